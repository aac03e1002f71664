"""GPTBigCode (StarCoder) in Flax: GPT-2 with multi-query attention and learned positions.

The forward pass is a pure function of token ids, their absolute positions and the keys and
values already computed for earlier positions of each row. It returns logits and the keys and
values of the new tokens; where those are stored (the slot cache) is generate.py's business:
this module reads the rows of whatever cache it is handed (PastKV) and knows nothing of
slots or requests.

Layers are unrolled, each with its own arrays (h_0, h_1, ...). A stacked parameter tree run
with `scan` compiles faster, but XLA on CPU then copies each layer's weights out of the stack
at every step, which doubles the memory traffic of decoding (measured: 76 ms against 45 ms
per token for tiny_starcoder_py), and decoding is bound by exactly that traffic.

Parameter layout (the loader in checkpoint.py maps transformers' names onto it):
  wte/embedding [vocab, d]      wpe/embedding [positions, d]       ln_f/{scale,bias}
  h_i/ln_1, h_i/ln_2            h_i/attn/q_proj [heads·hd, d]     h_i/attn/kv_proj [2·kv·hd, d]
  h_i/attn/c_proj [d, d]        h_i/mlp/c_fc [inner, d]           h_i/mlp/c_proj [d, inner]
Linear weights keep transformers' [out, in] layout (see `project` for why).
transformers fuses q, k and v into c_attn; they are kept apart here so that the query heads
can be split across devices while the single MQA key/value head is replicated.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from starcoder_lsp import sharding
from starcoder_lsp.config import GELU_APPROXIMATE, ModelConfig

# Finite, so that a row whose keys are all masked (padding) gives a uniform softmax, not NaN.
MASKED = float(jnp.finfo(jnp.float32).min)


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


def empty_past(config: ModelConfig, batch: int, dtype: jnp.dtype) -> PastKV:
    kv = jnp.zeros((config.n_layer, 2, batch, 0, config.kv_heads, config.head_dim), dtype)
    return PastKV(kv, jnp.zeros((batch,), jnp.int32))


# Below this many rows (decode batches) a product is computed as weight · xᵀ: XLA on CPU
# streams a [out, in] weight past a few vectors well, while x · weightᵀ with few rows runs
# at a third of the memory bandwidth (measured: 4 rows cost 3.5× one row instead of 1.3×).
# The barrier keeps XLA's layout assignment from folding the transpose back into the
# product, which would bring the slow form back.
FEW_ROWS = 16


def project(x: jax.Array, weight: jax.Array) -> jax.Array:
    """x [..., in] · weightᵀ, with weight [out, in] as PyTorch and transformers store it."""
    rows = x.reshape(-1, x.shape[-1])
    contract = (((1,), (1,)), ((), ()))
    if rows.shape[0] <= FEW_ROWS:
        out = jax.lax.optimization_barrier(jax.lax.dot_general(weight, rows, contract)).T
    else:
        out = jax.lax.dot_general(rows, weight, contract)
    return out.reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Module):
    """A dense layer whose weight is [out, in], the layout of the checkpoint files."""

    features: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.normal(0.02)
        weight = self.param("kernel", init, (self.features, x.shape[-1]), self.dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.dtype)
        return project(x.astype(self.dtype), weight) + bias


def activation(name: str) -> callable:
    if name in GELU_APPROXIMATE:
        return lambda x: jax.nn.gelu(x, approximate=GELU_APPROXIMATE[name])
    return {"relu": jax.nn.relu, "silu": jax.nn.silu, "swish": jax.nn.silu}[name]


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


# Cached positions per step of attention's loop over the cache. A block's scores for a
# 256-token chunk of tiny_starcoder_py (3,072 query rows, 3 MB) stay in a CPU's L3 cache.
# Prefilling 1,024 and 4,096 tokens ran 3-5% faster than with blocks of 512 and 6-10% faster
# than with 1,024, measured in turn in one process; decoding was the same with 256 or 512.
PAST_BLOCK = 256


def _weighted(weights: jax.Array, values: jax.Array) -> jax.Array:
    """float32 [b, kv, rows, hd]: weights [b, kv, rows, t] times values [b, t, kv, hd]."""
    weights = weights.astype(values.dtype)
    return jnp.einsum("bkqt,btkd->bkqd", weights, values, preferred_element_type=jnp.float32)


def _past_block(past: PastKV, layer: int, start: jax.Array, size: int) -> jax.Array:
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


def attend(
    q: jax.Array,
    new: tuple[jax.Array, jax.Array],
    new_visible: jax.Array,
    past: PastKV,
    layer: int,
    block: int,
    mesh: Mesh | None = None,
) -> jax.Array:
    """Softmax attention over the new tokens' keys, then over the cached keys block by block.

    q: [b, kv, seq·group, hd], already scaled; new: (keys, values) [b, t, kv, hd] of the
    new tokens (t = seq, or more where keys decoded earlier in the same call come first);
    new_visible: bool [b, seq, t]. Returns float32 [b, kv, seq·group, hd].

    The loop over the cache keeps a running maximum, sum and output (online softmax) and
    runs for as many blocks as the longest row has cached. The count is traced, so one
    compiled program serves every cache length, a short row reads only what it uses, and
    scores exist for one block at a time: over all 4,096 keys at once they outgrew the L3
    cache, and 20 layers of a 256-token chunk took 1.49 s against 0.80 s in blocks of 512
    (and padding the cache to a power-of-two span wasted up to half the work besides).
    The blocks are read where they lie; the cache is never copied or joined to the new keys.
    mesh: where the cache's rows are split across devices (dp) and batch rows pick their
    cache row by index, each device reads its own rows (see `_on_row_owners`).
    """
    b, kv, rows, _ = q.shape
    seq, t = new_visible.shape[1:]
    scores = _scores(q, new[0]).reshape(b, kv, seq, rows // seq, t)
    scores = jnp.where(new_visible[:, None, :, None, :], scores, MASKED).reshape(b, kv, rows, t)
    top = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.exp(scores - top)
    state = (top, jnp.sum(weights, axis=-1, keepdims=True), _weighted(weights, new[1]))

    if past.kv.shape[3]:
        read = partial(_attend_past, layer=layer, size=min(block, past.kv.shape[3]))
        if (
            mesh is not None
            and past.row is not None
            and sharding.splits_cache_rows(mesh, past.kv.shape[2])
        ):
            read = _on_row_owners(read, mesh)
        state = read(q, past, state)
    _, total, out = state
    # Normalising the output rather than the probabilities saves a pass over the scores.
    return out / total


def _attend_past(
    q: jax.Array, past: PastKV, state: tuple[jax.Array, ...], layer: int, size: int
) -> tuple[jax.Array, ...]:
    """Carry the running (max, sum, output) of each query row over the cached blocks."""
    time = past.kv.shape[3]

    def step(masked: bool, i: jax.Array, state: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        top, total, out = state
        # A last block that would run past the cache is moved back inside it; the
        # positions it then repeats were counted by the block before.
        first = i * size
        start = jnp.minimum(first, time - size)
        keys, values = _past_block(past, layer, start, size)
        scores = _scores(q, keys)
        if masked:
            at = start + jnp.arange(size)
            visible = (at >= first)[None] & (at[None] < past.length[:, None])
            scores = jnp.where(visible[:, None, None], scores, MASKED)
        new_top = jnp.maximum(top, jnp.max(scores, axis=-1, keepdims=True))
        weights = jnp.exp(scores - new_top)
        rescale = jnp.exp(top - new_top)
        total = total * rescale + jnp.sum(weights, axis=-1, keepdims=True)
        return new_top, total, out * rescale + _weighted(weights, values)

    # Blocks that every row has cached whole need no mask (it was a tenth of the loop).
    whole = jnp.min(past.length) // size
    blocks = (jnp.max(past.length) + size - 1) // size
    state = jax.lax.fori_loop(0, whole, partial(step, False), state)
    return jax.lax.fori_loop(whole, blocks, partial(step, True), state)


def _on_row_owners(read: callable, mesh: Mesh) -> callable:
    """`read` run on each dp device over the cache rows it holds, not over the whole cache.

    Where batch rows pick their cache rows by index, the partitioner cannot tell which device
    a row lives on, and gathered the whole cache onto every device for each loop over it (two
    per layer, each step). Here every device runs the loop for all batch rows against its own
    rows; a batch row whose cache row lives elsewhere borrows a harmless length and its result
    is dropped, and a sum over dp then leaves each row the result of the device that holds it.
    The price: each device also reads blocks for rows it does not hold, where a gather moved
    the whole cache.
    """

    def local(q: jax.Array, past: PastKV, state: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        held = past.kv.shape[2]
        row = past.row - jax.lax.axis_index(sharding.DATA) * held
        mine = (row >= 0) & (row < held)
        # Rows held elsewhere take the longest length held here: no block is read for them
        # beyond what the held rows need, and the unmasked loop stays as long as it can.
        borrowed = jnp.max(jnp.where(mine, past.length, 0))
        here = PastKV(past.kv, jnp.where(mine, past.length, borrowed), jnp.clip(row, 0, held - 1))
        keep = mine[:, None, None, None]
        state = read(q, here, state)
        return tuple(jax.lax.psum(jnp.where(keep, s, 0), sharding.DATA) for s in state)

    replicated = sharding.P()
    past_spec = PastKV(sharding.CACHE_SPEC, replicated, replicated)
    return jax.shard_map(
        local, mesh=mesh, in_specs=(replicated, past_spec, replicated), out_specs=replicated,
        axis_names={sharding.DATA}, check_vma=False,
    )  # fmt: skip


class Attention(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype
    layer: int
    block: int
    mesh: Mesh | None

    @nn.compact
    def __call__(
        self, x: jax.Array, new_visible: jax.Array, past: PastKV, earlier: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        batch, seq, _ = x.shape
        heads, kv_heads, hd = cfg.n_head, cfg.kv_heads, cfg.head_dim
        group = heads // kv_heads
        dense = lambda features, name: Linear(features, self.dtype, name=name)

        q = dense(heads * hd, "q_proj")(x).reshape(batch, seq, kv_heads, group, hd)
        kv = dense(2 * kv_heads * hd, "kv_proj")(x).reshape(batch, seq, 2, kv_heads, hd)
        new_kv = kv.transpose(2, 0, 1, 3, 4).astype(past.kv.dtype)  # [2, b, s, kv_heads, hd]

        scale = hd**-0.5 if cfg.scale_attn_weights else 1.0
        q = q * jnp.asarray(scale, q.dtype)
        # Queries of all heads sharing a key/value head form one matrix: with MQA the scores
        # of a row are a single [seq·heads, hd] × [hd, time] product.
        q = q.transpose(0, 2, 1, 3, 4).reshape(batch, kv_heads, seq * group, hd)
        keys, values = new_kv[0], new_kv[1]
        if earlier is not None:  # this layer's RecentKV: [2, b, steps, kv_heads, hd]
            keys = jnp.concatenate([earlier[0], keys], axis=1)
            values = jnp.concatenate([earlier[1], values], axis=1)
        out = attend(q, (keys, values), new_visible, past, self.layer, self.block, self.mesh)
        out = out.astype(self.dtype).reshape(batch, kv_heads, seq, group, hd)
        out = out.transpose(0, 2, 1, 3, 4).reshape(batch, seq, heads * hd)
        return dense(cfg.n_embd, "c_proj")(out), new_kv


def new_token_mask(positions: jax.Array, valid: jax.Array) -> jax.Array:
    """bool [b, s, s]: which new keys each new token sees (valid, and not after it)."""
    return (positions[:, None, :] <= positions[:, :, None]) & valid[:, None, :]


class MLP(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = Linear(cfg.inner_dim, self.dtype, name="c_fc")(x)
        h = activation(cfg.activation_function)(h)
        return Linear(cfg.n_embd, self.dtype, name="c_proj")(h)


class Block(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype
    layer: int
    block: int
    mesh: Mesh | None

    @nn.compact
    def __call__(
        self, x: jax.Array, new_visible: jax.Array, past: PastKV, earlier: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        eps = self.config.layer_norm_epsilon
        norm = lambda name: nn.LayerNorm(
            epsilon=eps, dtype=self.dtype, param_dtype=self.dtype, name=name
        )
        attention = Attention(self.config, self.dtype, self.layer, self.block, self.mesh,
                              name="attn")  # fmt: skip
        attn_out, new_kv = attention(norm("ln_1")(x), new_visible, past, earlier)
        x = x + attn_out
        x = x + MLP(self.config, self.dtype, name="mlp")(norm("ln_2")(x))
        return x, new_kv


class GPTBigCode(nn.Module):
    """`apply(params, tokens, positions, valid, past)` → (float32 logits [b, s, vocab], new_kv).

    tokens, positions: int32 [b, s]; valid: bool [b, s], False for padding (a padded token
    is neither attended to nor meaningful as a query); past: PastKV for the earlier positions.
    new_kv: [layers, 2, b, s, kv_heads, hd], the keys and values of these tokens.
    recent: keys and values of tokens decoded earlier in this call (RecentKV), which every
    new token sees besides `past`.
    last_only: logits [b, vocab] of each row's last valid token only. A prefill chunk needs no
    more, and the LM head over every position of a 512-token chunk would cost a third as much
    again as the rest of the model.
    past_block: how many cached positions attention reads per step of its loop.
    mesh: the device mesh the cache is split over, if its rows are split across dp.
    """

    config: ModelConfig
    dtype: jnp.dtype = jnp.float32
    past_block: int = PAST_BLOCK
    mesh: Mesh | None = None

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        valid: jax.Array,
        past: PastKV,
        last_only: bool = False,
        recent: RecentKV | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        embed = lambda n, name: nn.Embed(
            n, cfg.n_embd, dtype=self.dtype, param_dtype=self.dtype, name=name
        )
        wte = embed(cfg.vocab_size, "wte")
        x = wte(tokens) + embed(cfg.n_positions, "wpe")(positions)

        new_visible = new_token_mask(positions, valid)
        if recent is not None:
            batch, seq = tokens.shape
            filled = jnp.arange(recent.kv.shape[3]) < recent.count
            filled = jnp.broadcast_to(filled, (batch, seq, recent.kv.shape[3]))
            new_visible = jnp.concatenate([filled, new_visible], axis=2)
        new_kv = []
        for i in range(cfg.n_layer):
            # The whole cache goes to every layer: slicing a layer out of it here would copy it.
            block = Block(cfg, self.dtype, i, self.past_block, self.mesh, name=f"h_{i}")
            x, kv = block(x, new_visible, past, None if recent is None else recent.kv[i])
            new_kv.append(kv)
        if last_only:
            last = x.shape[1] - 1 - jnp.argmax(valid[:, ::-1], axis=1)
            x = x[jnp.arange(x.shape[0]), last]

        x = nn.LayerNorm(
            epsilon=cfg.layer_norm_epsilon, dtype=self.dtype, param_dtype=self.dtype, name="ln_f"
        )(x)
        # The LM head is tied to the token embedding, as in every StarCoder checkpoint.
        logits = project(x, wte.embedding).astype(jnp.float32)
        return logits, jnp.stack(new_kv)


def abstract_params(config: ModelConfig, dtype: jnp.dtype = jnp.float32) -> dict:
    """The parameter tree's shapes and dtypes, without allocating it."""
    model = GPTBigCode(config, dtype)
    tokens = jnp.zeros((1, 1), jnp.int32)
    init = lambda: model.init(
        jax.random.PRNGKey(0), tokens, tokens, tokens == 0, empty_past(config, 1, dtype)
    )
    return jax.eval_shape(init)["params"]
