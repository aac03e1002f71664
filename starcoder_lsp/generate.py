"""Compiled prefill and decode on the mesh, sampling, and the Generator API.

One jitted step serves both prefill and decode: it attends over a row's cached keys and
values plus its new tokens, writes the new keys and values into the slot cache in place (the
cache buffer is donated), and samples the next token from the last position. Shapes are
static and few — prefill chunk sizes and decode batch sizes; attention loops over as much
of the cache as is filled, a traced count — so after `warmup()` no request compiles anything.
A second decode program runs several steps in one call, sampling on the device; the Generator
uses it, the server does not (see Runner).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from starcoder_lsp import checkpoint, sharding
from starcoder_lsp.config import ModelConfig
from starcoder_lsp.model import GPTBigCode, PastKV, RecentKV

# Prefill chunk sizes. Above a few tokens a chunk's cost grows with its length (compute-bound),
# so a prompt is cut greedily into the largest chunks that fit and only the last chunk is
# padded, by less than the smallest size; bigger chunks would only add compiled shapes.
DEFAULT_CHUNKS = (16, 64, 256)
DEFAULT_BATCHES = (1, 2, 4, 8)
MULTI_STEP = "multi-step decode"
# The Generator decodes this many steps per compiled call where at least as many tokens are
# left to generate. Eight took 6-8% less per step than one at batch 1 on a 2-core CPU.
GENERATOR_STEPS_PER_CALL = 8


# --- sampling --------------------------------------------------------------------------


class Sampling(NamedTuple):
    """Per-row settings, each float32/int32 [batch]. temperature 0 means greedy."""

    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array

    @staticmethod
    def rows(
        temperature: float | Sequence[float] | np.ndarray = 0.0,
        top_p: float | Sequence[float] | np.ndarray = 1.0,
        top_k: int | Sequence[int] | np.ndarray = 0,
        batch: int = 1,
    ) -> Sampling:
        # starcoder-jax shapes them (batch, 1); a plain float applies to every row.
        as_rows = lambda v, dtype: np.broadcast_to(np.asarray(v, dtype).reshape(-1), (batch,))
        return Sampling(
            as_rows(temperature, np.float32), as_rows(top_p, np.float32), as_rows(top_k, np.int32)
        )


def sample(logits: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
    """Next token per row: greedy where temperature is 0, else top-k/top-p sampling."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled() -> jax.Array:
        scaled = logits / jnp.maximum(s.temperature, 1e-6)[:, None]
        ranked = -jnp.sort(-scaled, axis=-1)
        vocab = logits.shape[-1]
        k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, vocab), vocab)
        kth = jnp.take_along_axis(ranked, (k - 1)[:, None], axis=-1)
        probs = jax.nn.softmax(ranked, axis=-1)
        # Keep the smallest prefix of the ranking whose mass reaches top_p (always the first).
        kept = jnp.sum((jnp.cumsum(probs, axis=-1) - probs) < s.top_p[:, None], axis=-1)
        pth = jnp.take_along_axis(ranked, jnp.maximum(kept - 1, 0)[:, None], axis=-1)
        masked = jnp.where(scaled >= jnp.maximum(kth, pth), scaled, -jnp.inf)
        return jax.random.categorical(key, masked, axis=-1).astype(jnp.int32)

    # The sort over the vocabulary is skipped when every row is greedy.
    chosen = jax.lax.cond(jnp.any(s.temperature > 0), sampled, lambda: greedy)
    return jnp.where(s.temperature > 0, chosen, greedy)


# --- the compiled step -----------------------------------------------------------------


