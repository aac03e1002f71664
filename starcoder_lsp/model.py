"""The StarCoder family in Flax: GPTBigCode and StarCoder2, one module, as the config says.

GPTBigCode (StarCoder, StarCoderBase, tiny_starcoder_py) is GPT-2 with multi-query attention
and learned positions. StarCoder2 has the same blocks (layer norms with biases, a GELU MLP,
biases in every linear layer) with rotary positions, grouped-query attention, a sliding
attention window and, where the checkpoint says so, an LM head of its own. Keys are cached
after rotation, so a slot's keys and values stay valid for any prompt that shares its token
prefix, as with learned positions.

The forward pass is a pure function of token ids, their absolute positions and the keys and
values already computed for earlier positions of each row. It returns logits and the keys and
values of the new tokens; where those are stored (the slot cache) is runner.py's business:
this module reads the rows of whatever cache it is handed (PastKV, see attention.py) and knows
nothing of slots or requests.

Layers are unrolled, each with its own arrays (h_0, h_1, ...). A stacked parameter tree run
with `scan` compiles faster, but XLA on CPU then copies each layer's weights out of the stack
at every step, which doubles the memory traffic of decoding (measured: 76 ms against 45 ms
per token for tiny_starcoder_py), and decoding is bound by exactly that traffic.

The parameter layout is in layout.py, which maps each family's tensor names onto it. Linear
weights keep transformers' [out, in] layout (see `project` for why). Queries and keys/values
have projections of their own (GPTBigCode fuses them into c_attn), so that the query heads
can be split across devices while a single MQA key/value head is replicated.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from starcoder_lsp import cpu_kernels
from starcoder_lsp.attention import (
    PAST_BLOCK,
    PastKV,
    RecentKV,
    attend,
    new_token_mask,
    with_recent,
)
from starcoder_lsp.config import GELU_APPROXIMATE, ModelConfig
from starcoder_lsp.cpu_kernels import one_cpu

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


# On one CPU device, XLA's dot of an int8 weight (converted in the product, or int8 × int8)
# runs 6-7× slower than float32's, element by element (measured on tiny_starcoder_py's
# matrices, benchmarks in the closing note of issue 19). The few rows of a decode step go to
# our kernel (cpu_kernels.py), which reads the int8 bytes at memory speed; where it cannot be
# built, the product is taken in blocks of this many rows, each converted to float32 where it
# sits in the CPU's cache (a decode step 1.2-1.35× faster than float32's; the kernel's, 2.2×).
CPU_INT8_BLOCK = 128

# The config's activations our int8 kernel applies to its output itself, by its name for them.
KERNEL_ACTIVATIONS = {name: "gelu_tanh" for name, tanh in GELU_APPROXIMATE.items() if tanh}


def int8_kernel_takes(x: jax.Array, quantized: bool, one_cpu: bool) -> bool:
    """Whether a product of x with a weight goes to our int8 kernel (`project_int8`): an int8
    weight whole on one CPU device, and the few rows of a decode or verify step."""
    few = math.prod(x.shape[:-1]) <= FEW_ROWS
    return quantized and one_cpu and few and cpu_kernels.has_int8_matmul()


def project_int8(
    x: jax.Array,
    weight: jax.Array,
    scale: jax.Array,
    one_cpu: bool = False,
    int8_activations: bool = False,
    bias: jax.Array | None = None,
    norm: LayerNorm | None = None,
    activation_name: str | None = None,
    residual: jax.Array | None = None,
) -> jax.Array:
    """act(norm(x) [..., in] · (weight · scale)ᵀ (+ bias)) (+ residual) for an int8 weight
    [out, in] with a scale per row [out]: the scale is applied to the product, never to the
    weight, so the weight is read as the int8 it is stored as. one_cpu: the weight is whole on
    one CPU device. int8_activations: our CPU kernel rounds x to int8 too, in groups of 64
    (cpu_kernels.py). norm: a layer norm x goes through first; activation_name: the config's
    activation_function, applied to the output; residual [..., out]: added last. Our kernel
    takes all three in the same call where it has the activation."""
    rows = x.reshape(-1, x.shape[-1])
    shape = (*x.shape[:-1], weight.shape[0])
    if int8_kernel_takes(x, True, one_cpu):
        fused = None if norm is None else (norm.scale, norm.bias, norm.epsilon)
        kernel_activation = KERNEL_ACTIVATIONS.get(activation_name)
        # An activation the kernel lacks is applied after it, and the residual after that.
        in_kernel = activation_name is None or kernel_activation is not None
        adds_residual = in_kernel and residual is not None
        added = residual.reshape(-1, weight.shape[0]) if adds_residual else None
        out = cpu_kernels.int8_matmul(
            rows, weight, scale, int8_activations, bias, fused, kernel_activation, added
        )
        out = out.astype(x.dtype).reshape(shape)
        return out if in_kernel else _after(out, activation_name, residual)
    if norm is not None:
        x = norm(x)
        rows = x.reshape(-1, x.shape[-1])
    contract = (((1,), (1,)), ((), ()))
    few = rows.shape[0] <= FEW_ROWS
    if few and one_cpu and weight.shape[0] % CPU_INT8_BLOCK == 0:
        blocks = weight.reshape(-1, CPU_INT8_BLOCK, weight.shape[1])

        def block(carry: None, w: jax.Array) -> tuple[None, jax.Array]:
            product = jax.lax.dot_general(w.astype(rows.dtype), rows, contract)
            return carry, product.astype(jnp.float32)

        _, out = jax.lax.scan(block, None, blocks)
        out = out.reshape(weight.shape[0], rows.shape[0]).T
    elif few:
        out = jax.lax.dot_general(weight, rows, contract, preferred_element_type=jnp.float32)
        out = jax.lax.optimization_barrier(out).T
    else:
        out = jax.lax.dot_general(rows, weight, contract, preferred_element_type=jnp.float32)
    out = (out * scale).astype(x.dtype)
    if bias is not None:
        out = out + bias.astype(x.dtype)
    return _after(out.reshape(shape), activation_name, residual)


def _after(out: jax.Array, activation_name: str | None, residual: jax.Array | None) -> jax.Array:
    """act(out) + residual, either left out where None."""
    out = out if activation_name is None else activation(activation_name)(out)
    return out if residual is None else out + residual


class Linear(nn.Module):
    """A dense layer whose weight is [out, in], the layout of the checkpoint files; int8
    with a float scale per output channel where the model is quantized (quantize.py)."""

    features: int
    dtype: jnp.dtype
    use_bias: bool = True
    quantized: bool = False
    one_cpu: bool = False
    int8_activations: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        norm: LayerNorm | None = None,
        activation_name: str | None = None,
        residual: jax.Array | None = None,
    ) -> jax.Array:
        """act(norm(x) · weightᵀ + bias) + residual; norm, activation_name and residual as
        `project_int8` takes them, each left out where None."""
        shape = (self.features, x.shape[-1])
        x = x.astype(self.dtype)
        if self.quantized:
            weight = self.param("kernel", nn.initializers.zeros, shape, jnp.int8)
            scale = self.param("scale", nn.initializers.ones, (self.features,), jnp.float32)
        else:
            weight = self.param("kernel", nn.initializers.normal(0.02), shape, self.dtype)
        bias = None
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.dtype)
        if self.quantized:
            placement = (self.one_cpu, self.int8_activations)
            return project_int8(x, weight, scale, *placement, bias, norm, activation_name, residual)
        out = project(x if norm is None else norm(x), weight)
        return _after(out if bias is None else out + bias, activation_name, residual)


def linear_layers(
    cfg: ModelConfig, dtype: jnp.dtype, mesh: Mesh | None, int8_activations: bool
) -> Callable[[int, str], Linear]:
    """A maker of a block's linear layers: (features, name) → Linear, with the model's bias,
    quantization and placement."""
    local = one_cpu(mesh)
    return lambda features, name: Linear(
        features, dtype, cfg.use_bias, cfg.quantized, local, int8_activations, name=name
    )


class LayerNorm(nn.Module):
    """A layer norm with a scale and a bias (flax's parameter names), its statistics in
    float32; on one CPU device the few rows of a decode step go to our kernel (one call where
    XLA runs five or six small programs), or to that of the int8 product that follows, which
    takes the norm in its own call (`project_int8`)."""

    features: int
    epsilon: float
    dtype: jnp.dtype
    one_cpu: bool = False

    def setup(self) -> None:
        # Parameters of their own (not made in __call__): an int8 product that follows the
        # norm reads them to take the norm itself (project_int8).
        self.scale = self.param("scale", nn.initializers.ones, (self.features,), self.dtype)
        self.bias = self.param("bias", nn.initializers.zeros, (self.features,), self.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        rows = x.reshape(-1, self.features)
        few = rows.shape[0] <= FEW_ROWS and x.dtype == jnp.float32
        if few and self.one_cpu and cpu_kernels.has_layer_norm():
            out = cpu_kernels.layer_norm(rows, self.scale, self.bias, self.epsilon)
            return out.reshape(x.shape)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        variance = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(variance + self.epsilon)
        scale, bias = self.scale.astype(jnp.float32), self.bias.astype(jnp.float32)
        return (y * scale + bias).astype(self.dtype)


class Embed(nn.Module):
    """A table of vectors [num, features], looked up by index; int8 with a scale per row
    where the model is quantized. `attend` is the tied LM head: x · tableᵀ."""

    num: int
    features: int
    dtype: jnp.dtype
    quantized: bool = False
    one_cpu: bool = False
    int8_activations: bool = False

    def setup(self) -> None:
        shape = (self.num, self.features)
        if self.quantized:
            self.embedding = self.param("embedding", nn.initializers.zeros, shape, jnp.int8)
            self.scale = self.param("scale", nn.initializers.ones, (self.num,), jnp.float32)
        else:
            init = nn.initializers.normal(0.02)
            self.embedding = self.param("embedding", init, shape, self.dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        rows = jnp.take(self.embedding, ids, axis=0).astype(self.dtype)
        if self.quantized:
            rows = rows * jnp.take(self.scale, ids, axis=0)[..., None].astype(self.dtype)
        return rows

    def attend(self, x: jax.Array, norm: LayerNorm | None = None) -> jax.Array:
        """norm(x) · tableᵀ (see `project_int8` for norm)."""
        if self.quantized:
            table, scale = self.embedding, self.scale
            return project_int8(x, table, scale, self.one_cpu, self.int8_activations, None, norm)
        return project(x if norm is None else norm(x), self.embedding)


def rotate(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding of x [b, s, ..., hd] at positions [b, s], as transformers'
    StarCoder2 applies it: the two halves of each head rotate together (not interleaved),
    angles computed in float32."""
    hd = x.shape[-1]
    inverse = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    angles = positions.astype(jnp.float32)[..., None] * inverse  # [b, s, hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    shape = (*angles.shape[:2], *([1] * (x.ndim - 3)), hd)
    cos = jnp.cos(angles).reshape(shape).astype(x.dtype)
    sin = jnp.sin(angles).reshape(shape).astype(x.dtype)
    half = hd // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name in GELU_APPROXIMATE:
        return lambda x: jax.nn.gelu(x, approximate=GELU_APPROXIMATE[name])
    return {"relu": jax.nn.relu, "silu": jax.nn.silu, "swish": jax.nn.silu}[name]


class LayerModule(nn.Module):
    """What a layer and its attention are built with: layer is the index in the stack,
    past_block how many cached positions attention reads per step of its loop, mesh the
    device mesh where the cache's rows are split across dp, int8_activations as for
    `project_int8`."""

    config: ModelConfig
    dtype: jnp.dtype
    layer: int
    past_block: int
    mesh: Mesh | None
    int8_activations: bool


class Attention(LayerModule):
    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        new_visible: jax.Array,
        past: PastKV,
        recent: jax.Array | None,
        norm: LayerNorm | None = None,
        residual: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """norm(x) [b, s, d] → (output [b, s, d], new_kv [2, b, s, kv_heads, hd]). recent:
        this layer's keys and values of tokens decoded earlier in the call, [2, b, steps, kv,
        hd]. norm: the layer norm the projections take x through; residual [b, s, d]: added
        to the output (see `project_int8`)."""
        cfg = self.config
        batch, seq, _ = x.shape
        heads, kv_heads, hd = cfg.n_head, cfg.kv_heads, cfg.head_dim
        group = heads // kv_heads
        dense = linear_layers(cfg, self.dtype, self.mesh, self.int8_activations)

        if norm is not None and not int8_kernel_takes(x, cfg.quantized, one_cpu(self.mesh)):
            x, norm = norm(x), None  # once, for both projections
        q = dense(heads * hd, "q_proj")(x, norm).reshape(batch, seq, kv_heads, group, hd)
        kv = dense(kv_heads * 2 * hd, "kv_proj")(x, norm).reshape(batch, seq, kv_heads, 2, hd)
        keys, values = kv[:, :, :, 0], kv[:, :, :, 1]  # [b, s, kv_heads, hd]
        if not cfg.learned_positions:
            q, keys = rotate(q, positions, cfg.rope_theta), rotate(keys, positions, cfg.rope_theta)
        new_kv = jnp.stack([keys, values]).astype(past.kv.dtype)  # [2, b, s, kv_heads, hd]

        # Queries of all heads sharing a key/value head form one matrix: with MQA the scores
        # of a row are a single [seq·heads, hd] × [hd, time] product.
        q = q.transpose(0, 2, 1, 3, 4).reshape(batch, kv_heads, seq * group, hd)
        keys, values = new_kv[0], new_kv[1]
        if recent is not None:
            keys = jnp.concatenate([recent[0], keys], axis=1)
            values = jnp.concatenate([recent[1], values], axis=1)
        out = attend(
            q,
            (keys, values),
            new_visible,
            past,
            self.layer,
            positions,
            window=cfg.sliding_window,
            past_block=self.past_block,
            mesh=self.mesh,
            scale=hd**-0.5 if cfg.scale_attn_weights else 1.0,
        )
        out = out.astype(self.dtype).reshape(batch, kv_heads, seq, group, hd)
        out = out.transpose(0, 2, 1, 3, 4).reshape(batch, seq, heads * hd)  # [b, s, heads·hd]
        return dense(cfg.n_embd, "c_proj")(out, residual=residual), new_kv


class MLP(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype
    mesh: Mesh | None = None
    int8_activations: bool = False

    @nn.compact
    def __call__(
        self, x: jax.Array, norm: LayerNorm | None = None, residual: jax.Array | None = None
    ) -> jax.Array:
        """norm(x) through the two layers, plus residual (see `project_int8`)."""
        cfg = self.config
        dense = linear_layers(cfg, self.dtype, self.mesh, self.int8_activations)
        h = dense(cfg.inner_dim, "c_fc")(x, norm, cfg.activation_function)
        return dense(cfg.n_embd, "c_proj")(h, residual=residual)


class Block(LayerModule):
    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        new_visible: jax.Array,
        past: PastKV,
        recent: jax.Array | None,
    ) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        local = one_cpu(self.mesh)
        epsilon = cfg.layer_norm_epsilon
        norm = lambda name: LayerNorm(cfg.n_embd, epsilon, self.dtype, local, name=name)
        placement = (self.layer, self.past_block, self.mesh, self.int8_activations)
        attention = Attention(cfg, self.dtype, *placement, name="attn")
        # The norms and the residual adds are handed to the products next to them, which take
        # them in their own kernel call where they can.
        x, new_kv = attention(x, positions, new_visible, past, recent, norm("ln_1"), residual=x)
        mlp = MLP(cfg, self.dtype, self.mesh, self.int8_activations, name="mlp")
        return mlp(x, norm("ln_2"), residual=x), new_kv


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
    int8_activations: on one CPU device, int8 weights multiply activations rounded to int8 in
    groups of 64 (cpu_kernels.int8_activations() says whether a runner asks for it).
    """

    config: ModelConfig
    dtype: jnp.dtype = jnp.float32
    past_block: int = PAST_BLOCK
    mesh: Mesh | None = None
    int8_activations: bool = False

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
        local = one_cpu(self.mesh)
        rounds = self.int8_activations
        wte = Embed(
            cfg.vocab_size, cfg.n_embd, self.dtype, cfg.quantized, local, rounds, name="wte"
        )
        x = wte(tokens)  # [b, s, d]
        if cfg.learned_positions:  # one row a step: never quantized
            x = x + Embed(cfg.n_positions, cfg.n_embd, self.dtype, name="wpe")(positions)

        new_visible = new_token_mask(positions, valid, cfg.sliding_window)
        if recent is not None:
            new_visible = with_recent(new_visible, recent, cfg.sliding_window)
        new_kv = []
        for i in range(cfg.n_layer):
            # The whole cache goes to every layer: slicing a layer out of it here would copy it.
            block = Block(cfg, self.dtype, i, self.past_block, self.mesh, rounds, name=f"h_{i}")
            x, kv = block(x, positions, new_visible, past, None if recent is None else recent.kv[i])
            new_kv.append(kv)
        if last_only:
            last = x.shape[1] - 1 - jnp.argmax(valid[:, ::-1], axis=1)
            x = x[jnp.arange(x.shape[0]), last]  # [b, d]

        ln_f = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, self.dtype, local, name="ln_f")
        if cfg.tie_word_embeddings:  # the LM head is the token embedding
            logits = wte.attend(x, ln_f)
        else:
            head = Linear(
                cfg.vocab_size, self.dtype, False, cfg.quantized, local, rounds, name="lm_head"
            )
            logits = head(x, ln_f)
        return logits.astype(jnp.float32), jnp.stack(new_kv)


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
