"""GPTBigCode (StarCoder) in Flax: GPT-2 with multi-query attention and learned positions.

The forward pass is a pure function of token ids, their absolute positions and the keys and
values already computed for earlier positions of each row. It returns logits and the keys and
values of the new tokens; where those are stored (the slot cache) is generate.py's business,
so this module knows nothing of slots, buckets or requests.

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

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from starcoder_lsp.config import GELU_APPROXIMATE, ModelConfig

# Finite, so that a row whose keys are all masked (padding) gives a uniform softmax, not NaN.
MASKED = float(jnp.finfo(jnp.float32).min)


class PastKV(NamedTuple):
    """Keys and values of earlier positions, per layer: [layers, 2, batch, time, kv_heads, hd].

    Only positions below `length[b]` of row b are attended to; what lies beyond is ignored.
    """

    kv: jax.Array
    length: jax.Array  # int32 [batch]


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


def attend(
    q: jax.Array,
    past: tuple[jax.Array, jax.Array],
    past_visible: jax.Array,
    new: tuple[jax.Array, jax.Array],
    new_visible: jax.Array,
) -> jax.Array:
    """Softmax attention over cached keys and the new tokens' keys, without joining them.

    q: [b, kv, seq·group, hd], already scaled; past, new: (keys, values) [b, t, kv, hd];
    past_visible: bool [b, 1, t_past]; new_visible: bool [b, seq, seq]. Returns float32
    [b, kv, seq·group, hd]. The cache is read in place: concatenating it with the new keys
    would copy all of it at every step. Normalising the output rather than the
    probabilities saves a pass over [rows, t].
    """
    b, kv, rows, _ = q.shape
    seq = new_visible.shape[1]
    split = lambda s: s.reshape(b, kv, seq, rows // seq, s.shape[-1])

    def masked(scores: jax.Array, visible: jax.Array) -> jax.Array:
        return jnp.where(visible[:, None, :, None, :], split(scores), MASKED)

    parts = [(masked(_scores(q, new[0]), new_visible), new[1])]
    if past[0].shape[1]:
        parts.append((masked(_scores(q, past[0]), past_visible), past[1]))
    top = functools.reduce(jnp.maximum, [jnp.max(s, axis=-1, keepdims=True) for s, _ in parts])
    out, total = 0.0, 0.0
    for scores, values in parts:
        weights = jnp.exp(scores - top)
        total = total + jnp.sum(weights, axis=-1)
        weights = weights.reshape(b, kv, rows, -1).astype(values.dtype)
        out = out + jnp.einsum("bkqt,btkd->bkqd", weights, values,
                               preferred_element_type=jnp.float32)  # fmt: skip
    return out / total.reshape(b, kv, rows, 1)


class Attention(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(
        self, x: jax.Array, masks: tuple[jax.Array, jax.Array], past_kv: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        batch, seq, _ = x.shape
        heads, kv_heads, hd = cfg.n_head, cfg.kv_heads, cfg.head_dim
        group = heads // kv_heads
        dense = lambda features, name: Linear(features, self.dtype, name=name)

        q = dense(heads * hd, "q_proj")(x).reshape(batch, seq, kv_heads, group, hd)
        kv = dense(2 * kv_heads * hd, "kv_proj")(x).reshape(batch, seq, 2, kv_heads, hd)
        new_kv = kv.transpose(2, 0, 1, 3, 4).astype(past_kv.dtype)  # [2, b, s, kv_heads, hd]

        scale = hd**-0.5 if cfg.scale_attn_weights else 1.0
        q = q * jnp.asarray(scale, q.dtype)
        # Queries of all heads sharing a key/value head form one matrix: with MQA the scores
        # of a row are a single [seq·heads, hd] × [hd, time] product.
        q = q.transpose(0, 2, 1, 3, 4).reshape(batch, kv_heads, seq * group, hd)
        past_visible, new_visible = masks
        out = attend(q, (past_kv[0], past_kv[1]), past_visible, (new_kv[0], new_kv[1]),
                     new_visible).astype(self.dtype)  # fmt: skip
        out = out.reshape(batch, kv_heads, seq, group, hd).transpose(0, 2, 1, 3, 4)
        out = dense(cfg.n_embd, "c_proj")(out.reshape(batch, seq, heads * hd))
        return out, new_kv


def attention_masks(
    positions: jax.Array, valid: jax.Array, past: PastKV
) -> tuple[jax.Array, jax.Array]:
    """Which keys each new token sees: cached keys below the row's length (bool [b, 1, past]),
    and new keys that are valid and not after the query (bool [b, s, s])."""
    cached = jnp.arange(past.kv.shape[3])[None, None, :] < past.length[:, None, None]
    new = (positions[:, None, :] <= positions[:, :, None]) & valid[:, None, :]
    return cached, new


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

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        masks: tuple[jax.Array, jax.Array],
        past_kv: jax.Array,
    ) -> tuple[jax.Array, jax.Array]:
        eps = self.config.layer_norm_epsilon
        norm = lambda name: nn.LayerNorm(
            epsilon=eps, dtype=self.dtype, param_dtype=self.dtype, name=name
        )
        attn_out, new_kv = Attention(self.config, self.dtype, name="attn")(
            norm("ln_1")(x), masks, past_kv
        )
        x = x + attn_out
        x = x + MLP(self.config, self.dtype, name="mlp")(norm("ln_2")(x))
        return x, new_kv


class GPTBigCode(nn.Module):
    """`apply(params, tokens, positions, valid, past)` → (float32 logits [b, s, vocab], new_kv).

    tokens, positions: int32 [b, s]; valid: bool [b, s], False for padding (a padded token
    is neither attended to nor meaningful as a query); past: PastKV for the earlier positions.
    new_kv: [layers, 2, b, s, kv_heads, hd], the keys and values of these tokens.
    last_only: logits [b, vocab] of each row's last valid token only. A prefill chunk needs no
    more, and the LM head over every position of a 512-token chunk would cost a third as much
    again as the rest of the model.
    """

    config: ModelConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        valid: jax.Array,
        past: PastKV,
        last_only: bool = False,
    ) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        embed = lambda n, name: nn.Embed(
            n, cfg.n_embd, dtype=self.dtype, param_dtype=self.dtype, name=name
        )
        wte = embed(cfg.vocab_size, "wte")
        x = wte(tokens) + embed(cfg.n_positions, "wpe")(positions)

        masks = attention_masks(positions, valid, past)
        new_kv = []
        for i in range(cfg.n_layer):
            x, kv = Block(cfg, self.dtype, name=f"h_{i}")(x, masks, past.kv[i])
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