@partial(jax.jit, static_argnames=("model", "every_slot"))
def _forward(
    model: GPTBigCode,
    params: dict,
    cache: jax.Array,
    tokens: jax.Array,
    positions: jax.Array,
    valid: jax.Array,
    slots: jax.Array,
    order: jax.Array,
    every_slot: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Run `tokens` (at `positions`, rows in cache `slots`) against the cached rows.

    Row b has positions[b, 0] tokens cached before this call. Returns (logits of each row's
    last token, in the row order `order`; new_kv). every_slot: row i is slot i for every
    slot of the cache, so the cache is read block by block across all slots at once.
    """
    past = PastKV(cache, positions[:, 0], None if every_slot else slots)
    logits, new_kv = model.apply({"params": params}, tokens, positions, valid, past, last_only=True)
    return logits[order], new_kv


@partial(jax.jit, static_argnames=("model", "steps", "every_slot"))
def _decode_steps(
    model: GPTBigCode,
    params: dict,
    cache: jax.Array,
    tokens: jax.Array,
    positions: jax.Array,
    valid: jax.Array,
    slots: jax.Array,
    order: jax.Array,
    key: jax.Array,
    sampling: Sampling,
    steps: int,
    every_slot: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """`steps` decode steps in one program, each sampling every row's next token on the device.

    tokens, positions, valid, slots: [b], as for one step of `_forward`. Returns (the sampled
    tokens [b, steps] in the row order `order`; the new keys and values [layers, 2, b, steps,
    kv_heads, hd], which `_write` stores). The cache is only read: the keys of the tokens
    decoded in this call stay in a small buffer that attention reads besides it.
    """
    c = model.config
    past = PastKV(cache, positions, None if every_slot else slots)

    def step(i: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        token, recent, out = carry
        # Past the position table the tokens are never kept (the caller stops rows before).
        at = jnp.minimum(positions + i, c.n_positions - 1)[:, None]
        logits, new_kv = model.apply({"params": params}, token[:, None], at, valid[:, None],
                                     past, last_only=True, recent=RecentKV(recent, i))  # fmt: skip
        recent = jax.lax.dynamic_update_slice_in_dim(recent, new_kv, i, axis=3)
        token = sample(logits, jax.random.fold_in(key, i), sampling)
        return token, recent, out.at[:, i].set(token)

    b = tokens.shape[0]
    recent = jnp.zeros((c.n_layer, 2, b, steps, c.kv_heads, c.head_dim), cache.dtype)
    out = jnp.zeros((b, steps), jnp.int32)
    _, recent, out = jax.lax.fori_loop(0, steps, step, (tokens, recent, out))
    return out[order], recent


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


_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compilations = 0


def _count_compilation(event: str, duration: float, **_: object) -> None:
    global _compilations
    if event == _COMPILE_EVENT:
        _compilations += 1


jax.monitoring.register_event_duration_secs_listener(_count_compilation)


def compilations() -> int:
    """How many XLA programs this process has compiled (or loaded from the disk cache)."""
    return _compilations


# Sampling is compiled apart from the model: it depends on the batch size only, not on the
# chunk or span, so its sort over the vocabulary is compiled a handful of times, not per shape.
_sample = jax.jit(sample)


def _bucket(sizes: Sequence[int], n: int) -> int:
    i = bisect.bisect_left(sizes, n)
    if i == len(sizes):
        raise ValueError(f"{n} exceeds the largest compiled size {sizes[-1]}")
    return sizes[i]


class Runner:
    """The model on its mesh, its key/value cache, and the compiled steps with their shapes.

    The cache is an array [layers, 2, slots, max_len, kv_heads, head_dim]. A caller owns it
    and passes it in and out of each step (it is donated: the old handle is dead after a call).
    Its size is fixed, so that one set of compiled programs serves every request.

    steps_per_call > 1 also compiles `decode_steps`, which runs that many decode steps in one
    program and samples on the device: per step it saves launching the programs and waiting
    for the host (measured for tiny_starcoder_py on a 2-core CPU, five runs: 1.13-1.26× the
    bandwidth floor at batch 1 with 8 steps, against 1.20-1.37× one step at a time). A row
    that stops midway wastes the rest of the call, and a new request waits for the call to
    end, so the server decodes one step at a time.
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
        shape = (c.n_layer, 2, self.slots, self.max_len, c.kv_heads, c.head_dim)
        self._zeros = jax.jit(
            partial(jnp.zeros, shape, self.dtype),
            out_shardings=sharding.cache_sharding(mesh, self.slots),
        )

    # -- cache ----------------------------------------------------------------------------

    @property
    def cache_bytes(self) -> int:
        c = self.config
        per_slot = 2 * c.n_layer * self.max_len * c.kv_heads * c.head_dim * self.dtype.itemsize
        return self.slots * per_slot

    def new_cache(self) -> jax.Array:
        return self._zeros()

    # -- steps ----------------------------------------------------------------------------

    def _forward(
        self,
        cache: jax.Array,
        tokens: np.ndarray,
        positions: np.ndarray,
        valid: np.ndarray,
        slots: np.ndarray,
        order: np.ndarray | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        every_slot = order is not None
        if order is None:
            order = np.arange(len(slots), dtype=np.int32)
        # The small host arrays go to the programs as they are: jit places them itself for
        # about 10 µs each, where jax.device_put took 100-180 µs each from Python (4% of a
        # batch-1 decode step for the five of them).
        logits, new_kv = _forward(self.model, self.params, cache, tokens, positions, valid,
                                  slots, order, every_slot)  # fmt: skip
        return logits, _write(cache, new_kv, positions, valid, slots)

    def sample(self, logits: jax.Array, sampling: Sampling, key: jax.Array) -> np.ndarray:
        return np.asarray(_sample(logits, key, sampling))

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
            valid = (np.arange(size) < n)[None]
            logits, cache = self._forward(
                cache, chunk, positions[None], valid, np.array([slot], np.int32)
            )
            done += n
            calls += 1
        return logits, cache, calls

    def _decode_rows(self, slots: Sequence[int]) -> tuple[np.ndarray, ...]:
        """How n requests in `slots` fill the rows of one decode call, each [batch bucket]:
        (source: the request whose token, position and settings a row takes, slots, valid,
        order: the rows of the requests in request order, then padding; None where the rows
        are in request order already)."""
        n = len(slots)
        size = _bucket(self.batches, n)
        source = np.zeros(size, np.int32)
        if size < self.slots:
            # Padding rows repeat request 0 but are invalid: they write nothing.
            source[:n] = np.arange(n)
            call_slots = np.asarray(slots, np.int32)[source]
            return source, call_slots, np.arange(size) < n, None
        # A full batch runs one row per slot, row i in slot i, so that the cache is read in
        # place rather than copied row by row (a third of a batch-8 step). Slots without a
        # request run an invalid row; results come back in the order of `slots`.
        if len(set(slots)) != n:
            raise ValueError(f"a slot appears twice in one step: {list(slots)}")
        source[list(slots)] = np.arange(n)
        valid = np.zeros(size, bool)
        valid[list(slots)] = True
        order = np.concatenate([np.asarray(slots, np.int32), np.full(size - n, slots[0])])
        return source, np.arange(size, dtype=np.int32), valid, order.astype(np.int32)

    def decode(
        self,
        cache: jax.Array,
        slots: Sequence[int],
        tokens: Sequence[int],
        positions: Sequence[int],
    ) -> tuple[jax.Array, jax.Array]:
        """One step for each row: `tokens[i]` sits at `positions[i]` of `slots[i]`.
        Returns logits [batch bucket, vocab] (rows past len(slots) are padding) and the cache."""
        source, call_slots, valid, order = self._decode_rows(slots)
        tokens = np.asarray(tokens, np.int32)[source][:, None]
        positions = np.asarray(positions, np.int32)[source][:, None]
        return self._forward(cache, tokens, positions, valid[:, None], call_slots, order)

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
        source, call_slots, valid, order = self._decode_rows(slots)
        out, cache = self._steps(
            cache, np.asarray(tokens, np.int32)[source], np.asarray(positions, np.int32)[source],
            valid, call_slots, order, Sampling(*(np.asarray(v)[source] for v in sampling)), key,
        )  # fmt: skip
        return out[: len(slots)], cache

    def _steps(
        self,
        cache: jax.Array,
        tokens: np.ndarray,
        positions: np.ndarray,
        valid: np.ndarray,
        slots: np.ndarray,
        order: np.ndarray | None,
        sampling: Sampling,
        key: jax.Array,
    ) -> tuple[np.ndarray, jax.Array]:
        steps, every_slot = self.steps_per_call, order is not None
        if order is None:
            order = np.arange(len(slots), dtype=np.int32)
        out, recent = _decode_steps(self.model, self.params, cache, tokens, positions, valid,
                                    slots, order, key, sampling, steps, every_slot)  # fmt: skip
        at = positions[:, None] + np.arange(steps, dtype=np.int32)
        cache = _write(cache, recent, at, valid[:, None] & (at < self.max_len), slots)
        return np.asarray(out), cache

    def pad_sampling(self, sampling: Sampling, n: int) -> Sampling:
        """Per-row settings padded to the decode batch bucket that n rows use."""
        size = _bucket(self.batches, n)
        return Sampling(*(np.concatenate([v, np.repeat(v[:1], size - n)]) for v in sampling))

    # -- compilation ------------------------------------------------------------------------

    def shapes(self) -> list[tuple[str, int]]:
        """Every (kind, size) the model step is compiled for: a prefill chunk of `size`
        tokens, or a decode step of `size` rows. How much of the cache is read is not a
        shape: attention loops over the filled part of it."""
        shapes = [("prefill", c) for c in self.chunks] + [("decode", b) for b in self.batches]
        if self.steps_per_call > 1:
            shapes += [(MULTI_STEP, b) for b in self.batches]
        return shapes

    def warmup(self, progress: Callable[[int, int, str], None] | None = None) -> jax.Array:
        """Compile every shape (each run once, writing nothing). Returns a fresh cache."""
        cache = self.new_cache()
        key, _ = _split_key(jax.random.PRNGKey(0))  # the key handling compiles too
        shapes = self.shapes()
        for i, (kind, size) in enumerate(shapes):
            if progress:
                progress(i, len(shapes), f"compiling {kind} {size}")
            sampling = Sampling.rows(1.0, 0.9, 5, batch=1 if kind == "prefill" else size)
            zeros, idle = np.zeros(size, np.int32), np.zeros(size, bool)
            if kind == "prefill":
                positions = np.arange(size, dtype=np.int32)[None]
                logits, cache = self._forward(cache, zeros[None], positions, idle[None],
                                              np.zeros(1, np.int32))  # fmt: skip
                if size == self.chunks[0]:
                    self.sample(logits, sampling, key)
                continue
            # The rows of `size` requests, none of them valid.
            _, slots, _, order = self._decode_rows(range(size))
            if kind == MULTI_STEP:
                _, cache = self._steps(cache, zeros, zeros, idle, slots, order, sampling, key)
                continue
            logits, cache = self._forward(cache, zeros[:, None], zeros[:, None], idle[:, None],
                                          slots, order)  # fmt: skip
            self.sample(logits, sampling, key)
        if progress:
            progress(len(shapes), len(shapes), "compiled")
        return cache


def enable_compilation_cache(directory: str | Path | None = None) -> Path:
    """Persist compiled programs so that a restarted server skips most of its warm-up."""
    path = Path(directory or Path.home() / ".cache" / "starcoder-lsp" / "jax").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


# --- a whole generation ------------------------------------------------------------------


@dataclass
class Completion:
    tokens: list[int]
    text: str
    finish_reason: str  # "stop" (end/FIM token or stop string), "length"
    prefill_calls: int = 0
    seconds: float = 0.0


@dataclass
class _Row:
    slot: int
    tokens: list[int] = field(default_factory=list)
    position: int = 0
    done: str | None = None


def _split_key(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    key, sub = jax.random.split(key)
    return key, sub


def stop_reason(
    generated: Sequence[int], stop_ids: Iterable[int], stop_strings: Sequence[str],
    decode: Callable[[Sequence[int]], str], max_new_tokens: int,
) -> str | None:  # fmt: skip
    if generated and generated[-1] in set(stop_ids):
        return "stop"
    if stop_strings and any(s in decode(generated) for s in stop_strings):
        return "stop"
    if len(generated) >= max_new_tokens:
        return "length"
    return None


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    cuts = [text.index(s) for s in stop_strings if s in text]
    return text[: min(cuts)] if cuts else text


class Generator:
    """A model ready to generate: starcoder-jax's API, plus `generate` for whole batches.

    >>> g = Generator.from_pretrained("bigcode/tiny_starcoder_py")
    >>> initial, hparams = g.prepare_context("def fib(n):", max_length=256, temperature=0)
    >>> tokens, rng = g.generate_at_once(**initial, **hparams, rng=rng, max_new_tokens=32)

    The generator owns one key/value cache of `runner.slots` rows; a batch larger than that
    is generated in groups.
    """

    def __init__(self, ckpt: checkpoint.Checkpoint, **runner_options: object) -> None:
        runner_options.setdefault("steps_per_call", GENERATOR_STEPS_PER_CALL)
        self.checkpoint = ckpt
        self.tokenizer = ckpt.tokenizer
        self.tokens = ckpt.tokens
        self._runner_options = runner_options
        self.runner = Runner(ckpt.config, ckpt.params, ckpt.mesh, ckpt.dtype, **runner_options)
        self._cache: jax.Array | None = None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        mesh: Mesh | None = None,
        dtype: str | jnp.dtype | None = None,
        **runner_options: object,
    ) -> Generator:
        if dtype is None:  # float32 is fast on CPU; bfloat16 on accelerators
            dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
        return cls(checkpoint.load(name_or_path, mesh, dtype), **runner_options)

    from_huggingface = from_pretrained

    @property
    def config(self) -> ModelConfig:
        return self.checkpoint.config

    def shard(self, mesh: Mesh) -> Generator:
        """Move the parameters onto `mesh` with the partition rules of sharding.py."""
        targets = sharding.param_shardings(self.checkpoint.params, mesh)
        params = jax.tree_util.tree_map(jax.device_put, self.checkpoint.params, targets)
        self.checkpoint.params, self.checkpoint.mesh = params, mesh
        self.runner = Runner(self.config, params, mesh, self.checkpoint.dtype,
                             **self._runner_options)  # fmt: skip
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
            self._check_fits(len(prompt), max_new_tokens)
        key = jax.random.PRNGKey(seed) if isinstance(seed, int) else seed
        sampling = Sampling.rows(temperature, top_p, top_k, batch=len(prompts))
        out: list[Completion] = []
        for first in range(0, len(prompts), self.runner.slots):
            group = range(first, min(first + self.runner.slots, len(prompts)))
            key, sub = _split_key(key)
            rows = Sampling(*(v[group.start : group.stop] for v in sampling))
            out += self._generate_group(
                [prompts[i] for i in group], rows, sub, max_new_tokens, stop
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
        runner = self.runner
        cache = self._take_cache()
        rows: list[_Row] = []
        calls = 0
        for slot, prompt in enumerate(prompts):
            logits, cache, n = runner.prefill(cache, slot, prompt, 0)
            key, sub = _split_key(key)
            first = runner.sample(logits, Sampling(*(v[slot : slot + 1] for v in sampling)), sub)
            rows.append(_Row(slot, [int(first[0])], len(prompt)))
            calls += n
        for row in rows:
            row.done = self._stopped(row.tokens, max_new_tokens, stop)
        while active := [r for r in rows if r.done is None]:
            slots = [r.slot for r in active]
            left = max(max_new_tokens - len(r.tokens) for r in active)
            rows_sampling = Sampling(*(v[slots] for v in sampling))
            key, sub = _split_key(key)
            new, cache = self._decode(cache, slots, [r.tokens[-1] for r in active],
                                      [r.position for r in active], rows_sampling, sub,
                                      left)  # fmt: skip
            for row, row_new in zip(active, new, strict=True):
                for token in row_new:
                    row.tokens.append(int(token))
                    row.position += 1
                    row.done = self._stopped(row.tokens, max_new_tokens, stop)
                    if row.done:
                        break  # the rest of the call's tokens for this row are dropped
        self._cache = cache
        elapsed = time.perf_counter() - start
        completions = []
        for row in rows:
            ids = [t for t in row.tokens if t not in self.tokens.stop_ids]
            text = cut_at_stop(self.decode(ids), stop)
            completions.append(Completion(row.tokens, text, row.done or "length", calls, elapsed))
        return completions

    def _check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        if not prompt_tokens:
            raise ValueError("a prompt needs at least one token")
        if prompt_tokens + max_new_tokens > self.runner.max_len:
            raise ValueError(
                f"a prompt of {prompt_tokens} tokens + {max_new_tokens} new tokens does not "
                f"fit the context of {self.runner.max_len}"
            )

    def _decode(
        self,
        cache: jax.Array,
        slots: list[int],
        tokens: Sequence[int],
        positions: Sequence[int],
        sampling: Sampling,
        key: jax.Array,
        left: int,
    ) -> tuple[np.ndarray, jax.Array]:
        """The next tokens of each row [rows, steps]: several steps in one call where at least
        as many tokens are `left` to generate, else one."""
        runner = self.runner
        if runner.steps_per_call > 1 and left >= runner.steps_per_call:
            return runner.decode_steps(cache, slots, tokens, positions, sampling, key)
        logits, cache = runner.decode(cache, slots, tokens, positions)
        new = runner.sample(logits, runner.pad_sampling(sampling, len(slots)), key)
        return new[: len(slots), None], cache

    def _stopped(self, generated: list[int], max_new: int, stop: Sequence[str]) -> str | None:
        return stop_reason(generated, self.tokens.stop_ids, stop, self.decode, max_new)

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
        if batch > self.runner.slots:
            raise ValueError(
                f"a batch of {batch} exceeds the {self.runner.slots} cache rows; "
                "pass slots=N to from_pretrained"
            )
        sampling = Sampling.rows(temperature, top_p, 0 if top_k is None else top_k, batch)
        cache = self._take_cache()
        first, positions = np.zeros(batch, np.int32), np.zeros(batch, np.int32)
        for i in range(batch):
            ids = tokens[i][mask[i]].tolist()
            logits, cache, _ = self.runner.prefill(cache, i, ids, 0)
            rng, sub = _split_key(rng)
            first[i] = self.runner.sample(logits, Sampling(*(v[i : i + 1] for v in sampling)), sub)[
                0
            ]
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
        logits, cache = self.runner.decode(
            state.cache, list(range(batch)), np.asarray(new_tokens).tolist(),
            state.positions.tolist(),
        )  # fmt: skip
        rng, sub = _split_key(rng)
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
        then -1. Decodes several steps per compiled call (steps_per_call)."""
        batch = len(tokens)
        for prompt_tokens in np.asarray(mask, bool).sum(axis=1):
            self._check_fits(int(prompt_tokens), max_new_tokens)
        out = np.full((batch, max_new_tokens), -1, np.int32)
        new, state, rng = self.generate_from_context(tokens, mask, rng, temperature, top_p, top_k)
        sampling = Sampling.rows(temperature, top_p, 0 if top_k is None else top_k, batch)
        ended = np.zeros(batch, bool)
        step, cache, positions = 0, state.cache, state.positions
        new = new[:, None]
        while True:
            for column in new.T[: max_new_tokens - step]:
                out[~ended, step] = column[~ended]
                ended |= np.isin(column, self.tokens.stop_ids)
                step += 1
            if ended.all() or step == max_new_tokens:
                self._cache = cache
                return out, rng
            rng, sub = _split_key(rng)
            new, cache = self._decode(cache, list(range(batch)), new[:, -1].tolist(),
                                      positions.tolist(), sampling, sub,
                                      max_new_tokens - step)  # fmt: skip
            positions = positions + new.shape[1]


class GenerationState(NamedTuple):
    """What generate_next_tokens carries between calls: the cache and each row's length."""

    cache: jax.Array
    positions: np.ndarray
