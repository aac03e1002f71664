// The level of each line a spawned server writes to stderr, for the output channel.
// vscode-languageclient marks every stderr line `[error]`; starcoder-lsp sends its own log
// as window/logMessage (with levels), so stderr holds what other code printed: JAX's and
// XLA's lines, Python warnings, a traceback if the server crashes. No `vscode` import: the
// Node tests call it directly.

export type Level = 'debug' | 'info' | 'warn' | 'error';

const PYTHON_LEVELS: Record<string, Level> = {
  DEBUG: 'debug',
  INFO: 'info',
  WARNING: 'warn',
  ERROR: 'error',
  CRITICAL: 'error',
};

const GLOG_LEVELS: Record<string, Level> = { I: 'info', W: 'warn', E: 'error', F: 'error' };

// Python's logging as `serve` formats it: "2026-12-02 04:19:03,123 INFO name: message".
const PYTHON_RECORD = /^\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d[,.]\d+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) /;
// absl/glog, as XLA logs: "W1202 04:19:03.123456  1234 file.cc:56] message".
const GLOG_RECORD = /^([IWEF])\d{4} \d\d:\d\d:\d\d\.\d+ /;
// Python's warnings module: "/path/file.py:12: UserWarning: message".
const PYTHON_WARNING = /^\S.*:\d+: [A-Za-z]*Warning: /;
// A traceback, or the command line's own "error: ..." before it exits.
const ERROR_START = /^(Traceback \(most recent call last\):|error: |Fatal Python error)/;
// absl's "WARNING: All log messages before absl::InitializeLog() ..." and the like.
const WORD_LEVEL = /^(DEBUG|INFO|WARNING|ERROR|CRITICAL):/;

/**
 * The level of `line`: the one it states where it starts a record, else the level of the
 * record it continues (`previous`: a traceback's lines, a message over several lines).
 */
export function stderrLevel(line: string, previous: Level): Level {
  let match = PYTHON_RECORD.exec(line);
  if (match) {
    return PYTHON_LEVELS[match[1]];
  }
  match = GLOG_RECORD.exec(line);
  if (match) {
    return GLOG_LEVELS[match[1]];
  }
  if (PYTHON_WARNING.test(line)) {
    return 'warn';
  }
  if (ERROR_START.test(line)) {
    return 'error';
  }
  match = WORD_LEVEL.exec(line);
  if (match) {
    return PYTHON_LEVELS[match[1]];
  }
  return previous;
}

/** Something that logs at each level, as a LogOutputChannel does. */
export type Logger = Record<Level, (message: string) => void>;

/** A line handler that logs each line at its level; lines before any record are info. */
export function stderrLogger(logger: Logger): (line: string) => void {
  let level: Level = 'info';
  return (line: string): void => {
    level = stderrLevel(line, level);
    logger[level](line);
  };
}
