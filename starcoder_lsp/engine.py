"""The engine: one model, one key/value cache, requests from every connection in one queue.

A worker thread owns the device cache. Each turn of its loop it admits waiting requests (each
reuses the cache slot whose tokens share the longest prefix with its prompt), prefills one
chunk of one admitted prompt, then advances every decoding request by one token in a single
batched step. Cancellation and supersession are checked between steps, so a stale request
stops within one step. Callers get a `Handle` (a concurrent future) and never touch JAX.

It decodes one step per call, where the Generator runs several (Runner.decode_steps): a
completion is often a line of a few tokens, and eight steps per call would make a new
keystroke's request wait up to eight steps to join and a finished row waste up to seven.

Many editors share it, so no one of them may hold it up (each limit is off at 0):

- requests wait in one queue per owner (a connection), and slots go to the owners in turn,
  round robin, not first come first served;
- an owner has at most `max_queued` requests waiting; a newer one supersedes its oldest;
- an owner decodes in at most `max_rows` slots at once;
- a long prompt is prefilled `prefill_chunk` tokens at a time while other requests are
  decoding or prefilling, taking at most a third of the time while rows decode (owners
  take turns for it), so that the others go on instead of waiting for the whole prompt
  (alone, in pieces of ALONE_CHUNK); a keystroke's prompt, which one chunk finishes, goes
  first;
- `drop(owner)` stops everything of an owner that left, queued or running.

Every request is resolved: whatever fails while serving it (the model step, a stop rule, the
tokenizer) resolves it with a RequestError, logged once, here.
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
from starcoder_lsp.request import Handle, Request, RequestError, Result
from starcoder_lsp.runner import Runner
from starcoder_lsp.sampling import Sampling, split_key
from starcoder_lsp.stopping import finish_reason

log = logging.getLogger(__name__)

# The most prompt tokens prefilled in one turn when nothing else runs: the runner's largest
# compiled chunk (runner.DEFAULT_CHUNKS), prefilled at ~290 tokens/s against ~210 for 64 on
# a 2-core CPU; a whole prompt of 8,000 tokens in one turn kept a new request waiting 50 s.
ALONE_CHUNK = 256
# While rows decode, each second of prefill waits for this many seconds of decode steps: the
# prefill takes at most a third of the time, so the rows decoding beside a stream of long
# prompts take at most 1.5 times as long per step.
DECODE_PER_PREFILL = 2.0


__all__ = ["Engine", "Handle", "Request", "Result"]


@dataclass
class _Row:
    """A request in a cache slot that its lease pins: prefilling, then decoding."""

    handle: Handle
    lease: Lease
    written: list[int]  # token ids whose keys/values the slot holds
    generated: list[int] = field(default_factory=list)
    queued_seconds: float = 0.0
    prefill_seconds: float = 0.0
    decode_started: float = 0.0
    decode_steps: int = 0

    @property
    def owner(self) -> Hashable | None:
        return self.handle.request.owner

    def to_prefill(self) -> list[int]:
        return self.handle.request.ids[len(self.written) :]

    def prefill_tokens(self) -> int:
        """How many tokens of its prompt the slot did not hold when it was admitted."""
        return len(self.handle.request.ids) - self.lease.reuse

    def result(self, reason: str, text: str) -> Result:
        request = self.handle.request
        decoding = self.decode_started > 0
        return Result(
            tokens=self.generated,
            text=text,
            finish_reason=reason,
            prompt_tokens=len(request.ids),
            reused_tokens=self.lease.reuse,
            prefilled_tokens=min(len(self.written), len(request.ids)) - self.lease.reuse,
            queued_seconds=self.queued_seconds,
            prefill_seconds=self.prefill_seconds,
            decode_seconds=time.perf_counter() - self.decode_started if decoding else 0.0,
            decode_steps=self.decode_steps,
        )


class Engine:
    """The scheduler between the server's connections and the runner; see the module doc.

    decode: token ids → text (the tokenizer's), for stop rules and results; stop_ids: the
    tokens that end a generation; assistant: drafts that a step verifies (assist.py), so that
    a step may produce several tokens of a row. max_queued, max_rows, prefill_chunk: the
    per-owner limits and the prefill chunk of the module doc (0: none). clock: what prefill
    and decode time is measured with, to share the time between them (tests pass their own).
    """

    def __init__(
        self,
        runner: Runner,
        decode: Callable[[Sequence[int]], str],
        stop_ids: Sequence[int],
        prefix_cache: bool = True,
        assistant: Assistant | None = None,
        *,
        max_queued: int = 0,
        max_rows: int = 0,
        prefill_chunk: int = 0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.runner = runner
        self.assistant = assistant
        self._decode_text = decode
        self._stop_ids = frozenset(stop_ids)
        self.prefix_cache = PrefixCache(runner.slots, enabled=prefix_cache)
        self.max_queued, self.max_rows, self.prefill_chunk = max_queued, max_rows, prefill_chunk
        self._cache: jax.Array | None = None
        # Waiting requests, one queue per owner; the dict's order is the round robin's.
        self._queues: dict[Hashable | None, deque[Handle]] = {}
        self._prefilling: deque[_Row] = deque()
        self._decoding: list[_Row] = []
        # Seconds of prefill not yet made up for by decode steps (while nothing decodes, the
        # last chunk's); and chunks prefilled per owner since prefilling began (its round
        # robin).
        self._prefill_debt = 0.0
        self._prefill_turns: dict[Hashable | None, int] = {}
        self._clock = clock
        self._groups: dict[Hashable, Handle] = {}
        self._owned: dict[Hashable, set[Handle]] = {}  # every unresolved handle of an owner
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
        if not self._thread.is_alive():
            # The cache is most of the engine's device memory (gigabytes for a 3B model's
            # context): a closed engine gives it back, so that a process can build another.
            self._cache = None

    def abort(self, error: Exception) -> None:
        """Fail every request now, from any thread, and take no more: for when the worker may
        be stuck (a multi-host step waiting for a process that is gone)."""
        with self._cv:
            self._closed = True
            waiting = [h for queue in self._queues.values() for h in queue]
            self._queues = {}
            running = [row.handle for row in (*self._prefilling, *self._decoding)]
            self._cv.notify_all()
        for handle in [*waiting, *running]:
            if not handle.future.done():
                handle.future.set_exception(error)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- requests ----------------------------------------------------------------------------

    def submit(self, request: Request) -> Handle:
        """Queue `request`. A prompt given as ids is checked against the context now (a
        ValueError says why it does not fit); one made lazily, when it is admitted."""
        if request.prompt is None:
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
            queue = self._queues.setdefault(request.owner, deque())
            queue.append(handle)
            if request.owner is not None:
                self._owned.setdefault(request.owner, set()).add(handle)
                if self.max_queued:
                    waiting = [h for h in queue if h.cancel_reason is None and not h.claimed]
                    for oldest in waiting[: -self.max_queued]:
                        oldest.cancel("superseded")
            self._cv.notify_all()
        return handle

    def drop(self, owner: Hashable) -> int:
        """Stop every request of `owner`, waiting or running (its connection closed); each is
        resolved with finish_reason "disconnected". Returns how many were stopped."""
        with self._cv:
            handles = self._owned.get(owner, set())
            for handle in handles:
                handle.cancel("disconnected")
            self._cv.notify_all()
            return len(handles)

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
                while not self._closed and not self._has_work():
                    self._cv.wait()
                if self._closed:
                    break
            try:
                self._drop_cancelled()
                self._admit()
                self._prefill_next()
                self._step()
            except Exception as e:  # a fault of the loop itself: no request is left waiting
                log.exception("engine loop failed")
                self._fail_running(e)
        self._fail_all(RuntimeError("the engine was closed"))

    def _has_work(self) -> bool:
        return any(self._queues.values()) or bool(self._prefilling or self._decoding)

    def _drop_cancelled(self) -> None:
        """Resolve the waiting requests that were cancelled or superseded: their editors
        are waiting for the (empty) answer."""
        with self._cv:
            stopped = [h for q in self._queues.values() for h in q if h.cancel_reason]
            for owner, queue in list(self._queues.items()):
                kept = deque(h for h in queue if h.cancel_reason is None)
                if kept:
                    self._queues[owner] = kept
                else:
                    del self._queues[owner]
        for handle in stopped:
            self._resolve(handle, _never_started(handle, handle.cancel_reason or "cancelled"))

    def _admit(self) -> None:
        """Give free slots to waiting requests, one owner after another."""
        while self.prefix_cache.has_free():
            with self._cv:
                handle = self._next_waiting()
                if handle is None:
                    return
                handle.claimed = True
                # To the back of the round now, admitted or not: an owner whose requests keep
                # being superseded while their prompts are made gets one try per round.
                owner = handle.request.owner
                self._queues[owner] = self._queues.pop(owner)
            if not self._make_prompt(handle):
                continue
            with self._cv:
                if handle.cancel_reason is not None:
                    continue  # superseded while its prompt was made: resolved next turn
                lease = self.prefix_cache.acquire(handle.request.ids)
                if lease is None:
                    return  # every slot is busy: wait for a row to finish
                self._dequeue(handle)
            written = list(handle.request.ids[: lease.reuse])
            queued = time.perf_counter() - handle.submitted
            self._prefilling.append(_Row(handle, lease, written, queued_seconds=queued))

    def _make_prompt(self, handle: Handle) -> bool:
        """Make a lazy request's ids and check that they fit; False (the request resolved
        with the error) when that fails."""
        request = handle.request
        if request.prompt is None:
            return True
        try:
            request.ids = list(request.prompt())
            request.prompt = None
            self.runner.check_fits(len(request.ids), request.max_new_tokens)
        except Exception as e:
            log.exception("making a prompt failed; the request gets the error")
            with self._cv:
                self._dequeue(handle)
            self._fail(handle, e)
            return False
        return True

    def _dequeue(self, handle: Handle) -> None:
        """Take `handle` out of its owner's queue. (Under the lock.)"""
        owner = handle.request.owner
        queue = self._queues[owner]
        queue.remove(handle)
        if not queue:
            del self._queues[owner]

    def _next_waiting(self) -> Handle | None:
        """The first waiting request, in round-robin order, of an owner under its row limit."""
        rows: dict[Hashable | None, int] = {}
        for row in (*self._prefilling, *self._decoding):
            rows[row.owner] = rows.get(row.owner, 0) + 1
        for owner, queue in self._queues.items():
            if owner is not None and self.max_rows and rows.get(owner, 0) >= self.max_rows:
                continue
            for handle in queue:
                if handle.cancel_reason is None:
                    return handle
        return None

    def _prefill_next(self) -> None:
        """Prefill one chunk of a prefilling row: one that a chunk finishes (a keystroke's few
        tokens) if any, else one of the owner that had the fewest chunks so far (round robin
        across connections, however many rows each has); an unfinished row waits its turn.

        While other rows decode, a chunk runs only once the decode steps since the last one
        took DECODE_PER_PREFILL times as long as it did (a keystroke's chunk runs at once),
        whether or not rows were decoding when it ran.
        Otherwise a prompt of thousands of tokens, in chunks between every step, would make
        each step of the others several times slower.
        """
        self._prefilling = deque(r for r in self._prefilling if not self._finish_if_cancelled(r))
        if not self._prefilling:
            self._prefill_debt = 0.0
            self._prefill_turns.clear()
            return
        chunk = self.prefill_chunk
        short = [r for r in self._prefilling if chunk and r.prefill_tokens() <= chunk]
        if short:
            row = short[0]
        elif chunk and self._decoding and self._prefill_debt > 0:
            return  # the decoding rows' turn
        else:
            row = min(self._prefilling, key=lambda r: self._prefill_turns.get(r.owner, 0))
            self._prefill_turns[row.owner] = self._prefill_turns.get(row.owner, 0) + 1
        self._prefilling.remove(row)
        request = row.handle.request
        rest = row.to_prefill()
        # Small chunks only while other requests wait on it; alone, as large as prefill is
        # efficient, but not whole: a request arriving meanwhile waits one piece at most.
        others = self._decoding or self._prefilling
        piece = rest[:chunk] if chunk and others else rest[: max(chunk, ALONE_CHUNK)]
        start, clocked = time.perf_counter(), self._clock()
        try:
            logits, self._cache, _ = self.runner.prefill(
                self._cache, row.lease.slot, piece, len(row.written)
            )
            # JAX returns before the work is done: wait for it, or its time would be charged
            # to the next decode step and the sharing of time would not see it.
            jax.block_until_ready(self._cache)
            first = None
            if len(piece) == len(rest):
                first = int(self.runner.sample(logits, _sampling([request]), self._next_key())[0])
        except Exception as e:
            log.exception("prefill failed; the request gets the error")
            self.prefix_cache.discard(row.lease)
            self._fail(row.handle, e)
            return
        row.written.extend(piece)
        row.prefill_seconds += time.perf_counter() - start
        # A chunk that ran while nothing decoded is owed too, or a keystroke's row, decoding
        # right after it, would get the next chunk at once (its latency beside a stream of
        # long prompts was 3.8× its latency alone, with a chunk in nearly every request).
        cost = self._clock() - clocked
        if self._decoding:
            self._prefill_debt += cost
        else:
            self._prefill_debt = max(self._prefill_debt, cost)
        if first is None:
            self._prefilling.append(row)
            return
        row.generated.append(first)
        row.decode_started = time.perf_counter()
        if not self._finish_if_done(row):
            self._decoding.append(row)

    def _step(self) -> None:
        rows = [r for r in self._decoding if not self._finish_if_cancelled(r)]
        self._decoding = rows
        if not rows:
            return
        sampling = _sampling([r.handle.request for r in rows])
        started = self._clock()
        try:
            new_tokens = self._assisted(rows, sampling) if self.assistant else None
            if new_tokens is None:
                new_tokens = [[token] for token in self._decode(rows, sampling)]
        except Exception as e:
            log.exception("decode step failed; its %d requests get the error", len(rows))
            self._fail_running(e)
            return
        repaid = (self._clock() - started) / DECODE_PER_PREFILL
        self._prefill_debt = max(0.0, self._prefill_debt - repaid)
        still = []
        for row, tokens in zip(rows, new_tokens, strict=True):
            row.decode_steps += 1
            if not self._take(row, tokens):
                still.append(row)
        self._decoding = still

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
        assert self.assistant is not None
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
        try:
            reason = finish_reason(row.generated, request.max_new_tokens, self._stop_ids, by_text)
        except Exception as e:  # the request's stop rule, or the tokenizer, failed
            log.exception("a stop rule failed; the request gets the error")
            self.prefix_cache.release(row.lease, row.written)
            self._fail(row.handle, e)
            return True
        reason = reason or row.handle.cancel_reason
        if reason is None:
            return False
        self._finish(row, reason)
        return True

    def _finish(self, row: _Row, reason: str) -> None:
        self.prefix_cache.release(row.lease, row.written)
        if self.assistant is not None:
            self.assistant.finished(row.handle, row.written)
        try:
            result = row.result(reason, self._text(row.generated))
        except Exception as e:
            log.exception("decoding a result failed; the request gets the error")
            self._fail(row.handle, e)
            return
        self._resolve(row.handle, result)

    def _forget(self, handle: Handle) -> None:
        request = handle.request
        with self._cv:
            if request.group is not None and self._groups.get(request.group) is handle:
                del self._groups[request.group]
            owned = self._owned.get(request.owner)
            if owned is not None:
                owned.discard(handle)
                if not owned:
                    del self._owned[request.owner]

    def _resolve(self, handle: Handle, result: Result) -> None:
        self._forget(handle)
        if not handle.future.done():
            handle.future.set_result(result)

    def _fail(self, handle: Handle, error: BaseException) -> None:
        """Resolve with the error; the caller has logged it."""
        self._forget(handle)
        if not handle.future.done():
            failure = RequestError(f"the request failed: {error}")
            failure.__cause__ = error
            handle.future.set_exception(failure)

    def _fail_running(self, error: BaseException) -> None:
        """Every admitted request gets `error`; their slots' contents are unknown."""
        rows, self._decoding = [*self._prefilling, *self._decoding], []
        self._prefilling = deque()
        for row in rows:
            self.prefix_cache.discard(row.lease)
            if self.assistant is not None:
                self.assistant.finished(row.handle, [])
            self._fail(row.handle, error)

    def _fail_all(self, error: BaseException) -> None:
        self._fail_running(error)
        with self._cv:
            waiting = [h for queue in self._queues.values() for h in queue]
            self._queues = {}
        for handle in waiting:
            self._fail(handle, error)

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
