"""`serve --tcp --health-port N`: the HTTP check a load balancer asks before sending a replica
new editors (tests/test_replicas.py puts it behind HAProxy)."""

from __future__ import annotations

import http.client
import json
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from starcoder_lsp.backend import Backend
from starcoder_lsp.health import HealthServer
from starcoder_lsp.progress import Progress


class ControlledLoad:
    """A model load that reports progress, then finishes or fails when the test says."""

    def __init__(self) -> None:
        self.reported = threading.Event()
        self.go = threading.Event()
        self.failure: str | None = None

    def __call__(self, progress: Progress) -> Any:
        progress(1, 4, "compiling")
        self.reported.set()
        self.go.wait(10)
        if self.failure:
            raise RuntimeError(self.failure)
        ready = threading.Event()
        ready.set()
        return SimpleNamespace(engine=SimpleNamespace(ready=ready, context=8192))


def get(server: HealthServer, path: str = "/health", method: str = "GET") -> tuple[int, Any]:
    host, port = server.url.split("//")[1].split("/")[0].rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        body = response.read()
        return response.status, json.loads(body) if body else None
    finally:
        connection.close()


@pytest.fixture
def load() -> ControlledLoad:
    return ControlledLoad()


@pytest.fixture
def checks(load: ControlledLoad) -> Iterator[tuple[Backend, HealthServer]]:
    backend = Backend(load, "test-model")
    server = HealthServer(backend, "127.0.0.1", 0).start()
    backend.start()
    assert load.reported.wait(5)
    try:
        yield backend, server
    finally:
        load.go.set()
        server.close()


def test_503_while_the_model_loads_then_200(
    load: ControlledLoad, checks: tuple[Backend, HealthServer]
) -> None:
    backend, server = checks
    assert get(server) == (503, {"ready": False, "state": "loading", "progress": "compiling (25%)"})
    assert get(server, method="HEAD") == (503, None)  # HAProxy may check with HEAD
    load.go.set()
    assert backend.ready.wait(5)
    assert get(server) == (200, {"ready": True, "state": "ready"})
    assert get(server, "/health?probe=1")[0] == 200
    assert get(server, method="HEAD") == (200, None)


def test_503_after_the_model_failed_to_load(
    load: ControlledLoad, checks: tuple[Backend, HealthServer]
) -> None:
    backend, server = checks
    load.failure = "no such checkpoint"
    load.go.set()
    assert backend.ready.wait(5)
    # Not the reason, which may name paths: that is in the log and behind the token.
    assert get(server) == (503, {"ready": False, "state": "error"})


def test_only_the_health_path_is_served(checks: tuple[Backend, HealthServer]) -> None:
    _, server = checks
    status, body = get(server, "/")
    assert status == 404 and "/health" in body["error"]


def test_a_taken_port_is_refused_at_once(checks: tuple[Backend, HealthServer]) -> None:
    backend, server = checks
    port = int(server.url.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(Exception, match=f"cannot listen on 127.0.0.1:{port} for health checks"):
        HealthServer(backend, "127.0.0.1", port)


def test_checks_that_end_with_a_reset_print_nothing(
    checks: tuple[Backend, HealthServer], capfd: pytest.CaptureFixture[str]
) -> None:
    """HAProxy resets each check's connection once it has the status line: no traceback on
    stderr for that, at every check of every replica."""
    _, server = checks
    host, port = server.url.split("//")[1].split("/")[0].rsplit(":", 1)
    for _ in range(20):
        with socket.create_connection((host, int(port))) as check:
            check.sendall(b"GET /health HTTP/1.0\r\n\r\n")
            check.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert get(server)[0] == 503  # still answering
    assert "Traceback" not in capfd.readouterr().err


def test_health_port_needs_tcp() -> None:
    """Over stdio there is no balancer, and stdout is the editor's: refused before loading."""
    done = subprocess.run(
        [sys.executable, "-m", "starcoder_lsp", "serve", "--stdio", "--health-port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "--health-port apply to --tcp only" in done.stderr, done.stderr
