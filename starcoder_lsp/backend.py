"""What every connection shares: the model, loaded once per process in the background, and
the counts `starcoder/stats` reports."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starcoder_lsp.completer import Completer
from starcoder_lsp.progress import Progress
from starcoder_lsp.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Stats:
    """Counts and latencies for `starcoder/stats`, shared by every connection."""

    requests: int = 0
    shown: int = 0
    accepted: int = 0
    typed_through: int = 0
    empty: int = 0
    docstrings: int = 0
    cancelled: int = 0  # generations stopped early by $/cancelRequest
    superseded: int = 0  # ... or by a newer request for the same document
    latencies: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count_request(self) -> None:
        with self.lock:
            self.requests += 1

    def record(self, seconds: float, shown: bool, typed_through: bool) -> None:
        with self.lock:
            self.shown += shown
            self.empty += not shown
            self.typed_through += typed_through
            self.latencies.append(seconds)
            del self.latencies[:-10_000]  # percentiles of the recent past, in bounded memory

    def count_stopped(self, reason: str) -> None:
        with self.lock:
            self.cancelled += reason == "cancelled"
            self.superseded += reason == "superseded"

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
        self.stats = Stats()

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
            self.completer = completer
            self.progress = (1, 1, "ready")
        except Exception as e:  # the server keeps answering, with the reason in its log
            log.exception("the model could not be loaded")
            self.error = str(e)
            self.progress = (1, 1, f"failed: {e}")
        self.ready.set()

    def _report(self, done: int, total: int, what: str) -> None:
        self.progress = (done, max(total, 1), what)

    def status(self) -> dict[str, Any]:
        cache = self.completer.engine.prefix_cache.stats if self.completer else None
        return {
            "ready": self.completer is not None,
            "loading": self.progress[2],
            "error": self.error,
            "model": self.model,
            **self.stats.as_json(),
            "cacheHits": cache.hits if cache else 0,
            "cacheRequests": cache.requests if cache else 0,
            "speculation": self._speculation(),
        }

    def _speculation(self) -> dict[str, Any] | None:
        """Drafted and accepted tokens and model steps per token; None without drafts."""
        assistant = self.completer.engine.assistant if self.completer else None
        return assistant.stats.as_json() if assistant is not None else None
