"""Model configuration of the StarCoder family, as read from (and written to) config.json.

Two families share one configuration and one model (model.py): GPTBigCode (StarCoder,
StarCoderBase, tiny_starcoder_py: learned positions, multi-query attention) and StarCoder2
(rotary positions, grouped-query attention, a sliding attention window). A checkpoint's
`model_type` says which; the fields keep GPT-2's names whatever the family calls them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from starcoder_lsp.errors import CheckpointError

GPT_BIGCODE, STARCODER2 = "gpt_bigcode", "starcoder2"
FAMILIES = (GPT_BIGCODE, STARCODER2)

# The activation names transformers' ACT2FN accepts for these checkpoints, mapped to
# whether jax.nn.gelu should use the tanh approximation. StarCoder 15B uses the exact erf
# GELU while tiny_starcoder_py and the 1B use the tanh form: getting this wrong changes logits.
GELU_APPROXIMATE = {
    "gelu": False,
    "gelu_pytorch_tanh": True,
    "gelu_new": True,
    "gelu_fast": True,
}
OTHER_ACTIVATIONS = ("relu", "silu", "swish")

# config.json's names → ours. transformers accepts both GPT-2's names and the generic ones
# for GPTBigCode; StarCoder2 has only the generic ones.
_GENERIC_NAMES = {
    "hidden_size": "n_embd",
    "num_hidden_layers": "n_layer",
    "num_attention_heads": "n_head",
    "max_position_embeddings": "n_positions",
}
_STARCODER2_NAMES = {
    **_GENERIC_NAMES,
    "num_key_value_heads": "n_kv_head",
    "intermediate_size": "n_inner",
    "hidden_act": "activation_function",
    "norm_epsilon": "layer_norm_epsilon",
}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 49152
    n_positions: int = 8192
    n_embd: int = 768
    n_layer: int = 20
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_pytorch_tanh"
    layer_norm_epsilon: float = 1e-5
    multi_query: bool = True
    scale_attn_weights: bool = True
    bos_token_id: int = 0
    eos_token_id: int = 0
    model_type: str = GPT_BIGCODE
    # StarCoder2: key/value heads (GPTBigCode derives them from multi_query), the rotary
    # base (None: learned positions), how far back attention looks (None: all the way).
    n_kv_head: int | None = None
    rope_theta: float | None = None
    sliding_window: int | None = None
    use_bias: bool = True
    tie_word_embeddings: bool = True
    # "int8": linear weights and the token embedding stored as int8 with a float scale per
    # output channel (quantize.py); None: in the compute dtype.
    quantization: str | None = None

    def __post_init__(self) -> None:
        if self.model_type not in FAMILIES:
            raise CheckpointError(_unknown_family(self.model_type))
        if self.n_embd % self.n_head:
            raise CheckpointError(
                f"n_embd ({self.n_embd}) is not divisible by n_head ({self.n_head})"
            )
        if self.n_head % self.kv_heads:
            raise CheckpointError(
                f"{self.n_head} attention heads do not share {self.kv_heads} key/value heads evenly"
            )
        if (self.model_type == STARCODER2) != (self.rope_theta is not None):
            raise CheckpointError("StarCoder2 needs rope_theta; GPTBigCode has no rotary base")
        known = (*GELU_APPROXIMATE, *OTHER_ACTIVATIONS)
        if self.activation_function not in known:
            raise CheckpointError(
                f"activation_function {self.activation_function!r} is not supported "
                f"(known: {', '.join(known)})"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        if self.n_kv_head is not None:
            return self.n_kv_head
        return 1 if self.multi_query else self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def quantized(self) -> bool:
        return self.quantization is not None

    @property
    def learned_positions(self) -> bool:
        return self.rope_theta is None

    def num_parameters(self) -> int:
        from starcoder_lsp.layout import hf_tensors  # the layout is built from the config

        return sum(t.numel for t in hf_tensors(self.replace(quantization=None)))

    def streamed_parameters(self) -> int:
        """Parameters a decode step reads: all but the position table, of which it reads a row."""
        table = self.n_positions * self.n_embd if self.learned_positions else 0
        return self.num_parameters() - table

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> ModelConfig:
        model_type = data.get("model_type")
        if model_type not in FAMILIES:
            raise CheckpointError(_unknown_family(model_type))
        names = _STARCODER2_NAMES if model_type == STARCODER2 else _GENERIC_NAMES
        values = {names.get(k, k): v for k, v in data.items()}
        if model_type == STARCODER2:
            # transformers 5 keeps the base in rope_parameters; 4.x wrote rope_theta.
            rope = data.get("rope_parameters") or {}
            values["rope_theta"] = rope.get("rope_theta", data.get("rope_theta", 10000.0))
            if rope.get("rope_type", "default") != "default":
                raise CheckpointError(f"rope_type {rope['rope_type']!r} is not supported")
            values["multi_query"] = False
        fields = set(cls.__dataclass_fields__)
        kwargs = {k: v for k, v in values.items() if k in fields and v is not None}
        missing = {"n_embd", "n_layer", "n_head", "vocab_size"} - kwargs.keys()
        if missing:
            raise CheckpointError(f"config.json lacks {', '.join(sorted(missing))}")
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf_dict(data)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json transformers writes for this family's model."""
        if self.model_type == STARCODER2:
            return self._starcoder2_dict()
        data = asdict(self)
        for ours in ("model_type", "n_kv_head", "rope_theta", "sliding_window", "use_bias"):
            del data[ours]
        if self.quantization is None:
            del data["quantization"]
        data.update(
            model_type=GPT_BIGCODE,
            architectures=["GPTBigCodeForCausalLM"],
            attention_softmax_in_fp32=True,
            scale_attention_softmax_in_fp32=True,
            initializer_range=0.02,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            resid_pdrop=0.0,
            use_cache=True,
        )
        return data

    def _starcoder2_dict(self) -> dict[str, Any]:
        theirs = {ours: name for name, ours in _STARCODER2_NAMES.items()}
        data = {
            theirs.get(k, k): v
            for k, v in asdict(self).items()
            if k not in ("multi_query", "scale_attn_weights", "model_type", "rope_theta")
            and not (k == "quantization" and v is None)
        }
        data.update(
            model_type=STARCODER2,
            architectures=["Starcoder2ForCausalLM"],
            num_key_value_heads=self.kv_heads,
            intermediate_size=self.inner_dim,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            initializer_range=0.018042,
            attention_dropout=0.0,
            residual_dropout=0.0,
            embedding_dropout=0.0,
            use_cache=True,
        )
        return data

    def replace(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)


