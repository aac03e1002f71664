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
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from starcoder_lsp import sharding
from starcoder_lsp.attention import PastKV, RecentKV
from starcoder_lsp.config import ModelConfig
from starcoder_lsp.model import GPTBigCode
from starcoder_lsp.progress import Progress
from starcoder_lsp.sampling import Sampling, sample, split_key

if TYPE_CHECKING:
    from starcoder_lsp.checkpoint import Checkpoint

# Prefill chunk sizes. Above a few tokens a chunk's cost grows with its length (compute-bound),
# so a prompt is cut greedily into the largest chunks that fit and only the last chunk is
# padded, by less than the smallest size; bigger chunks would only add compiled shapes.
DEFAULT_CHUNKS = (16, 64, 256)
DEFAULT_BATCHES = (1, 2, 4, 8)
PREFILL, DECODE, MULTI_STEP = "prefill", "decode", "multi-step decode"


class StepRows(NamedTuple):
    """What each batch row of one compiled step works on.

    tokens, positions, valid: int32, int32, bool, [b, s] for a step over s new tokens per row
    ([b] for `decode_steps`, one token per row); valid is False for padding, which is neither
    attended to nor written. slots: int32 [b], the cache row each batch row reads and writes.
    order: None where rows pick their cache rows by `slots`; otherwise batch row i is cache
    row i for every slot of the cache, which is then read in place, and the results come back
    in this order (int32 [b]).
    """

    tokens: np.ndarray
    positions: np.ndarray
    valid: np.ndarray
    slots: np.ndarray
    order: np.ndarray | None = None


def _one_token_each(rows: StepRows) -> StepRows:
    """Rows of one token each ([b]) as a step over new tokens takes them ([b, 1])."""
    column = lambda a: a[:, None]
    return rows._replace(
        tokens=column(rows.tokens), positions=column(rows.positions), valid=column(rows.valid)
    )


def _past(cache: jax.Array, rows: StepRows, length: jax.Array) -> PastKV:
    return PastKV(cache, length, rows.slots if rows.order is None else None)


def _in_order(out: jax.Array, rows: StepRows) -> jax.Array:
    return out if rows.order is None else out[rows.order]


@partial(jax.jit, static_argnames=("model",))
def _forward(
    model: GPTBigCode, params: dict, cache: jax.Array, rows: StepRows
) -> tuple[jax.Array, jax.Array]:
    """Run the rows' tokens against their cached keys and values (row b has positions[b, 0]
    tokens cached). Returns the logits of each row's last valid token, [b, vocab], and the
    new keys and values [layers, 2, b, s, kv_heads, hd], which `_write` stores."""
    past = _past(cache, rows, rows.positions[:, 0])
    logits, new_kv = model.apply(
        {"params": params}, rows.tokens, rows.positions, rows.valid, past, last_only=True
    )
    return _in_order(logits, rows), new_kv


