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
from dataclasses import dataclass, field

import jax

from starcoder_lsp.assist import Assistant, AssistRow
from starcoder_lsp.cache import Lease, PrefixCache
from starcoder_lsp.progress import Progress
from starcoder_lsp.request import Handle, Request, Result
from starcoder_lsp.runner import Runner
from starcoder_lsp.sampling import Sampling, split_key
from starcoder_lsp.stopping import finish_reason

log = logging.getLogger(__name__)


__all__ = ["Engine", "Handle", "Request", "Result"]


@dataclass
class _Row:
    """A request being decoded, in the cache slot its lease pins."""

    handle: Handle
    lease: Lease
    written: list[int]  # token ids whose keys/values the slot holds
    generated: list[int] = field(default_factory=list)
    queued_seconds: float = 0.0
    prefill_seconds: float = 0.0
    decode_started: float = 0.0
    decode_steps: int = 0

    def result(self, reason: str, text: str) -> Result:
        request = self.handle.request
        return Result(
            tokens=self.generated,
            text=text,
            finish_reason=reason,
            prompt_tokens=len(request.ids),
            reused_tokens=self.lease.reuse,
            prefilled_tokens=len(request.ids) - self.lease.reuse,
            queued_seconds=self.queued_seconds,
            prefill_seconds=self.prefill_seconds,
            decode_seconds=time.perf_counter() - self.decode_started,
            decode_steps=self.decode_steps,
        )


