"""A runner whose outputs are worked out by hand, for the engine's scheduling tests (as
JetStream's mock_engine): no model, no timing.

After token t comes token t + 1 (mod the vocabulary), whatever came before. The "cache" is
the token ids each slot holds, so every prefill checks that the positions the engine says are
cached hold exactly the prompt's tokens: prefix reuse that is not exact fails the test. With
`hold()`, each decode step waits until the test lets it go, so a test decides what happens
between two steps.

`clock` tells time in calls, not seconds: a prefill call costs `prefill_cost`, a decode
step 1, so that the engine's sharing of time between them is worked out by hand too.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from starcoder_lsp.sampling import Sampling

VOCAB = 64


@dataclass
class Call:
    kind: str  # "prefill" or "decode"
    slots: list[int]
    tokens: list[int]
    start: list[int]  # the position of each row's first token


@dataclass
class ScriptedRunner:
    slots: int = 2
    max_len: int = 256
    batches: tuple[int, ...] = (1, 2)
    dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))
    calls: list[Call] = field(default_factory=list)
    prefill_cost: float = 1.0
    time: float = 0.0
    _gate: threading.Semaphore | None = None
    _waiting: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))

    @property
    def cache_bytes(self) -> int:
        return 0

    def check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        if prompt_tokens < 1 or prompt_tokens + max_new_tokens > self.max_len:
            raise ValueError("does not fit the context")

    def new_cache(self) -> list[list[int]]:
        return [[] for _ in range(self.slots)]

    def warmup(self, progress: object = None) -> list[list[int]]:
        return self.new_cache()

    def prefill(
        self, cache: list[list[int]], slot: int, tokens: Sequence[int], start: int
    ) -> tuple[np.ndarray, list[list[int]], int]:
        assert start <= len(cache[slot]), f"slot {slot} holds {len(cache[slot])}, not {start}"
        cache[slot] = cache[slot][:start] + list(tokens)
        self.calls.append(Call("prefill", [slot], list(tokens), [start]))
        self.time += self.prefill_cost
        return _next_after([tokens[-1]]), cache, 1

    def decode(
        self,
        cache: list[list[int]],
        slots: Sequence[int],
        tokens: Sequence[int],
        positions: Sequence[int],
    ) -> tuple[np.ndarray, list[list[int]]]:
        gate = self._gate
        if gate is not None:
            self._waiting.release()
            gate.acquire()
        for slot, token, position in zip(slots, tokens, positions, strict=True):
            assert len(cache[slot]) == position, (slot, len(cache[slot]), position)
            cache[slot].append(token)
        self.calls.append(Call("decode", list(slots), list(tokens), list(positions)))
        self.time += 1
        return _next_after(tokens), cache

    def sample(self, logits: np.ndarray, sampling: Sampling, key: object) -> np.ndarray:
        return np.argmax(logits, axis=-1).astype(np.int32)

    def pad_sampling(self, sampling: Sampling, n: int) -> Sampling:
        return sampling

    def clock(self) -> float:
        return self.time

    # -- stepping by hand ----------------------------------------------------------------

    def hold(self) -> None:
        """From now on each decode step waits for `release`."""
        self._gate = threading.Semaphore(0)

    def wait_for_step(self, timeout: float = 10) -> None:
        """Block until the engine is inside a decode step, waiting to be released."""
        assert self._waiting.acquire(timeout=timeout), "the engine never reached a decode step"

    def release(self, steps: int = 1) -> None:
        for _ in range(steps):
            self._gate.release()

    def run_freely(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.release(1000)


def _next_after(tokens: Sequence[int]) -> np.ndarray:
    logits = np.zeros((len(tokens), VOCAB), np.float32)
    logits[np.arange(len(tokens)), (np.asarray(tokens) + 1) % VOCAB] = 1.0
    return logits
