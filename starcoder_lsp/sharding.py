"""The device mesh and the partition rules: the one place that says what is split where.

The mesh has two named axes: `dp` splits the batch (and the rows of the key/value cache),
`mp` splits the model (query heads, key/value heads where they divide, MLP width,
vocabulary). MQA's single key/value head is replicated across `mp`. The same rules serve one
CPU device, eight forced host devices in tests, and a TPU slice.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from starcoder_lsp.config import ModelConfig
from starcoder_lsp.errors import StarcoderError

DATA, MODEL = "dp", "mp"
P = PartitionSpec

# The logical axes of each parameter's dimensions (regex on the '/'-joined parameter path; the
# first match wins; h_N is layer N), as maxtext names them. Linear weights are [out, in].
# An int8 matrix's scales (one per output row) are split as its rows are.
PARAM_AXES: list[tuple[str, tuple[str | None, ...]]] = [
    (r"^(wte/embedding|lm_head/kernel)$", ("vocab", None)),  # logits come out split by mp
    (r"^(wte|lm_head)/scale$", ("vocab",)),
    (r"^h_\d+/attn/q_proj/kernel$", ("heads", None)),
    (r"^h_\d+/attn/q_proj/(bias|scale)$", ("heads",)),
    (r"^h_\d+/attn/kv_proj/kernel$", ("kv_heads", None)),
    (r"^h_\d+/attn/kv_proj/(bias|scale)$", ("kv_heads",)),
    (r"^h_\d+/attn/c_proj/kernel$", (None, "heads")),  # row-parallel after split heads
    (r"^h_\d+/mlp/c_fc/kernel$", ("mlp", None)),
    (r"^h_\d+/mlp/c_fc/(bias|scale)$", ("mlp",)),
    (r"^h_\d+/mlp/c_proj/kernel$", (None, "mlp")),
    (r".*", ()),  # positions, layer norms, output biases, row-parallel scales
]
# Which mesh axis each logical axis is split over. An axis whose count (of heads, not of
# rows) does not divide by the mesh axis is replicated instead: a split must not cut a head
# in two. MQA's single key/value head, or StarCoder2-3B's 2 on an 8-way mp, stay whole on
# every device; 4 key/value heads on a 4-way mp are split with their query heads.
LOGICAL_AXES = {"vocab": MODEL, "heads": MODEL, "kv_heads": MODEL, "mlp": MODEL}

# Key/value cache [layers, 2, rows, time, kv_heads, head_dim]: rows split across dp. Each dp
# device reads only its own rows (attention._on_row_owners), so the cache never moves. Its
# key/value heads are split over mp where kv_proj's are.
CACHE_SPEC = P(None, None, DATA)
BATCH_SPEC = P(DATA)


class MeshError(StarcoderError):
    """A mesh description that does not fit the devices JAX sees."""


def parse_mesh_shape(text: str, device_count: int) -> tuple[int, int]:
    """'2x4' → (2, 4). 'auto' (or '') puts every device on mp: one model, split widest."""
    if text in ("", "auto"):
        return 1, device_count
    match = re.fullmatch(r"\s*(\d+)\s*[x×,]\s*(\d+)\s*", text)
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise MeshError(f"mesh {text!r} is not of the form DPxMP, e.g. 1x8 or 2x4")
    return int(match[1]), int(match[2])


def make_mesh(shape: str | tuple[int, int] = "auto", devices: Sequence | None = None) -> Mesh:
    """A (dp, mp) mesh over the first dp·mp devices."""
    devices = list(devices if devices is not None else jax.devices())
    dp, mp = parse_mesh_shape(shape, len(devices)) if isinstance(shape, str) else shape
    if dp * mp > len(devices):
        raise MeshError(
            f"mesh {dp}x{mp} needs {dp * mp} devices, but JAX sees {len(devices)} "
            f"({jax.default_backend()}); on CPU, XLA_FLAGS="
            "--xla_force_host_platform_device_count=N simulates N devices"
        )
    return Mesh(np.array(devices[: dp * mp]).reshape(dp, mp), (DATA, MODEL))


def logical_counts(config: ModelConfig) -> dict[str, int]:
    """How many of each logical axis the model has: what a split must divide."""
    return {
        "vocab": config.vocab_size,
        "heads": config.n_head,
        "kv_heads": config.kv_heads,
        "mlp": config.inner_dim,
    }


def _mesh_axis(logical: str | None, counts: dict[str, int], mesh: Mesh) -> str | None:
    axis = LOGICAL_AXES.get(logical) if logical else None
    if axis is None or counts[logical] % mesh.shape[axis]:
        return None
    return axis


def param_spec(path: str, mesh: Mesh, config: ModelConfig) -> PartitionSpec:
    """The spec for one parameter; replicated along an axis whose heads (or rows) do not
    divide evenly over the mesh rather than failing."""
    counts = logical_counts(config)
    for pattern, axes in PARAM_AXES:
        if re.match(pattern, path):
            split = [_mesh_axis(axis, counts, mesh) for axis in axes]
            return P(*split) if any(split) else P()
    raise AssertionError("PARAM_AXES ends with a catch-all")


def path_str(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def param_shardings(abstract_params: dict, mesh: Mesh, config: ModelConfig) -> dict:
    """A tree of NamedSharding matching the parameter tree."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, param_spec(path_str(path), mesh, config)),
        abstract_params,
    )


def splits_cache_rows(mesh: Mesh, rows: int) -> bool:
    """Whether a cache of `rows` rows is split across dp (it is replicated where they do not
    divide evenly, or where dp is 1)."""
    return mesh.shape[DATA] > 1 and rows % mesh.shape[DATA] == 0


def cache_sharding(mesh: Mesh, rows: int, config: ModelConfig) -> NamedSharding:
    """The cache's rows over dp where they divide; its key/value heads over mp as kv_proj's."""
    row_axis = DATA if splits_cache_rows(mesh, rows) else None
    head_axis = _mesh_axis("kv_heads", logical_counts(config), mesh)
    return NamedSharding(mesh, P(None, None, row_axis, None, head_axis))
