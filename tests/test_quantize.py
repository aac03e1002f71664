"""int8 weights: the per-channel error bound, the model against float32, the quantize command,
quantized checkpoints on meshes."""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from starcoder_lsp import checkpoint, cpu_kernels, sharding
from starcoder_lsp.bench import weight_bytes
from starcoder_lsp.errors import CheckpointError
from starcoder_lsp.factory import ModelOptions
from starcoder_lsp.model import GPTBigCode, empty_past, project_int8
from starcoder_lsp.quantize import dequantize_rows, quantize_checkpoint, quantize_rows
from starcoder_lsp.runner import DECODE, PREFILL, Runner

# The logits of the int8 model stay within this share of the float32 logits' spread.
LOGIT_TOLERANCE = 0.05


def test_each_value_is_within_half_its_rows_step():
    weights = np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32)
    weights[3] *= 100  # rows of very different ranges get scales of their own
    weights[5] = 0.0
    quantized, scale = quantize_rows(weights)
    assert quantized.dtype == np.int8 and scale.shape == (64,)
    error = np.abs(dequantize_rows(quantized, scale) - weights)
    assert (error <= scale[:, None] / 2 + 1e-6).all()
    assert np.abs(quantized).max() == 127
    assert (dequantize_rows(quantized, scale)[5] == 0).all()


def _logits(ckpt: checkpoint.Checkpoint, tokens: np.ndarray) -> np.ndarray:
    model = GPTBigCode(ckpt.config)
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    past = empty_past(ckpt.config, tokens.shape[0], jnp.float32)
    logits, _ = model.apply(
        {"params": ckpt.params},
        jnp.asarray(tokens),
        jnp.asarray(positions),
        jnp.ones(tokens.shape, bool),
        past,
    )
    return np.asarray(logits)


@pytest.fixture(scope="module", params=["mqa", "mha"])
def pair(request, tiny_mqa_dir, tiny_mha_dir):
    directory = tiny_mqa_dir if request.param == "mqa" else tiny_mha_dir
    return checkpoint.load(directory), checkpoint.load(directory, quantize="int8")


def test_weights_are_int8_and_take_a_quarter_of_the_bytes(pair):
    full, quantized = pair
    kernel = quantized.params["h_0"]["mlp"]["c_fc"]
    assert kernel["kernel"].dtype == jnp.int8 and kernel["scale"].dtype == jnp.float32
    assert quantized.params["wte"]["embedding"].dtype == jnp.int8
    assert quantized.params["wpe"]["embedding"].dtype == jnp.float32  # one row a step
    assert weight_bytes(quantized.params) < 0.4 * weight_bytes(full.params)


def test_int8_logits_stay_close_to_float32_and_the_argmax_agrees(pair):
    """Teacher-forced over prompts that grow as typing does: the next-token argmax of the
    int8 model agrees with float32's at ≥ 95% of positions."""
    full, quantized = pair
    rng = np.random.default_rng(1)
    tokens = rng.integers(20, full.config.vocab_size, (4, 120))
    expected, got = _logits(full, tokens), _logits(quantized, tokens)
    spread = np.abs(expected).max()
    assert np.abs(got - expected).max() <= LOGIT_TOLERANCE * spread
    agreement = (got.argmax(-1) == expected.argmax(-1)).mean()
    assert agreement >= 0.95, agreement
    assert np.abs(got - expected).max() > 0  # it is int8: not bit-for-bit float32


