"""Checkpoints: a local directory or a Hugging Face hub id → config, Flax params, tokenizer.

Weights are read with safetensors (memory-mapped, no torch) and each parameter is built
shard by shard straight onto its device sharding: a device's piece is cut from the file's
tensor layer by layer, so the host never holds a second copy of the model.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from safetensors import safe_open

from starcoder_lsp import layout, sharding
from starcoder_lsp import quantize as quantization
from starcoder_lsp.config import ModelConfig
from starcoder_lsp.errors import CheckpointError, TokenizerError
from starcoder_lsp.layout import Source, hf_tensors
from starcoder_lsp.model import abstract_params
from starcoder_lsp.progress import Progress
from starcoder_lsp.special_tokens import SpecialTokens, special_tokens

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")

CONVERT_HINT = (
    "starcoder-lsp reads safetensors only (no torch at run time). Convert it once with:\n"
    '  python -c "from transformers import AutoModelForCausalLM as M; '
    "M.from_pretrained('{src}').save_pretrained('{src}-safetensors')\"\n"
    "and point --model at {src}-safetensors"
)


def resolve(name_or_path: str | Path, revision: str | None = None) -> Path:
    """A local checkpoint directory, downloading a hub id (as transformers does) if needed.

    Gated repositories (bigcode/starcoder) need a token: HF_TOKEN or `hf auth login`.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    text = str(name_or_path)
    if path.exists():
        raise CheckpointError(f"{text} is a file; --model takes a checkpoint directory")
    if not _HUB_ID.match(text):
        raise CheckpointError(f"no checkpoint directory at {text}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=HUB_PATTERNS))
    except GatedRepoError:
        raise CheckpointError(
            f"{text} is gated: accept its licence on the Hugging Face hub, then set HF_TOKEN "
            "or run `hf auth login`"
        ) from None
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{text} is not a local directory and could not be fetched from the Hugging Face "
            "hub (offline?). Pass a checkpoint directory, or make one without network with "
            "`starcoder-lsp make-random-model DIR`"
        ) from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"could not fetch {text} from the Hugging Face hub: {e}") from None


def load_config(directory: Path) -> ModelConfig:
    return ModelConfig.from_json_file(directory / "config.json")


