"""Real `starcoder-lsp serve --tcp` processes for the wire tests, and connecting to them."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from lsp_wire import WireClient

SERVE = [sys.executable, "-m", "starcoder_lsp", "serve"]


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_tcp_server(
    model: Path, log: Path, *extra: str, env: dict[str, str] | None = None
) -> Server:
    process = subprocess.Popen(
        [*SERVE, "--tcp", "--port", "0", "--model", str(model), *extra],
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
        env=env,
    )
    line = process.stdout.readline()
    if "listening on" not in line:
        process.kill()
        raise AssertionError(f"the server did not start: {line!r}\n{log.read_text()}")
    return Server(process, int(line.split()[3].rsplit(":", 1)[1]), log)


def stop(server: Server) -> None:
    server.process.terminate()
    server.process.wait(timeout=30)


async def connect(server: Server, options: dict | None = None, **kwargs) -> WireClient:
    """A client, initialized (multiline suggestions unless `options` say otherwise), once the
    model is ready."""
    client = await WireClient.tcp(server.port, **kwargs)
    reply = await client.initialize({"multiline": "always", **(options or {})})
    assert "result" in reply, reply
    await client.wait_ready()
    return client