def test_a_quantized_checkpoint_round_trips_and_loads_on_meshes(tiny_mqa_dir, tmp_path):
    target = tmp_path / "int8"
    wrote = subprocess.run(
        [sys.executable, "-m", "starcoder_lsp", "quantize", str(tiny_mqa_dir), str(target)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert wrote.returncode == 0, wrote.stderr
    with safe_open(target / "model.safetensors", framework="numpy") as f:
        weight = f.get_tensor("transformer.h.0.attn.c_attn.weight")
        scale = f.get_tensor("transformer.h.0.attn.c_attn.weight_scale")
        assert weight.dtype == np.int8 and scale.shape == (weight.shape[0],)
        assert f.get_tensor("transformer.wpe.weight").dtype == np.float32
    tokens = np.random.default_rng(2).integers(20, 1000, (2, 40))
    at_load = _logits(checkpoint.load(tiny_mqa_dir, quantize="int8"), tokens)
    for shape in ("1x1", "2x4"):
        stored = checkpoint.load(target, sharding.make_mesh(shape))
        assert stored.config.quantization == "int8"
        np.testing.assert_allclose(_logits(stored, tokens), at_load, atol=1e-5, err_msg=shape)
    with pytest.raises(CheckpointError, match="already quantized"):
        quantize_checkpoint(target, tmp_path / "again")


def test_the_int8_model_generates_through_the_runner_on_a_2x4_mesh(tiny_mqa_dir, monkeypatch):
    """The compiled steps run on int8 weights split over a mesh as on one device (with the
    kernel's float activations: XLA's product on the mesh does not round them)."""
    monkeypatch.setenv(cpu_kernels.ACTIVATIONS_VARIABLE, "float")
    prompts = [
        np.random.default_rng(3 + i).integers(20, 1000, 9 + 5 * i).tolist() for i in range(4)
    ]
    outputs = {}
    for shape in ("1x1", "2x4"):
        ckpt = checkpoint.load(tiny_mqa_dir, sharding.make_mesh(shape), quantize="int8")
        assert ckpt.params["h_1"]["mlp"]["c_fc"]["scale"].sharding.spec == sharding.P("mp")
        runner = Runner.from_checkpoint(ckpt, slots=4, chunks=(8, 32), batches=(1, 4))
        cache, logits = runner.new_cache(), []
        for slot, prompt in enumerate(prompts):
            last, cache, _ = runner.prefill(cache, slot, prompt, 0)
            logits.append(np.asarray(last))
        step, cache = runner.decode(cache, [0, 1, 2, 3], [7] * 4, [len(p) for p in prompts])
        outputs[shape] = [*logits, np.asarray(step)]
    for a, b in zip(outputs["2x4"], outputs["1x1"], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


def _rounded_in_groups(x: np.ndarray) -> np.ndarray:
    """x as the int8 form of the kernel sees it: each 64 values of a row rounded to int8 with
    their largest magnitude / 127 as the step, in float32 as the kernel computes it."""
    groups = x.reshape(x.shape[0], -1, 64)
    top = np.abs(groups).max(axis=-1, keepdims=True)
    inverse = np.where(top > 0, np.float32(127) / np.where(top > 0, top, 1), 0).astype(np.float32)
    return (np.rint(groups * inverse) * (top / np.float32(127))).reshape(x.shape)


def _decoded_logits(ckpt: checkpoint.Checkpoint, tokens: np.ndarray) -> np.ndarray:
    """Each row of tokens fed one decode step at a time on one CPU device (the int8 kernel's
    path), teacher-forced: the logits after every token [rows, positions, vocab]."""
    runner = Runner.from_checkpoint(ckpt, slots=len(tokens), chunks=(8,), batches=(len(tokens),))
    cache, steps = runner.new_cache(), []
    rows = list(range(len(tokens)))
    for position in range(tokens.shape[1]):
        logits, cache = runner.decode(
            cache, rows, tokens[:, position].tolist(), [position] * len(rows)
        )
        steps.append(np.asarray(logits)[: len(rows)])
    return np.stack(steps, axis=1)


@pytest.mark.parametrize("form", ["int8", "float"])
def test_decode_steps_with_the_kernel_agree_with_float32(pair, form, monkeypatch):
    """The kernel's forms, as a server decodes (one token a step, one CPU device), against the
    float32 model over the same tokens: logits within the tolerance, the greedy next token
    the same at ≥ 95% of positions. Rounding the activations to int8 costs little next to the
    weights' own rounding."""
    monkeypatch.setenv(cpu_kernels.ACTIVATIONS_VARIABLE, form)
    full, quantized = pair
    tokens = np.random.default_rng(4).integers(20, full.config.vocab_size, (4, 60))
    expected, got = _logits(full, tokens), _decoded_logits(quantized, tokens)
    assert np.abs(got - expected).max() <= LOGIT_TOLERANCE * np.abs(expected).max()
    agreement = (got.argmax(-1) == expected.argmax(-1)).mean()
    assert agreement >= 0.95, agreement


def test_the_int8_form_is_what_decode_steps_use_by_default(pair, monkeypatch):
    """Without the variable, decode steps round the activations (where the CPU can): their
    logits differ from the float form's, by less than the weights' rounding moves them."""
    _, quantized = pair
    tokens = np.random.default_rng(5).integers(20, quantized.config.vocab_size, (2, 12))
    monkeypatch.delenv(cpu_kernels.ACTIVATIONS_VARIABLE, raising=False)
    default = _decoded_logits(quantized, tokens)
    monkeypatch.setenv(cpu_kernels.ACTIVATIONS_VARIABLE, "float")
    exact = _decoded_logits(quantized, tokens)
    difference = np.abs(default - exact).max()
    if cpu_kernels.has_int8_activations():
        assert 0 < difference <= LOGIT_TOLERANCE * np.abs(exact).max()
    else:
        assert difference == 0
    monkeypatch.setenv(cpu_kernels.ACTIVATIONS_VARIABLE, "int4")
    with pytest.raises(ValueError, match="STARCODER_INT8_ACTIVATIONS"):
        _decoded_logits(quantized, tokens)


def test_the_kernel_rounds_activations_only_where_the_cpu_has_vnni():
    flags = Path("/proc/cpuinfo").read_text().split()
    assert cpu_kernels.has_int8_activations() == ("avx512_vnni" in flags)


SHAPES = [(1, 37, 100), (3, 768, 130), (9, 48, 256), (16, 64, 65), (2, 3072, 70)]


@pytest.mark.parametrize("int8_activations", [False, True], ids=["float", "int8"])
@pytest.mark.parametrize(("m", "k", "n"), SHAPES)
def test_the_cpu_kernel_multiplies_as_numpy_does(m, k, n, int8_activations):
    """Rows in groups of 8 and a remainder, a weight width that is no multiple of 16 (and
    widths that are no multiple of 64, which the int8 form leaves to the float one), more
    output rows than one thread's block, and fewer. The int8 form multiplies the activations
    rounded in groups of 64, and stays within half a step of each activation of the product."""
    assert cpu_kernels.has_int8_matmul()  # built here, with this machine's C++ compiler
    rng = np.random.default_rng(m)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[0, :64] *= 50  # a group with an outlier gets a coarser step of its own
    w = rng.integers(-127, 128, (n, k)).astype(np.int8)
    scale = rng.random(n).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32) if m % 2 else None  # the LM head has none
    product = jax.jit(
        functools.partial(cpu_kernels.int8_matmul, round_activations=int8_activations)
    )
    got = np.asarray(product(x, w, scale, bias=bias))
    if bias is not None:
        got = got - bias
    rounded = int8_activations and cpu_kernels.has_int8_activations() and k % 64 == 0
    seen = _rounded_in_groups(x) if rounded else x
    expected = (seen.astype(np.float64) @ w.T.astype(np.float64)) * scale
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    exact = (x.astype(np.float64) @ w.T.astype(np.float64)) * scale
    if rounded:
        steps = np.repeat(np.abs(x).reshape(m, -1, 64).max(axis=-1) / 127, 64, axis=1)
        bound = (steps / 2) @ np.abs(w.T.astype(np.float64)) * scale
        assert (np.abs(got - exact) <= bound * 1.001 + 1e-4).all()
        assert np.abs(got - exact).max() > 1e-3 * np.abs(exact).max()  # it did round
    else:
        np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-5 * np.abs(exact).max())


@pytest.mark.parametrize("int8_activations", [False, True], ids=["float", "int8"])
def test_the_kernel_takes_a_layer_norm_of_its_rows_as_the_norm_kernel_does(int8_activations):
    """The norm taken in the product's own call gives the product of the norm kernel's rows,
    to the bit (the same code normalises both); without it, the product of the raw rows."""
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((3, 768)) * 4 + 2).astype(np.float32)
    w = rng.integers(-127, 128, (300, 768)).astype(np.int8)
    scale, bias = rng.random(300).astype(np.float32), rng.standard_normal(300).astype(np.float32)
    norm_scale, norm_bias = rng.standard_normal((2, 768)).astype(np.float32)
    product = functools.partial(cpu_kernels.int8_matmul, round_activations=int8_activations)
    fused = jax.jit(lambda x, w, s, b, g, h: product(x, w, s, bias=b, norm=(g, h, 1e-5)))
    got = np.asarray(fused(x, w, scale, bias, norm_scale, norm_bias))
    normed = jax.jit(cpu_kernels.layer_norm, static_argnums=3)(x, norm_scale, norm_bias, 1e-5)
    unfused = jax.jit(lambda x, w, s, b: product(x, w, s, bias=b))
    np.testing.assert_array_equal(got, np.asarray(unfused(normed, w, scale, bias)))
    raw = np.asarray(unfused(x, w, scale, bias))
    assert np.abs(got - raw).max() > 1.0  # the norm was taken


