"""The CPU layer-norm kernel (kernels/layer_norm.cc) against numpy, and where the model calls
it."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from starcoder_lsp import checkpoint, cpu_kernels, sharding
from starcoder_lsp.model import LayerNorm
from starcoder_lsp.runner import DECODE, PREFILL, Runner


def _layer_norm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray, epsilon: float) -> np.ndarray:
    x = x.astype(np.float64)
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + epsilon) * scale + bias


@pytest.mark.parametrize(("m", "k"), [(1, 768), (5, 64), (16, 37)])
def test_the_kernel_normalizes_as_numpy_does(m, k):
    assert cpu_kernels.has_layer_norm()  # built here, with this machine's C++ compiler
    rng = np.random.default_rng(k)
    x = (rng.standard_normal((m, k)) * 3 + 10).astype(np.float32)  # far from zero mean
    scale, bias = rng.standard_normal((2, k)).astype(np.float32)
    got = np.asarray(jax.jit(cpu_kernels.layer_norm, static_argnums=3)(x, scale, bias, 1e-5))
    np.testing.assert_allclose(got, _layer_norm(x, scale, bias, 1e-5), rtol=1e-4, atol=1e-4)


def test_the_module_gives_the_same_norm_with_and_without_the_kernel():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 48)).astype(np.float32)
    module = LayerNorm(x.shape[-1], 1e-5, np.float32, one_cpu=True)
    params = module.init(jax.random.PRNGKey(0), x)
    params = jax.tree.map(lambda p: p + rng.standard_normal(p.shape).astype(np.float32), params)
    kernel = np.asarray(module.apply(params, x))
    xla = np.asarray(LayerNorm(x.shape[-1], 1e-5, np.float32, one_cpu=False).apply(params, x))
    np.testing.assert_allclose(kernel, xla, rtol=1e-5, atol=1e-5)
    p = params["params"]
    expected = _layer_norm(x, np.asarray(p["scale"]), np.asarray(p["bias"]), 1e-5)
    np.testing.assert_allclose(kernel, expected, rtol=1e-4, atol=1e-4)


def test_decode_steps_on_one_cpu_device_call_the_kernel(tiny_mqa_dir):
    """Two norms a layer and the final one, in a decode step on a 1x1 mesh; a long prefill
    chunk only for the final norm (of its last token), and a mesh of several devices never."""
    calls = lambda runner, kind, size: (
        runner.lower(kind, size).as_text().count(f"custom_call @{cpu_kernels.LAYER_NORM}(")
    )
    ckpt = checkpoint.load(tiny_mqa_dir, sharding.make_mesh("1x1"))
    runner = Runner.from_checkpoint(ckpt, slots=2, chunks=(8, 32), batches=(1, 2))
    assert calls(runner, DECODE, 2) == 2 * ckpt.config.n_layer + 1
    assert calls(runner, PREFILL, 32) == 1
    ckpt = checkpoint.load(tiny_mqa_dir, sharding.make_mesh("2x4"))
    runner = Runner.from_checkpoint(ckpt, slots=2, chunks=(8, 32), batches=(1, 2))
    assert calls(runner, DECODE, 2) == 0
