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

from starcoder_lsp import sharding
from starcoder_lsp.config import ModelConfig
from starcoder_lsp.errors import CheckpointError, TokenizerError
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


# How each parameter of model.py is made from transformers' tensors. `layer` is None for
# parameters outside the layer stack. Linear weights are [out, in] in both.
Source = Callable[[_Reader, int | None], np.ndarray]


def _sources(config: ModelConfig) -> dict[str, Source]:
    d, hd, kv = config.n_embd, config.head_dim, config.kv_heads
    layer_name = lambda i, rest: f"transformer.h.{i}.{rest}"

    def plain(rest: str) -> Source:
        return lambda r, i: r.read(layer_name(i, rest) if i is not None else f"transformer.{rest}")

    def c_attn(part: str, suffix: str) -> Source:
        # MQA packs rows as [q (d) | k (hd) | v (hd)]; MHA interleaves them per head as
        # [head][q|k|v][hd]. Both become q_proj [.., h·hd] and kv_proj [.., 2·kv·hd].
        def read(r: _Reader, i: int | None) -> np.ndarray:
            t = r.read(layer_name(i, f"attn.c_attn.{suffix}"))
            rows = t.reshape(kv, 3 * hd, *t.shape[1:]) if not config.multi_query else None
            if config.multi_query:
                out = t[:d] if part == "q" else t[d:]
            elif part == "q":
                out = rows[:, :hd].reshape(d, *t.shape[1:])
            else:
                out = rows[:, hd:].reshape(kv, 2, hd, *t.shape[1:]).swapaxes(0, 1)
                out = out.reshape(2 * kv * hd, *t.shape[1:])
            return out

        return read

    sources: dict[str, Source] = {
        "wte/embedding": plain("wte.weight"),
        "wpe/embedding": plain("wpe.weight"),
        "ln_f/scale": plain("ln_f.weight"),
        "ln_f/bias": plain("ln_f.bias"),
        "h/attn/q_proj/kernel": c_attn("q", "weight"),
        "h/attn/q_proj/bias": c_attn("q", "bias"),
        "h/attn/kv_proj/kernel": c_attn("kv", "weight"),
        "h/attn/kv_proj/bias": c_attn("kv", "bias"),
    }
    for norm in ("ln_1", "ln_2"):
        sources[f"h/{norm}/scale"] = plain(f"{norm}.weight")
        sources[f"h/{norm}/bias"] = plain(f"{norm}.bias")
    for linear in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        key = "h/" + linear.replace(".", "/")
        sources[f"{key}/kernel"] = plain(f"{linear}.weight")
        sources[f"{key}/bias"] = plain(f"{linear}.bias")
    return sources


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """transformers' tensor names and shapes for this config (tied head: no lm_head)."""
    d, inner = config.n_embd, config.inner_dim
    c_attn = d + 2 * config.kv_heads * config.head_dim
    shapes = {
        "transformer.wte.weight": (config.vocab_size, d),
        "transformer.wpe.weight": (config.n_positions, d),
        "transformer.ln_f.weight": (d,),
        "transformer.ln_f.bias": (d,),
    }
    per_layer = {
        "ln_1.weight": (d,),
        "ln_1.bias": (d,),
        "ln_2.weight": (d,),
        "ln_2.bias": (d,),
        "attn.c_attn.weight": (c_attn, d),
        "attn.c_attn.bias": (c_attn,),
        "attn.c_proj.weight": (d, d),
        "attn.c_proj.bias": (d,),
        "mlp.c_fc.weight": (inner, d),
        "mlp.c_fc.bias": (inner,),
        "mlp.c_proj.weight": (d, inner),
        "mlp.c_proj.bias": (d,),
    }
    for i in range(config.n_layer):
        shapes.update({f"transformer.h.{i}.{k}": v for k, v in per_layer.items()})
    return shapes


def check_shapes(reader: _Reader, config: ModelConfig) -> None:
    names = reader.names()
    for name, shape in expected_shapes(config).items():
        if name not in names:
            raise CheckpointError(f"the checkpoint has no tensor {name} (needed by its config)")
        actual = reader.shape(name)
        if actual != shape:
            raise CheckpointError(
                f"tensor {name} has shape {list(actual)}, but config.json implies {list(shape)}"
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
    piece = lambda index: np.asarray(source(reader, layer)[index], dtype)
    return jax.make_array_from_callback(leaf.shape, target, piece)


def load_params(
    directory: Path,
    config: ModelConfig,
    mesh: Mesh | None = None,
    dtype: jnp.dtype = jnp.float32,
    progress: Progress | None = None,
) -> dict:
    """The Flax parameter tree, each leaf placed on its sharding of `mesh`."""
    mesh = mesh if mesh is not None else sharding.make_mesh("1x1")
    abstract = abstract_params(config, dtype)
    shardings = dict(_flatten(sharding.param_shardings(abstract, mesh)))
    sources = _sources(config)
    np_dtype = np.dtype(jnp.dtype(dtype))
    leaves = list(_flatten(abstract))
    placed = {}
    with ExitStack() as stack:
        reader = _Reader(weight_files(directory), stack)
        check_shapes(reader, config)
        for n, (key, leaf) in enumerate(leaves):
            match = _LAYER.match(key)
            layer = int(match[1]) if match else None
            source = sources[_LAYER.sub("h/", key)]
            placed[key] = _place(source, reader, layer, leaf, shardings[key], np_dtype)
            if progress:
                progress(n + 1, len(leaves), f"loading {key}")
    return _unflatten(placed)


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
) -> Checkpoint:
    """Everything a runner needs from a checkpoint: mesh None is one device, dtype None the
    platform's default (`default_dtype`)."""
    start = time.perf_counter()
    directory = resolve(name_or_path, revision)
    config = load_config(directory)
    tokenizer, tokens = load_tokenizer(directory)
    mesh = mesh if mesh is not None else sharding.make_mesh("1x1")
    dtype = jnp.dtype(dtype) if dtype is not None else default_dtype()
    params = load_params(directory, config, mesh, dtype, progress)
    jax.block_until_ready(params)
    return Checkpoint(
        directory, config, params, tokenizer, tokens, dtype, mesh, time.perf_counter() - start
    )
