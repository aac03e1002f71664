"""An HTTP health check for load balancers (`serve --tcp --health-port N`).

A balancer in front of several replicas (HAProxy's `option httpchk GET /health`) sends new
editors only to replicas that can serve them: `GET /health` answers 200 once the model is
loaded, and 503 while it loads or after it failed to load. LSP itself is a poor check: a
replica that is still loading, or whose model failed, accepts connections and answers
`initialize` all the same.

Its own port, plain HTTP, no token: the answer says only whether the replica is ready (the
counters stay behind the token, in `starcoder/stats`).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from starcoder_lsp.backend import Backend
from starcoder_lsp.errors import StarcoderError

log = logging.getLogger(__name__)

PATH = "/health"


def state(backend: Backend) -> tuple[HTTPStatus, dict[str, object]]:
    """The answer to `GET /health`: its status and its JSON body."""
    if backend.completer is not None:
        return HTTPStatus.OK, {"ready": True, "state": "ready"}
    if backend.error is not None:
        return HTTPStatus.SERVICE_UNAVAILABLE, {"ready": False, "state": "error"}
    done, total, what = backend.progress
    return HTTPStatus.SERVICE_UNAVAILABLE, {
        "ready": False,
        "state": "loading",
        "progress": f"{what} ({round(100 * done / total)}%)",
    }


class HealthServer:
    """`GET /health` on host:port, answered from a thread of its own."""

    def __init__(self, backend: Backend, host: str, port: int) -> None:
        handler = type("Handler", (_Handler,), {"backend": backend})
        try:
            self._http = _Server((host, port), handler)
        except OSError as e:  # the port is taken, the address is not ours, ...
            raise StarcoderError(
                f"cannot listen on {host}:{port} for health checks: {e.strerror or e}"
            ) from None
        self._thread = threading.Thread(
            target=self._http.serve_forever, name="starcoder-health", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._http.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}{PATH}"

    def start(self) -> HealthServer:
        self._thread.start()
        log.info("health checks on %s", self.url)
        # Scripts and tests read the port from here (with --health-port 0, the one chosen).
        print(f"starcoder-lsp health check on {self.url}", flush=True)
        return self

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: tuple) -> None:
        # HAProxy ends each check with a reset once it has read the status line, often before
        # the body is written: that is how checks end, not an error (socketserver would print
        # a traceback to stderr for every check).
        if isinstance(sys.exc_info()[1], ConnectionError):
            log.debug("health check from %s: %s", client_address, sys.exc_info()[1])
            return
        log.exception("health check from %s failed", client_address)


class _Handler(BaseHTTPRequestHandler):
    backend: Backend
    server_version = "starcoder-lsp"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self._answer(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        if self.path.split("?", 1)[0] != PATH:
            status, content = HTTPStatus.NOT_FOUND, {"error": f"only {PATH} is here"}
        else:
            status, content = state(self.backend)
        data = json.dumps(content).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        # A balancer checks every second or so: stderr would fill with these at INFO.
        log.debug("%s " + format, self.address_string(), *args)
