"""GPTBigCode model configuration, as read from (and written to) a checkpoint's config.json."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from starcoder_lsp.errors import CheckpointError

# The activation names transformers' ACT2FN accepts for GPTBigCode checkpoints, mapped to
# whether jax.nn.gelu should use the tanh approximation. StarCoder 15B uses the exact erf
# GELU while tiny_starcoder_py and the 1B use the tanh form: getting this wrong changes logits.
GELU_APPROXIMATE = {
    "gelu": False,
    "gelu_pytorch_tanh": True,
    "gelu_new": True,
    "gelu_fast": True,
}
OTHER_ACTIVATIONS = ("relu", "silu", "swish")


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

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise CheckpointError(
                f"n_embd ({self.n_embd}) is not divisible by n_head ({self.n_head})"
            )
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
        return 1 if self.multi_query else self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    def num_parameters(self) -> int:
        d, kv = self.n_embd, self.kv_heads * self.head_dim
        per_layer = (
            4 * d  # two layer norms
            + d * (d + 2 * kv)
            + (d + 2 * kv)  # c_attn
            + d * d
            + d  # attn c_proj
            + 2 * d * self.inner_dim
            + self.inner_dim
            + d  # mlp
        )
        return self.vocab_size * d + self.n_positions * d + self.n_layer * per_layer + 2 * d

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> ModelConfig:
        model_type = data.get("model_type")
        if model_type != "gpt_bigcode":
            raise CheckpointError(
                f"model_type is {model_type!r}; starcoder-lsp runs GPTBigCode (StarCoder) "
                'checkpoints, whose config.json says "model_type": "gpt_bigcode"'
            )
        # transformers accepts both the GPT-2 names and the generic aliases.
        aliases = {
            "hidden_size": "n_embd",
            "num_hidden_layers": "n_layer",
            "num_attention_heads": "n_head",
            "max_position_embeddings": "n_positions",
        }
        values = {aliases.get(k, k): v for k, v in data.items()}
        fields = {f for f in cls.__dataclass_fields__}
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
        """The config.json transformers writes for GPTBigCodeForCausalLM."""
        data = asdict(self)
        data.update(
            model_type="gpt_bigcode",
            architectures=["GPTBigCodeForCausalLM"],
            attention_softmax_in_fp32=True,
            scale_attention_softmax_in_fp32=True,
            tie_word_embeddings=True,
            initializer_range=0.02,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            resid_pdrop=0.0,
            use_cache=True,
        )
        return data

    def replace(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)


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
}
