// What the extension sends and spawns, from its settings. No `vscode` import here: the Node
// tests build the same messages from the same functions.

/** The `starcoder.*` settings (package.json `contributes.configuration`). */
export interface Settings {
  enable: boolean;
  serverCommand: string;
  serverArgs: string[];
  model: string;
  logLevel: string;
  remote: RemoteSettings;
  maxNewTokens: number;
  temperature: number;
  topP: number;
  fimMode: 'spm' | 'psm';
  multiline: 'auto' | 'always' | 'never';
  minChars: number;
  prefixTokens: number | null;
  suffixTokens: number | null;
}

export interface RemoteSettings {
  host: string;
  port: number;
  token: string;
  tls: boolean;
  tlsCaFile: string;
}

export const DEFAULT_SETTINGS: Settings = {
  enable: true,
  serverCommand: 'starcoder-lsp',
  serverArgs: [],
  model: '',
  logLevel: 'INFO',
  remote: { host: '', port: 2087, token: '', tls: false, tlsCaFile: '' },
  maxNewTokens: 64,
  temperature: 0,
  topP: 1,
  fimMode: 'spm',
  multiline: 'auto',
  minChars: 1,
  prefixTokens: null,
  suffixTokens: null,
};

/** Reads the settings through a `get(key, default)` such as WorkspaceConfiguration.get. */
export function readSettings(get: <T>(key: string, defaultValue: T) => T): Settings {
  const d = DEFAULT_SETTINGS;
  return {
    enable: get('enable', d.enable),
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
    maxNewTokens: get('maxNewTokens', d.maxNewTokens),
    temperature: get('temperature', d.temperature),
    topP: get('topP', d.topP),
    fimMode: get('fimMode', d.fimMode),
    multiline: get('multiline', d.multiline),
    minChars: get('minChars', d.minChars),
    prefixTokens: get('prefixTokens', d.prefixTokens),
    suffixTokens: get('suffixTokens', d.suffixTokens),
  };
}

/** The server's own settings: sent as initializationOptions and on configuration changes. */
export interface ServerSettings {
  enabled: boolean;
  maxNewTokens: number;
  temperature: number;
  topP: number;
  fimMode: string;
  multiline: string;
  minChars: number;
  prefixTokens?: number;
  suffixTokens?: number;
}

export function serverSettings(settings: Settings): ServerSettings {
  const result: ServerSettings = {
    enabled: settings.enable,
    maxNewTokens: settings.maxNewTokens,
    temperature: settings.temperature,
    topP: settings.topP,
    fimMode: settings.fimMode,
    multiline: settings.multiline,
    minChars: settings.minChars,
  };
  if (settings.prefixTokens !== null) {
    result.prefixTokens = settings.prefixTokens;
  }
  if (settings.suffixTokens !== null) {
    result.suffixTokens = settings.suffixTokens;
  }
  return result;
}

/** The token a remote server asks for: the setting, else $STARCODER_LSP_TOKEN. */
export function token(settings: Settings, env: NodeJS.ProcessEnv = process.env): string | undefined {
  return settings.remote.token || env.STARCODER_LSP_TOKEN || undefined;
}

export interface InitializationOptions extends ServerSettings {
  token?: string;
}

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

/** The settings whose change needs a new connection (the rest is sent to the server). */
export const CONNECTION_KEYS = ['serverCommand', 'serverArgs', 'model', 'logLevel', 'remote'];

/** The `workspace/executeCommand` that writes a docstring at a position. */
export const GENERATE_DOCSTRING = 'starcoder.generateDocstring';
export const STATS_REQUEST = 'starcoder/stats';

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
  latencyMs: { p50?: number; p90?: number; p99?: number };
}

/** The reply of `starcoder.generateDocstring`. */
export interface DocstringResult {
  applied: boolean;
  docstring: string;
  reason?: string;
}