@pytest.mark.parametrize("int8_activations", [False, True], ids=["float", "int8"])
def test_the_kernel_applies_gelu_and_adds_the_residual_as_xla_would(int8_activations):
    """GELU (tanh's approximation) on the product and a residual added after it, in the
    kernel's call: as jax.nn.gelu(approximate=True) and an addition on the kernel's plain
    product, within float32 rounding, over a range where GELU curves and where e^2u would
    overflow; an output width that no vector divides (a masked tail)."""
    rng = np.random.default_rng(13)
    x = rng.standard_normal((3, 128)).astype(np.float32)
    w = rng.integers(-127, 128, (1000, 128)).astype(np.int8)
    scale = (rng.random(1000) * 0.02).astype(np.float32)
    bias = rng.standard_normal(1000).astype(np.float32)
    scale[:8] = 50.0  # outputs in the hundreds, where the tanh saturates
    residual = rng.standard_normal((3, 1000)).astype(np.float32)
    product = functools.partial(cpu_kernels.int8_matmul, round_activations=int8_activations)
    plain = np.asarray(jax.jit(lambda *a: product(*a[:3], bias=a[3]))(x, w, scale, bias))
    assert np.abs(plain).max() > 100 and (plain < -3).any()
    fused = jax.jit(lambda *a: product(*a[:3], bias=a[3], activation="gelu_tanh"))
    got = np.asarray(fused(x, w, scale, bias))
    expected = np.asarray(jax.nn.gelu(plain, approximate=True))
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-6)
    added = jax.jit(lambda *a: product(*a[:3], bias=a[3], residual=a[4]))
    np.testing.assert_array_equal(np.asarray(added(x, w, scale, bias, residual)), plain + residual)
    both = jax.jit(lambda *a: product(*a[:3], bias=a[3], activation="gelu_tanh", residual=a[4]))
    np.testing.assert_allclose(
        np.asarray(both(x, w, scale, bias, residual)), expected + residual, rtol=2e-6, atol=2e-6
    )
    with pytest.raises(ValueError, match="relu"):
        product(x, w, scale, activation="relu")


