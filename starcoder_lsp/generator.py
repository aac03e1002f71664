"""starcoder-jax's `Generator` API over the Runner, plus `generate` for whole batches.

The library path: a caller hands in prompts and gets tokens back, with no server, queue or
prefix reuse. It decodes several steps per compiled call (`steps_per_call`, 8 by default)
wherever at least that many tokens are left to generate; the Engine, which serves editors,
decodes one step per call instead (see engine.py).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from starcoder_lsp import assist, checkpoint, sharding
from starcoder_lsp.assist import Assistant, AssistRow
from starcoder_lsp.config import ModelConfig
from starcoder_lsp.runner import DEFAULT_BATCHES, Runner
from starcoder_lsp.sampling import Sampling, split_key
from starcoder_lsp.speculate import OFF
from starcoder_lsp.stopping import cut_at_stop, finish_reason, stop_strings_rule

# The Generator decodes this many steps per compiled call where at least as many tokens are
# left to generate. Eight took 6-8% less per step than one at batch 1 on a 2-core CPU.
GENERATOR_STEPS_PER_CALL = 8


@dataclass
class Completion:
    tokens: list[int]
    text: str
    finish_reason: str  # "stop" (end/FIM token or stop string), "length"
    prefill_calls: int = 0
    seconds: float = 0.0


class GenerationState(NamedTuple):
    """What generate_next_tokens carries between calls: the cache and each row's length."""

    cache: jax.Array
    positions: np.ndarray


@dataclass(eq=False)
class _Row:
    slot: int
    position: int  # where the last token goes: the tokens before it are cached
    tokens: list[int] = field(default_factory=list)
    done: str | None = None
    prompt: list[int] = field(default_factory=list)


