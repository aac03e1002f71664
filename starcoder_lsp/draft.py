"""Draft tokens for assisted generation: from the prompt (lookup) or from a small model.

Both are `Drafter`s: given each active row's tokens so far and how many drafts it wants,
they propose them. The engine and the generator verify the proposals with the big model in
one step (Runner.verify).

The draft model keeps its own key/value cache slots, reused across keystrokes exactly like
the big model's: a row's slot is the one sharing the longest token prefix, and a proposal
first catches up on the tokens the big model accepted that the draft has not seen.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import jax
import numpy as np

from starcoder_lsp.cache import Lease, PrefixCache, common_prefix
from starcoder_lsp.errors import CheckpointError
from starcoder_lsp.runner import Runner
from starcoder_lsp.sampling import Sampling
from starcoder_lsp.speculate import prompt_lookup


@dataclass(frozen=True)
class DraftRow:
    """What a drafter needs of one row: who it is, its tokens so far (the prompt and what was
    generated; the big model has cached all but the last), and how many drafts it wants."""

    key: Hashable
    tokens: Sequence[int]
    wanted: int


class Drafter(Protocol):
    # The proposals come with the distributions they were drawn from (for speculative
    # sampling), not as certainties.
    distributions: bool

    def warmup(self) -> None: ...

    def propose(
        self, rows: Sequence[DraftRow], sampling: Sampling, key: jax.Array
    ) -> tuple[list[list[int]], np.ndarray | None]:
        """Each row's drafts (at most `wanted`), and with `distributions` their distributions
        [rows, k, vocab] (k the most any row may ask)."""
        ...

    def release(self, key: Hashable, written: Sequence[int]) -> None:
        """The row finished; the big model's cache holds exactly `written` for it."""
        ...


@dataclass
class PromptLookup:
    """Drafts from the row's own tokens: what followed the last n-gram where it occurred."""

    ngram: int = 3
    distributions: bool = False

    def warmup(self) -> None:
        pass

    def propose(
        self, rows: Sequence[DraftRow], sampling: Sampling, key: jax.Array
    ) -> tuple[list[list[int]], None]:
        drafts = [prompt_lookup(r.tokens, r.wanted, self.ngram) if r.wanted else [] for r in rows]
        return drafts, None

    def release(self, key: Hashable, written: Sequence[int]) -> None:
        pass


# A row missing at most this many tokens catches up in decode steps batched with the other
# rows (one step reads the weights once for all of them); more, in a prefill of its own.
FEW_MISSING = 2


@dataclass
class _DraftSlot:
    lease: Lease
    held: list[int]  # the tokens whose keys and values the draft's slot holds


@dataclass
class DraftModel:
    """A small model with the big one's tokenizer, proposing k tokens per row per step.

    runner: the draft model's, made with steps_per_call=k and steps_with_probs; it owns its
    own cache of as many slots as the big model's.
    """

    runner: Runner
    prefix_cache: PrefixCache = field(init=False)
    distributions: bool = True
    _cache: jax.Array | None = None
    _rows: dict[Hashable, _DraftSlot] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.runner.steps_per_call < 2 or not self.runner.steps_with_probs:
            raise ValueError("a draft model's runner needs steps_per_call ≥ 2 and probs")
        self.prefix_cache = PrefixCache(self.runner.slots)

    @property
    def k(self) -> int:
        return self.runner.steps_per_call

    def warmup(self) -> None:
        self._cache = self.runner.warmup()

    def propose(
        self, rows: Sequence[DraftRow], sampling: Sampling, key: jax.Array
    ) -> tuple[list[list[int]], np.ndarray]:
        if self._cache is None:
            self._cache = self.runner.new_cache()
        self._catch_up(rows)
        slots = [self._rows[r.key].lease.slot for r in rows]
        last = [r.tokens[-1] for r in rows]
        positions = [len(r.tokens) - 1 for r in rows]
        # A row that asks for one draft (a budget turned down, or a retry) costs one step.
        steps = 1 if max(r.wanted for r in rows) <= 1 else self.k
        out, probs, self._cache = self.runner.propose(
            self._cache, slots, last, positions, sampling, key, steps
        )
        for row, proposed in zip(rows, out, strict=True):
            # It ran the last token and every proposal but the final one.
            self._rows[row.key].held = [*row.tokens, *proposed[:-1].tolist()]
        drafts = [proposed[: r.wanted].tolist() for r, proposed in zip(rows, out, strict=True)]
        return drafts, probs

    def release(self, key: Hashable, written: Sequence[int]) -> None:
        slot = self._rows.pop(key, None)
        if slot is not None:
            valid = common_prefix(slot.held, written)
            self.prefix_cache.release(slot.lease, slot.held[:valid])

    def _catch_up(self, rows: Sequence[DraftRow]) -> None:
        """Make each row's draft slot hold all of the row's tokens but the last. What the
        last verification accepted (a token or two per row: the final proposal, whose keys
        were never computed) goes in decode steps over all rows at once; more (a row's first
        proposal, or after its drafting was off) is prefilled row by row."""
        gaps: list[tuple[int, int, list[int]]] = []  # (slot, first missing position, tokens)
        for row in rows:
            needed = list(row.tokens[:-1])
            slot = self._rows.get(row.key)
            if slot is None:
                lease = self.prefix_cache.acquire(row.tokens)
                if lease is None:
                    raise RuntimeError("the draft model has fewer cache slots than the model")
                slot = self._rows[row.key] = _DraftSlot(lease, needed[: lease.reuse])
            start = common_prefix(slot.held, needed)
            missing = needed[start:]
            if len(missing) > FEW_MISSING:
                _, self._cache, _ = self.runner.prefill(
                    self._cache, slot.lease.slot, missing, start
                )
            elif missing:
                gaps.append((slot.lease.slot, start, missing))
            slot.held = needed
        for step in range(max((len(tokens) for *_, tokens in gaps), default=0)):
            batch = [(s, at + step, tokens[step]) for s, at, tokens in gaps if len(tokens) > step]
            slots, positions, tokens = (list(column) for column in zip(*batch, strict=True))
            _, self._cache = self.runner.decode(self._cache, slots, tokens, positions)


def check_same_vocabulary(model_tokenizer: object, draft_tokenizer: object, draft: str) -> None:
    """Refuse a draft model whose tokens mean something else: its proposals would be noise."""
    if model_tokenizer.get_vocab() != draft_tokenizer.get_vocab():
        raise CheckpointError(
            f"the draft model {draft} has another tokenizer than the model: assisted "
            "generation needs a draft with the same vocabulary (e.g. tiny_starcoder_py for "
            "StarCoder, a StarCoder2 model for StarCoder2)"
        )
