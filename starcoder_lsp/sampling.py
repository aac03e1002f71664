"""Choosing the next token from logits: greedy, temperature, top-k and top-p, row by row.

Every row of a batch carries its own settings, so that one compiled step serves a greedy
request beside a sampling one.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


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

    def select(self, rows: Sequence[int] | np.ndarray | slice) -> Sampling:
        """The settings of some rows, in the order given."""
        return Sampling(*(np.asarray(v)[rows] for v in self))


# Slices of the vocabulary `greedy` compares elementwise. XLA's CPU reductions along a row
# of 49,152 logits take 3-8 ns an entry: argmax 290-400 µs, a plain max 120-180 µs (3% of an
# int8 decode step of tiny_starcoder_py). The maximum of 32 slices of a row, taken
# elementwise, is vectorized: the whole argmax took 67 µs (8 slices: 105 µs, 16: 70, 64: 71,
# 128: 78), where a max over chunks of 128 and an argmax within the best took 175.
GREEDY_SLICES = 32


def greedy(logits: jax.Array) -> jax.Array:
    """int32 [...]: the index of each row's largest logit, the first where several tie (as
    jnp.argmax), for logits [..., vocab]."""
    *lead, vocab = logits.shape
    rows = logits.reshape(-1, vocab)
    width = -(-vocab // GREEDY_SLICES)
    padded = width * GREEDY_SLICES
    rows = jnp.pad(rows, [(0, 0), (0, padded - vocab)], constant_values=-jnp.inf)
    slices = rows.reshape(-1, GREEDY_SLICES, width)
    each = [slices[:, i] for i in range(GREEDY_SLICES)]
    top = jnp.max(functools.reduce(jnp.maximum, each), axis=-1, keepdims=True)  # [b, 1]
    lane = jax.lax.iota(jnp.int32, width)  # computed in the loop, never a table to read
    where_top = [jnp.where(s == top, lane + i * width, padded) for i, s in enumerate(each)]
    first = jnp.min(functools.reduce(jnp.minimum, where_top), axis=-1)
    # NaN logits (a broken model) equal nothing: the last entry rather than one past the end.
    return jnp.minimum(first, vocab - 1).reshape(lead).astype(jnp.int32)


def _filtered(logits: jax.Array, s: Sampling) -> jax.Array:
    """logits [b, vocab] divided by each row's temperature, -inf outside its top-k and top-p:
    the distribution a sampled row draws from, as logits."""
    scaled = logits / jnp.maximum(s.temperature, 1e-6)[:, None]
    ranked = -jnp.sort(-scaled, axis=-1)
    vocab = logits.shape[-1]
    k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, vocab), vocab)
    kth = jnp.take_along_axis(ranked, (k - 1)[:, None], axis=-1)
    probs = jax.nn.softmax(ranked, axis=-1)
    # Keep the smallest prefix of the ranking whose mass reaches top_p (always the first).
    kept = jnp.sum((jnp.cumsum(probs, axis=-1) - probs) < s.top_p[:, None], axis=-1)
    pth = jnp.take_along_axis(ranked, jnp.maximum(kept - 1, 0)[:, None], axis=-1)
    return jnp.where(scaled >= jnp.maximum(kth, pth), scaled, -jnp.inf)


def sample(logits: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
    """Next token per row: greedy where temperature is 0, else top-k/top-p sampling."""
    top = greedy(logits)

    def sampled() -> jax.Array:
        return jax.random.categorical(key, _filtered(logits, s), axis=-1).astype(jnp.int32)

    # The sort over the vocabulary is skipped when every row is greedy.
    chosen = jax.lax.cond(jnp.any(s.temperature > 0), sampled, lambda: top)
    return jnp.where(s.temperature > 0, chosen, top)


def distribution(logits: jax.Array, s: Sampling) -> jax.Array:
    """float32 [b, t, vocab]: the probabilities `sample` draws each row's tokens from, for
    logits [b, t, vocab] (one-hot at the argmax for a greedy row)."""
    b, t, vocab = logits.shape
    flat = logits.reshape(b * t, vocab).astype(jnp.float32)
    rows = Sampling(*(jnp.repeat(jnp.asarray(v), t) for v in s))
    certain = jax.nn.one_hot(greedy(flat), vocab, dtype=jnp.float32)

    def sampled() -> jax.Array:
        filtered = jax.nn.softmax(_filtered(flat, rows), axis=-1)
        return jnp.where((rows.temperature > 0)[:, None], filtered, certain)

    # As in `sample`: the sort over the vocabulary, for each of the t positions, is skipped
    # when every row is greedy (it took longer than the model's step that verified them).
    probs = jax.lax.cond(jnp.any(rows.temperature > 0), sampled, lambda: certain)
    return probs.reshape(b, t, vocab)


def accept_drafts(
    logits: jax.Array,
    drafts: jax.Array,
    counts: jax.Array,
    draft_probs: jax.Array | None,
    s: Sampling,
    key: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Speculative sampling: how many of each row's drafts the model keeps, and its next token.

    logits: [b, k + 1, vocab], the model's at the position before each draft and after the
    last; drafts: int32 [b, k], of which the first counts[b] are real; draft_probs: [b, k,
    vocab], the distributions the drafts were drawn from (None: each draft was certain, as a
    prompt lookup's is). Draft i is kept with probability min(1, p(d_i) / q(d_i)) while all
    before it were; at the first rejection the next token is drawn from the normalised
    max(0, p − q), and after k kept drafts from p itself. The tokens that come out are
    distributed exactly as sampling from the model alone would give (Leviathan et al., 2023;
    Chen et al., 2023). A greedy row keeps drafts while they equal the argmax, then takes it.
    Returns (accepted int32 [b], next token int32 [b]).
    """
    b, k = drafts.shape
    vocab = logits.shape[-1]
    p = distribution(logits, s)  # [b, k + 1, vocab]
    q = jax.nn.one_hot(drafts, vocab, dtype=jnp.float32) if draft_probs is None else draft_probs
    p_draft = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]
    q_draft = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    key_accept, key_next = jax.random.split(key)
    uniform = jax.random.uniform(key_accept, (b, k))
    kept = (uniform * q_draft < p_draft) & (jnp.arange(k)[None] < counts[:, None])
    accepted = jnp.sum(jnp.cumprod(kept, axis=1), axis=1).astype(jnp.int32)
    rows = jnp.arange(b)
    p_next = p[rows, accepted]
    q_next = jnp.where((accepted < counts)[:, None], q[rows, jnp.minimum(accepted, k - 1)], 0.0)
    residual = jnp.maximum(p_next - q_next, 0.0)
    total = jnp.sum(residual, axis=-1, keepdims=True)
    residual = jnp.where(total > 0, residual / jnp.where(total > 0, total, 1.0), p_next)
    drawn = jax.random.categorical(key_next, jnp.log(residual), axis=-1).astype(jnp.int32)
    return accepted, jnp.where(s.temperature > 0, drawn, greedy(logits[rows, accepted]))


# Compiled: split op by op it was several small programs, 210 µs a call where this takes 20,
# and the engine splits a key for every decode step (0.8 ms a token when the CPU's caches
# were cold after the step).
@jax.jit
def split_key(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(the key to keep, a key to use now)."""
    key, sub = jax.random.split(key)
    return key, sub
