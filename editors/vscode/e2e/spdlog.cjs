// @vscode/spdlog in plain JavaScript, for the test's code-server only. The real module is
// native and `npm ci --ignore-scripts` does not compile it; without it VS Code writes no log
// file, and so shows nothing in any output channel (the extension's included). setup.sh puts
// this file in place of the module's index.js. Same API (index.d.ts), one file, no rotation.
'use strict';
const fs = require('node:fs');
const path = require('node:path');

const LEVELS = ['trace', 'debug', 'info', 'warning', 'error', 'critical', 'off'];
let globalLevel = 2;

function timestamp() {
  const now = new Date();
  const pad = (n, width = 2) => String(n).padStart(width, '0');
  return (
    `${now.getFullYear()}-${pad(now.getMonth() + 1)}-${pad(now.getDate())} ` +
    `${pad(now.getHours())}:${pad(now.getMinutes())}:${pad(now.getSeconds())}.` +
    pad(now.getMilliseconds(), 3)
  );
}

class Logger {
  constructor(loggerType, name, filename) {
    this.name = name;
    this.filename = filename;
    this.level = globalLevel;
    this.formatted = true; // "%Y-%m-%d %H:%M:%S.%e [%l] %v" until clearFormatters()
    fs.mkdirSync(path.dirname(filename), { recursive: true });
  }

  write(level, message) {
    if (level < this.level) {
      return;
    }
    const line = this.formatted ? `${timestamp()} [${LEVELS[level]}] ${message}` : message;
    fs.appendFileSync(this.filename, `${line}\n`);
  }

  trace(message) {
    this.write(0, message);
  }
  debug(message) {
    this.write(1, message);
  }
  info(message) {
    this.write(2, message);
  }
  warn(message) {
    this.write(3, message);
  }
  error(message) {
    this.write(4, message);
  }
  critical(message) {
    this.write(5, message);
  }
  getLevel() {
    return this.level;
  }
  setLevel(level) {
    this.level = level;
  }
  setPattern() {
    this.formatted = true;
  }
  clearFormatters() {
    this.formatted = false;
  }
  flush() {}
  drop() {}
}

async function createLogger(loggerType, name, filename, filesize, filecount) {
  return new Logger(loggerType, name, filename, filesize, filecount);
}

// One `exports.name =` each, so that `import('@vscode/spdlog')` finds every name.
exports.version = 11500;
exports.setLevel = (level) => {
  globalLevel = level;
};
exports.setFlushOn = () => {};
exports.Logger = Logger;
exports.createRotatingLogger = (...args) => createLogger('rotating', ...args);
exports.createAsyncRotatingLogger = (...args) => createLogger('rotating_async', ...args);