def weight_files(directory: Path) -> dict[str, Path]:
    """Tensor name → the safetensors file holding it (single file or sharded index)."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a safetensors index: {e}") from None
        files = {name: directory / file for name, file in weight_map.items()}
        for file in set(files.values()):
            if not file.is_file():
                raise CheckpointError(f"{index} names {file.name}, which is missing")
        return files
    single = directory / SINGLE_FILE
    if single.is_file():
        with safe_open(single, framework="numpy") as f:
            return dict.fromkeys(f.keys(), single)
    if any(directory.glob("pytorch_model*.bin")):
        raise CheckpointError(
            f"{directory} holds only PyTorch .bin weights. " + CONVERT_HINT.format(src=directory)
        )
    raise CheckpointError(f"{directory} has no {SINGLE_FILE} nor {INDEX_FILE}")


class _Reader:
    """Open safetensors files by tensor name; each file is memory-mapped once."""

    def __init__(self, files: dict[str, Path], stack: ExitStack) -> None:
        self._files = files
        self._stack = stack
        self._open: dict[Path, object] = {}

    def names(self) -> set[str]:
        return set(self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str) -> np.ndarray:
        return self._handle(name).get_tensor(name)

    def _handle(self, name: str) -> object:
        if name not in self._files:
            raise CheckpointError(f"the checkpoint has no tensor {name}")
        file = self._files[name]
        if file not in self._open:
            self._open[file] = self._stack.enter_context(safe_open(file, framework="numpy"))
        return self._open[file]


def check_shapes(reader: _Reader, config: ModelConfig) -> None:
    """Every tensor the config implies is there, in its shape."""
    names = reader.names()
    for tensor in hf_tensors(config):
        if tensor.name not in names:
            raise CheckpointError(
                f"the checkpoint has no tensor {tensor.name} (needed by its config)"
            )
        actual = reader.shape(tensor.name)
        if actual != tensor.shape:
            raise CheckpointError(
                f"tensor {tensor.name} has shape {list(actual)}, but config.json implies "
                f"{list(tensor.shape)}"
            )


_LAYER = re.compile(r"^h_(\d+)/")


def _place(
    source: Source,
    reader: _Reader,
    layer: int | None,
    leaf: jax.ShapeDtypeStruct,
    target: jax.sharding.Sharding,
    dtype: np.dtype,
) -> jax.Array:
    """One parameter, each device's piece cut from the file's tensor as that device needs it."""
    piece = lambda index: np.asarray(source(reader.read, layer)[index], dtype)
    return jax.make_array_from_callback(leaf.shape, target, piece)


def load_params(
    directory: Path,
    config: ModelConfig,
    mesh: Mesh | None = None,
    dtype: jnp.dtype = jnp.float32,
    progress: Progress | None = None,
    quantize: str | None = None,
) -> dict:
    """The Flax parameter tree, each leaf placed on its sharding of `mesh`. config is the
    checkpoint's own; quantize ("int8") quantizes a float checkpoint while it loads, one
    tensor at a time, never holding the model in full precision on a device."""
    quantization.check(quantize)
    model_config = config.replace(quantization=config.quantization or quantize)
    mesh = mesh if mesh is not None else sharding.make_mesh("1x1")
    abstract = abstract_params(model_config, dtype)
    shardings = dict(_flatten(sharding.param_shardings(abstract, mesh, model_config)))
    sources = _leaf_sources(config, model_config)
    leaves = list(_flatten(abstract))
    placed = {}
    with ExitStack() as stack:
        reader = _Reader(weight_files(directory), stack)
        check_shapes(reader, config)
        for n, (key, leaf) in enumerate(leaves):
            match = _LAYER.match(key)
            layer = int(match[1]) if match else None
            source = sources[_LAYER.sub("h/", key)]
            # int8 values and their float32 scales keep their own dtypes.
            placed[key] = _place(source, reader, layer, leaf, shardings[key], np.dtype(leaf.dtype))
            if progress:
                progress(n + 1, len(leaves), f"loading {key}")
    return _unflatten(placed)


def _leaf_sources(stored: ModelConfig, model: ModelConfig) -> dict[str, Source]:
    """How each leaf of `model`'s parameter tree is read from a checkpoint `stored` says:
    as it is, as the int8 values and scales stored beside each other, or quantized now."""
    sources = layout.sources(stored)
    if not model.quantized:
        return sources
    leaves = dict(sources)
    for path, source in sources.items():
        if not quantization.is_quantized(path):
            continue
        scale_path = path.rsplit("/", 1)[0] + "/scale"
        if stored.quantized:  # <name>_scale sits beside <name>, rows cut as the values'
            leaves[scale_path] = _beside(source)
        else:
            leaves[path], leaves[scale_path] = _quantized(source)
    return leaves


def _beside(source: Source) -> Source:
    return lambda read, i: source(lambda name: read(name + quantization.SCALE_SUFFIX), i)


def _quantized(source: Source) -> tuple[Source, Source]:
    """(int8 values, scales) of a float tensor, quantized once for both."""
    last: dict[int | None, tuple[np.ndarray, np.ndarray]] = {}

    def rows(read: Callable[[str], np.ndarray], layer: int | None) -> tuple[np.ndarray, ...]:
        if layer not in last:
            last.clear()  # one tensor at a time
            last[layer] = quantization.quantize_rows(source(read, layer))
        return last[layer]

    return (lambda read, i: rows(read, i)[0]), (lambda read, i: rows(read, i)[1])


def _flatten(tree: dict) -> Iterator[tuple[str, object]]:
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        yield sharding.path_str(path), leaf


def _unflatten(flat: dict[str, jax.Array]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        *parents, last = key.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return tree


# --- tokenizer -------------------------------------------------------------------------


def load_tokenizer(directory: Path) -> tuple[object, SpecialTokens]:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"could not load a tokenizer from {directory}: {e}") from None
    return tokenizer, special_tokens(tokenizer)


# --- everything at once ----------------------------------------------------------------


@dataclass
class Checkpoint:
    path: Path
    config: ModelConfig
    params: dict
    tokenizer: object
    tokens: SpecialTokens
    dtype: jnp.dtype
    mesh: Mesh
    load_seconds: float


def default_dtype() -> jnp.dtype:
    """float32 on CPU, where XLA runs bfloat16 slowly; bfloat16 on GPUs and TPUs."""
    return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)


def load(
    name_or_path: str | Path,
    mesh: Mesh | None = None,
    dtype: jnp.dtype | str | None = None,
    revision: str | None = None,
    progress: Progress | None = None,
    quantize: str | None = None,
) -> Checkpoint:
    """Everything a runner needs from a checkpoint: mesh None is one device, dtype None the
    platform's default (`default_dtype`); quantize "int8" quantizes a float checkpoint's
    weights while loading (a checkpoint `starcoder-lsp quantize` wrote is int8 already)."""
    start = time.perf_counter()
    directory = resolve(name_or_path, revision)
    config = load_config(directory)
    tokenizer, tokens = load_tokenizer(directory)
    mesh = mesh if mesh is not None else sharding.make_mesh("1x1")
    dtype = jnp.dtype(dtype) if dtype is not None else default_dtype()
    params = load_params(directory, config, mesh, dtype, progress, quantize)
    jax.block_until_ready(params)
    config = config.replace(quantization=config.quantization or quantize)
    return Checkpoint(
        directory, config, params, tokenizer, tokens, dtype, mesh, time.perf_counter() - start
    )
