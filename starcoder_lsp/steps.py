"""The compiled programs the Runner drives: forward (prefill and decode), several decode steps
in one call, verification of draft tokens, and the in-place cache write.

One jitted step serves prefill and decode: it attends over a row's cached keys and values
plus its new tokens and returns the new keys and values, which `write` stores in the cache in
place (the cache is donated). Everything here is a pure function of arrays; which rows go in
and how the cache is laid out is runner.py's business.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from starcoder_lsp.attention import PastKV, RecentKV
from starcoder_lsp.model import GPTBigCode
from starcoder_lsp.sampling import Sampling, accept_drafts, distribution, sample


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


class ParamTree:
    """The structure of a model's parameter tree. The steps take the parameters as a flat
    tuple of arrays and this as a static argument: jit's dispatch walks a tuple of
    tiny_starcoder_py's 385 arrays faster than the nested dict, and after a decode step has
    pushed their objects out of the CPU's caches a one-step call waits on that walk (a jitted
    no-op took 0.81 ms with the tuple against 1.05-1.07 with the dict, caches flushed first).
    Its hash is kept: jit hashes its static arguments on every call, and hashing the tree
    took 5 µs."""

    def __init__(self, params: dict) -> None:
        self.treedef = jax.tree_util.tree_structure(params)
        self._hash = hash(self.treedef)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, ParamTree) and self.treedef == other.treedef)

    def unflatten(self, leaves: tuple[jax.Array, ...]) -> dict:
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def one_token_each(rows: StepRows) -> StepRows:
    """Rows of one token each ([b]) as a step over new tokens takes them ([b, 1])."""
    column = lambda a: a[:, None]
    return rows._replace(
        tokens=column(rows.tokens), positions=column(rows.positions), valid=column(rows.valid)
    )


def _past(cache: jax.Array, rows: StepRows, length: jax.Array) -> PastKV:
    return PastKV(cache, length, rows.slots if rows.order is None else None)


def _in_order(out: jax.Array, rows: StepRows) -> jax.Array:
    return out if rows.order is None else out[rows.order]


@partial(jax.jit, static_argnames=("model", "tree"))
def forward(
    model: GPTBigCode,
    tree: ParamTree,
    leaves: tuple[jax.Array, ...],
    cache: jax.Array,
    rows: StepRows,
) -> tuple[jax.Array, jax.Array]:
    """Run the rows' tokens against their cached keys and values (row b has positions[b, 0]
    tokens cached). Returns the logits of each row's last valid token, [b, vocab], and the
    new keys and values [layers, 2, b, s, kv_heads, hd], which `write` stores."""
    past = _past(cache, rows, rows.positions[:, 0])
    logits, new_kv = model.apply(
        {"params": tree.unflatten(leaves)},
        rows.tokens,
        rows.positions,
        rows.valid,
        past,
        last_only=True,
    )
    return _in_order(logits, rows), new_kv


@partial(jax.jit, static_argnames=("model", "tree", "steps", "with_probs"))
def decode_steps(
    model: GPTBigCode,
    tree: ParamTree,
    leaves: tuple[jax.Array, ...],
    cache: jax.Array,
    rows: StepRows,
    sampling: Sampling,
    key: jax.Array,
    steps: int,
    with_probs: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """`steps` decode steps in one program, each sampling every row's next token on the device.

    Returns the sampled tokens [b, steps], the new keys and values [layers, 2, b, steps,
    kv_heads, hd], which `write` stores, and with_probs the distributions each token was
    drawn from [b, steps, vocab] (a draft model's, for speculative sampling). The cache is only
    read: the keys of the tokens decoded in this call stay in a small buffer that attention
    reads besides it.
    """
    c, params = model.config, tree.unflatten(leaves)
    past = _past(cache, rows, rows.positions)
    b = rows.tokens.shape[0]

    def step(i: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        token, recent, out, probs = carry
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
        if with_probs:
            probs = probs.at[:, i].set(distribution(logits[:, None], sampling)[:, 0])
        return token, recent, out.at[:, i].set(token), probs

    recent = jnp.zeros((c.n_layer, 2, b, steps, c.kv_heads, c.head_dim), cache.dtype)
    out = jnp.zeros((b, steps), jnp.int32)
    probs = jnp.zeros((b, steps, c.vocab_size) if with_probs else (0,), jnp.float32)
    _, recent, out, probs = jax.lax.fori_loop(0, steps, step, (rows.tokens, recent, out, probs))
    return _in_order(out, rows), recent, _in_order(probs, rows) if with_probs else None


@partial(jax.jit, static_argnames=("model", "tree"))
def verify(
    model: GPTBigCode,
    tree: ParamTree,
    leaves: tuple[jax.Array, ...],
    cache: jax.Array,
    rows: StepRows,
    counts: jax.Array,
    draft_probs: jax.Array | None,
    sampling: Sampling,
    key: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Run each row's last token and its k drafts (rows.tokens [b, 1 + k]) in one step and
    keep the drafts the model agrees with (sampling.accept_drafts). Returns (accepted [b],
    the model's next token [b], new keys and values [layers, 2, b, 1 + k, kv_heads, hd])."""
    past = _past(cache, rows, rows.positions[:, 0])
    variables = {"params": tree.unflatten(leaves)}
    logits, new_kv = model.apply(variables, rows.tokens, rows.positions, rows.valid, past)
    drafts = rows.tokens[:, 1:]
    accepted, following = accept_drafts(logits, drafts, counts, draft_probs, sampling, key)
    return _in_order(accepted, rows), _in_order(following, rows), new_kv


# Writing is a program of its own: when the step that reads the cache also updates it, XLA
# copies the whole cache (twice) instead of updating it in place, which made a decode step
# ten times slower with 8 slots of 8192 positions.
@partial(jax.jit, donate_argnames=("cache",))
def write(
    cache: jax.Array, new_kv: jax.Array, positions: jax.Array, valid: jax.Array, slots: jax.Array
) -> jax.Array:
    # Padding writes nowhere: an index past the end is dropped.
    write_at = jnp.where(valid, positions, cache.shape[3])
    return cache.at[:, :, slots[:, None], write_at].set(new_kv.astype(cache.dtype), mode="drop")


# Sampling is compiled apart from the model: it depends on the batch size only, not on the
# chunk or span, so its sort over the vocabulary is compiled a handful of times, not per shape.
sample_tokens = jax.jit(sample)


def to_host(array: jax.Array) -> np.ndarray:
    """A step's small result as numpy on this host, wherever its pieces live: on a mesh that
    spans several hosts, a piece another host holds is gathered (every process calls this
    for the same arrays, as for the steps themselves)."""
    if array.is_fully_addressable or array.sharding.is_fully_replicated:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
