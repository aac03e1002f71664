"""Assisted generation: one step of the big model that keeps a draft's tokens it agrees with.

The Engine and the Generator both call `Assistant.step` in place of a decode step: it asks
the drafter for each row's drafts (as many as the row's budget allows), verifies them all
in one step of the big model (Runner.verify), and returns each row's new tokens: the kept
drafts and the model's own next token. When no row has a draft it returns None and the
caller decodes one step as usual, so a draft that finds nothing costs only the search.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import jax
import numpy as np

from starcoder_lsp import checkpoint
from starcoder_lsp.checkpoint import Checkpoint
from starcoder_lsp.draft import Drafter, DraftModel, DraftRow, PromptLookup, check_same_vocabulary
from starcoder_lsp.progress import Progress
from starcoder_lsp.runner import Runner
from starcoder_lsp.sampling import Sampling, split_key
from starcoder_lsp.speculate import OFF, PROMPT_LOOKUP, DraftBudget

# Budgets are kept per document; the least recently used are forgotten past this many.
MAX_BUDGETS = 4096


@dataclass(frozen=True)
class AssistRow:
    """A row about to take a step: its drafter key, the document it belongs to, its tokens
    so far (the model has cached all but the last), its cache slot, and how many more tokens
    it may take (no draft past its max_new_tokens or the context)."""

    key: Hashable
    group: Hashable
    tokens: Sequence[int]
    slot: int
    room: int


@dataclass
class SpeculationStats:
    """How much the drafts saved: model steps per generated token is the figure of merit."""

    drafted: int = 0
    accepted: int = 0
    model_steps: int = 0  # steps of the big model: verifications and plain decode steps
    tokens: int = 0  # tokens those steps produced
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, drafted: int, accepted: int, steps: int, tokens: int) -> None:
        with self.lock:
            self.drafted += drafted
            self.accepted += accepted
            self.model_steps += steps
            self.tokens += tokens

    def as_json(self) -> dict[str, float | int]:
        with self.lock:
            return {
                "drafted": self.drafted,
                "accepted": self.accepted,
                "acceptance": round(self.accepted / self.drafted, 3) if self.drafted else 0.0,
                "modelStepsPerToken": round(self.model_steps / self.tokens, 3)
                if self.tokens
                else 1.0,
            }


class Assistant:
    """A drafter, the number of draft tokens per step (k), and a budget per document."""

    def __init__(self, drafter: Drafter, k: int) -> None:
        if k < 1:
            raise ValueError(f"assisted generation needs at least one draft token, not {k}")
        self.drafter = drafter
        self.k = k
        self.stats = SpeculationStats()
        self._budgets: OrderedDict[Hashable, DraftBudget] = OrderedDict()

    def step(
        self,
        runner: Runner,
        cache: jax.Array,
        rows: Sequence[AssistRow],
        sampling: Sampling,
        key: jax.Array,
    ) -> tuple[list[list[int]] | None, jax.Array]:
        """Each row's new tokens (kept drafts, then the model's own), and the cache; None for
        the tokens when no row has a draft (then the caller decodes a plain step)."""
        wanted = [min(self._budget(r.group).drafts(), r.room - 1, self.k) for r in rows]
        wanted = [max(w, 0) for w in wanted]
        if not any(wanted):
            return None, cache
        key, drafting = split_key(key)
        draft_rows = [DraftRow(r.key, r.tokens, w) for r, w in zip(rows, wanted, strict=True)]
        drafts, probs = self.drafter.propose(draft_rows, sampling, drafting)
        if not any(drafts):
            return None, cache
        if probs is not None:
            probs = _widen(probs, runner.draft_tokens)
        slots = [r.slot for r in rows]
        last = [r.tokens[-1] for r in rows]
        positions = [len(r.tokens) - 1 for r in rows]
        accepted, following, cache = runner.verify(
            cache, slots, last, drafts, positions, sampling, key, probs
        )
        new_tokens = []
        for row, row_drafts, kept, token in zip(rows, drafts, accepted, following, strict=True):
            self._budget(row.group).record(len(row_drafts), int(kept))
            new_tokens.append([*row_drafts[:kept], int(token)])
        produced = sum(len(t) for t in new_tokens)
        self.stats.record(sum(map(len, drafts)), int(np.sum(accepted)), 1, produced)
        return new_tokens, cache

    def plain_step(self, rows: int, steps: int = 1) -> None:
        """Count decode steps taken without drafts (`steps` in one call)."""
        self.stats.record(0, 0, steps, rows * steps)

    def finished(self, key: Hashable, written: Sequence[int]) -> None:
        self.drafter.release(key, written)

    def _budget(self, group: Hashable) -> DraftBudget:
        budget = self._budgets.get(group)
        if budget is None:
            budget = self._budgets[group] = DraftBudget(self.k)
            while len(self._budgets) > MAX_BUDGETS:
                self._budgets.popitem(last=False)
        else:
            self._budgets.move_to_end(group)
        return budget


def build(
    draft: str,
    ckpt: Checkpoint,
    slots: int,
    k: int = 4,
    ngram: int = 3,
    progress: Progress | None = None,
) -> Assistant | None:
    """An assistant for the model of `ckpt`: draft is "off" (None), "prompt-lookup", or a
    draft model's directory or hub id, loaded on the model's mesh with as many cache slots."""
    if draft == OFF:
        return None
    if draft == PROMPT_LOOKUP:
        return Assistant(PromptLookup(ngram), k)
    if progress is not None:
        progress(0, 1, f"loading the draft model {draft}")
    quantize = ckpt.config.quantization  # an int8 model gets an int8 draft
    small = checkpoint.load(draft, ckpt.mesh, ckpt.dtype, progress=progress, quantize=quantize)
    check_same_vocabulary(ckpt.tokenizer, small.tokenizer, draft)
    runner = Runner.from_checkpoint(
        small,
        slots=slots,
        max_len=min(ckpt.config.n_positions, small.config.n_positions),
        steps_per_call=k,
        steps_with_probs=True,
    )
    return Assistant(DraftModel(runner), k)


def _widen(probs: np.ndarray, k: int) -> np.ndarray:
    """Draft distributions [rows, ≤k, vocab] padded to the verify step's k."""
    if probs.shape[1] == k:
        return probs
    padded = np.zeros((probs.shape[0], k, probs.shape[2]), probs.dtype)
    padded[:, : probs.shape[1]] = probs
    return padded
