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
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast

from starcoder_lsp.config import ModelConfig
from starcoder_lsp.errors import CheckpointError, TokenizerError

# StarCoder's special tokens, in the order that gives them ids 0..18 (shared/STARCODER.md).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<fim_prefix>",
    "<fim_middle>",
    "<fim_suffix>",
    "<fim_pad>",
    "<filename>",
    "<gh_stars>",
    "<issue_start>",
    "<issue_comment>",
    "<issue_closed>",
    "<jupyter_start>",
    "<jupyter_text>",
    "<jupyter_code>",
    "<jupyter_output>",
    "<empty_output>",
    "<commit_before>",
    "<commit_msg>",
    "<commit_after>",
    "<reponame>",
)
ENDOFTEXT = SPECIAL_TOKENS[0]

# Bump when the training recipe changes so that stale cached tokenizers are not reused.
TOKENIZER_RECIPE_VERSION = 2
# Enough text for the merges of a vocabulary this size: a 1024-token vocabulary trains on
# ~1 MB in half a second; 49152 tokens want the whole standard library (~30 MB, ~10 s).
TRAINING_BYTES_PER_TOKEN = 1000
MIN_TRAINING_BYTES = 250_000
# Every byte must be a token, or byte-level BPE cannot encode arbitrary text.
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256

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


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- tokenizer ---------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """`$STARCODER_LSP_CACHE`, else `~/.cache/starcoder-lsp`."""
    env = os.environ.get("STARCODER_LSP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "starcoder-lsp"


def stdlib_sources() -> list[Path]:
    """The standard library's own .py files, sorted so that training is deterministic."""
    root = sysconfig.get_paths()["stdlib"]
    sources = []
    for folder, subfolders, files in os.walk(root):
        # Third-party packages may live under the stdlib directory, and differ between
        # machines; pruning them here also spares walking hundreds of megabytes.
        subfolders[:] = [d for d in subfolders if d not in ("site-packages", "dist-packages")]
        sources += [Path(folder, name) for name in files if name.endswith(".py")]
    return sorted(sources)


def _take_bytes(paths: list[Path], budget: int) -> list[Path]:
    taken, total = [], 0
    for path in paths:
        if total >= budget:
            break
        taken.append(path)
        total += path.stat().st_size
    return taken


def _read_texts(paths: list[Path]) -> Iterator[str]:
    for path in paths:
        # A few stdlib test files are deliberately not UTF-8; any text will do for training.
        yield path.read_text(encoding="utf-8", errors="replace")


def _new_bpe() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    # StarCoder's tokenizer.json: every digit on its own, then GPT-2's byte-level split.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _train_bpe(vocab_size: int, paths: list[Path]) -> Tokenizer:
    tokenizer = _new_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        # Listed first, so they get ids 0..18 in this order.
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 bytes, so that any text (emoji, accents) encodes without an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_read_texts(paths), trainer, length=len(paths))
    return tokenizer


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        # transformers' default clean-up rewrites " ." as "." on decode, which breaks code.
        clean_up_tokenization_spaces=False,
    )


def _train(vocab_size: int) -> PreTrainedTokenizerFast:
    """Train on a prefix of the sorted stdlib, widening to all of it if merges run out."""
    sources = stdlib_sources()
    subset = _take_bytes(sources, max(MIN_TRAINING_BYTES, vocab_size * TRAINING_BYTES_PER_TOKEN))
    attempts = [subset] if len(subset) == len(sources) else [subset, sources]
    for paths in attempts:
        megabytes = sum(p.stat().st_size for p in paths) / 1e6
        _progress(
            f"training a {vocab_size}-token byte-level BPE tokenizer on {len(paths)} "
            f"standard-library files ({megabytes:.1f} MB)..."
        )
        start = time.perf_counter()
        tokenizer = _train_bpe(vocab_size, paths)
        _progress(f"trained the tokenizer in {time.perf_counter() - start:.1f} s")
        if tokenizer.get_vocab_size() == vocab_size:
            return _wrap(tokenizer)
    raise TokenizerError(
        f"the standard library at {sysconfig.get_paths()['stdlib']} has too little text for "
        f"a {vocab_size}-token vocabulary (training made {tokenizer.get_vocab_size()} tokens)"
    )


def _cache_entry(cache_dir: Path, vocab_size: int) -> Path:
    # The stdlib, hence the merges, differ between Python versions.
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return cache_dir / f"tokenizer-v{TOKENIZER_RECIPE_VERSION}-{python}-{vocab_size}"


