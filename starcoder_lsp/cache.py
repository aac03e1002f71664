"""Which key/value cache slot a request reuses: bookkeeping of token ids, no arrays.

Positions are absolute, so a slot's keys and values are valid for a new prompt exactly as
far as the two token sequences agree. A request takes the free slot sharing the longest
common prefix with its prompt and prefills only the rest, if it keeps at least half of what
that slot holds (the prompt continues that slot's text, as a keystroke continues the last);
otherwise the least recently used free slot is overwritten. Every FIM prompt begins with the
same special tokens: without the half rule, another connection's prompt sharing just those
took the slot most recently used (a typist's, between two keystrokes) and threw away the
thousands of tokens its next keystroke would have reused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Lease:
    slot: int
    reuse: int  # leading prompt tokens whose keys/values the slot already holds


@dataclass
class CacheStats:
    requests: int = 0
    hits: int = 0
    reused_tokens: int = 0
    prefilled_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0


@dataclass
class _Slot:
    tokens: list[int] = field(default_factory=list)
    busy: bool = False
    last_used: int = 0


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    # Vectorised: prompts run to thousands of tokens and every slot is compared per request.
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.asarray(a[:n]) != np.asarray(b[:n])
    return int(np.argmax(differ)) if differ.any() else n


class PrefixCache:
    def __init__(self, slots: int, enabled: bool = True) -> None:
        if slots < 1:
            raise ValueError("the cache needs at least one slot")
        self.enabled = enabled
        self._slots = [_Slot() for _ in range(slots)]
        self._clock = 0
        self.stats = CacheStats()

    def has_free(self) -> bool:
        return any(not s.busy for s in self._slots)

    def acquire(self, tokens: Sequence[int]) -> Lease | None:
        """Pin the best free slot for `tokens`; None when every slot is busy."""
        free = [i for i, s in enumerate(self._slots) if not s.busy]
        if not free:
            return None
        # At least one token must still run, to give the logits of the next one.
        cap = max(len(tokens) - 1, 0)
        shared = {
            i: min(common_prefix(self._slots[i].tokens, tokens), cap) if self.enabled else 0
            for i in free
        }
        # Slots the prompt continues: it keeps at least half of what they hold.
        continued = [i for i in free if 2 * shared[i] >= len(self._slots[i].tokens)]
        # Longest shared prefix; among equals the most recently used, as the likelier to
        # be extended by the next keystroke.
        best = max(continued or free, key=lambda i: (shared[i], self._slots[i].last_used))
        if not continued or shared[best] == 0:  # evict the least recently used free slot
            best = min(free, key=lambda i: self._slots[i].last_used)
        slot = self._slots[best]
        slot.busy = True
        self.stats.requests += 1
        self.stats.hits += shared[best] > 0
        self.stats.reused_tokens += shared[best]
        self.stats.prefilled_tokens += len(tokens) - shared[best]
        return Lease(best, shared[best])

    def release(self, lease: Lease, written: Sequence[int]) -> None:
        """The slot now holds keys/values for exactly `written`; it is free again."""
        slot = self._busy(lease)
        slot.tokens = list(written)
        slot.busy = False
        self._clock += 1
        slot.last_used = self._clock

    def discard(self, lease: Lease) -> None:
        """Free the slot and forget its contents (what was written is unknown)."""
        slot = self._busy(lease)
        slot.tokens = []
        slot.busy = False
        slot.last_used = -1  # empty: the first to be taken by a prompt that shares nothing

    def _busy(self, lease: Lease) -> _Slot:
        slot = self._slots[lease.slot]
        if not slot.busy:
            raise ValueError(f"slot {lease.slot} is not leased (released twice?)")
        return slot

    def contents(self, slot: int) -> list[int]:
        return list(self._slots[slot].tokens)