class Engine:
    """The scheduler between the server's connections and the runner; see the module doc.

    decode: token ids → text (the tokenizer's), for stop rules and results; stop_ids: the
    tokens that end a generation; assistant: drafts that a step verifies (assist.py), so that
    a step may produce several tokens of a row.
    """

    def __init__(
        self,
        runner: Runner,
        decode: Callable[[Sequence[int]], str],
        stop_ids: Sequence[int],
        prefix_cache: bool = True,
        assistant: Assistant | None = None,
    ) -> None:
        self.runner = runner
        self.assistant = assistant
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

    @property
    def context(self) -> int:
        """Tokens a prompt and its completion may take together."""
        return self.runner.max_len

    # -- life cycle ---------------------------------------------------------------------

    def start(self, progress: Progress | None = None, warmup: bool = True) -> Engine:
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

    def abort(self, error: Exception) -> None:
        """Fail every request now, from any thread, and take no more: for when the worker may
        be stuck (a multi-host step waiting for a process that is gone)."""
        with self._cv:
            self._closed = True
            pending, self._pending = list(self._pending), deque()
            active = list(self._active)
            self._cv.notify_all()
        for handle in [*pending, *(row.handle for row in active)]:
            if not handle.future.done():
                handle.future.set_exception(error)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- requests ----------------------------------------------------------------------------

    def submit(self, request: Request) -> Handle:
        self.runner.check_fits(len(request.ids), request.max_new_tokens)
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
                if self.assistant is not None:
                    self.assistant.drafter.warmup()
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
                self._resolve(handle, _never_started(handle, handle.cancel_reason))
                continue
            self._prefill(handle, lease)

    def _prefill(self, handle: Handle, lease: Lease) -> None:
        request = handle.request
        queued = time.perf_counter() - handle.submitted
        start = time.perf_counter()
        rest = request.ids[lease.reuse :]
        try:
            logits, self._cache, _ = self.runner.prefill(self._cache, lease.slot, rest, lease.reuse)
            first = self.runner.sample(logits, _sampling([request]), self._next_key())
        except Exception:
            self.prefix_cache.discard(lease)
            raise
        row = _Row(handle, lease, list(request.ids), [int(first[0])], queued_seconds=queued)
        row.prefill_seconds = time.perf_counter() - start
        row.decode_started = time.perf_counter()
        if not self._finish_if_done(row):
            self._active.append(row)

    def _step(self) -> None:
        rows = [r for r in self._active if not self._finish_if_cancelled(r)]
        self._active = rows
        if not rows:
            return
        sampling = _sampling([r.handle.request for r in rows])
        new_tokens = self._assisted(rows, sampling) if self.assistant else None
        if new_tokens is None:
            new_tokens = [[token] for token in self._decode(rows, sampling)]
        still = []
        for row, tokens in zip(rows, new_tokens, strict=True):
            row.decode_steps += 1
            if not self._take(row, tokens):
                still.append(row)
        self._active = still

    def _decode(self, rows: list[_Row], sampling: Sampling) -> list[int]:
        """One plain decode step: each row's next token."""
        slots = [r.lease.slot for r in rows]
        tokens = [r.generated[-1] for r in rows]
        positions = [len(r.written) for r in rows]
        logits, self._cache = self.runner.decode(self._cache, slots, tokens, positions)
        padded = self.runner.pad_sampling(sampling, len(rows))
        if self.assistant is not None:
            self.assistant.plain_step(len(rows))
        return [int(t) for t in self.runner.sample(logits, padded, self._next_key())[: len(rows)]]

    def _assisted(self, rows: list[_Row], sampling: Sampling) -> list[list[int]] | None:
        """Each row's new tokens from one verified step of drafts; None when none has any."""
        assist_rows = [
            AssistRow(
                key=r.handle,
                group=r.handle.request.group if r.handle.request.group is not None else r.handle,
                tokens=[*r.written, r.generated[-1]],
                slot=r.lease.slot,
                room=min(
                    r.handle.request.max_new_tokens - len(r.generated),
                    self.runner.max_len - len(r.written) - 1,
                ),
            )
            for r in rows
        ]
        new_tokens, self._cache = self.assistant.step(
            self.runner, self._cache, assist_rows, sampling, self._next_key()
        )
        return new_tokens

    def _take(self, row: _Row, tokens: Sequence[int]) -> bool:
        """Append a step's tokens to the row one at a time, as plain decoding would, and
        finish it where it ends (the tokens after an end are dropped). True if it ended."""
        for token in tokens:
            row.written.append(row.generated[-1])
            row.generated.append(token)
            if self._finish_if_done(row):
                return True
        return False

    # -- finishing -------------------------------------------------------------------------------

    def _finish_if_cancelled(self, row: _Row) -> bool:
        if row.handle.cancel_reason is None:
            return False
        self._finish(row, row.handle.cancel_reason)
        return True

    def _finish_if_done(self, row: _Row) -> bool:
        request = row.handle.request
        by_text = None
        if request.stop is not None:
            by_text = lambda: request.stop(self._text(row.generated))
        reason = finish_reason(row.generated, request.max_new_tokens, self._stop_ids, by_text)
        reason = reason or row.handle.cancel_reason
        if reason is None:
            return False
        self._finish(row, reason)
        return True

    def _finish(self, row: _Row, reason: str) -> None:
        self.prefix_cache.release(row.lease, row.written)
        if self.assistant is not None:
            self.assistant.finished(row.handle, row.written)
        self._resolve(row.handle, row.result(reason, self._text(row.generated)))

    def _resolve(self, handle: Handle, result: Result) -> None:
        with self._cv:
            if self._groups.get(handle.request.group) is handle:
                del self._groups[handle.request.group]
        if not handle.future.done():
            handle.future.set_result(result)

    def _fail_active(self, error: Exception) -> None:
        for row in self._active:
            self.prefix_cache.discard(row.lease)
            if self.assistant is not None:
                self.assistant.finished(row.handle, [])
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

    def _next_key(self) -> jax.Array:
        self._key, sub = split_key(self._key)
        return sub


def _sampling(requests: Sequence[Request]) -> Sampling:
    return Sampling.rows(
        [r.temperature for r in requests],
        [r.top_p for r in requests],
        [r.top_k for r in requests],
        batch=len(requests),
    )


def _never_started(handle: Handle, reason: str) -> Result:
    """The result of a request stopped before it left the queue."""
    return Result(
        tokens=[],
        text="",
        finish_reason=reason,
        prompt_tokens=len(handle.request.ids),
        reused_tokens=0,
        prefilled_tokens=0,
        queued_seconds=time.perf_counter() - handle.submitted,
        prefill_seconds=0.0,
        decode_seconds=0.0,
        decode_steps=0,
    )
