// A connection to a remote `starcoder-lsp serve --tcp` (plain TCP or TLS), made again when it
// drops. No `vscode` import: the Node tests connect the same way.
import * as fs from 'node:fs';
import * as net from 'node:net';
import { PassThrough, Writable } from 'node:stream';
import * as tls from 'node:tls';

import type { RemoteSettings } from './options';

/** Opens the socket; resolves once it is connected (and the TLS handshake is done). */
export function connect(remote: RemoteSettings): Promise<net.Socket> {
  const host = remote.host.trim();
  const port = remote.port;
  return new Promise((resolve, reject) => {
    let socket: net.Socket;
    let ready: string;
    if (remote.tls) {
      const ca = remote.tlsCaFile ? [fs.readFileSync(remote.tlsCaFile)] : undefined;
      const servername = net.isIP(host) ? undefined : host;
      socket = tls.connect({ host, port, servername, ca });
      ready = 'secureConnect';
    } else {
      socket = net.connect({ host, port });
      ready = 'connect';
    }
    const fail = (error: Error): void => {
      socket.destroy();
      reject(new Error(`cannot reach starcoder-lsp at ${host}:${port}: ${error.message}`));
    };
    socket.once('error', fail);
    socket.once(ready, () => {
      socket.removeListener('error', fail);
      resolve(socket);
    });
  });
}

/** Tries at a remote server that fail in a row wait 0.5 s, 1 s, 2 s, ... and at most 30 s. */
export const RETRY_FIRST_MS = 500;
export const RETRY_MAX_MS = 30_000;

/** The wait before the `attempt`-th try in a row (1-based). */
export function retryDelay(attempt: number): number {
  return Math.min(RETRY_FIRST_MS * 2 ** (attempt - 1), RETRY_MAX_MS);
}

/** A try that failed: which one in a row, why, and how long until the next. */
export interface RetryEvent {
  attempt: number;
  reason: string;
  delayMs: number;
}

export interface LinkEvents {
  /** A try failed; the next comes after `delayMs`. */
  retry(event: RetryEvent): void;
  /** The server said something: the connection is made. */
  connected?(): void;
}

/**
 * The streams vscode-languageclient reads and writes for a remote server, over connections
 * made (and made again) underneath them, so that a server that is not there yet costs retries
 * rather than an error.
 *
 * Until the server has said something, a connection that cannot be made, or that closes (a load
 * balancer accepts a connection and closes it when no replica is up), is tried again after the
 * backoff delay, and what the client wrote meanwhile (its `initialize`) is sent again on the new
 * one: vscode-languageclient only sees an `initialize` that takes a while, where a connection
 * closed under it would be an error message and a client that gives up. Once the server has
 * answered, its connection closing ends the reader: the client's close handler then restarts
 * it, with a new link (`reconnecting`: its first try waits too, after a connection that just
 * dropped).
 */
export class RemoteLink {
  /** What the client reads: the server's bytes. */
  readonly reader = new PassThrough();
  /** What the client writes: to the server, once connected (kept until it answers). */
  readonly writer: Writable;
  private socket: net.Socket | undefined;
  private unanswered: Buffer[] = [];
  private answered = false;
  private disposed = false;
  private attempt = 0;
  private timer: NodeJS.Timeout | undefined;

  constructor(
    private readonly remote: RemoteSettings,
    private readonly events: LinkEvents,
    private readonly reconnecting = false,
  ) {
    this.writer = new Writable({
      write: (chunk: Buffer, _encoding, done) => {
        if (!this.answered) {
          this.unanswered.push(chunk);
        }
        this.socket?.write(chunk);
        done();
      },
      final: (done) => {
        this.socket?.end();
        done();
      },
    });
    this.schedule(reconnecting ? retryDelay(1) : 0);
  }

  /** Stops trying. The reader is left open: its end would be one more error to the client. */
  dispose(): void {
    this.disposed = true;
    clearTimeout(this.timer);
    this.socket?.destroy();
  }

  private schedule(ms: number): void {
    this.timer = setTimeout(() => void this.open(), ms);
  }

  private async open(): Promise<void> {
    let socket: net.Socket;
    try {
      socket = await connect(this.remote);
    } catch (error) {
      this.failed(error instanceof Error ? error.message : String(error));
      return;
    }
    if (this.disposed) {
      socket.destroy();
      return;
    }
    this.socket = socket;
    for (const chunk of this.unanswered) {
      socket.write(chunk);
    }
    socket.on('data', (data: Buffer) => {
      if (!this.answered) {
        this.answered = true;
        this.unanswered = [];
        this.events.connected?.();
      }
      this.reader.write(data);
    });
    socket.on('error', () => {
      // 'close' follows, and says what to do.
    });
    socket.on('close', () => {
      this.socket = undefined;
      if (this.disposed) {
        return;
      }
      if (this.answered) {
        this.disposed = true;
        this.reader.end();
        return;
      }
      const { host, port } = this.remote;
      this.failed(`${host.trim()}:${port} closed the connection before the server answered`);
    });
  }

  private failed(reason: string): void {
    if (this.disposed) {
      return;
    }
    this.attempt += 1;
    const delayMs = retryDelay(this.attempt + (this.reconnecting ? 1 : 0));
    this.events.retry({ attempt: this.attempt, reason, delayMs });
    this.schedule(delayMs);
  }
}
