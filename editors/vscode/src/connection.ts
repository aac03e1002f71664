// A connection to a remote `starcoder-lsp serve --tcp` (plain TCP or TLS). No `vscode`
// import: the Node tests connect the same way.
import * as fs from 'node:fs';
import * as net from 'node:net';
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
