"""The device mesh and the partition rules: the one place that says what is split where.

The mesh has two named axes: `dp` splits the batch (and the rows of the key/value cache),
`mp` splits the model (query heads, MLP width, vocabulary). MQA's single key/value head is
too small to split and is replicated across `mp`. The same rules serve one CPU device, eight
forced host devices in tests, and a TPU slice.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from starcoder_lsp.errors import StarcoderError

DATA, MODEL = "dp", "mp"
P = PartitionSpec

# (regex on the '/'-joined parameter path, spec). The first match wins. h_N is layer N.
PARAM_RULES: list[tuple[str, PartitionSpec]] = [
    (r"^wte/embedding$", P(MODEL, None)),  # vocabulary split: logits come out split by mp
    # Linear weights are [out, in].
    (r"^h_\d+/attn/q_proj/kernel$", P(MODEL, None)),
    (r"^h_\d+/attn/q_proj/bias$", P(MODEL)),
    (r"^h_\d+/attn/c_proj/kernel$", P(None, MODEL)),  # row-parallel after split heads
    (r"^h_\d+/mlp/c_fc/kernel$", P(MODEL, None)),
    (r"^h_\d+/mlp/c_fc/bias$", P(MODEL)),
    (r"^h_\d+/mlp/c_proj/kernel$", P(None, MODEL)),
    (r".*", P()),  # positions, layer norms, the key/value projection, output biases
]

# Key/value cache [layers, 2, rows, time, kv_heads, head_dim]: rows split across dp. Each dp
# device reads only its own rows (model._on_row_owners), so the cache never moves.
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


def _fits(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> bool:
    for dim, axis in zip(shape, spec, strict=False):
        if axis is not None and dim % math.prod(mesh.shape[a] for a in _axes(axis)):
            return False
    return True


def _axes(axis: str | tuple[str, ...]) -> tuple[str, ...]:
    return axis if isinstance(axis, tuple) else (axis,)


def param_spec(path: str, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """The spec for one parameter; replicated where its dimension does not divide evenly
    (e.g. 22 heads of the 3B model on 8 devices) rather than failing."""
    for pattern, spec in PARAM_RULES:
        if re.match(pattern, path):
            return spec if _fits(spec, shape, mesh) else P()
    raise AssertionError("PARAM_RULES ends with a catch-all")


def path_str(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def param_shardings(abstract_params: dict, mesh: Mesh) -> dict:
    """A tree of NamedSharding matching the parameter tree."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, param_spec(path_str(path), leaf.shape, mesh)),
        abstract_params,
    )


def splits_cache_rows(mesh: Mesh, rows: int) -> bool:
    """Whether a cache of `rows` rows is split across dp (it is replicated where they do not
    divide evenly, or where dp is 1)."""
    return mesh.shape[DATA] > 1 and rows % mesh.shape[DATA] == 0


def cache_sharding(mesh: Mesh, rows: int) -> NamedSharding:
    return NamedSharding(mesh, CACHE_SPEC if splits_cache_rows(mesh, rows) else P())
