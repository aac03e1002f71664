// StarCoder for VS Code: a client of starcoder-lsp. vscode-languageclient (>= 10) shows the
// server's inline completions and runs the command each accepted item carries; this file
// starts the client (spawned or remote), keeps the server's settings in sync, and adds the
// docstring command and the status-bar item.
import * as readline from 'node:readline';
import * as vscode from 'vscode';
import {
  CloseAction,
  DidChangeConfigurationNotification,
  ErrorAction,
  ExecuteCommandRequest,
  InlineCompletionRequest,
  LanguageClient,
  State,
  type ErrorHandler,
  type Middleware,
  type LanguageClientOptions,
  type ServerOptions,
  type StreamInfo,
} from 'vscode-languageclient/node';

import { RETRY_MAX_MS, RemoteLink, type RetryEvent } from './connection';
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

/**
 * One started client and its remote connection. A remote server that goes away (a replica
 * behind a load balancer restarts or fails, the network drops) is connected to again, with
 * backoff, for as long as the client is not stopped: vscode-languageclient restarts the client
 * (our error handler says so, without its limit of a few restarts), which sends `initialize`
 * with the settings of now and opens the open documents again.
 */
interface Session {
  where: string;
  /** Set once the client is made: its middleware asks it whether it runs. */
  client?: LanguageClient;
  link?: RemoteLink;
  /** A connection that had been made ended: the next ones are reconnections. */
  reconnecting: boolean;
  /** The server refused `initialize` (a wrong token): trying again would not help. */
  refused: boolean;
  /** A message said the server cannot be reached: say when it can again. */
  warned: boolean;
  /** Stopped on purpose (a restart, new settings, VS Code closing): no more tries. */
  stopped: boolean;
}

/** This many failed tries in a row (about 3.5 s) are worth a message; fewer pass silently. */
const WARN_AFTER_TRIES = 3;

function settings(): Settings {
  const configuration = vscode.workspace.getConfiguration('starcoder');
  return readSettings((key, defaultValue) => configuration.get(key, defaultValue));
}

function onRetry(session: Session, event: RetryEvent): void {
  const next = `next try in ${Math.round(event.delayMs / 100) / 10} s`;
  const detail = `${event.reason}\n(try ${event.attempt}, ${next})`;
  if (session.reconnecting) {
    status.show('reconnecting', `reconnecting to ${session.where}: ${detail}`);
  } else {
    status.show('starting', `connecting to ${session.where}: ${detail}`);
  }
  if (event.attempt === WARN_AFTER_TRIES && !session.warned) {
    session.warned = true;
    const every = `trying again, at most every ${RETRY_MAX_MS / 1000} s`;
    void vscode.window.showWarningMessage(
      `StarCoder: cannot reach ${session.where} (${event.reason}); ${every}. ` +
        'Check starcoder.remote.* (host, port, token, TLS) if this lasts.',
    );
  }
}

function serverOptions(s: Settings, session: Session): ServerOptions {
  if (isRemote(s)) {
    // Called again at each restart of the client: a new link, whose first try waits when a
    // connection just dropped.
    return async (): Promise<StreamInfo> => {
      session.link?.dispose();
      const link = new RemoteLink(
        s.remote,
        { retry: (event) => onRetry(session, event) },
        session.reconnecting,
      );
      session.link = link;
      return { reader: link.reader, writer: link.writer };
    };
  }
  return serverCommand(s);
}

/** For a remote server: restart after every drop, for as long as the client is not stopped. */
function remoteErrorHandler(session: Session): ErrorHandler {
  return {
    // A write to a connection that has gone: its close, below, decides.
    error: () => ({ action: ErrorAction.Continue, handled: true }),
    closed: () => {
      if (session.refused || session.stopped) {
        return { action: CloseAction.DoNotRestart, handled: true };
      }
      session.reconnecting = true;
      const message = `the connection to ${session.where} ended; reconnecting`;
      status.stop('reconnecting', message);
      // handled: in the output channel only, not as a message (the status bar item says it).
      return { action: CloseAction.Restart, message: `StarCoder: ${message}`, handled: true };
    },
  };
}

function eachLine(input: NodeJS.ReadableStream, onLine: (line: string) => void): void {
  readline.createInterface({ input, crlfDelay: Infinity, terminal: false }).on('line', onLine);
}

/**
 * A document notification sent while the client (re)starts waits for the start, and fails with
 * it when that try fails (a reconnection's try that the balancer closed at once): the next start
 * opens every document again with its whole text, so nothing is lost, and the status bar item
 * already says what is going on. Into the output channel, rather than an error message.
 */
