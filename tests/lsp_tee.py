"""Runs a language server with the editor's stdio passed through, and copies every byte the
server writes to stdout into a file too: what it said to the editor, for a test to read.

    python tests/lsp_tee.py WIRE_LOG COMMAND [ARG...]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def main() -> int:
    log_path, command = sys.argv[1], sys.argv[2:]
    server = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert server.stdin is not None and server.stdout is not None

    def upstream() -> None:
        try:
            while data := os.read(sys.stdin.fileno(), 65536):
                _write_all(server.stdin.fileno(), data)
        except OSError:  # the server has gone
            pass
        finally:
            server.stdin.close()

    threading.Thread(target=upstream, daemon=True).start()
    with open(log_path, "ab", buffering=0) as log:
        while data := os.read(server.stdout.fileno(), 65536):
            log.write(data)
            _write_all(sys.stdout.fileno(), data)
    return server.wait()


def messages(wire: bytes) -> list[dict]:
    """The JSON-RPC messages in a copy of the wire (Content-Length framed)."""
    found = []
    while (head := wire.find(b"\r\n\r\n")) >= 0:
        headers = wire[:head].decode("ascii").split("\r\n")
        sizes = [h.split(":")[1] for h in headers if h.lower().startswith("content-length:")]
        length = int(sizes[0])
        found.append(json.loads(wire[head + 4 : head + 4 + length]))
        wire = wire[head + 4 + length :]
    return found


if __name__ == "__main__":
    sys.exit(main())
