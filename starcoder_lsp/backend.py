"""What every connection shares: the model, loaded once per process in the background, and
the counts `starcoder/stats` reports.

Each connection counts its own requests (a `Stats` that also adds to the process's totals).
`starcoder/stats` tells a client its own counts and the totals; only a local server (stdio,
or TCP on loopback without a token: one user) also lists every connection's counts, since on
a shared server they would tell one user what the others do.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starcoder_lsp.completer import Completer
from starcoder_lsp.progress import Progress
from starcoder_lsp.settings import Settings, SettingsError

log = logging.getLogger(__name__)


@dataclass
class Stats:
    """Counts and latencies for `starcoder/stats`: of one connection, adding to `total`, or
    of the whole process."""

    requests: int = 0
    shown: int = 0
    accepted: int = 0
    typed_through: int = 0
    empty: int = 0
    docstrings: int = 0
    cancelled: int = 0  # generations stopped early by $/cancelRequest
    superseded: int = 0  # ... or by a newer request for the same document
    disconnected: int = 0  # ... or because their connection closed
    failed: int = 0  # answered with an error by the engine
    context_tokens: int = 0  # cross-file context tokens in the prompts that ran the model
    context_requests: int = 0  # ... and how many of those prompts had any
    last_context: list[str] = field(default_factory=list)  # "path:line" of each chunk
    latencies: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    total: Stats | None = None  # where a connection's counts add up

    def count_request(self) -> None:
        self._add(requests=1)

    def count_accepted(self) -> None:
        self._add(accepted=1)

    def count_docstring(self) -> None:
        self._add(docstrings=1)

    def count_failed(self) -> None:
        self._add(failed=1)

    def record(self, seconds: float, shown: bool, typed_through: bool) -> None:
        with self.lock:
            self.latencies.append(seconds)
            del self.latencies[:-10_000]  # percentiles of the recent past, in bounded memory
        self._add(shown=shown, empty=not shown, typed_through=typed_through)
        if self.total is not None:
            with self.total.lock:
                self.total.latencies.append(seconds)
                del self.total.latencies[:-10_000]

    def record_context(self, tokens: int, chunks: list[str]) -> None:
        """A prompt that ran the model with `tokens` of cross-file context from `chunks`."""
        self._add(context_tokens=tokens, context_requests=tokens > 0)
        with self.lock:
            self.last_context = chunks

    def count_stopped(self, reason: str) -> None:
        if reason in ("cancelled", "superseded", "disconnected"):
            self._add(**{reason: 1})

    def _add(self, **counts: int) -> None:
        for stats in (self, self.total):
            if stats is None:
                continue
            with stats.lock:
                for name, n in counts.items():
                    setattr(stats, name, getattr(stats, name) + n)

    def as_json(self) -> dict[str, Any]:
        with self.lock:
            ordered = sorted(self.latencies)
            counts = {
                "requests": self.requests,
                "shown": self.shown,
                "accepted": self.accepted,
                "typedThrough": self.typed_through,
                "empty": self.empty,
                "docstrings": self.docstrings,
                "cancelled": self.cancelled,
                "superseded": self.superseded,
                "disconnected": self.disconnected,
                "failed": self.failed,
                "contextTokens": self.context_tokens,
                "contextRequests": self.context_requests,
                "lastContext": list(self.last_context),
            }

        def percentile(p: float) -> float:
            return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000, 1)

        percentiles = (0.5, 0.9, 0.99) if ordered else ()
        return {**counts, "latencyMs": {f"p{round(p * 100)}": percentile(p) for p in percentiles}}


Loader = Callable[[Progress], Completer]


class Backend:
    """The model and engine, loaded once per process in a thread, shared by all connections."""

    def __init__(self, load: Loader, model: str = "", settings: Settings | None = None) -> None:
        self._load = load
        self.model = model
        self.settings = settings or Settings()  # each connection starts from these
        self.completer: Completer | None = None
        self.error: str | None = None
        self.progress = (0, 1, "loading the model")
        self.ready = threading.Event()  # set once loaded, or once loading failed
        self.stats = Stats()  # the totals of every connection
        self.connections: dict[int, Stats] = {}  # the open ones

    def connect(self, connection: int) -> Stats:
        """The counts of a new connection, adding to the totals."""
        stats = self.connections[connection] = Stats(total=self.stats)
        return stats

    def disconnect(self, connection: int) -> None:
        self.connections.pop(connection, None)

    def start(self) -> Backend:
        threading.Thread(target=self._run, name="starcoder-load", daemon=True).start()
        return self

    def abort(self, reason: str) -> None:
        """Stop serving: every request gets `reason` as its error, now and from now on."""
        self.error = reason
        self.progress = (1, 1, f"failed: {reason}")
        if self.completer is not None:
            self.completer.engine.abort(RuntimeError(reason))
        self.completer = None

    def close(self) -> None:
        if self.completer is not None:
            self.completer.engine.close()

    def _run(self) -> None:
        try:
            completer = self._load(self._report)
            completer.engine.ready.wait()
            try:  # the server's own defaults (--max-new-tokens) must fit the model too
                self.settings.check_context(completer.engine.context)
            except SettingsError:
                completer.engine.close()
                raise
            self.completer = completer
            self.progress = (1, 1, "ready")
        except Exception as e:  # the server keeps answering, with the reason in its log
            log.exception("the model could not be loaded")
            self.error = str(e)
            self.progress = (1, 1, f"failed: {e}")
        self.ready.set()

    def _report(self, done: int, total: int, what: str) -> None:
        self.progress = (done, max(total, 1), what)

    @property
    def context(self) -> int | None:
        """The model's context in tokens, once it is loaded."""
        return self.completer.engine.context if self.completer is not None else None

    def status(self, own: Stats, local: bool) -> dict[str, Any]:
        """`starcoder/stats` for the connection counting `own`: its counts, the totals, and
        on a local server every connection's counts."""
        cache = self.completer.engine.prefix_cache.stats if self.completer else None
        status = {
            "ready": self.completer is not None,
            "loading": self.progress[2],
            "error": self.error,
            "model": self.model,
            **own.as_json(),
            "totals": self.stats.as_json(),
            "cacheHits": cache.hits if cache else 0,
            "cacheRequests": cache.requests if cache else 0,
            "speculation": self._speculation(),
        }
        if local:
            connections = dict(self.connections)
            status["connections"] = {str(n): s.as_json() for n, s in connections.items()}
        return status

    def _speculation(self) -> dict[str, Any] | None:
        """Drafted and accepted tokens and model steps per token; None without drafts."""
        assistant = self.completer.engine.assistant if self.completer else None
        return assistant.stats.as_json() if assistant is not None else None