@pytest.mark.parametrize("name", [None, "gelu_pytorch_tanh", "gelu", "relu"])
def test_a_product_with_its_activation_and_residual_agrees_in_and_out_of_the_kernel(name):
    """project_int8 on one CPU device (our kernel, which applies the tanh GELU itself and
    leaves other activations, then the residual, to XLA) against XLA's form of the same
    product: the activation and the residual each applied once, in that order."""
    if not cpu_kernels.has_int8_matmul():
        pytest.skip("no C++ compiler: the int8 kernel is not built")
    rng = np.random.default_rng(17)
    x = rng.standard_normal((1, 2, 128)).astype(np.float32)
    w = rng.integers(-127, 128, (96, 128)).astype(np.int8)
    scale = (rng.random(96) * 0.02).astype(np.float32)
    bias = rng.standard_normal(96).astype(np.float32)
    residual = rng.standard_normal((1, 2, 96)).astype(np.float32)
    product = jax.jit(
        lambda one_cpu, *a: project_int8(*a[:3], one_cpu, False, a[3], None, name, a[4]),
        static_argnums=0,
    )
    kernel = np.asarray(product(True, x, w, scale, bias, residual))
    xla = np.asarray(product(False, x, w, scale, bias, residual))
    np.testing.assert_allclose(kernel, xla, rtol=1e-5, atol=1e-5)
    without = np.asarray(product(True, x, w, scale, bias, np.zeros_like(residual)))
    np.testing.assert_allclose(kernel - without, residual, rtol=1e-5, atol=1e-5)


