"""Random-weight StarCoder checkpoints in Hugging Face format, for tests and benchmarks.

The real weights cannot be downloaded here, so tests and benchmarks run on checkpoints with
the real architecture and file layout (config.json, safetensors shards, tokenizer files) but
random weights, and a byte-level BPE tokenizer trained locally on the Python standard library
whose special tokens sit at StarCoder's ids.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file
from transformers import GenerationConfig

from starcoder_lsp.config import ModelConfig
from starcoder_lsp.errors import CheckpointError
from starcoder_lsp.layout import HFTensor, hf_tensors
from starcoder_lsp.random_tokenizer import progress_line, train_tokenizer

NUMPY_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}
# Below this many bytes of weights a write takes well under a second: no progress lines.
PROGRESS_MIN_BYTES = 256 * 1024**2
# Each thread holds one float32 tensor while it samples: bounded for the 15B model's sake.
MAX_GENERATION_THREADS = 8
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


# --- weights -----------------------------------------------------------------------------


def plan_shards(specs: list[HFTensor], itemsize: int, max_shard_bytes: int) -> list[list[HFTensor]]:
    """Fill shards greedily in order, as transformers does; a tensor larger than the limit
    gets a shard of its own."""
    shards: list[list[HFTensor]] = [[]]
    used = 0
    for spec in specs:
        size = spec.numel * itemsize
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += size
    return shards


def _random_tensor(
    spec: HFTensor, rng: np.random.Generator, init_std: float, dtype: np.dtype
) -> np.ndarray:
    values = rng.standard_normal(spec.shape, dtype=np.float32)
    values *= np.float32(init_std)
    if spec.init == "ones":
        # Not exactly 1, so that a loader that forgets the layer-norm weight is caught.
        values += np.float32(1.0)
    # "bias" keeps its small random values, so that a forward pass that drops one differs.
    return values if values.dtype == dtype else values.astype(dtype)


def _tensor_rngs(seed: int, count: int) -> list[np.random.Generator]:
    # One stream per tensor: a tensor's values do not depend on how the model is sharded,
    # and each shard is generated without generating those before it.
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(count)]


def _check_directory(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory} exists and is not a directory")


def _prepare_directory(directory: Path, total_bytes: int) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create {directory}: {e.strerror}") from None
    # Weights left by an earlier write with another sharding would confuse loaders.
    for stale in [*directory.glob("model*.safetensors"), directory / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    free = shutil.disk_usage(directory).free
    if free < total_bytes:
        raise CheckpointError(
            f"{directory} has {free / 1e9:.1f} GB free; the weights need {total_bytes / 1e9:.1f} GB"
        )


def _write_config(directory: Path, config: ModelConfig, dtype: str) -> None:
    data = config.to_hf_dict()
    # transformers 5 reads "dtype"; older versions and other tools read "torch_dtype".
    data.update(torch_dtype=dtype, dtype=dtype)
    (directory / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_weights(
    directory: Path,
    specs: list[HFTensor],
    *,
    seed: int,
    dtype: np.dtype,
    max_shard_bytes: int,
    init_std: float,
) -> None:
    shards = plan_shards(specs, dtype.itemsize, max_shard_bytes)
    rngs = dict(zip((s.name for s in specs), _tensor_rngs(seed, len(specs)), strict=True))
    total_bytes = sum(s.numel for s in specs) * dtype.itemsize
    verbose = total_bytes >= PROGRESS_MIN_BYTES
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    generate = lambda spec: _random_tensor(spec, rngs[spec.name], init_std, dtype)
    start = time.perf_counter()
    # Sampling dominates the time of a big model. numpy's generators release the GIL and each
    # tensor has its own stream, so threads give the same values as a serial loop, faster.
    with ThreadPoolExecutor(max_workers=min(os.cpu_count() or 1, MAX_GENERATION_THREADS)) as pool:
        for number, (shard, filename) in enumerate(zip(shards, names, strict=True), start=1):
            # Only this shard is in memory: the 15B model is ~62 GB in float32.
            tensors = dict(zip((s.name for s in shard), pool.map(generate, shard), strict=True))
            save_file(tensors, directory / filename, metadata={"format": "pt"})
            if verbose:
                size = sum(t.nbytes for t in tensors.values()) / 1e9
                progress_line(
                    f"wrote {filename} ({number}/{len(shards)}, {size:.2f} GB, "
                    f"{time.perf_counter() - start:.0f} s)"
                )
            del tensors
    if len(shards) > 1:
        weight_map = {s.name: f for shard, f in zip(shards, names, strict=True) for s in shard}
        metadata = {"total_parameters": sum(s.numel for s in specs), "total_size": total_bytes}
        index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def write_random_model(
    directory: str | Path,
    config: ModelConfig,
    *,
    seed: int = 0,
    dtype: str = "float32",
    max_shard_bytes: int = 2 * 1024**3,
    init_std: float = 0.02,
) -> Path:
    """Write a Hugging Face GPTBigCode checkpoint with random weights to `directory`.

    The directory holds config.json, generation_config.json, the tokenizer files of
    `train_tokenizer(config.vocab_size)` and the weights as `model.safetensors`, or as
    numbered shards of at most `max_shard_bytes` with `model.safetensors.index.json`.
    Matrices and embeddings are normal(0, init_std); layer-norm weights 1 + normal(0,
    init_std); biases normal(0, init_std). The same seed gives byte-identical files.
    """
    if dtype not in NUMPY_DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not one of {', '.join(NUMPY_DTYPES)}")
    if max_shard_bytes <= 0:
        raise CheckpointError(f"max_shard_bytes must be positive, not {max_shard_bytes}")
    directory = Path(directory)
    _check_directory(directory)
    np_dtype = NUMPY_DTYPES[dtype]
    specs = hf_tensors(config)
    # The tokenizer first: if its training fails, the directory is left untouched.
    tokenizer = train_tokenizer(config.vocab_size, family=config.model_type)
    _prepare_directory(directory, sum(s.numel for s in specs) * np_dtype.itemsize)
    tokenizer.save_pretrained(directory)
    _write_config(directory, config, dtype)
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id
    ).save_pretrained(directory)
    _write_weights(
        directory,
        specs,
        seed=seed,
        dtype=np_dtype,
        max_shard_bytes=max_shard_bytes,
        init_std=init_std,
    )
    return directory
