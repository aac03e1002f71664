// The remote link (src/connection.ts) against plain TCP servers that play a load balancer:
// refusing, accepting and closing at once (no replica up), then a server that answers. The
// whole extension reconnecting through HAProxy, in a real VS Code: tests/test_replicas.py.
import assert from 'node:assert/strict';
import * as net from 'node:net';
import { afterEach, describe, test } from 'node:test';

import {
  RETRY_FIRST_MS,
  RETRY_MAX_MS,
  RemoteLink,
  retryDelay,
  type LinkEvents,
  type RetryEvent,
} from '../src/connection';
import { DEFAULT_SETTINGS } from '../src/options';

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** A port that nothing listens on (yet). */
async function freePort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as net.AddressInfo;
  await new Promise((resolve) => server.close(resolve));
  return port;
}

// What a test opened, closed after it whether it passed or not (an open server or timer would
// keep the test process from ending).
const cleanups: (() => Promise<unknown> | void)[] = [];

afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) {
    await cleanup();
  }
});

function listen(port: number, onConnection: (socket: net.Socket) => void): Promise<net.Server> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    onConnection(socket);
  });
  cleanups.push(() => {
    sockets.forEach((socket) => socket.destroy());
    return new Promise((resolve) => server.close(resolve));
  });
  return new Promise((resolve) => server.listen(port, '127.0.0.1', () => resolve(server)));
}

function openLink(port: number, events: LinkEvents, reconnecting = false): RemoteLink {
  const made = new RemoteLink(remote(port), events, reconnecting);
  cleanups.push(() => made.dispose());
  return made;
}

async function waitFor<T>(what: string, check: () => T | undefined, timeoutMs = 10_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = check();
    if (value) {
      return value;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out waiting for ${what}`);
    }
    await sleep(20);
  }
}

function remote(port: number) {
  return { ...DEFAULT_SETTINGS.remote, host: '127.0.0.1', port };
}

describe('a remote link', () => {
  test('waits 0.5 s, doubling, at most 30 s between tries', () => {
    assert.deepEqual([1, 2, 3, 4].map(retryDelay), [500, 1000, 2000, 4000]);
    assert.equal(retryDelay(6), 16_000);
    assert.equal(retryDelay(7), RETRY_MAX_MS);
    assert.equal(retryDelay(60), RETRY_MAX_MS);
  });

  test('retries until the server answers, sending again what the client wrote', async () => {
    const port = await freePort();
    const retries: RetryEvent[] = [];
    let connected = 0;
    const link = openLink(port, {
      retry: (event) => retries.push(event),
      connected: () => (connected += 1),
    });
    const read: Buffer[] = [];
    let readerClosed = false;
    link.reader.on('data', (data: Buffer) => read.push(data));
    link.reader.on('close', () => (readerClosed = true));
    link.writer.write('initialize'); // before any connection: kept

    // Refused: nothing listens yet.
    await waitFor('a refused try', () => retries.length === 1);
    assert.match(retries[0].reason, /ECONNREFUSED/);
    assert.equal(retries[0].delayMs, 500);

    // Then a balancer with no replica: accepts, and closes at once.
    const received: string[] = [];
    let server = await listen(port, (socket) => socket.destroy());
    await waitFor('a closed try', () => retries.length === 2);
    assert.match(retries[1].reason, /closed the connection before the server answered/);
    assert.equal(retries[1].delayMs, 1000);
    assert.equal(read.length, 0, 'nothing reached the client');
    await new Promise((resolve) => server.close(resolve));

    // Then a server that answers: it gets the client's bytes again, on the new connection.
    const sockets: net.Socket[] = [];
    server = await listen(port, (socket) => {
      sockets.push(socket);
      socket.on('data', (data: Buffer) => {
        received.push(data.toString());
        if (received.length === 1) {
          socket.write('result');
        }
      });
    });
    await waitFor('the answer', () => read.length > 0);
    assert.equal(Buffer.concat(read).toString(), 'result');
    assert.deepEqual(received, ['initialize']);
    assert.equal(connected, 1);
    assert.equal(retries.length, 2);

    // Answered: what the client writes now goes straight through, and is not kept.
    link.writer.write('initialized');
    await waitFor('the next message', () => received.length === 2);
    assert.equal(received[1], 'initialized');

    // The connection closing now ends the reader (vscode-languageclient restarts the client
    // with a new link), and this link tries no more.
    sockets[0].destroy();
    await waitFor('the reader closed', () => readerClosed);
    await sleep(700);
    assert.equal(retries.length, 2);
    assert.equal(sockets.length, 1);
  });

  test('after a drop, the first try waits too', async () => {
    const port = await freePort();
    const accepted: number[] = [];
    await listen(port, (socket) => {
      accepted.push(Date.now());
      socket.resume(); // reading, so that it sees the link close
      socket.write('hello');
    });
    const created = Date.now();
    openLink(port, { retry: () => undefined }, true);
    await waitFor('a connection', () => accepted.length > 0);
    assert.ok(accepted[0] - created >= RETRY_FIRST_MS - 50, `${accepted[0] - created} ms`);
  });

  test('disposed, it tries no more and leaves the reader open', async () => {
    const port = await freePort();
    const retries: RetryEvent[] = [];
    const link = openLink(port, { retry: (event) => retries.push(event) });
    let readerClosed = false;
    link.reader.on('close', () => (readerClosed = true));
    await waitFor('a refused try', () => retries.length === 1);
    link.dispose();
    let accepted = 0;
    await listen(port, (socket) => {
      accepted += 1;
      socket.destroy();
    });
    await sleep(RETRY_FIRST_MS + 500);
    assert.equal(accepted, 0);
    assert.equal(retries.length, 1);
    assert.equal(readerClosed, false);
  });
});
