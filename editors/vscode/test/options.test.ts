// The settings, without a server: every `starcoder.*` property of package.json is read, and
// the server's settings are sent under their wire names, null ones left out.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import {
  CONNECTION_KEYS,
  DEFAULT_SETTINGS,
  PROPERTIES,
  SERVER_KEYS,
  initializationOptions,
  readSettings,
  serverSettings,
} from '../src/options';

/** A WorkspaceConfiguration.get over `given`, which records the keys asked for. */
function configuration(given: Record<string, unknown>): {
  asked: string[];
  get: <T>(key: string, defaultValue: T) => T;
} {
  const asked: string[] = [];
  const get = <T>(key: string, defaultValue: T): T => {
    asked.push(key);
    return (key in given ? given[key] : defaultValue) as T;
  };
  return { asked, get };
}

test('every property of package.json is read, and no other', () => {
  const { asked, get } = configuration({});
  readSettings(get);
  const properties = Object.keys(PROPERTIES).map((key) => key.replace(/^starcoder\./, ''));
  assert.deepEqual([...asked].sort(), [...properties].sort());
});

test('the server settings are the properties besides the connection ones', () => {
  assert.deepEqual(SERVER_KEYS, [
    'enabled',
    'maxNewTokens',
    'temperature',
    'topP',
    'fimMode',
    'multiline',
    'minChars',
    'prefixTokens',
    'suffixTokens',
    'filename',
    'crossFileContext',
    'crossFileTokens',
    'crossFileSources',
  ]);
  assert.ok(SERVER_KEYS.every((key) => !CONNECTION_KEYS.includes(key.split('.')[0])));
});

test("the defaults come from package.json; null ones (fimMode: the model's own) are not sent", () => {
  assert.equal(DEFAULT_SETTINGS.serverCommand, 'starcoder-lsp');
  assert.deepEqual(DEFAULT_SETTINGS.remote, { host: '', port: 2087, token: '', tls: false, tlsCaFile: '' });
  assert.deepEqual(serverSettings(DEFAULT_SETTINGS), {
    enabled: true,
    maxNewTokens: 64,
    temperature: 0,
    topP: 1,
    multiline: 'auto',
    minChars: 1,
    filename: false,
    crossFileContext: true,
    crossFileSources: 'open,edited,pushed',
  });
});

test('settings the user changed are sent, filename and the token too', () => {
  const { get } = configuration({
    enabled: false,
    filename: true,
    prefixTokens: 100,
    model: '/models/tiny',
    'remote.token': 'secret',
  });
  const settings = readSettings(get);
  assert.equal(settings.model, '/models/tiny');
  assert.deepEqual(initializationOptions(settings, {}), {
    enabled: false,
    maxNewTokens: 64,
    temperature: 0,
    topP: 1,
    multiline: 'auto',
    minChars: 1,
    prefixTokens: 100,
    filename: true,
    crossFileContext: true,
    crossFileSources: 'open,edited,pushed',
    token: 'secret',
  });
});
