"""The engine: one model, one key/value cache, requests from every connection in one queue.

A worker thread owns the device cache. Between decode steps it admits waiting requests
(each reuses the cache slot whose tokens share the longest prefix with its prompt, and
prefills only the rest), then advances every active request by one token in a single batched
step. Cancellation and supersession are checked between steps, so a stale request stops
within one step. Callers get a `Handle` (a concurrent future) and never touch JAX.

It decodes one step per call, where the Generator runs several (Runner.decode_steps): a
completion is often a line of a few tokens, and eight steps per call would make a new
keystroke's request wait up to eight steps to join and a finished row waste up to seven.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import jax
import numpy as np

from starcoder_lsp.cache import Lease, PrefixCache
from starcoder_lsp.generate import Runner, Sampling

log = logging.getLogger(__name__)


@dataclass
class Request:
    ids: list[int]
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    # Stop once this returns True for the decoded text so far (e.g. a line is complete).
    stop: Callable[[str], bool] | None = None
    # A newer request with the same group supersedes this one (one per document).
    group: Hashable | None = None


@dataclass
class Result:
    tokens: list[int]
    text: str
    finish_reason: str  # stop | length | cancelled | superseded | error
    prompt_tokens: int
    reused_tokens: int
    prefilled_tokens: int
    queued_seconds: float
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int

    @property
    def seconds(self) -> float:
        return self.queued_seconds + self.prefill_seconds + self.decode_seconds


class Handle:
    """A submitted request: `result()` blocks, `future` is awaitable via asyncio.wrap_future."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.future: Future[Result] = Future()
        self.cancel_reason: str | None = None
        self.submitted = time.perf_counter()

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop between decode steps; the result still arrives, with this finish_reason."""
        self.cancel_reason = self.cancel_reason or reason

    def result(self, timeout: float | None = None) -> Result:
        return self.future.result(timeout)


@dataclass
class _Row:
    handle: Handle
    lease: Lease
    written: list[int]  # token ids whose keys/values the slot holds
    generated: list[int] = field(default_factory=list)
    prefill_seconds: float = 0.0
    decode_started: float = 0.0
    decode_steps: int = 0
    queued_seconds: float = 0.0


class Engine:
    def __init__(
        self,
        runner: Runner,
        decode: Callable[[Sequence[int]], str],
        stop_ids: Sequence[int],
        prefix_cache: bool = True,
    ) -> None:
        self.runner = runner
        self._decode_text = decode
        self._stop_ids = frozenset(stop_ids)
        self.prefix_cache = PrefixCache(runner.slots, enabled=prefix_cache)
        self._cache: jax.Array | None = None
        self._pending: deque[Handle] = deque()
        self._active: list[_Row] = []
        self._groups: dict[Hashable, Handle] = {}
        self._cv = threading.Condition()
        self._closed = False
        self._key = jax.random.PRNGKey(0)
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="starcoder-engine", daemon=True)

    # -- life cycle ---------------------------------------------------------------------

    def start(
        self, progress: Callable[[int, int, str], None] | None = None, warmup: bool = True
    ) -> Engine:
        """Compile every shape (reporting progress), then serve. Returns at once. Without
        warm-up (one-shot commands), each shape compiles when first needed."""
        self._progress = progress
        self._warmup = warmup
        log.info("%s", self.describe())
        self._thread.start()
        return self

    def describe(self) -> str:
        """The memory the cache takes: fixed by the slot count, whatever the traffic."""
        runner = self.runner
        cache = "on" if self.prefix_cache.enabled else "off"
        return (
            f"key/value cache: {runner.slots} slots × {runner.max_len} positions = "
            f"{runner.cache_bytes / 2**20:,.0f} MiB ({runner.dtype.name}); prefix reuse {cache}"
        )

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    # -- requests ----------------------------------------------------------------------------

    def submit(self, request: Request) -> Handle:
        if not request.ids:
            raise ValueError("a request needs at least one prompt token")
        if len(request.ids) + request.max_new_tokens > self.runner.max_len:
            raise ValueError(
                f"{len(request.ids)} prompt tokens + {request.max_new_tokens} new tokens exceed "
                f"the context of {self.runner.max_len}"
            )
        handle = Handle(request)
        with self._cv:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if request.group is not None:
                older = self._groups.get(request.group)
                if older is not None:
                    older.cancel("superseded")
                self._groups[request.group] = handle
            self._pending.append(handle)
            self._cv.notify_all()
        return handle

    def generate(self, request: Request, timeout: float | None = None) -> Result:
        return self.submit(request).result(timeout)

    # -- the worker ----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            if self._warmup:
                self._cache = self.runner.warmup(self._progress)
            else:
                self._cache = self.runner.new_cache()
        except Exception as e:  # compilation failed: every request gets the error
            log.exception("warm-up failed")
            self._fail_all(e)
            return
        self.ready.set()
        while True:
            with self._cv:
                while not self._closed and not self._pending and not self._active:
                    self._cv.wait()
                if self._closed:
                    break
            try:
                self._admit()
                if self._active:
                    self._step()
            except Exception as e:
                log.exception("engine step failed")
                self._fail_active(e)
        self._fail_all(RuntimeError("the engine was closed"))

    def _admit(self) -> None:
        while True:
            with self._cv:
                if not self._pending:
                    return
                handle = self._pending[0]
                if handle.cancel_reason is None:
                    lease = self.prefix_cache.acquire(handle.request.ids)
                    if lease is None:
                        return  # every slot is busy: wait for a row to finish
                self._pending.popleft()
            if handle.cancel_reason is not None:
                self._resolve(handle, [], handle.cancel_reason, 0, 0, 0.0, 0.0, 0)
                continue
            self._prefill(handle, lease)

    def _prefill(self, handle: Handle, lease: Lease) -> None:
        request = handle.request
        queued = time.perf_counter() - handle.submitted
        start = time.perf_counter()
        rest = request.ids[lease.reuse :]
        try:
            logits, self._cache, _ = self.runner.prefill(self._cache, lease.slot, rest, lease.reuse)
            first = self.runner.sample(logits, self._sampling([request]), self._next_key())
        except Exception:
            self.prefix_cache.discard(lease)
            raise
        row = _Row(handle, lease, list(request.ids), [int(first[0])])
        row.prefill_seconds = time.perf_counter() - start
        row.queued_seconds = queued
        row.decode_started = time.perf_counter()
        if not self._finish_if_done(row):
            self._active.append(row)

    def _step(self) -> None:
        rows = [r for r in self._active if not self._finish_if_cancelled(r)]
        self._active = rows
        if not rows:
            return
        logits, self._cache = self.runner.decode(
            self._cache,
            [r.lease.slot for r in rows],
            [r.generated[-1] for r in rows],
            [len(r.written) for r in rows],
        )
        sampling = self.runner.pad_sampling(self._sampling([r.handle.request for r in rows]),
                                            len(rows))  # fmt: skip
        next_tokens = self.runner.sample(logits, sampling, self._next_key())
        still = []
        for row, token in zip(rows, next_tokens, strict=False):
            row.written.append(row.generated[-1])
            row.generated.append(int(token))
            row.decode_steps += 1
            if not self._finish_if_done(row):
                still.append(row)
        self._active = still

    # -- finishing -------------------------------------------------------------------------------

    def _finish_if_cancelled(self, row: _Row) -> bool:
        if row.handle.cancel_reason is None:
            return False
        self._finish(row, row.handle.cancel_reason)
        return True

    def _finish_if_done(self, row: _Row) -> bool:
        request = row.handle.request
        stopped_by_text = request.stop is not None and request.stop(self._text(row.generated))
        if row.generated[-1] in self._stop_ids or stopped_by_text:
            reason = "stop"
        elif len(row.generated) >= request.max_new_tokens:
            reason = "length"
        elif row.handle.cancel_reason is not None:
            reason = row.handle.cancel_reason
        else:
            return False
        self._finish(row, reason)
        return True

    def _finish(self, row: _Row, reason: str) -> None:
        self.prefix_cache.release(row.lease, row.written)
        decode_seconds = time.perf_counter() - row.decode_started
        self._resolve(
            row.handle, row.generated, reason, row.lease.reuse,
            len(row.handle.request.ids) - row.lease.reuse, row.prefill_seconds, decode_seconds,
            row.decode_steps, row.queued_seconds,
        )  # fmt: skip

    def _resolve(
        self,
        handle: Handle,
        generated: list[int],
        reason: str,
        reused: int,
        prefilled: int,
        prefill_seconds: float,
        decode_seconds: float,
        steps: int,
        queued: float | None = None,
    ) -> None:
        with self._cv:
            if self._groups.get(handle.request.group) is handle:
                del self._groups[handle.request.group]
        queued = time.perf_counter() - handle.submitted if queued is None else queued
        result = Result(
            generated, self._text(generated), reason, len(handle.request.ids), reused,
            prefilled, queued, prefill_seconds, decode_seconds, steps,
        )  # fmt: skip
        if not handle.future.done():
            handle.future.set_result(result)

    def _fail_active(self, error: Exception) -> None:
        for row in self._active:
            self.prefix_cache.discard(row.lease)
            if not row.handle.future.done():
                row.handle.future.set_exception(error)
        self._active = []

    def _fail_all(self, error: Exception) -> None:
        self._fail_active(error)
        with self._cv:
            pending, self._pending = list(self._pending), deque()
        for handle in pending:
            if not handle.future.done():
                handle.future.set_exception(error)

    # -- helpers ----------------------------------------------------------------------------------

    def _text(self, generated: Sequence[int]) -> str:
        return self._decode_text([t for t in generated if t not in self._stop_ids])

    def _sampling(self, requests: Sequence[Request]) -> Sampling:
        return Sampling(
            np.array([r.temperature for r in requests], np.float32),
            np.array([r.top_p for r in requests], np.float32),
            np.array([r.top_k for r in requests], np.int32),
        )

    def _next_key(self) -> jax.Array:
        self._key, sub = jax.random.split(self._key)
        return sub
