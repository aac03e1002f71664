"""The CPU int8 matmul kernel (kernels/int8_matmul.cc): built on first use, called from jit.

XLA's CPU dot of an int8 weight runs 6-7× slower per element than float32's, so an int8
model decoded slower than its bytes allow (35 ms against a 7 ms floor for tiny_starcoder_py
on a 2-core CPU). The kernel reads each int8 weight once and widens it in registers. It is
compiled here, on the machine that runs it (-march=native: the host's vector width), into the
cache directory, keyed by the source and the jaxlib headers; where no C++ compiler is found the
model keeps XLA's product and says so once.
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

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "kernels" / "int8_matmul.cc"
TARGET = "starcoder_int8_matmul"
BUILD_DIR = Path.home() / ".cache" / "starcoder-lsp" / "kernels"
# Set to 0 to keep XLA's product (to compare the two, or where the build misbehaves).
ENABLE_VARIABLE = "STARCODER_INT8_KERNEL"


def build(directory: Path = BUILD_DIR) -> Path:
    """The kernel's shared library, compiled unless a build of this source is there."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX) to build the int8 kernel")
    include = jax.ffi.include_dir()
    digest = hashlib.sha256(SOURCE.read_bytes() + include.encode() + jax.__version__.encode())
    library = directory / f"int8_matmul-{digest.hexdigest()[:16]}.so"
    if library.exists():
        return library
    log.info("building the CPU int8 kernel into %s (once per machine)", library)
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
            f"-I{include}",
            str(SOURCE),
            "-o",
            partial.name,
        ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        Path(partial.name).unlink(missing_ok=True)
        raise RuntimeError(f"building the int8 kernel failed: {done.stderr.strip()[-2000:]}")
    os.replace(partial.name, library)
    return library


@functools.cache
def available() -> bool:
    """Whether the kernel is registered with XLA (built and loaded once per process)."""
    if os.environ.get(ENABLE_VARIABLE, "1") == "0":
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(build()))
        jax.ffi.register_ffi_target(
            TARGET, jax.ffi.pycapsule(library.StarcoderInt8Matmul), platform="cpu"
        )
    except Exception as e:  # no compiler, or a jaxlib without the FFI: XLA's product
        log.warning("int8 weights use XLA's slower CPU product: %s", e)
        return False
    return True


def int8_matmul(rows: jax.Array, weight: jax.Array, scale: jax.Array) -> jax.Array:
    """rows [M, K] · (weight [N, K] · scale [N])ᵀ as float32 [M, N], on one CPU device."""
    out = jax.ShapeDtypeStruct((rows.shape[0], weight.shape[0]), jnp.float32)
    call = jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")
    return call(rows.astype(jnp.float32), weight, scale.astype(jnp.float32))
