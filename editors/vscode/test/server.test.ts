// The extension's messages against a real starcoder-lsp: spawned with the command line the
// extension builds (options.ts), initialized with the same initializationOptions, over the
// same JSON-RPC library family as vscode-languageclient; and over TLS with a token through
// the extension's own connect().
//
// Environment: STARCODER_LSP_TEST_SERVER, the starcoder-lsp executable (default: on PATH);
// STARCODER_LSP_TEST_MODEL, a checkpoint directory (default: a test-tiny random checkpoint
// written with `starcoder-lsp make-random-model`).
import assert from 'node:assert/strict';
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, before, describe, test } from 'node:test';

import {
  ApplyWorkspaceEditRequest,
  createProtocolConnection,
  DidOpenTextDocumentNotification,
  ExecuteCommandRequest,
  InitializedNotification,
  InitializeRequest,
  InlineCompletionRequest,
  InlineCompletionTriggerKind,
  StreamMessageReader,
  StreamMessageWriter,
  WorkDoneProgressCreateRequest,
  type ApplyWorkspaceEditParams,
  type ClientCapabilities,
  type InitializeResult,
  type InlineCompletionItem,
  type InlineCompletionList,
  type Position,
  type ProtocolConnection,
  type TextEdit,
} from 'vscode-languageserver-protocol/node';

import { connect } from '../src/connection';

interface ProgressParams {
  token: string | number;
  value: unknown;
}
import {
  CONTEXT_NOTIFICATION,
  DEFAULT_SETTINGS,
  GENERATE_DOCSTRING,
  STATS_REQUEST,
  contextParams,
  initializationOptions,
  serverCommand,
  type DocstringResult,
  type Settings,
  type Stats,
} from '../src/options';

const SERVER = process.env.STARCODER_LSP_TEST_SERVER || 'starcoder-lsp';
const TIMEOUT_MS = 120_000;

const PROGRAM = ['import os', '', '', 'def main(argv):', '    if argv:', '        ', ''].join('\n');
const DOCSTRING_PROGRAM = ['import os', '', '', 'def add(a, b):', '    return a + b', ''].join('\n');

// What vscode-languageclient 10 declares for the features this server uses.
const CAPABILITIES: ClientCapabilities = {
  general: { positionEncodings: ['utf-16'] },
  textDocument: {
    synchronization: { dynamicRegistration: true, didSave: true },
    inlineCompletion: { dynamicRegistration: true },
    codeAction: { dynamicRegistration: true },
  },
  workspace: {
    applyEdit: true,
    workspaceEdit: { documentChanges: true },
    executeCommand: { dynamicRegistration: true },
    configuration: true,
    didChangeConfiguration: { dynamicRegistration: true },
  },
  window: { workDoneProgress: true },
};

let madeModel: string | undefined;

function testModel(): string {
  const given = process.env.STARCODER_LSP_TEST_MODEL;
  if (given) {
    return given;
  }
  if (madeModel === undefined) {
    madeModel = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'starcoder-vscode-')), 'model');
    execFileSync(SERVER, ['make-random-model', madeModel, '--preset', 'test-tiny'], { stdio: 'inherit' });
  }
  return madeModel;
}

function settingsFor(model: string): Settings {
  return {
    ...DEFAULT_SETTINGS,
    serverCommand: SERVER,
    model,
    logLevel: 'WARNING',
    server: { ...DEFAULT_SETTINGS.server, multiline: 'always', maxNewTokens: 12 },
  };
}

function offsetAt(text: string, position: Position): number {
  const lines = text.split('\n');
  let offset = 0;
  for (let line = 0; line < position.line; line++) {
    offset += lines[line].length + 1;
  }
  return offset + position.character; // UTF-16 code units, as JavaScript strings count
}

