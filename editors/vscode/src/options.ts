// What the extension sends and spawns, from its settings. No `vscode` import here: the Node
// tests build the same messages from the same functions.

import * as fs from 'node:fs';
import * as path from 'node:path';

/** One `starcoder.*` entry of package.json's `contributes.configuration.properties`. */
export interface SettingSchema {
  type: string | string[];
  default: unknown;
  enum?: string[];
  description: string;
}

/**
 * package.json's `contributes.configuration.properties`: the one list of the extension's
 * settings, read at run time. Compiled, this file is out/src/options.js, two folders below
 * package.json.
 */
export const PROPERTIES: Record<string, SettingSchema> = JSON.parse(
  fs.readFileSync(path.join(__dirname, '..', '..', 'package.json'), 'utf8'),
).contributes.configuration.properties;

/** The extension's own settings, whose change needs a new connection. */
export const CONNECTION_KEYS = ['serverCommand', 'serverArgs', 'model', 'logLevel', 'remote'];

/**
 * Every other `starcoder.<key>` is one of the server's settings, under the server's own
 * (wire) name; tests/test_settings_parity.py checks them against the server's schema.
 */
export const SERVER_KEYS = Object.keys(PROPERTIES)
  .map((key) => key.replace(/^starcoder\./, ''))
  .filter((key) => !CONNECTION_KEYS.includes(key.split('.')[0]));

export type SettingValue = boolean | number | string;

/** The server's settings by wire name; null: not sent (the server's default). */
export type ServerSettings = Record<string, SettingValue | null>;

/** The `starcoder.*` settings. */
export interface Settings {
  serverCommand: string;
  serverArgs: string[];
  model: string;
  logLevel: string;
  remote: RemoteSettings;
  server: ServerSettings;
}

export interface RemoteSettings {
  host: string;
  port: number;
  token: string;
  tls: boolean;
  tlsCaFile: string;
}

function defaultOf<T>(key: string): T {
  return PROPERTIES[`starcoder.${key}`].default as T;
}

export const DEFAULT_SETTINGS: Settings = {
  serverCommand: defaultOf('serverCommand'),
  serverArgs: defaultOf('serverArgs'),
  model: defaultOf('model'),
  logLevel: defaultOf('logLevel'),
  remote: {
    host: defaultOf('remote.host'),
    port: defaultOf('remote.port'),
    token: defaultOf('remote.token'),
    tls: defaultOf('remote.tls'),
    tlsCaFile: defaultOf('remote.tlsCaFile'),
  },
  server: Object.fromEntries(SERVER_KEYS.map((key) => [key, defaultOf<SettingValue | null>(key)])),
};

/** Reads the settings through a `get(key, default)` such as WorkspaceConfiguration.get. */
export function readSettings(get: <T>(key: string, defaultValue: T) => T): Settings {
  const d = DEFAULT_SETTINGS;
  return {
    serverCommand: get('serverCommand', d.serverCommand),
    serverArgs: get('serverArgs', d.serverArgs),
    model: get('model', d.model),
    logLevel: get('logLevel', d.logLevel),
    remote: {
      host: get('remote.host', d.remote.host),
      port: get('remote.port', d.remote.port),
      token: get('remote.token', d.remote.token),
      tls: get('remote.tls', d.remote.tls),
      tlsCaFile: get('remote.tlsCaFile', d.remote.tlsCaFile),
    },
    server: Object.fromEntries(SERVER_KEYS.map((key) => [key, get(key, d.server[key])])),
  };
}

/** Whether suggestions are on (`starcoder.enabled`). */
export function isEnabled(settings: Settings): boolean {
  return settings.server.enabled !== false;
}

/** The server's settings as sent (initializationOptions, configuration changes), null ones left out. */
export function serverSettings(settings: Settings): Record<string, SettingValue> {
  const result: Record<string, SettingValue> = {};
  for (const key of SERVER_KEYS) {
    const value = settings.server[key];
    if (value !== null && value !== undefined) {
      result[key] = value;
    }
  }
  return result;
}

/** The token a remote server asks for: the setting, else $STARCODER_LSP_TOKEN. */
export function token(settings: Settings, env: NodeJS.ProcessEnv = process.env): string | undefined {
  return settings.remote.token || env.STARCODER_LSP_TOKEN || undefined;
}

export type InitializationOptions = Record<string, SettingValue>;

export function initializationOptions(
  settings: Settings,
  env: NodeJS.ProcessEnv = process.env,
): InitializationOptions {
  const secret = token(settings, env);
  return secret === undefined ? serverSettings(settings) : { ...serverSettings(settings), token: secret };
}

/** How to spawn a local server: `<serverCommand> serve --stdio [--model M] ...`. */
export function serverCommand(settings: Settings): { command: string; args: string[] } {
  const args = ['serve', '--stdio', '--log-level', settings.logLevel];
  if (settings.model) {
    args.push('--model', settings.model);
  }
  return { command: settings.serverCommand, args: [...args, ...settings.serverArgs] };
}

/** Whether the extension connects to a running server instead of spawning one. */
export function isRemote(settings: Settings): boolean {
  return settings.remote.host.trim() !== '';
}

/** The `workspace/executeCommand` that writes a docstring at a position. */
export const GENERATE_DOCSTRING = 'starcoder.generateDocstring';
export const STATS_REQUEST = 'starcoder/stats';

/** Text offered to the server as cross-file context: `{ uri, text }`. */
export const CONTEXT_NOTIFICATION = 'starcoder/context';

/** What the server keeps of each text it is sent; more only costs the wire. */
export const MAX_CONTEXT_CHARS = 262_144;

/**
 * The `starcoder/context` params for a document the user visited, or undefined when there is
 * nothing to send: cross-file context is off, the document is not a file (an output channel,
 * a diff), or it is blank. The server never reads the disk (it may be remote): a file the user
 * visited and closed is known to it from this message only.
 */
export function contextParams(
  settings: Settings,
  uri: string,
  text: string,
): { uri: string; text: string } | undefined {
  if (settings.server.crossFileContext === false || !uri.startsWith('file:') || !/\S/.test(text)) {
    return undefined;
  }
  return { uri, text: text.slice(0, MAX_CONTEXT_CHARS) };
}

/** The reply of `starcoder/stats`. */
export interface Stats {
  ready: boolean;
  loading: string;
  error: string | null;
  model: string;
  requests: number;
  shown: number;
  accepted: number;
  typedThrough: number;
  empty: number;
  cacheHits: number;
  cacheRequests: number;
  contextTokens: number;
  contextRequests: number;
  lastContext: string[];
  latencyMs: { p50?: number; p90?: number; p99?: number };
}

/** The reply of `starcoder.generateDocstring`. */
export interface DocstringResult {
  applied: boolean;
  docstring: string;
  reason?: string;
}
