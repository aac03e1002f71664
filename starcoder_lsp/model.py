"""GPTBigCode (StarCoder) in Flax: GPT-2 with multi-query attention and learned positions.

The forward pass is a pure function of token ids, their absolute positions and the keys and
values already computed for earlier positions of each row. It returns logits and the keys and
values of the new tokens; where those are stored (the slot cache) is generate.py's business,
so this module knows nothing of slots, buckets or requests.

Layers are stacked and run with `nn.scan`: one compiled layer instead of n_layer copies keeps
compilation fast for every prefill and decode shape.

Parameter layout (the loader in checkpoint.py maps transformers' names onto it):
  wte/embedding [vocab, d]      wpe/embedding [positions, d]       ln_f/{scale,bias}
  h/ln_1, h/ln_2                h/attn/q_proj [d, heads·hd]       h/attn/kv_proj [d, 2·kv·hd]
  h/attn/c_proj [d, d]          h/mlp/c_fc [d, inner]             h/mlp/c_proj [inner, d]
every h/... leaf carries a leading layer axis. transformers fuses q, k and v into c_attn; they
are kept apart here so that the query heads can be split across devices while the single
MQA key/value head is replicated.
"""

from __future__ import annotations

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


def activation(name: str) -> callable:
    if name in GELU_APPROXIMATE:
        return lambda x: jax.nn.gelu(x, approximate=GELU_APPROXIMATE[name])
    return {"relu": jax.nn.relu, "silu": jax.nn.silu, "swish": jax.nn.silu}[name]


class Attention(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        valid: jax.Array,
        past_kv: jax.Array,
        past_length: jax.Array,
    ) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        batch, seq, _ = x.shape
        heads, kv_heads, hd = cfg.n_head, cfg.kv_heads, cfg.head_dim
        group = heads // kv_heads
        dense = lambda features, name: nn.Dense(
            features, dtype=self.dtype, param_dtype=self.dtype, name=name
        )

        q = dense(heads * hd, "q_proj")(x).reshape(batch, seq, kv_heads, group, hd)
        kv = dense(2 * kv_heads * hd, "kv_proj")(x).reshape(batch, seq, 2, kv_heads, hd)
        k_new, v_new = kv[:, :, 0], kv[:, :, 1]
        k_past, v_past = past_kv[0], past_kv[1]

        scale = hd**-0.5 if cfg.scale_attn_weights else 1.0
        q = q * jnp.asarray(scale, q.dtype)
        # Scores against the cached keys and against this call's own keys, one softmax over both.
        # With MQA (kv_heads=1) each einsum is one [seq·heads, hd] × [hd, time] matmul per row.
        s_past = jnp.einsum("bskgd,btkd->bkgst", q, k_past, preferred_element_type=jnp.float32)
        s_new = jnp.einsum("bskgd,bukd->bkgsu", q, k_new, preferred_element_type=jnp.float32)

        past_mask = jnp.arange(k_past.shape[1])[None, :] < past_length[:, None]  # [b, t]
        new_mask = (positions[:, None, :] <= positions[:, :, None]) & valid[:, None, :]  # [b, s, u]
        s_past = jnp.where(past_mask[:, None, None, None, :], s_past, MASKED)
        s_new = jnp.where(new_mask[:, None, None, :, :], s_new, MASKED)

        probs = jax.nn.softmax(jnp.concatenate([s_past, s_new], axis=-1), axis=-1)
        p_past, p_new = probs[..., : k_past.shape[1]], probs[..., k_past.shape[1] :]
        out = jnp.einsum("bkgst,btkd->bskgd", p_past.astype(self.dtype), v_past) + jnp.einsum(
            "bkgsu,bukd->bskgd", p_new.astype(self.dtype), v_new
        )
        out = dense(cfg.n_embd, "c_proj")(out.reshape(batch, seq, heads * hd))
        return out, jnp.stack([k_new, v_new])


class MLP(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = nn.Dense(cfg.inner_dim, dtype=self.dtype, param_dtype=self.dtype, name="c_fc")(x)
        h = activation(cfg.activation_function)(h)
        return nn.Dense(cfg.n_embd, dtype=self.dtype, param_dtype=self.dtype, name="c_proj")(h)


class Block(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        valid: jax.Array,
        past_length: jax.Array,
        past_kv: jax.Array,
    ) -> tuple[jax.Array, jax.Array]:
        eps = self.config.layer_norm_epsilon
        norm = lambda name: nn.LayerNorm(
            epsilon=eps, dtype=self.dtype, param_dtype=self.dtype, name=name
        )
        attn_out, new_kv = Attention(self.config, self.dtype, name="attn")(
            norm("ln_1")(x), positions, valid, past_kv, past_length
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

        layers = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
            length=cfg.n_layer,
        )(cfg, self.dtype, name="h")
        x, new_kv = layers(x, positions, valid, past.length, past.kv)
        if last_only:
            last = x.shape[1] - 1 - jnp.argmax(valid[:, ::-1], axis=1)
            x = x[jnp.arange(x.shape[0]), last]

        x = nn.LayerNorm(
            epsilon=cfg.layer_norm_epsilon, dtype=self.dtype, param_dtype=self.dtype, name="ln_f"
        )(x)
        # The LM head is tied to the token embedding, as in every StarCoder checkpoint.
        logits = wte.attend(x).astype(jnp.float32)
        return logits, new_kv


def abstract_params(config: ModelConfig, dtype: jnp.dtype = jnp.float32) -> dict:
    """The parameter tree's shapes and dtypes, without allocating it."""
    model = GPTBigCode(config, dtype)
    tokens = jnp.zeros((1, 1), jnp.int32)
    init = lambda: model.init(
        jax.random.PRNGKey(0), tokens, tokens, tokens == 0, empty_past(config, 1, dtype)
    )
    return jax.eval_shape(init)["params"]