class Generator:
    """A model ready to generate: starcoder-jax's API, plus `generate` for whole batches.

    >>> g = Generator.from_pretrained("bigcode/tiny_starcoder_py")
    >>> initial, hparams = g.prepare_context("def fib(n):", max_length=256, temperature=0)
    >>> tokens, rng = g.generate_at_once(**initial, **hparams, rng=rng, max_new_tokens=32)

    The generator owns one key/value cache of `runner.slots` rows; a batch larger than that
    is generated in groups.
    """

    def __init__(
        self,
        ckpt: checkpoint.Checkpoint,
        assistant: Assistant | None = None,
        **runner_options: object,
    ) -> None:
        runner_options.setdefault("steps_per_call", GENERATOR_STEPS_PER_CALL)
        if assistant is not None:
            runner_options.setdefault("draft_tokens", assistant.k)
            runner_options.setdefault("draft_distributions", assistant.drafter.distributions)
        self.assistant = assistant
        self.checkpoint = ckpt
        self.tokenizer = ckpt.tokenizer
        self.tokens = ckpt.tokens
        self._runner_options = runner_options
        self.runner = Runner.from_checkpoint(ckpt, **runner_options)
        self._cache: jax.Array | None = None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        mesh: Mesh | None = None,
        dtype: str | jnp.dtype | None = None,
        draft: str = OFF,
        draft_tokens: int = 4,
        quantize: str | None = None,
        **runner_options: object,
    ) -> Generator:
        """Load a checkpoint directory or hub id; dtype None is the platform's default.
        draft: "prompt-lookup", or a draft model's directory or hub id, for assisted
        generation (`draft_tokens` per step); "off" by default. quantize: "int8" weights."""
        ckpt = checkpoint.load(name_or_path, mesh, dtype, quantize=quantize)
        slots = int(runner_options.get("slots") or max(DEFAULT_BATCHES))
        return cls(ckpt, assist.build(draft, ckpt, slots, draft_tokens), **runner_options)

    from_huggingface = from_pretrained

    @property
    def config(self) -> ModelConfig:
        return self.checkpoint.config

    def shard(self, mesh: Mesh) -> Generator:
        """Move the parameters onto `mesh` with the partition rules of sharding.py."""
        targets = sharding.param_shardings(self.checkpoint.params, mesh, self.config)
        params = jax.tree_util.tree_map(jax.device_put, self.checkpoint.params, targets)
        self.checkpoint.params, self.checkpoint.mesh = params, mesh
        self.runner = Runner.from_checkpoint(self.checkpoint, **self._runner_options)
        self._cache = None
        return self

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def _take_cache(self) -> jax.Array:
        cache, self._cache = self._cache, None
        return cache if cache is not None else self.runner.new_cache()

    # -- whole generations --------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[Sequence[int] | str],
        max_new_tokens: int = 32,
        temperature: float | Sequence[float] = 0.0,
        top_p: float | Sequence[float] = 1.0,
        top_k: int | Sequence[int] = 0,
        stop: Sequence[str] = (),
        seed: int | jax.Array = 0,
    ) -> list[Completion]:
        """Complete each prompt; rows decode together, each with its own sampling settings."""
        prompts = [self.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        for prompt in prompts:
            self.runner.check_fits(len(prompt), max_new_tokens)
        key = jax.random.PRNGKey(seed) if isinstance(seed, int) else seed
        sampling = Sampling.rows(temperature, top_p, top_k, batch=len(prompts))
        out: list[Completion] = []
        for first in range(0, len(prompts), self.runner.slots):
            group = slice(first, min(first + self.runner.slots, len(prompts)))
            key, sub = split_key(key)
            out += self._generate_group(
                prompts[group], sampling.select(group), sub, max_new_tokens, stop
            )
        return out

    def _generate_group(
        self,
        prompts: list[list[int]],
        sampling: Sampling,
        key: jax.Array,
        max_new_tokens: int,
        stop: Sequence[str],
    ) -> list[Completion]:
        start = time.perf_counter()
        rows, calls = _last(self._steps(prompts, sampling, key, max_new_tokens, stop))
        elapsed = time.perf_counter() - start
        return [self._completion(row, stop, calls, elapsed) for row in rows]

    def _steps(
        self,
        prompts: list[list[int]],
        sampling: Sampling,
        key: jax.Array,
        max_new_tokens: int,
        stop: Sequence[str],
    ) -> Iterator[tuple[list[_Row], int]]:
        """Generate for rows that fit the cache, yielding (the rows, prefill calls made) after
        prefill and after every step, for streaming; the last yield has every row done."""
        runner = self.runner
        cache = self._take_cache()
        stopped_by_text = stop_strings_rule(stop)

        def finish(row: _Row) -> str | None:
            by_text = None
            if stopped_by_text is not None:
                by_text = lambda: stopped_by_text(self.decode(row.tokens))
            return finish_reason(row.tokens, max_new_tokens, self.tokens.stop_ids, by_text)

        rows: list[_Row] = []
        calls = 0
        try:
            for slot, prompt in enumerate(prompts):
                logits, cache, n = runner.prefill(cache, slot, prompt, 0)
                key, sub = split_key(key)
                first = runner.sample(logits, sampling.select([slot]), sub)
                rows.append(_Row(slot, len(prompt), [int(first[0])], prompt=prompt))
                calls += n
            for row in rows:
                row.done = finish(row)
            yield rows, calls
            while active := [r for r in rows if r.done is None]:
                key, sub = split_key(key)
                new, cache = self._next_tokens(cache, active, sampling, sub, max_new_tokens)
                for row, row_new in zip(active, new, strict=True):
                    for token in row_new:
                        row.tokens.append(int(token))
                        row.position += 1
                        row.done = finish(row)
                        if row.done:
                            break  # the rest of the step's tokens for this row are dropped
                yield rows, calls
        finally:
            self._cache = cache
            if self.assistant is not None:
                for row in rows:
                    self.assistant.finished(row, [*row.prompt, *row.tokens[:-1]])

    def _next_tokens(
        self,
        cache: jax.Array,
        rows: list[_Row],
        sampling: Sampling,
        key: jax.Array,
        max_new_tokens: int,
    ) -> tuple[list[Sequence[int]], jax.Array]:
        """Each row's next tokens: the drafts the model keeps and its own, with an assistant;
        else several decode steps in one call where at least as many tokens are left to
        generate, or one."""
        slots = [r.slot for r in rows]
        row_sampling = sampling.select(slots)
        if self.assistant is not None:
            assist_rows = [
                # Budgets follow the slots across calls: a draft that agreed with nothing in
                # the last call starts this one turned down, as a document's does in a server.
                AssistRow(
                    key=r,
                    group=r.slot,
                    tokens=[*r.prompt, *r.tokens],
                    slot=r.slot,
                    room=min(max_new_tokens - len(r.tokens), self.runner.max_len - r.position - 1),
                )
                for r in rows
            ]
            key, drafting = split_key(key)
            new, cache = self.assistant.step(
                self.runner, cache, assist_rows, row_sampling, drafting
            )
            if new is not None:
                return new, cache
        runner = self.runner
        tokens, positions = [r.tokens[-1] for r in rows], [r.position for r in rows]
        left = max(max_new_tokens - len(r.tokens) for r in rows)
        if runner.steps_per_call > 1 and left >= runner.steps_per_call:
            new, cache = runner.decode_steps(cache, slots, tokens, positions, row_sampling, key)
        else:
            logits, cache = runner.decode(cache, slots, tokens, positions)
            new = runner.sample(logits, runner.pad_sampling(row_sampling, len(slots)), key)
            new = new[: len(slots), None]
        if self.assistant is not None:
            self.assistant.plain_step(len(rows), new.shape[1])
        return new, cache

    def _completion(self, row: _Row, stop: Sequence[str], calls: int, seconds: float) -> Completion:
        text = self.decode([t for t in row.tokens if t not in self.tokens.stop_ids])
        return Completion(
            tokens=row.tokens,
            text=cut_at_stop(text, stop),
            finish_reason=row.done or "length",
            prefill_calls=calls,
            seconds=seconds,
        )

    # -- starcoder-jax's API ------------------------------------------------------------

    def prepare_context(
        self,
        text: str,
        max_length: int | None = None,
        temperature: float = 0.8,
        top_p: float = 0.92,
        top_k: int = 0,
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(initial, hparams) for one prompt, left-padded to max_length as starcoder-jax did,
        so that contexts stack into a batch with np.concatenate. Padding is never computed."""
        max_length = max_length or self.runner.max_len
        ids = self.encode(text)[-max_length:]
        tokens = np.zeros((1, max_length), np.int32)
        mask = np.zeros((1, max_length), bool)
        if ids:
            tokens[0, -len(ids) :] = ids
            mask[0, -len(ids) :] = True
        hparams = {
            "temperature": np.full((1, 1), temperature, np.float32),
            "top_p": np.full((1, 1), top_p, np.float32),
            "top_k": np.full((1, 1), top_k, np.int32),
        }
        return {"tokens": tokens, "mask": mask}, hparams

    def generate_from_context(
        self,
        tokens: np.ndarray,
        mask: np.ndarray,
        rng: jax.Array,
        temperature: np.ndarray,
        top_p: np.ndarray,
        top_k: np.ndarray | None = None,
    ) -> tuple[np.ndarray, GenerationState, jax.Array]:
        """Prefill each row's prompt; returns (first new tokens [b], state, rng)."""
        tokens, mask = np.asarray(tokens), np.asarray(mask, bool)
        batch = tokens.shape[0]
        self._check_batch(batch)
        sampling = Sampling.rows(temperature, top_p, 0 if top_k is None else top_k, batch)
        cache = self._take_cache()
        first, positions = np.zeros(batch, np.int32), np.zeros(batch, np.int32)
        for i in range(batch):
            ids = tokens[i][mask[i]].tolist()
            logits, cache, _ = self.runner.prefill(cache, i, ids, 0)
            rng, sub = split_key(rng)
            first[i] = self.runner.sample(logits, sampling.select([i]), sub)[0]
            positions[i] = len(ids)
        return first, GenerationState(cache, positions), rng

    def generate_next_tokens(
        self,
        new_tokens: np.ndarray,
        state: GenerationState,
        rng: jax.Array,
        temperature: np.ndarray,
        top_p: np.ndarray,
        top_k: np.ndarray | None = None,
    ) -> tuple[np.ndarray, GenerationState, jax.Array]:
        """One more token per row, for streaming. The state passed in is consumed."""
        batch = len(new_tokens)
        sampling = Sampling.rows(temperature, top_p, 0 if top_k is None else top_k, batch)
        rows, tokens = list(range(batch)), np.asarray(new_tokens).tolist()
        logits, cache = self.runner.decode(state.cache, rows, tokens, state.positions.tolist())
        rng, sub = split_key(rng)
        next_tokens = self.runner.sample(logits, self.runner.pad_sampling(sampling, batch), sub)
        self._cache = cache  # the latest state's cache is the one to reuse afterwards
        return next_tokens[:batch], GenerationState(cache, state.positions + 1), rng

    def generate_at_once(
        self,
        tokens: np.ndarray,
        mask: np.ndarray,
        rng: jax.Array,
        temperature: np.ndarray,
        top_p: np.ndarray,
        top_k: np.ndarray | None = None,
        max_new_tokens: int = 1024,
    ) -> tuple[np.ndarray, jax.Array]:
        """int32 [b, max_new_tokens]: each row's tokens up to and including its end-of-text,
        then -1. Decodes several steps per compiled call (steps_per_call), or verifies drafts
        with an assistant."""
        tokens, mask = np.asarray(tokens), np.asarray(mask, bool)
        batch = len(tokens)
        prompts = [row[row_mask].tolist() for row, row_mask in zip(tokens, mask, strict=True)]
        for prompt in prompts:
            self.runner.check_fits(len(prompt), max_new_tokens)
        self._check_batch(batch)
        sampling = Sampling.rows(temperature, top_p, 0 if top_k is None else top_k, batch)
        rng, sub = split_key(rng)
        rows, _ = _last(self._steps(prompts, sampling, sub, max_new_tokens, ()))
        out = np.full((batch, max_new_tokens), -1, np.int32)
        for i, row in enumerate(rows):
            out[i, : len(row.tokens)] = row.tokens
        return out, rng

    def stream(
        self,
        prompt: Sequence[int] | str,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop: Sequence[str] = (),
        seed: int | jax.Array = 0,
    ) -> Iterator[list[int]]:
        """The new tokens of one prompt as each step makes them: one at a time when decoding
        plainly, as many as were accepted when an assistant's drafts are verified."""
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.runner.check_fits(len(ids), max_new_tokens)
        key = jax.random.PRNGKey(seed) if isinstance(seed, int) else seed
        sampling = Sampling.rows(temperature, top_p, top_k)
        sent = 0
        for rows, _ in self._steps([ids], sampling, key, max_new_tokens, stop):
            new = rows[0].tokens[sent:]
            sent = len(rows[0].tokens)
            if new:
                yield new

    def _check_batch(self, batch: int) -> None:
        if batch > self.runner.slots:
            raise ValueError(
                f"a batch of {batch} exceeds the {self.runner.slots} cache rows; "
                "pass slots=N to from_pretrained"
            )


def _last(steps: Iterator[tuple[list[_Row], int]]) -> tuple[list[_Row], int]:
    """Run a generation to its end."""
    return deque(steps, maxlen=1)[0]
