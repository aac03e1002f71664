"""How each model family's checkpoint names and shapes its tensors, and how they map onto
model.py's parameters. The loader reads through this, the random-checkpoint writer writes
through it: one list of names and shapes per family.

model.py's layout (Linear weights [out, in], as transformers stores them):
  wte/embedding [vocab, d]      wpe/embedding [positions, d] (GPTBigCode)    ln_f/{scale,bias}
  h_i/ln_1, h_i/ln_2            h_i/attn/q_proj [heads·hd, d]     h_i/attn/kv_proj [kv·2·hd, d]
  h_i/attn/c_proj [d, heads·hd] h_i/mlp/c_fc [inner, d]           h_i/mlp/c_proj [d, inner]
  lm_head/kernel [vocab, d]     (untied heads only)
kv_proj holds each key/value head's key rows then its value rows, so that splitting its rows
over `mp` by whole heads gives each device the keys and values of the heads it holds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from starcoder_lsp.config import STARCODER2, ModelConfig
from starcoder_lsp.quantize import SCALE_SUFFIX


@dataclass(frozen=True)
class HFTensor:
    """One tensor of a checkpoint: its transformers name, shape and how to initialise it."""

    name: str
    shape: tuple[int, ...]
    init: Literal["normal", "ones", "bias"]
    dtype: str | None = None  # None: the checkpoint's; else always this (a scale's float32)

    @property
    def quantizable(self) -> bool:
        """A matrix quantize.py stores as int8: all but the learned position table."""
        return len(self.shape) == 2 and not self.name.endswith("wpe.weight") and not self.dtype

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))


def hf_tensors(config: ModelConfig) -> list[HFTensor]:
    """The tensors of the family's transformers model, named and ordered as it saves them.
    A tied LM head is the token embedding and has no tensor of its own. A quantized
    checkpoint (config.quantization) stores each quantizable matrix as int8 with its scales
    beside it, as <name>_scale [rows]."""
    tensors = (
        _starcoder2_tensors(config)
        if config.model_type == STARCODER2
        else _gpt_bigcode_tensors(config)
    )
    if not config.quantized:
        return tensors
    with_scales = []
    for tensor in tensors:
        with_scales.append(tensor)
        if tensor.quantizable:
            scale = f"{tensor.name}{SCALE_SUFFIX}"
            with_scales.append(HFTensor(scale, tensor.shape[:1], "ones", dtype="float32"))
    return with_scales


# Reads one of our parameters (path with h/ for any layer) from the checkpoint: `read`
# gives a tensor by its transformers name; layer is None outside the layer stack.
Read = Callable[[str], np.ndarray]
Source = Callable[[Read, "int | None"], np.ndarray]


def sources(config: ModelConfig) -> dict[str, Source]:
    """Our parameter paths (h/... for every layer) → how each is read from the checkpoint."""
    if config.model_type == STARCODER2:
        return _starcoder2_sources(config)
    return _gpt_bigcode_sources(config)


def _norm(prefix: str, d: int) -> list[HFTensor]:
    return [HFTensor(f"{prefix}.weight", (d,), "ones"), HFTensor(f"{prefix}.bias", (d,), "bias")]


def _linear(prefix: str, out_features: int, in_features: int, bias: bool = True) -> list[HFTensor]:
    weight = HFTensor(f"{prefix}.weight", (out_features, in_features), "normal")
    return [weight, HFTensor(f"{prefix}.bias", (out_features,), "bias")] if bias else [weight]


# --- GPTBigCode -------------------------------------------------------------------------------


def _gpt_bigcode_tensors(config: ModelConfig) -> list[HFTensor]:
    d, inner = config.n_embd, config.inner_dim
    qkv = d + 2 * config.kv_heads * config.head_dim
    tensors = [
        HFTensor("transformer.wte.weight", (config.vocab_size, d), "normal"),
        HFTensor("transformer.wpe.weight", (config.n_positions, d), "normal"),
    ]
    for i in range(config.n_layer):
        block = f"transformer.h.{i}"
        tensors += _norm(f"{block}.ln_1", d)
        tensors += _linear(f"{block}.attn.c_attn", qkv, d)
        tensors += _linear(f"{block}.attn.c_proj", d, d)
        tensors += _norm(f"{block}.ln_2", d)
        tensors += _linear(f"{block}.mlp.c_fc", inner, d)
        tensors += _linear(f"{block}.mlp.c_proj", d, inner)
    tensors += _norm("transformer.ln_f", d)
    if not config.tie_word_embeddings:
        tensors.append(HFTensor("lm_head.weight", (config.vocab_size, d), "normal"))
    return tensors


def _gpt_bigcode_sources(config: ModelConfig) -> dict[str, Source]:
    d, hd, kv = config.n_embd, config.head_dim, config.kv_heads
    name = lambda layer, rest: f"transformer.h.{layer}.{rest}"

    def plain(rest: str) -> Source:
        return lambda read, i: read(name(i, rest) if i is not None else f"transformer.{rest}")

    def c_attn(part: str, suffix: str) -> Source:
        # MQA packs rows as [q (d) | k (hd) | v (hd)]; MHA interleaves them per head as
        # [head][q|k|v][hd]. Both become q_proj [h·hd, ..] and kv_proj [kv][k|v][hd].
        def read_part(read: Read, i: int | None) -> np.ndarray:
            t = read(name(i, f"attn.c_attn.{suffix}"))
            if config.multi_query:
                return t[:d] if part == "q" else t[d:]
            per_head = t.reshape(kv, 3 * hd, *t.shape[1:])
            out = per_head[:, :hd] if part == "q" else per_head[:, hd:]
            return out.reshape(-1, *t.shape[1:])

        return read_part

    table: dict[str, Source] = {
        "wte/embedding": plain("wte.weight"),
        "wpe/embedding": plain("wpe.weight"),
        "ln_f/scale": plain("ln_f.weight"),
        "ln_f/bias": plain("ln_f.bias"),
        "h/attn/q_proj/kernel": c_attn("q", "weight"),
        "h/attn/q_proj/bias": c_attn("q", "bias"),
        "h/attn/kv_proj/kernel": c_attn("kv", "weight"),
        "h/attn/kv_proj/bias": c_attn("kv", "bias"),
        "lm_head/kernel": lambda read, i: read("lm_head.weight"),
    }
    for norm in ("ln_1", "ln_2"):
        table[f"h/{norm}/scale"] = plain(f"{norm}.weight")
        table[f"h/{norm}/bias"] = plain(f"{norm}.bias")
    for linear in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        key = "h/" + linear.replace(".", "/")
        table[f"{key}/kernel"] = plain(f"{linear}.weight")
        table[f"{key}/bias"] = plain(f"{linear}.bias")
    return table


# --- StarCoder2 -------------------------------------------------------------------------------


def _starcoder2_tensors(config: ModelConfig) -> list[HFTensor]:
    d, inner, bias = config.n_embd, config.inner_dim, config.use_bias
    q, kv = config.n_head * config.head_dim, config.kv_heads * config.head_dim
    tensors = [HFTensor("model.embed_tokens.weight", (config.vocab_size, d), "normal")]
    for i in range(config.n_layer):
        layer = f"model.layers.{i}"
        tensors += _linear(f"{layer}.self_attn.q_proj", q, d, bias)
        tensors += _linear(f"{layer}.self_attn.k_proj", kv, d, bias)
        tensors += _linear(f"{layer}.self_attn.v_proj", kv, d, bias)
        tensors += _linear(f"{layer}.self_attn.o_proj", d, q, bias)
        tensors += _linear(f"{layer}.mlp.c_fc", inner, d, bias)
        tensors += _linear(f"{layer}.mlp.c_proj", d, inner, bias)
        tensors += _norm(f"{layer}.input_layernorm", d)
        tensors += _norm(f"{layer}.post_attention_layernorm", d)
    tensors += _norm("model.norm", d)
    if not config.tie_word_embeddings:
        tensors.append(HFTensor("lm_head.weight", (config.vocab_size, d), "normal"))
    return tensors


def _starcoder2_sources(config: ModelConfig) -> dict[str, Source]:
    kv, hd = config.kv_heads, config.head_dim

    def layer(rest: str) -> Source:
        return lambda read, i: read(f"model.layers.{i}.{rest}")

    def keys_and_values(suffix: str) -> Source:
        def read_both(read: Read, i: int | None) -> np.ndarray:
            k = read(f"model.layers.{i}.self_attn.k_proj.{suffix}")
            v = read(f"model.layers.{i}.self_attn.v_proj.{suffix}")
            rest = k.shape[1:]
            both = np.stack([k.reshape(kv, hd, *rest), v.reshape(kv, hd, *rest)], axis=1)
            return both.reshape(kv * 2 * hd, *rest)

        return read_both

    table: dict[str, Source] = {
        "wte/embedding": lambda read, i: read("model.embed_tokens.weight"),
        "ln_f/scale": lambda read, i: read("model.norm.weight"),
        "ln_f/bias": lambda read, i: read("model.norm.bias"),
        "h/ln_1/scale": layer("input_layernorm.weight"),
        "h/ln_1/bias": layer("input_layernorm.bias"),
        "h/ln_2/scale": layer("post_attention_layernorm.weight"),
        "h/ln_2/bias": layer("post_attention_layernorm.bias"),
        "h/attn/kv_proj/kernel": keys_and_values("weight"),
        "h/attn/kv_proj/bias": keys_and_values("bias"),
        "lm_head/kernel": lambda read, i: read("lm_head.weight"),
    }
    ours = {"q_proj": "self_attn.q_proj", "c_proj": "self_attn.o_proj"}
    for linear, theirs in ours.items():
        table[f"h/attn/{linear}/kernel"] = layer(f"{theirs}.weight")
        table[f"h/attn/{linear}/bias"] = layer(f"{theirs}.bias")
    for linear in ("c_fc", "c_proj"):
        table[f"h/mlp/{linear}/kernel"] = layer(f"mlp.{linear}.weight")
        table[f"h/mlp/{linear}/bias"] = layer(f"mlp.{linear}.bias")
    return table