function quietWhileStarting<T>(what: string) {
  return async (data: T, next: (data: T) => Promise<void>): Promise<void> => {
    try {
      await next(data);
    } catch (error) {
      output.warn(`${what} not sent: ${errorMessage(error)}`);
    }
  };
}

/**
 * Inline completions while the client runs, and quietly none while it (re)starts. A request
 * made while it reconnects would wait for the connection and be stale when it came, and one
 * caught by a connection that drops fails with the restart ("Starting server failed"), which
 * vscode-languageclient shows as an error message: the status bar item already says what is
 * going on. Failures while the client runs (the server's errors) are handled as before.
 */
function completionsWhileRunning(session: Session): Middleware['provideInlineCompletionItems'] {
  return async (document, position, context, token) => {
    const running = session.client;
    if (!running || session.stopped || running.state !== State.Running) {
      return null;
    }
    const params = running.code2ProtocolConverter.asInlineCompletionParams(document, position, context);
    try {
      const result = await running.sendRequest(InlineCompletionRequest.type, params, token);
      return token.isCancellationRequested
        ? null
        : running.protocol2CodeConverter.asInlineCompletionResult(result, token);
    } catch (error) {
      if (running.state === State.Running && !session.stopped) {
        return running.handleFailedRequest(InlineCompletionRequest.type, token, error, null);
      }
      output.warn(`textDocument/inlineCompletion not answered: ${errorMessage(error)}`);
      return null;
    }
  };
}

function clientOptions(s: Settings, session: Session): LanguageClientOptions {
  const remote: Partial<LanguageClientOptions> = isRemote(s)
    ? {
        errorHandler: remoteErrorHandler(session),
        initializationFailedHandler: () => {
          session.refused = true;
          return false;
        },
      }
    : {};
  return {
    ...remote,
    documentSelector: [{ scheme: 'file' }, { scheme: 'untitled' }],
    middleware: {
      didOpen: quietWhileStarting('textDocument/didOpen'),
      didChange: quietWhileStarting('textDocument/didChange'),
      didSave: quietWhileStarting('textDocument/didSave'),
      didClose: quietWhileStarting('textDocument/didClose'),
      provideInlineCompletionItems: completionsWhileRunning(session),
    },
    // Read at every (re)start: a reconnection sends the settings of now, changes included.
    initializationOptions: () => initializationOptions(settings()),
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
  const where = isRemote(s) ? `${s.remote.host.trim()}:${s.remote.port}` : serverCommand(s).command;
  const session: Session = { where, reconnecting: false, refused: false, warned: false, stopped: false };
  const started = new LanguageClient(
    'starcoder',
    'StarCoder',
    serverOptions(s, session),
    clientOptions(s, session),
  );
  client = started;
  session.client = started;
  sessions.set(started, session);
  started.onDidChangeState((event) => {
    if (client !== started) {
      return;
    }
    if (event.newState === State.Running) {
      if (session.warned) {
        void vscode.window.showInformationMessage(`StarCoder: connected again to ${where}.`);
      }
      session.reconnecting = session.warned = false;
      status.watch(started);
    } else if (event.newState === State.Stopped && !session.reconnecting) {
      status.stop('stopped', `the connection to ${where} ended (StarCoder: Restart the server)`);
    } else if (event.newState === State.StartFailed && session.reconnecting) {
      // Reconnected, but refused (a new token?): vscode-languageclient said why.
      status.stop('error', `${where} refused the connection (see the output channel)`);
    }
  });
  status.setEnabled(isEnabled(s));
  status.show('starting', isRemote(s) ? `connecting to ${where}` : `starting ${where}`);
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

const sessions = new WeakMap<LanguageClient, Session>();

async function stop(): Promise<void> {
  const stopping = client;
  client = undefined;
  if (!stopping) {
    return;
  }
  const session = sessions.get(stopping);
  if (session) {
    session.stopped = true; // its connection closing no longer restarts it
  }
  if (stopping.isRunning()) {
    try {
      await stopping.stop(); // shutdown and exit, over the connection: keep it till then
    } catch (error) {
      // No answer to shutdown (the connection was going): the restart goes on all the same.
      output.warn(`stopping the server: ${errorMessage(error)}`);
    }
  }
  // No more tries. A client still waiting for its first answer is left waiting: it cannot be
  // stopped while it starts, and ending its streams would show an error for nothing.
  session?.link?.dispose();
}

async function restart(): Promise<void> {
  await stop();
  // Not awaited: a remote server may take a while to reach, and a command that waits for it
  // would hang the command palette meanwhile.
  void start();
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
  // Not awaited: VS Code holds the commands of an extension that is still activating, and a
  // remote server may take a while to reach. The file open at startup counts as visited.
  void start().then(() => visited(vscode.window.activeTextEditor?.document));
}

export async function deactivate(): Promise<void> {
  await stop();
}
