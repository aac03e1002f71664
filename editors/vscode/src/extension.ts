// StarCoder for VS Code: a client of starcoder-lsp. vscode-languageclient (>= 10) shows the
// server's inline completions and runs the command each accepted item carries; this file
// starts the client (spawned or remote), keeps the server's settings in sync, and adds the
// docstring command and the status-bar item.
import * as readline from 'node:readline';
import * as vscode from 'vscode';
import {
  DidChangeConfigurationNotification,
  ExecuteCommandRequest,
  LanguageClient,
  State,
  type LanguageClientOptions,
  type ServerOptions,
  type StreamInfo,
} from 'vscode-languageclient/node';

import { connect } from './connection';
import {
  CONNECTION_KEYS,
  CONTEXT_NOTIFICATION,
  GENERATE_DOCSTRING,
  STATS_REQUEST,
  initializationOptions,
  isEnabled,
  contextParams,
  isRemote,
  readSettings,
  serverCommand,
  serverSettings,
  type DocstringResult,
  type Settings,
  type Stats,
} from './options';
import { stderrLogger } from './serverLog';
import { StatusItem, describeStats } from './status';

let client: LanguageClient | undefined;
let status: StatusItem;
let output: vscode.LogOutputChannel;

function settings(): Settings {
  const configuration = vscode.workspace.getConfiguration('starcoder');
  return readSettings((key, defaultValue) => configuration.get(key, defaultValue));
}

function serverOptions(s: Settings): ServerOptions {
  if (isRemote(s)) {
    return async (): Promise<StreamInfo> => {
      const socket = await connect(s.remote);
      return { reader: socket, writer: socket };
    };
  }
  return serverCommand(s);
}

function eachLine(input: NodeJS.ReadableStream, onLine: (line: string) => void): void {
  readline.createInterface({ input, crlfDelay: Infinity, terminal: false }).on('line', onLine);
}

function clientOptions(s: Settings): LanguageClientOptions {
  return {
    documentSelector: [{ scheme: 'file' }, { scheme: 'untitled' }],
    initializationOptions: initializationOptions(s),
    outputChannel: output,
    // The server's own log arrives as window/logMessage; stderr lines keep their level
    // rather than all showing as errors.
    stdioOptions: {
      stdout: (input, channel) => eachLine(input, (line) => channel.info(line)),
      stderr: (input, channel) => eachLine(input, stderrLogger(channel)),
    },
  };
}

function errorMessage(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

async function start(): Promise<void> {
  const s = settings();
  const where = isRemote(s) ? `${s.remote.host}:${s.remote.port}` : serverCommand(s).command;
  const started = new LanguageClient('starcoder', 'StarCoder', serverOptions(s), clientOptions(s));
  client = started;
  started.onDidChangeState((event) => {
    if (client !== started) {
      return;
    }
    if (event.newState === State.Running) {
      status.watch(started);
    } else if (event.newState === State.Stopped) {
      status.stop('stopped', `the connection to ${where} ended (StarCoder: Restart the server)`);
    }
  });
  status.setEnabled(isEnabled(s));
  status.show('starting', `starting ${where}`);
  try {
    await started.start();
  } catch (error) {
    const reason = errorMessage(error);
    status.stop('error', reason);
    const hint = isRemote(s)
      ? 'Check starcoder.remote.* (host, port, token, TLS).'
      : 'Set starcoder.serverCommand to the starcoder-lsp executable.';
    void vscode.window.showErrorMessage(`StarCoder: cannot start the server (${reason}). ${hint}`);
  }
}

async function stop(): Promise<void> {
  const stopping = client;
  client = undefined;
  if (stopping?.isRunning()) {
    await stopping.stop();
  }
}

async function restart(): Promise<void> {
  await stop();
  await start();
}

function runningClient(): LanguageClient | undefined {
  if (client?.isRunning()) {
    return client;
  }
  void vscode.window.showWarningMessage('StarCoder: the server is not running.');
  return undefined;
}

async function generateDocstringAtCursor(): Promise<void> {
  const editor = vscode.window.activeTextEditor;
  const running = runningClient();
  if (!editor || !running) {
    return;
  }
  const params = {
    command: GENERATE_DOCSTRING,
    arguments: [
      running.code2ProtocolConverter.asUri(editor.document.uri),
      running.code2ProtocolConverter.asPosition(editor.selection.active),
    ],
  };
  try {
    const result = (await vscode.window.withProgress(
      {
        location: vscode.ProgressLocation.Notification,
        title: 'StarCoder: writing a docstring…',
        cancellable: true,
      },
      (_progress, token) => running.sendRequest(ExecuteCommandRequest.type, params, token),
    )) as DocstringResult | null;
    if (!result?.applied) {
      void vscode.window.showWarningMessage(`StarCoder: no docstring (${result?.reason ?? 'no answer'}).`);
    }
  } catch (error) {
    void vscode.window.showErrorMessage(`StarCoder: ${errorMessage(error)}`);
  }
}

async function showStats(): Promise<void> {
  const running = runningClient();
  if (!running) {
    return;
  }
  const stats = await running.sendRequest<Stats>(STATS_REQUEST, {});
  const state = stats.error ? `error: ${stats.error}` : stats.ready ? 'ready' : stats.loading;
  // A notification shows one line; a dialog's detail keeps the line breaks.
  void vscode.window.showInformationMessage(`StarCoder: ${state}`, {
    modal: true,
    detail: describeStats(stats),
  });
}

async function toggle(): Promise<void> {
  const configuration = vscode.workspace.getConfiguration('starcoder');
  await configuration.update('enabled', !isEnabled(settings()), vscode.ConfigurationTarget.Global);
}

/** Sends the document the user visits (or saves) to the server as cross-file context. */
async function visited(document: vscode.TextDocument | undefined): Promise<void> {
  const running = client?.isRunning() ? client : undefined;
  if (!document || !running) {
    return;
  }
  const uri = running.code2ProtocolConverter.asUri(document.uri);
  const params = contextParams(settings(), uri, document.getText());
  if (params) {
    await running.sendNotification(CONTEXT_NOTIFICATION, params);
  }
}

async function onConfigurationChanged(event: vscode.ConfigurationChangeEvent): Promise<void> {
  if (!event.affectsConfiguration('starcoder')) {
    return;
  }
  if (CONNECTION_KEYS.some((key) => event.affectsConfiguration(`starcoder.${key}`))) {
    await restart();
    return;
  }
  const s = settings();
  status.setEnabled(isEnabled(s));
  if (client?.isRunning()) {
    await client.sendNotification(DidChangeConfigurationNotification.type, {
      settings: { starcoder: serverSettings(s) },
    });
  }
}

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  output = vscode.window.createOutputChannel('StarCoder', { log: true });
  status = new StatusItem('starcoder.showStats');
  context.subscriptions.push(
    output,
    status,
    vscode.commands.registerCommand('starcoder.generateDocstringAtCursor', generateDocstringAtCursor),
    vscode.commands.registerCommand('starcoder.showStats', showStats),
    vscode.commands.registerCommand('starcoder.toggle', toggle),
    vscode.commands.registerCommand('starcoder.restartServer', restart),
    vscode.workspace.onDidChangeConfiguration(onConfigurationChanged),
    vscode.window.onDidChangeActiveTextEditor((editor) => visited(editor?.document)),
    vscode.workspace.onDidSaveTextDocument((document) => visited(document)),
  );
  await start();
  await visited(vscode.window.activeTextEditor?.document);
}

export async function deactivate(): Promise<void> {
  await stop();
}
