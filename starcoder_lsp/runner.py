"""The model on its mesh and its compiled steps: prefill, decode, decode_steps.

`Runner` is the engine API the Engine (the server's scheduler) and the Generator (the
library's) both drive, as JetStream's engine_api drives a model: every step takes the
key/value cache and returns it (the cache is donated: the handle passed in is dead after the
call), so a caller owns exactly one cache and threads it through its loop:

    runner = Runner.from_checkpoint(checkpoint.load("models/tiny"), slots=2)
    cache = runner.warmup()  # compiles every shape; returns an empty cache
    logits, cache, _ = runner.prefill(cache, slot=0, tokens=prompt, start=0)
    token = runner.sample(logits, Sampling.rows(0.0), key)[0]
    for position in range(len(prompt), len(prompt) + 16):
        logits, cache = runner.decode(cache, [0], [token], [position])
        token = runner.sample(logits, runner.pad_sampling(Sampling.rows(0.0), 1), key)[0]

One jitted step serves prefill and decode: it attends over a row's cached keys and values
plus its new tokens and returns the new keys and values, which a second program writes into
the cache in place. Shapes are static and few (prefill chunk sizes, decode batch sizes);
attention loops over as much of the cache as is filled, a traced count. So after `warmup()`
no request compiles anything.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from starcoder_lsp import cpu_kernels, sharding, steps
from starcoder_lsp.config import ModelConfig
from starcoder_lsp.cpu_kernels import one_cpu
from starcoder_lsp.model import GPTBigCode
from starcoder_lsp.progress import Progress
from starcoder_lsp.sampling import Sampling, split_key
from starcoder_lsp.steps import StepRows, one_token_each

if TYPE_CHECKING:
    from starcoder_lsp.checkpoint import Checkpoint

# Prefill chunk sizes. Above a few tokens a chunk's cost grows with its length (compute-bound),
# so a prompt is cut greedily into the largest chunks that fit and only the last chunk is
# padded, by less than the smallest size; bigger chunks would only add compiled shapes. A
# keystroke adds one to three tokens to an SPM prompt: a chunk of 4 costs about a decode step
# (reading the weights once), where padding them to 16 cost about three.
DEFAULT_CHUNKS = (4, 16, 64, 256)
DEFAULT_BATCHES = (1, 2, 4, 8)
PREFILL, DECODE, MULTI_STEP, VERIFY = "prefill", "decode", "multi-step decode", "verify"
# A draft model's runner also proposes a single token, for rows that ask for only one.
ONE_DRAFT = "one-token draft"


def _bucket(sizes: Sequence[int], n: int) -> int:
    i = bisect.bisect_left(sizes, n)
    if i == len(sizes):
        raise ValueError(f"{n} exceeds the largest compiled size {sizes[-1]}")
    return sizes[i]


class Runner:
    """The model on its mesh, the shape of its key/value cache, and the compiled steps.

    The cache is an array [layers, 2, slots, max_len, kv_heads, head_dim]. A caller owns it
    and passes it in and out of each step (it is donated: the old handle is dead after a call).
    Its size is fixed, so that one set of compiled programs serves every request.

    steps_per_call > 1 also compiles `decode_steps`, which runs that many decode steps in one
    program and samples on the device: per step it saves launching the programs and waiting
    for the host (measured with `starcoder-lsp bench` for tiny_starcoder_py on a 2-core CPU,
    five runs: 1.13-1.26× the bandwidth floor at batch 1 with 8 steps, against 1.20-1.37× one
    step at a time). A row that stops midway wastes the rest of the call, and a new request
    waits for the call to end, so the server decodes one step at a time.

    draft_tokens = k > 0 also compiles `verify`, which runs each row's last token and up to k
    draft tokens in one step and keeps the drafts the model agrees with (assisted
    generation, see speculate.py); draft_distributions: the drafts come with the
    distributions they were drawn from (a draft model), not as certainties (prompt lookup).
    steps_with_probs: `propose` (decode_steps) also returns those distributions, as a draft
    model's runner must. int8_activations: whether an int8 model on one CPU device rounds its
    activations to int8 where the CPU can (default: as cpu_kernels.int8_activations() says).
    """

    def __init__(
        self,
        config: ModelConfig,
        params: dict,
        mesh: Mesh,
        dtype: jnp.dtype,
        max_len: int | None = None,
        slots: int | None = None,
        chunks: Sequence[int] = DEFAULT_CHUNKS,
        batches: Sequence[int] = DEFAULT_BATCHES,
        steps_per_call: int = 1,
        draft_tokens: int = 0,
        draft_distributions: bool = False,
        steps_with_probs: bool = False,
        int8_activations: bool | None = None,
    ) -> None:
        if steps_per_call < 1:
            raise ValueError(f"steps_per_call must be at least 1, not {steps_per_call}")
        if draft_tokens < 0:
            raise ValueError(f"draft_tokens must not be negative, not {draft_tokens}")
        self.steps_per_call = steps_per_call
        self.draft_tokens = draft_tokens
        self.draft_distributions = draft_distributions
        self.steps_with_probs = steps_with_probs
        self.config, self.params, self.mesh, self.dtype = config, params, mesh, jnp.dtype(dtype)
        self._flat: tuple[dict, steps.ParamTree, tuple[jax.Array, ...]] | None = None
        # Decided here, not when a program is traced: a bad setting is refused when the runner
        # is made, and a runner's programs keep the form they were made with.
        if int8_activations is None:
            int8_activations = config.quantized and cpu_kernels.int8_activations()
        rounds = (
            int8_activations
            and config.quantized
            and one_cpu(mesh)
            and cpu_kernels.has_int8_activations()
        )
        self.model = GPTBigCode(config, self.dtype, mesh=mesh, int8_activations=rounds)
        self.max_len = min(max_len or config.n_positions, config.n_positions)
        self.chunks = tuple(sorted(chunks))
        self.slots = slots or max(batches)
        self.batches = tuple(sorted(b for b in batches if b < self.slots)) + (self.slots,)
        c = config
        self._cache_shape = (c.n_layer, 2, self.slots, self.max_len, c.kv_heads, c.head_dim)
        self._cache_sharding = sharding.cache_sharding(mesh, self.slots, config)
        self._zeros = jax.jit(
            partial(jnp.zeros, self._cache_shape, self.dtype), out_shardings=self._cache_sharding
        )

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, **options: object) -> Runner:
        """A runner for a loaded checkpoint; options as for `Runner(...)`."""
        return cls(ckpt.config, ckpt.params, ckpt.mesh, ckpt.dtype, **options)

    # -- the cache --------------------------------------------------------------------------

    @property
    def cache_bytes(self) -> int:
        return int(np.prod(self._cache_shape)) * self.dtype.itemsize

    def new_cache(self) -> jax.Array:
        return self._zeros()

    def check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Refuse, with a ValueError that says why, a prompt that cannot run to the end."""
        if prompt_tokens < 1:
            raise ValueError("a prompt needs at least one token")
        over = prompt_tokens + max_new_tokens - self.max_len
        if over > 0:
            raise ValueError(
                f"a prompt of {prompt_tokens} tokens + {max_new_tokens} new tokens does not fit "
                f"the context of {self.max_len} (together they exceed the context by {over})"
            )

    # -- the steps ----------------------------------------------------------------------------

    def prefill(
        self, cache: jax.Array, slot: int, tokens: Sequence[int], start: int
    ) -> tuple[jax.Array, jax.Array, int]:
        """Prefill `tokens` at positions start.. of `slot` (whose first `start` positions are
        already cached), in as few compiled chunks as fit. Returns the last token's logits
        [1, vocab], the cache, and the number of model calls made."""
        if not tokens:
            raise ValueError("prefill needs at least one token")
        if start + len(tokens) > self.max_len:
            raise ValueError(f"{start + len(tokens)} tokens exceed the cache ({self.max_len})")
        calls, done = 0, 0
        while done < len(tokens):
            left = len(tokens) - done
            fitting = [c for c in self.chunks if c <= left]
            size = fitting[-1] if fitting else self.chunks[0]
            n = min(size, left)
            chunk = np.zeros((1, size), np.int32)
            chunk[0, :n] = tokens[done : done + n]
            positions = np.minimum(start + done + np.arange(size, dtype=np.int32), self.max_len - 1)
            valid = np.arange(size) < n
            rows = StepRows(chunk, positions[None], valid[None], np.array([slot], np.int32))
            logits, cache = self._step(cache, rows)
            done += n
            calls += 1
        return logits, cache, calls

    def decode(
        self,
        cache: jax.Array,
        slots: Sequence[int],
        tokens: Sequence[int],
        positions: Sequence[int],
    ) -> tuple[jax.Array, jax.Array]:
        """One step for each row: `tokens[i]` sits at `positions[i]` of `slots[i]`.
        Returns logits [batch bucket, vocab] (rows past len(slots) are padding) and the cache."""
        _, rows = self._decode_rows(slots, tokens, positions)
        return self._step(cache, one_token_each(rows))

    def decode_steps(
        self,
        cache: jax.Array,
        slots: Sequence[int],
        tokens: Sequence[int],
        positions: Sequence[int],
        sampling: Sampling,
        key: jax.Array,
    ) -> tuple[np.ndarray, jax.Array]:
        """`steps_per_call` steps for each row in one call, as `decode` makes one, sampling each
        next token with the row's settings. Returns the tokens [len(slots), steps] and the cache,
        which holds the keys and values of `tokens` and of all but the last new token. A row
        that stops early (a stop token, a stop string) just ignores the rest; steps that would
        run past the cache write nothing."""
        out, _, cache = self.propose(cache, slots, tokens, positions, sampling, key)
        return out, cache

    def propose(
        self,
        cache: jax.Array,
        slots: Sequence[int],
        tokens: Sequence[int],
        positions: Sequence[int],
        sampling: Sampling,
        key: jax.Array,
        steps: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None, jax.Array]:
        """`decode_steps`, also returning, with steps_with_probs, the distribution each token
        was drawn from [len(slots), steps, vocab]: what a draft model proposes. `steps` is
        steps_per_call (the default) or, with steps_with_probs, 1."""
        count = steps or self.steps_per_call
        if count not in (1, self.steps_per_call) or (count == 1 and not self.steps_with_probs):
            raise ValueError(f"this runner proposes {self.steps_per_call} tokens, not {count}")
        source, rows = self._decode_rows(slots, tokens, positions)
        out, probs, cache = self._steps(cache, rows, sampling.select(source), key, count)
        n = len(slots)
        return out[:n], None if probs is None else probs[:n], cache

    def verify(
        self,
        cache: jax.Array,
        slots: Sequence[int],
        tokens: Sequence[int],
        drafts: Sequence[Sequence[int]],
        positions: Sequence[int],
        sampling: Sampling,
        key: jax.Array,
        draft_probs: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, jax.Array]:
        """One step for each row over its last token `tokens[i]` (at `positions[i]` of
        `slots[i]`, as `decode` takes it) and its drafts `drafts[i]` (at most draft_tokens;
        draft_probs [rows, draft_tokens, vocab] with the runner's draft_distributions).
        Returns how many drafts each row keeps, the model's own next token after them, and the
        cache, which then holds the keys and values of the token and of every kept draft. What
        it holds beyond them is junk that nothing reads: a row's length is what was kept."""
        k = self.draft_tokens
        if k == 0:
            raise ValueError("this runner was made without draft_tokens: it cannot verify")
        if (draft_probs is not None) != self.draft_distributions:
            raise ValueError("draft_probs must be given exactly when draft_distributions is set")
        n = len(slots)
        counts = np.array([len(d) for d in drafts], np.int32)
        if counts.max(initial=0) > k:
            raise ValueError(f"at most {k} drafts per row, not {counts.max()}")
        padded = np.zeros((n, k), np.int32)
        for row, row_drafts in enumerate(drafts):
            padded[row, : len(row_drafts)] = row_drafts
        source, rows = self._decode_rows(slots, tokens, positions)
        counts = np.where(rows.valid, counts[source], 0)
        at = rows.positions[:, None] + np.arange(k + 1, dtype=np.int32)
        valid = rows.valid[:, None] & (np.arange(k + 1) <= counts[:, None]) & (at < self.max_len)
        row_tokens = np.concatenate([rows.tokens[:, None], padded[source]], axis=1)
        step = StepRows(row_tokens, np.minimum(at, self.max_len - 1), valid, rows.slots, rows.order)
        probs = None if draft_probs is None else np.asarray(draft_probs, np.float32)[source]
        accepted, following, cache = self._verify(
            cache, step, counts, probs, sampling.select(source), key
        )
        return accepted[:n], following[:n], cache

    def sample(self, logits: jax.Array, sampling: Sampling, key: jax.Array) -> np.ndarray:
        """The next token of each row of `logits`, on the host."""
        return steps.to_host(steps.sample_tokens(logits, key, sampling))

    def pad_sampling(self, sampling: Sampling, n: int) -> Sampling:
        """Per-row settings padded to the decode batch bucket that n rows use."""
        size = _bucket(self.batches, n)
        return Sampling(*(np.concatenate([v, np.repeat(v[:1], size - n)]) for v in sampling))

    def _params(self) -> tuple[steps.ParamTree, tuple[jax.Array, ...]]:
        """The parameters as the steps take them (steps.ParamTree), flattened once per tree."""
        if self._flat is None or self._flat[0] is not self.params:
            leaves = tuple(jax.tree_util.tree_leaves(self.params))
            self._flat = (self.params, steps.ParamTree(self.params), leaves)
        return self._flat[1], self._flat[2]

    def _step(self, cache: jax.Array, rows: StepRows) -> tuple[jax.Array, jax.Array]:
        # The small host arrays go to the programs as they are: jit places them itself for
        # about 10 µs each, where jax.device_put took 100-180 µs each from Python (4% of a
        # batch-1 decode step for the five of them).
        logits, new_kv = steps.forward(self.model, *self._params(), cache, rows)
        return logits, steps.write(cache, new_kv, rows.positions, rows.valid, rows.slots)

    def _verify(
        self,
        cache: jax.Array,
        rows: StepRows,
        counts: np.ndarray,
        draft_probs: np.ndarray | None,
        sampling: Sampling,
        key: jax.Array,
    ) -> tuple[np.ndarray, np.ndarray, jax.Array]:
        accepted, following, new_kv = steps.verify(
            self.model, *self._params(), cache, rows, counts, draft_probs, sampling, key
        )
        cache = steps.write(cache, new_kv, rows.positions, rows.valid, rows.slots)
        return steps.to_host(accepted), steps.to_host(following), cache

    def _steps(
        self,
        cache: jax.Array,
        rows: StepRows,
        sampling: Sampling,
        key: jax.Array,
        count: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None, jax.Array]:
        count, with_probs = count or self.steps_per_call, self.steps_with_probs
        args = (cache, rows, sampling, key, count, with_probs)
        out, recent, probs = steps.decode_steps(self.model, *self._params(), *args)
        at = rows.positions[:, None] + np.arange(count, dtype=np.int32)
        valid = rows.valid[:, None] & (at < self.max_len)
        probs = None if probs is None else steps.to_host(probs)
        return steps.to_host(out), probs, steps.write(cache, recent, at, valid, rows.slots)

    def _decode_rows(
        self, slots: Sequence[int], tokens: Sequence[int], positions: Sequence[int]
    ) -> tuple[np.ndarray, StepRows]:
        """How n requests in `slots` fill the rows of one decode call (one token per row, each
        array [batch bucket]). Also returns `source`: the request each row takes its token,
        position and settings from."""
        n = len(slots)
        size = _bucket(self.batches, n)
        source = np.zeros(size, np.int32)
        take = lambda values: np.asarray(values, np.int32)[source]
        if size < self.slots:
            # Padding rows repeat request 0 but are invalid: they write nothing.
            source[:n] = np.arange(n)
            rows = StepRows(take(tokens), take(positions), np.arange(size) < n, take(slots))
            return source, rows
        # A full batch runs one row per slot, row i in slot i, so that the cache is read in
        # place rather than copied row by row (a third of a batch-8 step). Slots without a
        # request run an invalid row; results come back in the order of `slots`.
        if len(set(slots)) != n:
            raise ValueError(f"a slot appears twice in one step: {list(slots)}")
        source[list(slots)] = np.arange(n)
        valid = np.zeros(size, bool)
        valid[list(slots)] = True
        order = np.concatenate([np.asarray(slots, np.int32), np.full(size - n, slots[0])])
        every_slot = np.arange(size, dtype=np.int32)
        rows = StepRows(take(tokens), take(positions), valid, every_slot, order.astype(np.int32))
        return source, rows

    # -- compilation ------------------------------------------------------------------------

    def shapes(self) -> list[tuple[str, int]]:
        """Every (kind, size) the model step is compiled for: a prefill chunk of `size`
        tokens, or a decode step of `size` rows. How much of the cache is read is not a
        shape: attention loops over the filled part of it."""
        shapes = [(PREFILL, c) for c in self.chunks] + [(DECODE, b) for b in self.batches]
        if self.steps_per_call > 1:
            shapes += [(MULTI_STEP, b) for b in self.batches]
        if self.steps_with_probs:
            shapes += [(ONE_DRAFT, b) for b in self.batches]
        if self.draft_tokens:
            shapes += [(VERIFY, b) for b in self.batches]
        return shapes

    def warmup(self, progress: Progress | None = None) -> jax.Array:
        """Compile every shape (each run once, writing nothing). Returns a fresh cache."""
        cache = self.new_cache()
        key, _ = split_key(jax.random.PRNGKey(0))  # the key handling compiles too
        shapes = self.shapes()
        for i, (kind, size) in enumerate(shapes):
            if progress:
                progress(i, len(shapes), f"compiling {kind} {size}")
            rows = self._idle_rows(kind, size)
            sampling = Sampling.rows(1.0, 0.9, 5, batch=1 if kind == PREFILL else size)
            if kind in (MULTI_STEP, ONE_DRAFT):
                _, _, cache = self._steps(cache, rows, sampling, key, self._step_count(kind))
                continue
            if kind == VERIFY:
                counts, probs = np.zeros(size, np.int32), self._idle_draft_probs(size)
                _, _, cache = self._verify(cache, rows, counts, probs, sampling, key)
                continue
            logits, cache = self._step(cache, rows)
            if kind == DECODE or size == self.chunks[0]:
                self.sample(logits, sampling, key)
        if progress:
            progress(len(shapes), len(shapes), "compiled")
        return cache

    def lower(self, kind: str, size: int) -> jax.stages.Lowered:
        """The model step of one shape of `shapes()`, lowered for inspection (e.g. the
        collectives in `.compile().as_text()`)."""
        cache = jax.ShapeDtypeStruct(self._cache_shape, self.dtype, sharding=self._cache_sharding)
        rows = self._idle_rows(kind, size)
        sampling, key = Sampling.rows(1.0, 0.9, 5, batch=size), jax.random.PRNGKey(0)
        if kind in (MULTI_STEP, ONE_DRAFT):
            args = (cache, rows, sampling, key, self._step_count(kind), self.steps_with_probs)
            return steps.decode_steps.lower(self.model, *self._params(), *args)
        if kind == VERIFY:
            counts, probs = np.zeros(size, np.int32), self._idle_draft_probs(size)
            args = (cache, rows, counts, probs, sampling, key)
            return steps.verify.lower(self.model, *self._params(), *args)
        return steps.forward.lower(self.model, *self._params(), cache, rows)

    def _step_count(self, kind: str) -> int:
        """Decode steps per call of a multi-step kind."""
        return 1 if kind == ONE_DRAFT else self.steps_per_call

    def _idle_draft_probs(self, size: int) -> np.ndarray | None:
        if not self.draft_distributions:
            return None
        return np.zeros((size, self.draft_tokens, self.config.vocab_size), np.float32)

    def _idle_rows(self, kind: str, size: int) -> StepRows:
        """Rows of one shape, none of them valid: running them writes nothing."""
        if kind == PREFILL:
            zeros = np.zeros((1, size), np.int32)
            positions = np.arange(size, dtype=np.int32)[None]
            return StepRows(zeros, positions, zeros == 1, np.zeros(1, np.int32))
        zeros = np.zeros(size, np.int32)
        _, rows = self._decode_rows(range(size), zeros, zeros)
        rows = rows._replace(valid=np.zeros(size, bool))
        if kind == VERIFY:
            width = (size, self.draft_tokens + 1)
            wide = lambda a: np.broadcast_to(a[:, None], width).copy()
            return rows._replace(
                tokens=wide(rows.tokens), positions=wide(rows.positions), valid=wide(rows.valid)
            )
        return rows if kind in (MULTI_STEP, ONE_DRAFT) else one_token_each(rows)