@partial(jax.jit, static_argnames=("model", "steps"))
def _decode_steps(
    model: GPTBigCode,
    params: dict,
    cache: jax.Array,
    rows: StepRows,
    sampling: Sampling,
    key: jax.Array,
    steps: int,
) -> tuple[jax.Array, jax.Array]:
    """`steps` decode steps in one program, each sampling every row's next token on the device.

    Returns the sampled tokens [b, steps] and the new keys and values [layers, 2, b, steps,
    kv_heads, hd], which `_write` stores. The cache is only read: the keys of the tokens
    decoded in this call stay in a small buffer that attention reads besides it.
    """
    c = model.config
    past = _past(cache, rows, rows.positions)

    def step(i: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        token, recent, out = carry
        # Past the position table the tokens are never kept (the caller stops rows before).
        at = jnp.minimum(rows.positions + i, c.n_positions - 1)[:, None]
        logits, new_kv = model.apply(
            {"params": params},
            token[:, None],
            at,
            rows.valid[:, None],
            past,
            last_only=True,
            recent=RecentKV(recent, i),
        )
        recent = jax.lax.dynamic_update_slice_in_dim(recent, new_kv, i, axis=3)
        token = sample(logits, jax.random.fold_in(key, i), sampling)
        return token, recent, out.at[:, i].set(token)

    b = rows.tokens.shape[0]
    recent = jnp.zeros((c.n_layer, 2, b, steps, c.kv_heads, c.head_dim), cache.dtype)
    out = jnp.zeros((b, steps), jnp.int32)
    _, recent, out = jax.lax.fori_loop(0, steps, step, (rows.tokens, recent, out))
    return _in_order(out, rows), recent


# Writing is a program of its own: when the step that reads the cache also updates it, XLA
# copies the whole cache (twice) instead of updating it in place, which made a decode step
# ten times slower with 8 slots of 8192 positions.
@partial(jax.jit, donate_argnames=("cache",))
def _write(
    cache: jax.Array, new_kv: jax.Array, positions: jax.Array, valid: jax.Array, slots: jax.Array
) -> jax.Array:
    # Padding writes nowhere: an index past the end is dropped.
    write_at = jnp.where(valid, positions, cache.shape[3])
    return cache.at[:, :, slots[:, None], write_at].set(new_kv.astype(cache.dtype), mode="drop")


# Sampling is compiled apart from the model: it depends on the batch size only, not on the
# chunk or span, so its sort over the vocabulary is compiled a handful of times, not per shape.
_sample = jax.jit(sample)


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
    ) -> None:
        if steps_per_call < 1:
            raise ValueError(f"steps_per_call must be at least 1, not {steps_per_call}")
        self.steps_per_call = steps_per_call
        self.config, self.params, self.mesh, self.dtype = config, params, mesh, jnp.dtype(dtype)
        self.model = GPTBigCode(config, self.dtype, mesh=mesh)
        self.max_len = min(max_len or config.n_positions, config.n_positions)
        self.chunks = tuple(sorted(chunks))
        self.slots = slots or max(batches)
        self.batches = tuple(sorted(b for b in batches if b < self.slots)) + (self.slots,)
        c = config
        self._cache_shape = (c.n_layer, 2, self.slots, self.max_len, c.kv_heads, c.head_dim)
        self._cache_sharding = sharding.cache_sharding(mesh, self.slots)
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
        return self._step(cache, _one_token_each(rows))

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
        source, rows = self._decode_rows(slots, tokens, positions)
        out, cache = self._steps(cache, rows, sampling.select(source), key)
        return out[: len(slots)], cache

    def sample(self, logits: jax.Array, sampling: Sampling, key: jax.Array) -> np.ndarray:
        """The next token of each row of `logits`, on the host."""
        return np.asarray(_sample(logits, key, sampling))

    def pad_sampling(self, sampling: Sampling, n: int) -> Sampling:
        """Per-row settings padded to the decode batch bucket that n rows use."""
        size = _bucket(self.batches, n)
        return Sampling(*(np.concatenate([v, np.repeat(v[:1], size - n)]) for v in sampling))

    def _step(self, cache: jax.Array, rows: StepRows) -> tuple[jax.Array, jax.Array]:
        # The small host arrays go to the programs as they are: jit places them itself for
        # about 10 µs each, where jax.device_put took 100-180 µs each from Python (4% of a
        # batch-1 decode step for the five of them).
        logits, new_kv = _forward(self.model, self.params, cache, rows)
        return logits, _write(cache, new_kv, rows.positions, rows.valid, rows.slots)

    def _steps(
        self, cache: jax.Array, rows: StepRows, sampling: Sampling, key: jax.Array
    ) -> tuple[np.ndarray, jax.Array]:
        steps = self.steps_per_call
        out, recent = _decode_steps(self.model, self.params, cache, rows, sampling, key, steps)
        at = rows.positions[:, None] + np.arange(steps, dtype=np.int32)
        valid = rows.valid[:, None] & (at < self.max_len)
        return np.asarray(out), _write(cache, recent, at, valid, rows.slots)

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
            if kind == MULTI_STEP:
                _, cache = self._steps(cache, rows, sampling, key)
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
        if kind == MULTI_STEP:
            sampling = Sampling.rows(1.0, 0.9, 5, batch=size)
            key = jax.random.PRNGKey(0)
            steps = self.steps_per_call
            return _decode_steps.lower(self.model, self.params, cache, rows, sampling, key, steps)
        return _forward.lower(self.model, self.params, cache, rows)

    def _idle_rows(self, kind: str, size: int) -> StepRows:
        """Rows of one shape, none of them valid: running them writes nothing."""
        if kind == PREFILL:
            zeros = np.zeros((1, size), np.int32)
            positions = np.arange(size, dtype=np.int32)[None]
            return StepRows(zeros, positions, zeros == 1, np.zeros(1, np.int32))
        zeros = np.zeros(size, np.int32)
        _, rows = self._decode_rows(range(size), zeros, zeros)
        rows = rows._replace(valid=np.zeros(size, bool))
        return rows if kind == MULTI_STEP else _one_token_each(rows)