def _unknown_family(model_type: object) -> str:
    return (
        f"model_type is {model_type!r}; starcoder-lsp runs the StarCoder family: "
        'GPTBigCode (StarCoder, "model_type": "gpt_bigcode") and StarCoder2 ("starcoder2")'
    )


# The published configs of the real models (see shared/STARCODER.md). The 3B and 7B sizes
# (n_embd 2816/4096, n_layer 36/42, n_head 22/32, n_inner 4·n_embd, gelu_pytorch_tanh) are
# those of the bigcode/starcoderbase-3b and -7b config.json files as recalled from the hub;
# they could not be re-checked offline, so treat those two presets as approximately sized.
PRESETS: dict[str, ModelConfig] = {
    "tiny_starcoder_py": ModelConfig(
        n_embd=768, n_layer=20, n_head=12, n_inner=3072, activation_function="gelu_pytorch_tanh"
    ),
    "starcoderbase-1b": ModelConfig(
        n_embd=2048, n_layer=24, n_head=16, n_inner=8192, activation_function="gelu_pytorch_tanh"
    ),
    "starcoderbase-3b": ModelConfig(
        n_embd=2816, n_layer=36, n_head=22, n_inner=11264, activation_function="gelu_pytorch_tanh"
    ),
    "starcoderbase-7b": ModelConfig(
        n_embd=4096, n_layer=42, n_head=32, n_inner=16384, activation_function="gelu_pytorch_tanh"
    ),
    "starcoder": ModelConfig(
        n_embd=6144, n_layer=40, n_head=48, n_inner=24576, activation_function="gelu"
    ),
    # Small enough for unit tests; keeps every architectural feature of the real ones.
    "test-tiny": ModelConfig(
        vocab_size=1024,
        n_positions=512,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_inner=256,
        activation_function="gelu_pytorch_tanh",
    ),
    # StarCoder2 (bigcode/starcoder2-3b, -7b, -15b). Sizes, heads, key/value heads, rope_theta,
    # the 16,384-position context and the 4,096-token sliding window agree with the published
    # config.json files as several public projects quote them (read here through the search
    # tool; the hub itself is out of reach). That every linear layer has a bias (use_bias),
    # norm_epsilon 1e-5 and gelu_pytorch_tanh are from the same quotes; tie_word_embeddings
    # is transformers' default for Starcoder2Config and is recalled, not checked.
    "starcoder2-3b": ModelConfig(
        model_type=STARCODER2,
        n_positions=16384,
        n_embd=3072,
        n_layer=30,
        n_head=24,
        n_kv_head=2,
        n_inner=12288,
        multi_query=False,
        rope_theta=999999.4420358813,
        sliding_window=4096,
    ),
    "starcoder2-7b": ModelConfig(
        model_type=STARCODER2,
        n_positions=16384,
        n_embd=4608,
        n_layer=32,
        n_head=36,
        n_kv_head=4,
        n_inner=18432,
        multi_query=False,
        rope_theta=1_000_000.0,
        sliding_window=4096,
    ),
    "starcoder2-15b": ModelConfig(
        model_type=STARCODER2,
        n_positions=16384,
        n_embd=6144,
        n_layer=40,
        n_head=48,
        n_kv_head=4,
        n_inner=24576,
        multi_query=False,
        rope_theta=100_000.0,
        sliding_window=4096,
    ),
    # Small enough for unit tests, with every feature of StarCoder2: 2 key/value heads shared
    # by 4 query heads, and a window shorter than a test prompt.
    "test-tiny-2": ModelConfig(
        model_type=STARCODER2,
        vocab_size=1024,
        n_positions=512,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_inner=256,
        multi_query=False,
        rope_theta=10000.0,
        sliding_window=48,
    ),
}
