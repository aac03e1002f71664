"""Choosing the next token from logits: greedy, temperature, top-k and top-p, row by row.

Every row of a batch carries its own settings, so that one compiled step serves a greedy
request beside a sampling one.
"""

from __future__ import annotations

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


def split_key(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(the key to keep, a key to use now)."""
    key, sub = jax.random.split(key)
    return key, sub