function applyEdits(text: string, edits: TextEdit[]): string {
  const sorted = [...edits].sort((a, b) => offsetAt(text, b.range.start) - offsetAt(text, a.range.start));
  for (const edit of sorted) {
    text =
      text.slice(0, offsetAt(text, edit.range.start)) +
      edit.newText +
      text.slice(offsetAt(text, edit.range.end));
  }
  return text;
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** An LSP session as an editor holds it: answers the server's requests, keeps what it sent. */
class Session {
  readonly edits: ApplyWorkspaceEditParams[] = [];
  readonly progress: ProgressParams[] = [];
  readonly documents = new Map<string, string>();
  initializeResult: InitializeResult | undefined;

  constructor(
    readonly connection: ProtocolConnection,
    private readonly process?: ChildProcess,
  ) {
    connection.onRequest(WorkDoneProgressCreateRequest.type, () => undefined);
    connection.onRequest(ApplyWorkspaceEditRequest.type, (params) => {
      this.edits.push(params);
      for (const [uri, edits] of Object.entries(params.edit.changes ?? {})) {
        this.documents.set(uri, applyEdits(this.documents.get(uri) ?? '', edits));
      }
      return { applied: true };
    });
    connection.onRequest('workspace/configuration', () => []);
    connection.onRequest('client/registerCapability', () => null);
    connection.onNotification('$/progress', (params: ProgressParams) => {
      this.progress.push(params);
    });
    connection.listen();
  }

  static spawn(settings: Settings): Session {
    const { command, args } = serverCommand(settings);
    const child = spawn(command, args, { stdio: ['pipe', 'pipe', 'inherit'] });
    const connection = createProtocolConnection(
      new StreamMessageReader(child.stdout),
      new StreamMessageWriter(child.stdin),
    );
    return new Session(connection, child);
  }

  async initialize(options: object): Promise<InitializeResult> {
    this.initializeResult = await this.connection.sendRequest(InitializeRequest.type, {
      processId: process.pid,
      rootUri: null,
      capabilities: CAPABILITIES,
      initializationOptions: options,
    });
    await this.connection.sendNotification(InitializedNotification.type, {});
    return this.initializeResult;
  }

  stats(): Promise<Stats> {
    return this.connection.sendRequest<Stats>(STATS_REQUEST, {});
  }

  async waitUntilReady(): Promise<Stats> {
    const deadline = Date.now() + TIMEOUT_MS;
    while (Date.now() < deadline) {
      const stats = await this.stats();
      assert.equal(stats.error, null, `the model failed to load: ${stats.error}`);
      if (stats.ready) {
        return stats;
      }
      await sleep(200);
    }
    throw new Error('the model did not load in time');
  }

  async open(uri: string, text: string): Promise<void> {
    this.documents.set(uri, text);
    await this.connection.sendNotification(DidOpenTextDocumentNotification.type, {
      textDocument: { uri, languageId: 'python', version: 1, text },
    });
  }

  async complete(uri: string, position: Position): Promise<InlineCompletionItem[]> {
    const result = (await this.connection.sendRequest(InlineCompletionRequest.type, {
      textDocument: { uri },
      position,
      context: { triggerKind: InlineCompletionTriggerKind.Invoked },
    })) as InlineCompletionList | InlineCompletionItem[] | null;
    return Array.isArray(result) ? result : (result?.items ?? []);
  }

  executeCommand<R>(command: string, args: unknown[]): Promise<R> {
    return this.connection.sendRequest(ExecuteCommandRequest.type, {
      command,
      arguments: args,
    }) as Promise<R>;
  }

  async close(): Promise<void> {
    try {
      await this.connection.sendRequest('shutdown');
      await this.connection.sendNotification('exit');
    } finally {
      this.connection.dispose();
      this.process?.kill();
    }
  }
}

describe('starcoder-lsp spawned as the extension spawns it', { timeout: TIMEOUT_MS * 2 }, () => {
  let session: Session;
  let settings: Settings;

  before(
    async () => {
      settings = settingsFor(testModel());
      session = Session.spawn(settings);
      const result = await session.initialize(initializationOptions(settings, {}));
      // VS Code's client registers inline completions and the server's commands from these.
      assert.ok(result.capabilities.inlineCompletionProvider);
      const commands = result.capabilities.executeCommandProvider?.commands ?? [];
      assert.ok(commands.includes(GENERATE_DOCSTRING), `commands: ${commands.join(', ')}`);
      assert.ok(commands.includes('starcoder.accepted'), `commands: ${commands.join(', ')}`);
      await session.waitUntilReady();
    },
    { timeout: TIMEOUT_MS },
  );

  after(async () => {
    await session?.close();
  });

  test('reports loading progress while the model loads', async () => {
    const kinds = (): string[] => session.progress.map((p) => (p.value as { kind: string }).kind);
    const deadline = Date.now() + 5000;
    while (!kinds().includes('end') && Date.now() < deadline) {
      await sleep(100);
    }
    assert.deepEqual([kinds()[0], kinds().at(-1)], ['begin', 'end']);
    assert.equal((session.progress[0].value as { title: string }).title, 'starcoder-lsp');
  });

  test('an inline completion, applied as VS Code applies it, and its acceptance counted', async () => {
    const uri = 'file:///workspace/typing.py';
    let text = PROGRAM;
    await session.open(uri, text);
    const line = 5;
    let position: Position = { line, character: 8 };
    let items: InlineCompletionItem[] = [];
    for (const typed of 'rxyzq') {
      // Typing one more character, as a user does, until the model has something to say.
      text = applyEdits(text, [{ range: { start: position, end: position }, newText: typed }]);
      position = { line, character: position.character + 1 };
      await session.connection.sendNotification('textDocument/didChange', {
        textDocument: { uri, version: position.character },
        contentChanges: [{ text }],
      });
      items = await session.complete(uri, position);
      if (items.length > 0) {
        break;
      }
    }
    assert.ok(items.length > 0, 'no suggestion at any position');
    const item = items[0];
    assert.equal(typeof item.insertText, 'string');
    const insertText = item.insertText as string;
    assert.ok(insertText.length > 0);
    assert.ok(item.range, 'the item has a range');
    assert.deepEqual(item.range.start, position);
    const accepted = applyEdits(text, [{ range: item.range, newText: insertText }]);
    const at = offsetAt(text, position);
    assert.equal(accepted, text.slice(0, at) + insertText + text.slice(offsetAt(text, item.range.end)));

    assert.equal(item.command?.command, 'starcoder.accepted');
    const before = (await session.stats()).accepted;
    await session.executeCommand(item.command.command, item.command.arguments ?? []);
    assert.equal((await session.stats()).accepted, before + 1);
  });

  test('the docstring command edits the document through workspace/applyEdit', async () => {
    const uri = 'file:///workspace/doc.py';
    await session.open(uri, DOCSTRING_PROGRAM);
    const result = await session.executeCommand<DocstringResult>(GENERATE_DOCSTRING, [
      uri,
      { line: 3, character: 4 },
    ]);
    assert.equal(result.applied, true, JSON.stringify(result));
    assert.ok(result.docstring.includes('"""'), result.docstring);
    assert.equal(session.edits.length, 1);
    const lines = DOCSTRING_PROGRAM.split('\n');
    const expected = [
      ...lines.slice(0, 4),
      ...result.docstring.replace(/\n$/, '').split('\n'),
      ...lines.slice(4),
    ];
    assert.equal(session.documents.get(uri), expected.join('\n'));
  });

  test('a visited file reaches the server as cross-file context, and only when it is on', async () => {
    const shapes = [
      'class Rectangle:',
      '    def __init__(self, width, height):',
      '        self.width = width',
      '',
    ];
    const visited = contextParams(settings, 'file:///workspace/geometry.py', shapes.join('\n'));
    assert.ok(visited);
    const off = { ...settings, server: { ...settings.server, crossFileContext: false } };
    assert.equal(contextParams(off, 'file:///workspace/geometry.py', shapes.join('\n')), undefined);
    assert.equal(contextParams(settings, 'output:extension-output', 'x = 1'), undefined);
    // As the extension sends it when the user visits geometry.py; the file is not open.
    await session.connection.sendNotification(CONTEXT_NOTIFICATION, visited);
    const uri = 'file:///workspace/uses.py';
    const text = 'from geometry import Rectangle\n\nbox = Rectangle(width=3, height=4)\nprint(box.';
    await session.open(uri, text);
    await session.complete(uri, { line: 3, character: 'print(box.'.length });
    const stats = await session.stats();
    assert.deepEqual(stats.lastContext, ['geometry.py:1']);
    assert.ok(stats.contextTokens > 0);
  });
});

describe(
  'a remote server over TLS with a token, reached with the extension connect()',
  { timeout: TIMEOUT_MS * 2 },
  () => {
    let server: ChildProcess;
    let port: number;
    let directory: string;
    const secret = 'test-token-123';

    before(
      async () => {
        directory = fs.mkdtempSync(path.join(os.tmpdir(), 'starcoder-tls-'));
        const cert = path.join(directory, 'cert.pem');
        const key = path.join(directory, 'key.pem');
        // prettier-ignore
        const certificate = [
      'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '1', '-subj', '/CN=localhost',
      '-addext', 'subjectAltName=DNS:localhost', '-keyout', key, '-out', cert,
    ];
        execFileSync('openssl', certificate, { stdio: 'ignore' });
        // prettier-ignore
        const serve = [
      'serve', '--tcp', '--port', '0', '--tls-cert', cert, '--tls-key', key,
      '--model', testModel(), '--log-level', 'WARNING',
    ];
        // The token travels in the environment: on the command line every user would see it.
        const env = { ...process.env, STARCODER_LSP_TOKEN: secret };
        server = spawn(SERVER, serve, { stdio: ['ignore', 'pipe', 'inherit'], env });
        port = await new Promise<number>((resolve, reject) => {
          let seen = '';
          server.stdout?.on('data', (chunk: Buffer) => {
            seen += chunk.toString();
            const match = /listening on \S*:(\d+)/.exec(seen);
            if (match) {
              resolve(Number(match[1]));
            }
          });
          server.once('exit', (code) => reject(new Error(`the server exited (${code}): ${seen}`)));
        });
      },
      { timeout: TIMEOUT_MS },
    );

    after(() => {
      server?.kill();
    });

    async function remoteSession(token: string): Promise<Session> {
      const settings: Settings = {
        ...DEFAULT_SETTINGS,
        remote: { host: 'localhost', port, token, tls: true, tlsCaFile: path.join(directory, 'cert.pem') },
      };
      const socket = await connect(settings.remote);
      const session = new Session(
        createProtocolConnection(new StreamMessageReader(socket), new StreamMessageWriter(socket)),
      );
      await session.initialize(initializationOptions(settings, {}));
      return session;
    }

    test('the right token gets answers', async () => {
      const session = await remoteSession(secret);
      const stats = await session.waitUntilReady();
      assert.equal(stats.ready, true);
      await session.close();
    });

    test('a wrong token is refused', async () => {
      await assert.rejects(remoteSession('wrong'), /token/);
    });

    test('a certificate from another CA is refused', async () => {
      const remote = { host: 'localhost', port, token: secret, tls: true, tlsCaFile: '' };
      await assert.rejects(connect(remote), /cannot reach starcoder-lsp/);
    });
  },
);
