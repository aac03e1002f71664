"""GPTBigCode (StarCoder) in Flax: GPT-2 with multi-query attention and learned positions.

The forward pass is a pure function of token ids, their absolute positions and the keys and
values already computed for earlier positions of each row. It returns logits and the keys and
values of the new tokens; where those are stored (the slot cache) is runner.py's business:
this module reads the rows of whatever cache it is handed (PastKV, see attention.py) and knows
nothing of slots or requests.

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

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from starcoder_lsp.attention import (
    PAST_BLOCK,
    PastKV,
    RecentKV,
    attend,
    new_token_mask,
    with_recent,
)
from starcoder_lsp.config import GELU_APPROXIMATE, ModelConfig

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


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name in GELU_APPROXIMATE:
        return lambda x: jax.nn.gelu(x, approximate=GELU_APPROXIMATE[name])
    return {"relu": jax.nn.relu, "silu": jax.nn.silu, "swish": jax.nn.silu}[name]


class LayerModule(nn.Module):
    """What a layer and its attention are built with: layer is the index in the stack,
    past_block how many cached positions attention reads per step of its loop, mesh the
    device mesh where the cache's rows are split across dp."""

    config: ModelConfig
    dtype: jnp.dtype
    layer: int
    past_block: int
    mesh: Mesh | None


class Attention(LayerModule):
    @nn.compact
    def __call__(
        self, x: jax.Array, new_visible: jax.Array, past: PastKV, recent: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        """x [b, s, d] → (output [b, s, d], new_kv [2, b, s, kv_heads, hd]). recent: this
        layer's keys and values of tokens decoded earlier in the call, [2, b, steps, kv, hd]."""
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
        q = q.transpose(0, 2, 1, 3, 4).reshape(batch, kv_heads, seq * group, hd)
        keys, values = new_kv[0], new_kv[1]
        if recent is not None:
            keys = jnp.concatenate([recent[0], keys], axis=1)
            values = jnp.concatenate([recent[1], values], axis=1)
        out = attend(q, (keys, values), new_visible, past, self.layer, self.past_block, self.mesh)
        out = out.astype(self.dtype).reshape(batch, kv_heads, seq, group, hd)
        out = out.transpose(0, 2, 1, 3, 4).reshape(batch, seq, heads * hd)  # [b, s, heads·hd]
        return dense(cfg.n_embd, "c_proj")(out), new_kv


class MLP(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = Linear(cfg.inner_dim, self.dtype, name="c_fc")(x)
        h = activation(cfg.activation_function)(h)
        return Linear(cfg.n_embd, self.dtype, name="c_proj")(h)


class Block(LayerModule):
    @nn.compact
    def __call__(
        self, x: jax.Array, new_visible: jax.Array, past: PastKV, recent: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        norm = lambda name: nn.LayerNorm(
            epsilon=cfg.layer_norm_epsilon, dtype=self.dtype, param_dtype=self.dtype, name=name
        )
        attention = Attention(cfg, self.dtype, self.layer, self.past_block, self.mesh, name="attn")
        attn_out, new_kv = attention(norm("ln_1")(x), new_visible, past, recent)
        x = x + attn_out
        x = x + MLP(cfg, self.dtype, name="mlp")(norm("ln_2")(x))
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
        x = wte(tokens) + embed(cfg.n_positions, "wpe")(positions)  # [b, s, d]

        new_visible = new_token_mask(positions, valid)
        if recent is not None:
            new_visible = with_recent(new_visible, recent)
        new_kv = []
        for i in range(cfg.n_layer):
            # The whole cache goes to every layer: slicing a layer out of it here would copy it.
            block = Block(cfg, self.dtype, i, self.past_block, self.mesh, name=f"h_{i}")
            x, kv = block(x, new_visible, past, None if recent is None else recent.kv[i])
            new_kv.append(kv)
        if last_only:
            last = x.shape[1] - 1 - jnp.argmax(valid[:, ::-1], axis=1)
            x = x[jnp.arange(x.shape[0]), last]  # [b, d]

        x = nn.LayerNorm(
            epsilon=cfg.layer_norm_epsilon, dtype=self.dtype, param_dtype=self.dtype, name="ln_f"
        )(x)
        # The LM head is tied to the token embedding, as in every StarCoder checkpoint.
        logits = project(x, wte.embedding).astype(jnp.float32)
        return logits, jnp.stack(new_kv)


def empty_past(config: ModelConfig, batch: int, dtype: jnp.dtype) -> PastKV:
    kv = jnp.zeros((config.n_layer, 2, batch, 0, config.kv_heads, config.head_dim), dtype)
    return PastKV(kv, jnp.zeros((batch,), jnp.int32))


def abstract_params(config: ModelConfig, dtype: jnp.dtype = jnp.float32) -> dict:
    """The parameter tree's shapes and dtypes, without allocating it."""
    model = GPTBigCode(config, dtype)
    tokens = jnp.zeros((1, 1), jnp.int32)
    init = lambda: model.init(
        jax.random.PRNGKey(0), tokens, tokens, tokens == 0, empty_past(config, 1, dtype)
    )
    return jax.eval_shape(init)["params"]