def _load_cached(entry: Path, vocab_size: int) -> PreTrainedTokenizerFast | None:
    if not (entry / "tokenizer.json").is_file():
        return None
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(entry)
    except Exception:  # whatever is wrong with a damaged entry, retraining fixes it
        return None
    # from_pretrained records how it loaded (transformers 5.24: is_local, local_files_only)
    # in init_kwargs, which save_pretrained writes out: a model's tokenizer_config.json would
    # then differ by whether its tokenizer was just trained or came from this cache.
    for loading_option in ("is_local", "local_files_only"):
        tokenizer.init_kwargs.pop(loading_option, None)
    return tokenizer if len(tokenizer) == vocab_size else None


def _store(tokenizer: PreTrainedTokenizerFast, entry: Path) -> None:
    """Save next to the entry, then rename: a reader never sees a half-written tokenizer."""
    staging = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
        tokenizer.save_pretrained(staging)
        shutil.rmtree(entry, ignore_errors=True)
        os.replace(staging, entry)
    except OSError as e:
        # Another process stored it first, or the cache is read-only: the tokenizer in hand
        # is still good, this machine just trains it again next time.
        _progress(f"could not cache the tokenizer at {entry}: {e}")
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def train_tokenizer(vocab_size: int, cache_dir: Path | None = None) -> PreTrainedTokenizerFast:
    """A StarCoder-style byte-level BPE tokenizer of exactly `vocab_size` tokens.

    Ids 0..18 are StarCoder's special tokens in StarCoder's order; bos = eos = unk =
    `<|endoftext|>`; no pad token. Trained on the standard library's sources and cached under
    `cache_dir` (default: `default_cache_dir()`), so each size is trained once per machine.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(
            f"vocab_size {vocab_size} is too small: a byte-level BPE needs at least "
            f"{MIN_VOCAB_SIZE} tokens ({len(SPECIAL_TOKENS)} special tokens and 256 bytes)"
        )
    entry = _cache_entry(Path(cache_dir) if cache_dir else default_cache_dir(), vocab_size)
    cached = _load_cached(entry, vocab_size)
    if cached is not None:
        return cached
    tokenizer = _train(vocab_size)
    _store(tokenizer, entry)
    return tokenizer


# --- weights -----------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightSpec:
    """One tensor of a checkpoint: its transformers name, shape and how to initialise it."""

    name: str
    shape: tuple[int, ...]
    init: Literal["normal", "ones", "bias"]

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))


def weight_specs(config: ModelConfig) -> list[WeightSpec]:
    """The tensors of GPTBigCodeForCausalLM, named and ordered as transformers saves them.

    The LM head is tied to `transformer.wte.weight`, so it has no tensor of its own.
    """
    d, inner = config.n_embd, config.inner_dim
    qkv = d + 2 * config.kv_heads * config.head_dim

    def layer_norm(prefix: str) -> list[WeightSpec]:
        return [
            WeightSpec(f"{prefix}.weight", (d,), "ones"),
            WeightSpec(f"{prefix}.bias", (d,), "bias"),
        ]

    def linear(prefix: str, out_features: int, in_features: int) -> list[WeightSpec]:
        # torch.nn.Linear layout: [out, in].
        return [
            WeightSpec(f"{prefix}.weight", (out_features, in_features), "normal"),
            WeightSpec(f"{prefix}.bias", (out_features,), "bias"),
        ]

    specs = [
        WeightSpec("transformer.wte.weight", (config.vocab_size, d), "normal"),
        WeightSpec("transformer.wpe.weight", (config.n_positions, d), "normal"),
    ]
    for i in range(config.n_layer):
        block = f"transformer.h.{i}"
        specs += layer_norm(f"{block}.ln_1")
        specs += linear(f"{block}.attn.c_attn", qkv, d)
        specs += linear(f"{block}.attn.c_proj", d, d)
        specs += layer_norm(f"{block}.ln_2")
        specs += linear(f"{block}.mlp.c_fc", inner, d)
        specs += linear(f"{block}.mlp.c_proj", d, inner)
    specs += layer_norm("transformer.ln_f")
    return specs


def plan_shards(
    specs: list[WeightSpec], itemsize: int, max_shard_bytes: int
) -> list[list[WeightSpec]]:
    """Fill shards greedily in order, as transformers does; a tensor larger than the limit
    gets a shard of its own."""
    shards: list[list[WeightSpec]] = [[]]
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
    spec: WeightSpec, rng: np.random.Generator, init_std: float, dtype: np.dtype
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
    specs: list[WeightSpec],
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
                _progress(
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
    specs = weight_specs(config)
    # The tokenizer first: if its training fails, the directory is left untouched.
    tokenizer = train_tokenizer(config.vocab_size)
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
