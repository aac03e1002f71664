"""Draft tokens for assisted generation, and how many to ask for.

A draft proposes the next few tokens; the model checks them all in one step (the runner's
`verify`) and keeps those it agrees with, so a step that would have produced one token
produces up to k + 1. Two sources:

- prompt lookup: code repeats itself, so the tokens that followed the last n tokens where
  they occurred before (in the prompt or in what was generated) are often what comes next.
  No model: a search over token ids.
- a draft model: a small model with the same tokenizer (tiny_starcoder_py for a larger
  StarCoder) proposes them, one of its own cheap decode steps each (see engine.py).

`DraftBudget` keeps a draft from costing much when it keeps being rejected: the number of
drafts asked for follows the acceptance of the recent past, down to none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

OFF, PROMPT_LOOKUP, DRAFT_MODEL = "off", "prompt-lookup", "model"
DRAFT_SOURCES = (OFF, PROMPT_LOOKUP, DRAFT_MODEL)


def prompt_lookup(tokens: Sequence[int], k: int, ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the longest suffix
    of `tokens` (from `ngram` tokens down to `min_ngram`); [] when there is none."""
    ids = np.asarray(tokens, np.int64)
    for n in range(min(ngram, len(ids) - 1), min_ngram - 1, -1):
        tail = ids[-n:]
        # Windows of n tokens that end before the last token, latest first.
        windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)
        matches = np.flatnonzero((windows == tail).all(axis=1))
        for start in matches[::-1]:
            follow = ids[start + n : start + n + k]
            if len(follow):
                return follow.tolist()
    return []


@dataclass
class DraftBudget:
    """How many draft tokens a document's requests ask for, from how many were accepted.

    Starts at one draft token: a draft that is wrong from the start wastes one token's check,
    not k. After each verification the running acceptance rate (an exponential average)
    decides: above `high` the budget doubles, up to k; below `low` it halves, down to 0 (plain
    decoding). A document that is off is tried again with one draft token after `retry`
    steps, so that a stretch of code that starts repeating itself is noticed; each retry that
    fails doubles the wait (up to `max_retry`), so that a draft that agrees with nothing costs
    a few percent of plain decoding, and one that succeeds turns the draft back on.
    """

    k: int
    low: float = 0.25
    high: float = 0.5
    retry: int = 16
    max_retry: int = 256
    rate: float = 0.4
    decay: float = 0.8
    current: int = 1
    _wait: int = 0
    _idle: int = 0

    def __post_init__(self) -> None:
        self.current = min(self.current, self.k)
        self._wait = self._wait or self.retry

    def drafts(self) -> int:
        """How many draft tokens to ask for now."""
        if self.current == 0:
            self._idle += 1
            if self._idle >= self._wait:
                self._idle = 0
                return 1
        return self.current

    def record(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        self.rate = self.decay * self.rate + (1 - self.decay) * accepted / drafted
        if self.current == 0:  # a retry
            if accepted:
                self.current, self.rate, self._wait = 1, max(self.rate, self.high), self.retry
            else:
                self._wait = min(2 * self._wait, self.max_retry)
        elif self.rate < self.low:
            self.current //= 2
        elif self.rate > self.high and self.current < self.k:
            self.current = min(self.k, self.current * 2)
