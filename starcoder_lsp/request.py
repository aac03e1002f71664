"""What callers of the engine hold: a request, its handle, its result. No JAX here, so that
the completer and the server can use them without importing it."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass


@dataclass
class Request:
    # The prompt's token ids; or, with `prompt`, made by it when the request leaves the
    # queue (then `ids` is empty until then).
    ids: list[int]
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    # Stop once this returns True for the decoded text so far (e.g. a line is complete).
    stop: Callable[[str], bool] | None = None
    # A newer request with the same group supersedes this one (one per document).
    group: Hashable | None = None
    # Who asked (a connection): the engine's per-owner limits and round robin, and what
    # `Engine.drop` stops when the owner leaves. None: no limits (the CLI, the library).
    owner: Hashable | None = None
    # Makes `ids` when the engine admits the request. A prompt costs tens of milliseconds
    # of tokenizing; made lazily, a request superseded in the queue costs none, so a client
    # that floods the queue cannot keep the server busy making prompts nobody will use.
    prompt: Callable[[], list[int]] | None = None


@dataclass
class Result:
    tokens: list[int]
    text: str
    finish_reason: str  # stop | length | cancelled | superseded | disconnected
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


class RequestError(RuntimeError):
    """Why a request could not be served. The engine logged it, with its traceback, when it
    happened: whoever passes it on to a client needs only its message."""


class Handle:
    """A submitted request: `result()` blocks, `future` is awaitable via asyncio.wrap_future."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.future: Future[Result] = Future()
        self.cancel_reason: str | None = None
        self.submitted = time.perf_counter()
        # The engine has begun admitting it (making its prompt): no newer request of the same
        # owner pushes it out of the queue any more, or that work would be thrown away.
        self.claimed = False

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop between decode steps; the result still arrives, with this finish_reason."""
        self.cancel_reason = self.cancel_reason or reason

    def result(self, timeout: float | None = None) -> Result:
        return self.future.result(timeout)
