"""Weight-only int8: each output channel (row) of a weight matrix as int8 with a float scale.

A decode step is bound by reading the weights once; int8 reads a quarter of float32's bytes
(half of bfloat16's). Activations stay in the compute dtype. What gets quantized: every
linear weight (attention, MLP, an untied LM head) and the token embedding, which is also the
tied LM head, the largest single matrix of a small model. The learned position table stays
as it is: a step reads one row of it.

A row's scale is its largest magnitude / 127, so the row's values round to -127..127 and
dequantize as q · scale: the error of any value is at most scale / 2.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from starcoder_lsp.errors import CheckpointError

INT8 = "int8"
QUANTIZATIONS = (INT8,)
SCALE_SUFFIX = "_scale"  # a quantized tensor's scales sit beside it, as <name>_scale
SHARD_BYTES = 2 * 1024**3

# Our parameter paths (h/ for every layer) whose matrices are quantized.
QUANTIZED_PARAMS = re.compile(r"^(wte/embedding|lm_head/kernel|h/(attn|mlp)/\w+/kernel)$")


def quantize_rows(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values, float32 scale per row) of a matrix [rows, ...]."""
    values = np.asarray(weights, np.float32)
    peak = np.abs(values).reshape(values.shape[0], -1).max(axis=1)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    shape = (-1, *([1] * (values.ndim - 1)))
    quantized = np.clip(np.rint(values / scale.reshape(shape)), -127, 127).astype(np.int8)
    return quantized, scale


def dequantize_rows(quantized: np.ndarray, scale: np.ndarray) -> np.ndarray:
    shape = (-1, *([1] * (quantized.ndim - 1)))
    return quantized.astype(np.float32) * scale.reshape(shape)


def is_quantized(path: str) -> bool:
    """Whether the parameter at `path` (with h/ for any layer) is stored as int8."""
    return QUANTIZED_PARAMS.match(path) is not None


def check(quantization: str | None) -> None:
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise CheckpointError(
            f"quantization {quantization!r} is not supported (known: {', '.join(QUANTIZATIONS)})"
        )


def quantize_checkpoint(
    source: Path, target: Path, progress: Callable[[str], None] = lambda line: None
) -> Path:
    """Write `source`'s float checkpoint to `target` with every quantizable matrix as int8
    and its scales beside it (<name>_scale), config.json recording the quantization; the
    tokenizer files are copied. One tensor at a time, in shards of at most SHARD_BYTES."""
    from starcoder_lsp.checkpoint import load_config, weight_files
    from starcoder_lsp.layout import hf_tensors

    config = load_config(source)
    if config.quantized:
        raise CheckpointError(f"{source} is already quantized ({config.quantization})")
    files = weight_files(source)
    target.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    with ExitStack() as stack:
        opened: dict[Path, object] = {}
        for tensor in hf_tensors(config):
            file = files[tensor.name]
            if file not in opened:
                opened[file] = stack.enter_context(safe_open(file, framework="numpy"))
            values = opened[file].get_tensor(tensor.name)
            if tensor.quantizable:
                values, scale = quantize_rows(values)
                pieces = {tensor.name: values, tensor.name + SCALE_SUFFIX: scale}
            else:
                pieces = {tensor.name: values}
            nbytes = sum(p.nbytes for p in pieces.values())
            if size + nbytes > SHARD_BYTES and shards[-1]:
                shards.append({})
                size = 0
            shards[-1].update(pieces)
            size += nbytes
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    weight_map = {}
    for shard, name in zip(shards, names, strict=True):
        save_file(shard, target / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        progress(f"wrote {name} ({sum(t.nbytes for t in shard.values()) / 1e9:.2f} GB)")
    if len(shards) > 1:
        index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    data = json.loads((source / "config.json").read_text())
    data["quantization"] = INT8
    (target / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    for path in source.iterdir():
        if path.is_file() and (
            path.name.startswith(("tokenizer", "special_tokens"))
            or path.name in ("vocab.json", "merges.txt", "generation_config.json")
        ):
            shutil.copyfile(path, target / path.name)
    return target