def test_the_kernel_is_right_when_called_from_several_threads_at_once():
    """The kernels' worker threads serve one call at a time; a call made meanwhile (XLA may
    run two at once, as may two engines in one process) runs on its own thread."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 256)).astype(np.float32)
    weights = [rng.integers(-127, 128, (640, 256)).astype(np.int8) for _ in range(4)]
    scale = rng.random(640).astype(np.float32)
    product = jax.jit(cpu_kernels.int8_matmul)
    expected = [(x.astype(np.float64) @ w.T.astype(np.float64)) * scale for w in weights]

    def run(i: int) -> float:
        worst = 0.0
        for _ in range(50):
            got = np.asarray(product(x, weights[i], scale))
            worst = max(worst, float(np.abs(got - expected[i]).max()))
        return worst

    with ThreadPoolExecutor(4) as pool:
        errors = list(pool.map(run, range(4)))
    assert max(errors) < 1e-3 * max(np.abs(e).max() for e in expected)


def test_few_rows_on_one_cpu_device_go_to_the_kernel(tiny_mqa_dir):
    """A decode step on a 1x1 mesh calls the kernel for every matrix; a long prefill chunk only
    for the LM head (its last token's); a mesh of several devices keeps XLA's product."""
    calls = lambda runner, kind, size: (
        runner.lower(kind, size).as_text().count(f"custom_call @{cpu_kernels.INT8_MATMUL}(")
    )
    ckpt = checkpoint.load(tiny_mqa_dir, sharding.make_mesh("1x1"), quantize="int8")
    runner = Runner.from_checkpoint(ckpt, slots=2, chunks=(8, 32), batches=(1, 2))
    matrices = 5 * ckpt.config.n_layer + 1  # query, key/value, attention out, MLP in, out; head
    assert calls(runner, DECODE, 2) == matrices
    assert calls(runner, PREFILL, 32) == 1
    # Each norm is taken in the products that follow it (query and key/value, MLP in, head):
    # no call of its own; only the attention's and the MLP's outputs follow none.
    lowered = runner.lower(DECODE, 2).as_text()
    assert f"custom_call @{cpu_kernels.LAYER_NORM}(" not in lowered
    assert lowered.count("epsilon = 0.000000e+00") == 2 * ckpt.config.n_layer
    # The MLP's activation is taken in its first product, and both residual adds in the
    # products before them: the step has no GELU (tanh), and its only [b, 1, d] addition
    # is the position embedding's.
    assert lowered.count("activation = 1 : i64") == ckpt.config.n_layer
    assert "tanh" not in lowered
    adds = re.findall(rf"stablehlo.add .*tensor<2x1x{ckpt.config.n_embd}xf32>", lowered)
    assert ckpt.config.learned_positions and len(adds) == 1
    ckpt = checkpoint.load(tiny_mqa_dir, sharding.make_mesh("2x4"), quantize="int8")
    runner = Runner.from_checkpoint(ckpt, slots=2, chunks=(8, 32), batches=(1, 2))
    assert calls(runner, DECODE, 2) == 0


def test_an_unknown_quantization_is_refused(tiny_mqa_dir):
    with pytest.raises(CheckpointError, match="int4"):
        checkpoint.load(tiny_mqa_dir, quantize="int4")
    assert ModelOptions(tiny_mqa_dir, quantize="int8").quantize == "int8"
