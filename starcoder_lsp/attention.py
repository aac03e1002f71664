"""Attention over the key/value cache: the kernels model.py's Attention calls.

A row's queries attend over the keys of its new tokens, then over its cached keys, read block
by block where they lie in the cache (online softmax): the cache is never copied, joined to
the new keys, or padded to a span. The loop runs for as many blocks as the longest row has
cached, a traced count, so one compiled program serves every cache length. Where the cache's
rows are split across `dp` devices and batch rows pick their cache row by index, each device
reads only its own rows (`_on_row_owners`). On one CPU device, a decode or verify step's
attention, over its new tokens and its cache, is our kernel's instead (cpu_kernels.py), each
row read as far as its own length: XLA's loop ran its small products there at a tenth of the
memory speed.

Shapes: q [b, kv_heads, seq·group, hd] (the query heads sharing a key/value head form one
matrix: with MQA a row's scores are one [seq·heads, hd] × [hd, time] product); keys and values
[b, t, kv_heads, hd]; the cache [layers, 2, rows, time, kv_heads, hd].
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from starcoder_lsp import cpu_kernels, sharding

# Finite, so that a row whose keys are all masked (padding) gives a uniform softmax, not NaN.
MASKED = float(jnp.finfo(jnp.float32).min)

# Cached positions per step of the loop over the cache. A block's scores for a 256-token chunk
# of tiny_starcoder_py (3,072 query rows, 3 MB) stay in a CPU's L3 cache. Prefilling 1,024 and
# 4,096 tokens ran 3-5% faster than with blocks of 512 and 6-10% faster than with 1,024,
# measured in turn in one process (`starcoder-lsp bench`); decoding was the same with 256 or
# 512.
PAST_BLOCK = 256

# New tokens per row up to which a step's attention over the cache is our CPU kernel's (a
# decode step, a verify step of a few drafts); more (a prefill chunk) keep XLA's loop, whose
# products are then large enough to run well.
FEW_NEW_TOKENS = 16

State = tuple[jax.Array, jax.Array, jax.Array]  # running (max, sum, output) per query row


class PastKV(NamedTuple):
    """Keys and values of earlier positions, per layer: kv [layers, 2, rows, time, kv_heads, hd].

    Batch row b reads kv row `row[b]` (row None: kv row b, and kv holds exactly the batch's
    rows), positions below `length[b]` only: what lies beyond is ignored. The cache of a
    server is passed whole this way, so that attention reads the blocks it needs in place.
    """

    kv: jax.Array
    length: jax.Array  # int32 [batch]
    row: jax.Array | None = None  # int32 [batch]


class RecentKV(NamedTuple):
    """Keys and values of tokens decoded earlier in the same compiled call, which are not in
    the cache yet: kv [layers, 2, b, steps, kv_heads, hd], of which the first `count` are
    filled. A multi-step decode keeps them apart because a program that reads the cache and
    writes it too makes XLA copy the whole cache."""

    kv: jax.Array
    count: jax.Array  # int32 scalar


def new_token_mask(positions: jax.Array, valid: jax.Array, window: int | None = None) -> jax.Array:
    """bool [b, s, s]: which new keys each new token sees (valid, not after it, and within
    the sliding window where there is one)."""
    behind = positions[:, :, None] - positions[:, None, :]  # query minus key position
    visible = (behind >= 0) & valid[:, None, :]
    return visible if window is None else visible & (behind < window)


def with_recent(new_visible: jax.Array, recent: RecentKV, window: int | None = None) -> jax.Array:
    """bool [b, s, steps + s]: the recent keys that are filled come first, seen by every new
    token (a decode step's single token), as far as the window reaches."""
    batch, seq, _ = new_visible.shape
    slot = jnp.arange(recent.kv.shape[3])
    filled = slot < recent.count
    if window is not None:  # recent key j lies count - j positions behind the new token
        filled &= recent.count - slot < window
    filled = jnp.broadcast_to(filled, (batch, seq, recent.kv.shape[3]))
    return jnp.concatenate([filled, new_visible], axis=2)


def attend(
    q: jax.Array,
    new: tuple[jax.Array, jax.Array],
    new_visible: jax.Array,
    past: PastKV,
    layer: int,
    positions: jax.Array,
    window: int | None = None,
    past_block: int = PAST_BLOCK,
    mesh: Mesh | None = None,
    scale: float = 1.0,
) -> jax.Array:
    """Softmax attention over the new tokens' keys, then over the cached keys block by block.

    q: [b, kv, seq·group, hd], to be multiplied by `scale` (our CPU kernel does it in its own
    call, where XLA's multiplication is a program of its own); new: (keys, values) [b, t, kv,
    hd] of the new tokens (t = seq, or more where keys decoded earlier in the same call come
    first);
    new_visible: bool [b, seq, t]; positions: int32 [b, seq], the queries' positions;
    window: a query sees the keys of the `window` positions up to its own, none before (None:
    all). Returns float32 [b, kv, seq·group, hd].

    The loop over the cache keeps a running maximum, sum and output (online softmax), so
    scores exist for one block at a time: over all 4,096 keys at once they outgrew the L3
    cache, and 20 layers of a 256-token chunk took 1.49 s against 0.80 s in blocks of 512
    (and padding the cache to a power-of-two span wasted up to half the work besides).
    mesh: where the cache's rows are split across devices (dp) and batch rows pick their
    cache row by index, each device reads its own rows (see `_on_row_owners`).
    """
    seq = new_visible.shape[1]
    if past.kv.shape[3] and _kernel_reads(q, seq, past, mesh):
        row = jnp.arange(q.shape[0]) if past.row is None else past.row
        return cpu_kernels.attention(
            q, new, new_visible, past.kv, row, past.length, positions, layer, window, scale
        )
    q = q * jnp.asarray(scale, q.dtype)
    state = new_tokens_state(q, new, new_visible)
    if past.kv.shape[3]:
        size = min(past_block, past.kv.shape[3])
        read = partial(_attend_past, layer=layer, size=size, window=window)
        rows_split = mesh is not None and sharding.splits_cache_rows(mesh, past.kv.shape[2])
        if rows_split and past.row is not None:
            read = _on_row_owners(read, mesh)
        state = read(q, past, state, positions)
    _, total, out = state
    # Normalising the output rather than the probabilities saves a pass over the scores.
    return out / total


def new_tokens_state(
    q: jax.Array, new: tuple[jax.Array, jax.Array], new_visible: jax.Array
) -> State:
    """The softmax state (max, sum, output) of q [b, kv, seq·group, hd] over the new tokens'
    keys and values [b, t, kv, hd] that new_visible [b, seq, t] lets each query see."""
    b, kv, rows, _ = q.shape
    seq, t = new_visible.shape[1:]
    scores = _scores(q, new[0]).reshape(b, kv, seq, rows // seq, t)
    scores = jnp.where(new_visible[:, None, :, None, :], scores, MASKED).reshape(b, kv, rows, t)
    top = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.exp(scores - top)
    return top, jnp.sum(weights, axis=-1, keepdims=True), _weighted(weights, new[1])


def _kernel_reads(q: jax.Array, seq: int, past: PastKV, mesh: Mesh | None) -> bool:
    """Whether our CPU kernel attends (past_attention.cc): for the few query rows of a decode
    or verify step on one CPU device, where XLA's loop over the cache runs at a tenth of the
    memory speed. A prefill chunk's many rows keep the loop, whose products are large enough."""
    return (
        seq <= FEW_NEW_TOKENS
        and q.shape[3] % 16 == 0
        and past.kv.dtype == jnp.float32
        and cpu_kernels.one_cpu(mesh)
        and cpu_kernels.has_past_attention()
    )


def _merge(state: State, other: State) -> State:
    """The softmax state over the keys of both."""
    top = jnp.maximum(state[0], other[0])
    mine, theirs = jnp.exp(state[0] - top), jnp.exp(other[0] - top)
    return top, state[1] * mine + other[1] * theirs, state[2] * mine + other[2] * theirs


def _scores(q: jax.Array, keys: jax.Array) -> jax.Array:
    """float32 [b, kv, rows, t] of q [b, kv, rows, hd] against keys [b, t, kv, hd].

    With few query rows (decoding: one token's heads) the product is taken as keys · qᵀ, so
    that the keys, the large operand, are read where they lie; q · keysᵀ made XLA on CPU
    copy every cached key into a transposed layout first, which cost more than the product.
    """
    if q.shape[2] < q.shape[3]:
        scores = jnp.einsum("btkd,bkqd->bktq", keys, q, preferred_element_type=jnp.float32)
        return scores.transpose(0, 1, 3, 2)
    return jnp.einsum("bkqd,btkd->bkqt", q, keys, preferred_element_type=jnp.float32)


def _weighted(weights: jax.Array, values: jax.Array) -> jax.Array:
    """float32 [b, kv, rows, hd]: weights [b, kv, rows, t] times values [b, t, kv, hd]."""
    weights = weights.astype(values.dtype)
    return jnp.einsum("bkqt,btkd->bkqd", weights, values, preferred_element_type=jnp.float32)


def _read_block(past: PastKV, layer: int, start: jax.Array, size: int) -> jax.Array:
    """[2, b, size, kv_heads, hd]: one layer's cached positions start.. of each batch row."""
    kv = past.kv

    def rows_from(first: jax.Array | int, count: int) -> jax.Array:
        shape = (1, 2, count, size, *kv.shape[4:])
        return jax.lax.dynamic_slice(kv, (layer, 0, first, start, 0, 0), shape)[0]

    if past.row is None:
        return rows_from(0, kv.shape[2])
    # One dynamic slice per row: a gather over row indices runs element by element on CPU
    # (90 ms for 8 rows of tiny_starcoder_py, against 10 ms for the slices).
    return jnp.concatenate([rows_from(r, 1) for r in past.row], axis=1)


def _attend_past(
    q: jax.Array,
    past: PastKV,
    state: State,
    positions: jax.Array,
    layer: int,
    size: int,
    window: int | None,
) -> State:
    """Carry the running (max, sum, output) of each query row over the cached blocks."""
    time = past.kv.shape[3]
    rows = q.shape[2]
    seq = positions.shape[1]

    def step(masked: bool, i: jax.Array, state: State) -> State:
        top, total, out = state
        # A last block that would run past the cache is moved back inside it; the
        # positions it then repeats were counted by the block before.
        first = i * size
        start = jnp.minimum(first, time - size)
        keys, values = _read_block(past, layer, start, size)
        scores = _scores(q, keys)
        if masked:
            at = start + jnp.arange(size)
            visible = (at >= first)[None] & (at[None] < past.length[:, None])  # [b, size]
            visible = visible[:, None, None]
            if window is not None:  # [b, 1, rows, size]: each query row has its own reach
                reach = at[None, None] > positions[:, :, None] - window  # [b, seq, size]
                reach = jnp.repeat(reach, rows // seq, axis=1)[:, None]
                visible = visible & reach
            scores = jnp.where(visible, scores, MASKED)
        new_top = jnp.maximum(top, jnp.max(scores, axis=-1, keepdims=True))
        weights = jnp.exp(scores - new_top)
        rescale = jnp.exp(top - new_top)
        total = total * rescale + jnp.sum(weights, axis=-1, keepdims=True)
        return new_top, total, out * rescale + _weighted(weights, values)

    blocks = (jnp.max(past.length) + size - 1) // size
    if window is not None:
        # Blocks wholly behind every query's window are never read; the rest are masked.
        first_block = jnp.maximum(jnp.min(positions) - window + 1, 0) // size
        return jax.lax.fori_loop(first_block, blocks, partial(step, True), state)
    # Blocks that every row has cached whole need no mask (it was a tenth of the loop).
    whole = jnp.min(past.length) // size
    state = jax.lax.fori_loop(0, whole, partial(step, False), state)
    return jax.lax.fori_loop(whole, blocks, partial(step, True), state)


Read = Callable[[jax.Array, PastKV, State, jax.Array], State]


def _on_row_owners(read: Read, mesh: Mesh) -> Read:
    """`read` run on each dp device over the cache rows it holds, not over the whole cache.

    Where batch rows pick their cache rows by index, the partitioner cannot tell which device
    a row lives on, and gathered the whole cache onto every device for each loop over it (two
    per layer, each step). Here every device runs the loop for all batch rows against its own
    rows; a batch row whose cache row lives elsewhere borrows a harmless length and its result
    is dropped, and a sum over dp then leaves each row the result of the device that holds it.
    The price: each device also reads blocks for rows it does not hold, where a gather moved
    the whole cache.
    """

    def local(q: jax.Array, past: PastKV, state: State, positions: jax.Array) -> State:
        held = past.kv.shape[2]
        row = past.row - jax.lax.axis_index(sharding.DATA) * held
        mine = (row >= 0) & (row < held)
        # Rows held elsewhere take the longest length held here: no block is read for them
        # beyond what the held rows need, and the unmasked loop stays as long as it can.
        borrowed = jnp.max(jnp.where(mine, past.length, 0))
        here = PastKV(past.kv, jnp.where(mine, past.length, borrowed), jnp.clip(row, 0, held - 1))
        keep = mine[:, None, None, None]
        state = read(q, here, state, positions)
        return tuple(jax.lax.psum(jnp.where(keep, s, 0), sharding.DATA) for s in state)

    replicated = sharding.P()
    past_spec = PastKV(sharding.CACHE_SPEC, replicated, replicated)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(replicated, past_spec, replicated, replicated),
        out_specs=replicated,
        axis_names={sharding.DATA},
        check_vma=False,
    )
