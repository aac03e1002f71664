"""Our CPU kernels (kernels/*.cc): built on first use, called from jit through XLA's FFI.

Three parts of a decode step run far below memory speed in XLA on CPU, and a decode step is
bound by memory:

- the product with an int8 weight: XLA's CPU dot of one runs 6-7× slower per element than
  float32's, so an int8 model decoded slower than its bytes allow (35 ms against a 7 ms floor
  for tiny_starcoder_py on a 2-core CPU). int8_matmul.cc reads each int8 weight once, and
  where the CPU has AVX-512 VNNI it rounds the activations to int8 too, in groups of 64 with
  a scale each (as llama.cpp's q8_0 does), so that one instruction multiplies 64 weights.
- attention over the cached keys and values: XLA's loop over them runs its small products at
  a tenth of the memory speed (26 ms a step for tiny_starcoder_py at 7,600 cached positions,
  where reading them takes 2 ms). past_attention.cc reads each cached key and value once,
  and takes the new tokens' part of the attention too (eight small XLA programs a layer).
- what comes around a product: XLA runs a decode row's layer norm as five or six small
  programs of 2-4 µs each, and its GELU and each residual addition as one more each;
  layer_norm.cc is one call, and an int8 product takes the norm before it, the activation
  after it and the residual it is added to in its own call (int8_matmul.cc).

They share threads of their own (workers.h), kept awake between the calls of a step. They
are compiled here, on the machine that runs them (-march=native: the host's vector
width), into one library in the cache directory, keyed by the sources and the jaxlib headers.
The attention kernel is written for AVX-512 and exists only where the host has it. Where no
C++ compiler is found, the model keeps XLA's forms and says so once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

log = logging.getLogger(__name__)

KERNELS = Path(__file__).parent / "kernels"
SOURCES = tuple(
    KERNELS / name
    for name in ("int8_matmul.cc", "past_attention.cc", "layer_norm.cc", "workers.cc")
)
HEADERS = tuple(KERNELS / name for name in ("workers.h", "layer_norm.h", "vector_math.h"))
INT8_MATMUL = "starcoder_int8_matmul"
PAST_ATTENTION = "starcoder_past_attention"
LAYER_NORM = "starcoder_layer_norm"
BUILD_DIR = Path.home() / ".cache" / "starcoder-lsp" / "kernels"
# Set to 0 to keep XLA's forms (to compare the two, or where a build misbehaves).
ENABLE_VARIABLE = "STARCODER_CPU_KERNELS"
# "float" keeps the activations of int8 products in float32 (exact up to the weights' own
# rounding, and slower); "int8", the default, rounds them in groups of 64 where the CPU can.
ACTIVATIONS_VARIABLE = "STARCODER_INT8_ACTIVATIONS"
ACTIVATION_FORMS = ("int8", "float")
# The activations an int8 product applies to its output itself (int8_matmul.cc's codes).
KERNEL_ACTIVATIONS = {None: 0, "gelu_tanh": 1}


def build(directory: Path = BUILD_DIR) -> Path:
    """The kernels' shared library, compiled unless a build of these sources is there."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX) to build the CPU kernels")
    include = jax.ffi.include_dir()
    digest = hashlib.sha256(include.encode() + jax.__version__.encode())
    for source in (*SOURCES, *HEADERS):
        digest.update(source.read_bytes())
    library = directory / f"starcoder_kernels-{digest.hexdigest()[:16]}.so"
    if library.exists():
        return library
    log.info("building the CPU kernels into %s (once per machine)", library)
    directory.mkdir(parents=True, exist_ok=True)
    # Written beside its final name and renamed: two processes building at once both succeed.
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".so", delete=False) as partial:
        command = [
            compiler,
            "-O3",
            "-march=native",
            "-std=c++17",
            "-shared",
            "-fPIC",
            "-pthread",
            f"-I{include}",
            *map(str, SOURCES),
            "-o",
            partial.name,
        ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        Path(partial.name).unlink(missing_ok=True)
        raise RuntimeError(f"building the CPU kernels failed: {done.stderr.strip()[-2000:]}")
    os.replace(partial.name, library)
    return library


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The kernels' library, built and loaded once per process; None where it cannot be."""
    if os.environ.get(ENABLE_VARIABLE, "1") == "0":
        return None
    try:
        return ctypes.cdll.LoadLibrary(str(build()))
    except Exception as e:  # no compiler, or a jaxlib without the FFI: XLA's forms
        log.warning("int8 products and attention use XLA's slower CPU forms: %s", e)
        return None


@functools.cache
def _registered() -> frozenset[str]:
    """The kernels registered with XLA."""
    library = _library()
    if library is None:
        return frozenset()
    targets = set()
    for target, symbol in (
        (INT8_MATMUL, "StarcoderInt8Matmul"),
        (PAST_ATTENTION, "StarcoderPastAttention"),
        (LAYER_NORM, "StarcoderLayerNorm"),
    ):
        if hasattr(library, symbol):  # the attention kernel needs AVX-512
            jax.ffi.register_ffi_target(
                target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu"
            )
            targets.add(target)
    return frozenset(targets)


def one_cpu(mesh: Mesh | None) -> bool:
    """Whether a model runs on a single CPU device (its mesh's, or the only one): where its
    weights and cache are whole, so that our kernels see all of them."""
    devices = list(mesh.devices.flat) if mesh is not None else jax.devices()
    return len(devices) == 1 and devices[0].platform == "cpu"


def has_int8_matmul() -> bool:
    return INT8_MATMUL in _registered()


def has_past_attention() -> bool:
    return PAST_ATTENTION in _registered()


def has_layer_norm() -> bool:
    return LAYER_NORM in _registered()


def layer_norm(rows: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
    """The layer norm of float32 rows [M, K] (scale and bias [K]), on one CPU device."""
    call = jax.ffi.ffi_call(LAYER_NORM, jax.ShapeDtypeStruct(rows.shape, jnp.float32))
    return call(
        rows.astype(jnp.float32),
        scale.astype(jnp.float32),
        bias.astype(jnp.float32),
        epsilon=np.float32(epsilon),
    )


def has_int8_activations() -> bool:
    """Whether the int8 kernel can round its activations to int8 (a CPU with AVX-512 VNNI)."""
    library = _library()
    return library is not None and bool(library.StarcoderInt8Activations())


def int8_activations() -> bool:
    """Whether int8 products on one CPU device should round their activations to int8: as
    ACTIVATIONS_VARIABLE says (default: yes), where the CPU can."""
    form = os.environ.get(ACTIVATIONS_VARIABLE, "int8")
    if form not in ACTIVATION_FORMS:
        raise ValueError(f"{ACTIVATIONS_VARIABLE}={form!r}: expected one of {ACTIVATION_FORMS}")
    return form == "int8" and has_int8_activations()


def int8_matmul(
    rows: jax.Array,
    weight: jax.Array,
    scale: jax.Array,
    round_activations: bool = False,
    bias: jax.Array | None = None,
    norm: tuple[jax.Array, jax.Array, float] | None = None,
    activation: str | None = None,
    residual: jax.Array | None = None,
) -> jax.Array:
    """act(rows [M, K] · (weight [N, K] · scale [N])ᵀ (+ bias [N])) (+ residual [M, N]) as
    float32 [M, N], on one CPU device. round_activations: round each 64 values of a row to
    int8 with a scale of their own, where the CPU can and K is a multiple of 64. norm: (scale
    [K], bias [K], epsilon) of a layer norm the rows go through first, as `layer_norm`.
    activation: one of KERNEL_ACTIVATIONS ("gelu_tanh": jax.nn.gelu(approximate=True))."""
    if activation not in KERNEL_ACTIVATIONS:
        raise ValueError(f"int8_matmul: activation {activation!r} is not one of ours")
    out = jax.ShapeDtypeStruct((rows.shape[0], weight.shape[0]), jnp.float32)
    call = jax.ffi.ffi_call(INT8_MATMUL, out, vmap_method="sequential")
    none = jnp.zeros((0,), jnp.float32)
    norm_scale, norm_bias, epsilon = (none, none, 0.0) if norm is None else norm
    return call(
        rows.astype(jnp.float32),
        weight,
        scale.astype(jnp.float32),
        none if bias is None else bias.astype(jnp.float32),
        norm_scale.astype(jnp.float32),
        norm_bias.astype(jnp.float32),
        none if residual is None else residual.astype(jnp.float32),
        int8_activations=np.int64(round_activations),
        epsilon=np.float32(epsilon),
        activation=np.int64(KERNEL_ACTIVATIONS[activation]),
    )


def attention(
    q: jax.Array,
    new: tuple[jax.Array, jax.Array],
    new_visible: jax.Array,
    cache: jax.Array,
    row: jax.Array,
    length: jax.Array,
    positions: jax.Array,
    layer: int,
    window: int | None,
    scale: float = 1.0,
) -> jax.Array:
    """The attention of q [b, kv, R, hd] (R = seq · group, new token r // group), multiplied
    by `scale` first, over the new tokens' keys and values new [b, t, kv, hd] that new_visible
    [b, seq, t] lets each see, and over the float32 cache [layers, 2, rows, time, kv, hd]:
    batch row i reads cache row `row[i]`, positions below `length[i]` (within `window` of its
    query's position in `positions` [b, seq]). Returns float32 [b, kv, R, hd], as
    attention.attend; zeros for a query row that sees no key."""
    b, kv, rows, hd = q.shape
    shape = jax.ShapeDtypeStruct((b, kv, rows, hd), jnp.float32)
    call = jax.ffi.ffi_call(PAST_ATTENTION, shape, vmap_method="sequential")
    return call(
        q.astype(jnp.float32),
        new[0].astype(jnp.float32),
        new[1].astype(jnp.float32),
        new_visible.astype(jnp.int8),
        cache,
        row.astype(jnp.int32),
        length.astype(jnp.int32),
        positions.astype(jnp.int32),
        layer=np.int64(layer),
        window=np.int64(window or 0),
        scale=np.float32(scale),
    )
