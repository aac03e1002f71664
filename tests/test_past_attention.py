"""The CPU attention kernel (kernels/past_attention.cc) against attention.py's own loop over
the cache, and where the model calls it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starcoder_lsp import checkpoint, cpu_kernels, sharding
from starcoder_lsp.attention import PastKV, _attend_past, new_tokens_state
from starcoder_lsp.runner import DECODE, PREFILL, Runner

pytestmark = pytest.mark.skipif(
    not cpu_kernels.has_past_attention(), reason="the attention kernel needs AVX-512"
)


@pytest.mark.parametrize(
    ("kv", "hd", "seq", "group", "window"),
    [
        (1, 64, 1, 12, None),  # a decode step of an MQA model (tiny_starcoder_py)
        (2, 128, 3, 4, None),  # a verify step of a GQA model: 3 new tokens per row
        (2, 64, 1, 2, 300),  # a sliding window (StarCoder2) that cuts into the cache
        (1, 64, 2, 6, 40),  # a window shorter than a span of the kernel
        (2, 64, 5, 4, None),  # 20 query rows: more than the kernel scores at once, and a rest
    ],
)
def test_the_kernel_attends_as_the_loop_does(kv, hd, seq, group, window):
    """Rows of several lengths (one empty, one not a multiple of the kernel's span), picking
    cache rows out of order, with two keys decoded earlier in the call before the new tokens'
    own (each token sees those and the new ones up to itself), the queries scaled in the
    kernel: as attend's loop on the scaled queries, normalised."""
    rng = np.random.default_rng(hd + seq)
    layers, cache_rows, time = 3, 5, 1100
    cache = jnp.asarray(rng.standard_normal((layers, 2, cache_rows, time, kv, hd), np.float32))
    length = jnp.asarray([1037, 0, 256, 300], jnp.int32)
    b, t = len(length), seq + 2
    row = jnp.asarray(rng.permutation(cache_rows)[:b].astype(np.int32))
    positions = length[:, None] + jnp.arange(seq, dtype=jnp.int32)
    unscaled = jnp.asarray(rng.standard_normal((b, kv, seq * group, hd), np.float32))
    q = unscaled * 0.3
    new = tuple(jnp.asarray(rng.standard_normal((b, t, kv, hd)), jnp.float32) for _ in "kv")
    visible = jnp.broadcast_to(jnp.arange(t)[None, :] <= jnp.arange(seq)[:, None] + 2, (b, seq, t))
    past = PastKV(cache, length, row)
    state = new_tokens_state(q, new, visible)
    _, total, out = _attend_past(q, past, state, positions, layer=1, size=256, window=window)
    kernel = jax.jit(cpu_kernels.attention, static_argnames=("layer", "window", "scale"))(
        unscaled, new, visible, cache, row, length, positions, layer=1, window=window, scale=0.3
    )
    np.testing.assert_allclose(np.asarray(kernel), np.asarray(out / total), rtol=2e-5, atol=2e-5)


def test_a_query_that_sees_no_key_gets_zeros():
    """A padding token with no cached positions and no visible new key: zeros, where 0 / 0
    would be NaN (and a NaN value times a zero weight spreads to the tokens that see it)."""
    rng = np.random.default_rng(3)
    kv, hd, seq, group, t = 1, 64, 2, 3, 2
    cache = jnp.asarray(rng.standard_normal((1, 2, 2, 16, kv, hd), np.float32))
    q = jnp.asarray(rng.standard_normal((1, kv, seq * group, hd), np.float32))
    new = tuple(jnp.asarray(rng.standard_normal((1, t, kv, hd)), jnp.float32) for _ in "kv")
    visible = jnp.asarray([[[True, False], [False, False]]])  # the second token: padding
    length, row, positions = jnp.asarray([0]), jnp.asarray([1]), jnp.asarray([[0, 1]])
    out = cpu_kernels.attention(q, new, visible, cache, row, length, positions, 0, None)
    out = np.asarray(out).reshape(seq, group, hd)
    np.testing.assert_array_equal(out[1], 0.0)
    np.testing.assert_allclose(out[0], np.broadcast_to(np.asarray(new[1])[0, 0, 0], (group, hd)))


def test_decode_steps_on_one_cpu_device_read_the_cache_with_the_kernel(tiny_mqa_dir):
    """Once per layer in a decode step on a 1x1 mesh; a prefill chunk, and a mesh of several
    devices, keep XLA's loop."""
    calls = lambda runner, kind, size: (
        runner.lower(kind, size).as_text().count(f"custom_call @{cpu_kernels.PAST_ATTENTION}(")
    )
    ckpt = checkpoint.load(tiny_mqa_dir, sharding.make_mesh("1x1"))
    runner = Runner.from_checkpoint(ckpt, slots=2, chunks=(8, 32), batches=(1, 2))
    assert calls(runner, DECODE, 1) == calls(runner, DECODE, 2) == ckpt.config.n_layer
    # The kernel scales the queries itself (no multiplication of XLA's before it).
    scale = f"scale = {ckpt.config.head_dim**-0.5:e} : f32"
    assert runner.lower(DECODE, 1).as_text().count(scale) == ckpt.config.n_layer
    assert calls(runner, PREFILL, 32) == 0  # 32 new tokens: a prefill chunk
    assert calls(runner, PREFILL, 8) == ckpt.config.n_layer  # as few as a verify step has
    ckpt = checkpoint.load(tiny_mqa_dir, sharding.make_mesh("2x4"))
    runner = Runner.from_checkpoint(ckpt, slots=2, chunks=(8, 32), batches=(1, 2))
    assert calls(runner, DECODE, 2) == 0


def test_a_model_decodes_the_same_with_and_without_the_kernel(tiny_mqa_dir):
    """A few steps of one row after a prompt longer than a span, on 1x1 (kernel) and 2x4
    (XLA's loop): the same logits."""
    prompt = list(np.random.default_rng(1).integers(1, 400, 300))
    logits = {}
    for shape in ("1x1", "2x4"):
        ckpt = checkpoint.load(tiny_mqa_dir, sharding.make_mesh(shape))
        runner = Runner.from_checkpoint(ckpt, slots=2, chunks=(8, 32), batches=(1, 2))
        cache = runner.new_cache()
        _, cache, _ = runner.prefill(cache, 1, prompt, 0)
        steps = []
        for i in range(3):
            step, cache = runner.decode(cache, [1], [7 + i], [len(prompt) + i])
            steps.append(np.asarray(step[:1]))
        logits[shape] = np.concatenate(steps)
    np.testing.assert_allclose(logits["1x1"], logits["2x4"], atol=1e-4)
