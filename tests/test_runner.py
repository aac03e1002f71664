"""The runner: compiled prefill, decode and multi-step decode on the mesh, static shapes."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starcoder_lsp import checkpoint, sharding
from starcoder_lsp.compilation import compilations
from starcoder_lsp.generator import Generator
from starcoder_lsp.runner import DECODE, MULTI_STEP, ONE_DRAFT, PREFILL, Runner
from starcoder_lsp.sampling import Sampling


@pytest.fixture(scope="module")
def ckpt(tiny_mqa_dir) -> checkpoint.Checkpoint:
    return checkpoint.load(tiny_mqa_dir)


# --- static shapes -------------------------------------------------------------------------


def test_no_compilation_after_warmup(ckpt):
    generator = Generator(ckpt, chunks=(8, 32), batches=(1, 2, 4))
    generator.runner.warmup()
    compiled = compilations()
    assert compiled >= len(generator.runner.shapes())  # the counter sees compilations
    rng = np.random.default_rng(0)
    vocab = ckpt.config.vocab_size
    for i in range(50):
        batch = int(rng.integers(1, 5))
        prompts = [
            rng.integers(20, vocab, int(rng.integers(1, 120))).tolist() for _ in range(batch)
        ]
        # Up to 13 new tokens: some generations decode several steps per call, some one.
        generator.generate(
            prompts, int(rng.integers(1, 14)), temperature=float(i % 2), top_p=0.9, seed=i
        )
    assert compilations() == compiled


def test_a_second_runner_on_the_checkpoint_reuses_the_first_ones_programs(ckpt):
    # The steps take the parameters' tree as a static argument (steps.ParamTree): equal
    # trees must hit jit's cache, or every runner would trace and compile its shapes anew.
    first = Runner.from_checkpoint(ckpt, chunks=(8,), batches=(1,))
    cache = first.warmup()
    compiled = compilations()
    second = Runner.from_checkpoint(ckpt, chunks=(8,), batches=(1,))
    expected, cache = first.decode(cache, [0], [5], [0])
    logits, _ = second.decode(cache, [0], [5], [0])
    assert compilations() == compiled
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(expected))


def test_prefill_in_chunks_equals_one_pass(ckpt):
    prompt = np.random.default_rng(5).integers(20, ckpt.config.vocab_size, 37).tolist()
    results = {}
    for chunks in ((4,), (4, 16), (64,)):
        runner = Runner.from_checkpoint(ckpt, chunks=chunks)
        results[chunks] = runner.prefill(runner.new_cache(), 0, prompt, 0)
    # 37 = 9·4 + 1 padded; 16 + 16 + 4 + 1 padded; one padded chunk of 64.
    assert [calls for _, _, calls in results.values()] == [10, 4, 1]
    for logits, _, _ in results.values():
        np.testing.assert_allclose(np.asarray(logits), np.asarray(results[(64,)][0]), atol=1e-4)


def test_a_step_over_every_slot_equals_rows_run_alone(ckpt):
    """Five rows in shuffled slots of eight take the step that reads the cache in place
    (their batch bucket is the whole cache); each must get what it gets alone."""
    runner = Runner.from_checkpoint(ckpt, slots=8, chunks=(8, 32))
    rng = np.random.default_rng(3)
    slots = [5, 2, 7, 0, 3]
    cache = runner.new_cache()
    prompts = {s: rng.integers(20, ckpt.config.vocab_size, 5 + 7 * s).tolist() for s in slots}
    for slot, prompt in prompts.items():
        _, cache, _ = runner.prefill(cache, slot, prompt, 0)
    tokens, positions = [11, 12, 13, 14, 15], [len(prompts[s]) for s in slots]
    together, cache = runner.decode(cache, slots, tokens, positions)
    assert together.shape[0] == 8
    for i, slot in enumerate(slots):
        alone, cache = runner.decode(cache, [slot], [tokens[i]], [positions[i]])
        np.testing.assert_allclose(np.asarray(together[i]), np.asarray(alone[0]), atol=1e-4)
    with pytest.raises(ValueError, match="twice"):
        runner.decode(cache, [1, 1, 2, 3, 4], tokens, positions)


@pytest.mark.parametrize("slots", [[2], [3, 0], [1, 3, 0, 2]])
def test_several_steps_per_call_equal_single_steps(ckpt, slots):
    """Greedy tokens and the cache written by calls of four steps equal those of one step at a
    time, for a row alone, rows picked by index, and every slot in shuffled order."""
    runner = Runner.from_checkpoint(
        ckpt, max_len=64, slots=4, chunks=(8, 32), batches=(1, 2, 4), steps_per_call=4
    )
    rng = np.random.default_rng(1)
    prompts = [rng.integers(20, ckpt.config.vocab_size, 9 + 6 * s).tolist() for s in range(4)]
    greedy = Sampling.rows(0.0, batch=len(slots))
    key = jax.random.PRNGKey(0)

    def prefilled() -> tuple[jax.Array, list[int]]:
        cache = runner.new_cache()
        for slot, prompt in enumerate(prompts):
            _, cache, _ = runner.prefill(cache, slot, prompt, 0)
        return cache, [len(prompts[s]) for s in slots]

    cache, positions = prefilled()
    tokens, one_by_one = [11, 12, 13, 14][: len(slots)], []
    for step in range(8):
        logits, cache = runner.decode(cache, slots, tokens, [p + step for p in positions])
        padded = runner.pad_sampling(greedy, len(slots))
        tokens = np.asarray(runner.sample(logits, padded, key))[: len(slots)]
        one_by_one.append(tokens)
    expected_cache = np.asarray(cache)

    cache, positions = prefilled()
    tokens, calls = [11, 12, 13, 14][: len(slots)], []
    for call in range(2):
        at = [p + 4 * call for p in positions]
        new, cache = runner.decode_steps(cache, slots, tokens, at, greedy, key)
        assert new.shape == (len(slots), 4)
        calls.append(new)
        tokens = new[:, -1]
    assert np.concatenate(calls, axis=1).tolist() == np.stack(one_by_one, axis=1).tolist()
    # Both wrote the keys and values of the first 8 tokens of each row (the 8th new token's
    # are written by the next call), and nothing else.
    np.testing.assert_allclose(np.asarray(cache), expected_cache, atol=1e-4)


def test_several_steps_per_call_sample_reproducibly_per_row(ckpt):
    runner = Runner.from_checkpoint(
        ckpt, max_len=64, slots=2, chunks=(8,), batches=(2,), steps_per_call=8
    )
    cache = runner.new_cache()
    for slot in range(2):
        _, cache, _ = runner.prefill(cache, slot, [30 + slot] * 5, 0)
    mixed = Sampling.rows([0.0, 2.0], 1.0, 0, batch=2)
    runs = {}
    for seed in (0, 0, 1):
        # Cache positions 5.. are rewritten by each call, so every call sees the same past.
        key = jax.random.PRNGKey(seed)
        new, cache = runner.decode_steps(cache, [0, 1], [7, 7], [5, 5], mixed, key)
        runs.setdefault(seed, []).append(new.tolist())
    all_greedy = Sampling.rows(0.0, batch=2)
    key = jax.random.PRNGKey(0)
    greedy, cache = runner.decode_steps(cache, [0, 1], [7, 7], [5, 5], all_greedy, key)
    assert runs[0][0] == runs[0][1]  # the same seed gives the same tokens
    assert runs[0][0][1] != runs[1][0][1]  # another seed, other tokens for the sampled row
    assert runs[0][0][0] == runs[1][0][0] == greedy[0].tolist()  # the greedy row is greedy


def test_runner_rejects_fewer_than_one_step_per_call(ckpt):
    with pytest.raises(ValueError, match="steps_per_call"):
        Runner.from_checkpoint(ckpt, steps_per_call=0)


def test_check_fits_says_by_how_much_a_prompt_overruns(ckpt):
    runner = Runner.from_checkpoint(ckpt, max_len=64)
    runner.check_fits(60, 4)
    with pytest.raises(ValueError, match="does not fit the context of 64.*exceed.* by 1"):
        runner.check_fits(60, 5)
    with pytest.raises(ValueError, match="at least one token"):
        runner.check_fits(0, 5)


def test_shapes_lists_every_compiled_program(ckpt):
    runner = Runner.from_checkpoint(ckpt, slots=4, chunks=(8, 32), batches=(1, 2), steps_per_call=4)
    assert runner.shapes() == [
        (PREFILL, 8),
        (PREFILL, 32),
        (DECODE, 1),
        (DECODE, 2),
        (DECODE, 4),
        (MULTI_STEP, 1),
        (MULTI_STEP, 2),
        (MULTI_STEP, 4),
    ]


def test_a_draft_runner_proposes_k_tokens_or_one(ckpt):
    runner = Runner.from_checkpoint(
        ckpt, slots=2, chunks=(8, 32), batches=(1,), steps_per_call=3, steps_with_probs=True
    )
    assert [s for s in runner.shapes() if s[0] == ONE_DRAFT] == [(ONE_DRAFT, 1), (ONE_DRAFT, 2)]
    cache = runner.warmup()
    prompt = list(range(5, 30))
    _, cache, _ = runner.prefill(cache, 0, prompt[:-1], 0)
    greedy, key = Sampling.rows(0.0), jax.random.PRNGKey(0)
    at = [len(prompt) - 1]
    compiled = compilations()
    many, many_probs, cache = runner.propose(cache, [0], prompt[-1:], at, greedy, key)
    one, one_probs, cache = runner.propose(cache, [0], prompt[-1:], at, greedy, key, steps=1)
    assert compilations() == compiled  # both were compiled by warmup
    assert many.shape == (1, 3) and one.shape == (1, 1)
    assert one[0, 0] == many[0, 0]
    np.testing.assert_allclose(one_probs[0, 0], many_probs[0, 0], atol=1e-6)
    with pytest.raises(ValueError, match="proposes 3 tokens, not 2"):
        runner.propose(cache, [0], prompt[-1:], at, greedy, key, steps=2)


# --- meshes --------------------------------------------------------------------------------


def _runner_on(directory, mesh_shape: str) -> Runner:
    ckpt = checkpoint.load(directory, sharding.make_mesh(mesh_shape), jnp.float32)
    return Runner.from_checkpoint(
        ckpt, max_len=128, slots=8, chunks=(8, 32), batches=(1, 4, 8), steps_per_call=4
    )


def _prefill_then_decode_some_rows(runner: Runner) -> list[np.ndarray]:
    """Eight rows of different lengths, then decode steps for rows held by different dp
    devices (a batch below the slot count: rows pick their cache rows by index), one step
    per call and then four."""
    rng = np.random.default_rng(3)
    prompts = [rng.integers(5, 500, n).tolist() for n in (37, 5, 70, 22, 51, 3, 40, 9)]
    cache, logits = runner.new_cache(), []
    for slot, prompt in enumerate(prompts):
        last, cache, _ = runner.prefill(cache, slot, prompt, 0)
        logits.append(np.asarray(last))
    for slots in ([6, 1, 3], [5]):
        positions = [len(prompts[s]) for s in slots]
        last, cache = runner.decode(cache, slots, [11] * len(slots), positions)
        logits.append(np.asarray(last)[: len(slots)])
    greedy = Sampling.rows(0.0, batch=3)
    positions = [len(prompts[s]) + 1 for s in (6, 1, 3)]
    key = jax.random.PRNGKey(0)
    new, cache = runner.decode_steps(cache, [6, 1, 3], [12] * 3, positions, greedy, key)
    return [*logits, new]


def test_rows_read_by_index_agree_on_every_mesh(tiny_mqa_dir):
    expected = _prefill_then_decode_some_rows(_runner_on(tiny_mqa_dir, "1x1"))
    for shape in ("2x4", "8x1"):
        got = _prefill_then_decode_some_rows(_runner_on(tiny_mqa_dir, shape))
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=shape)


COLLECTIVE = re.compile(r"= .* (all-gather|all-reduce|all-to-all|collective-permute)(-start)?\(")


def _collective_sizes(hlo: str) -> list[int]:
    """Element counts of the arrays each cross-device collective in compiled HLO produces."""
    sizes = []
    for line in hlo.splitlines():
        if COLLECTIVE.search(line):
            result = line.split("=", 1)[1].split(")")[0]
            dims = re.findall(r"\w+\[([\d,]*)\]", result)
            sizes += [math.prod(map(int, d.split(",")) if d else [1]) for d in dims]
    return sizes


def test_each_device_reads_only_its_own_cache_rows(tiny_mqa_dir):
    """Rows split across dp stay where they are: no collective moves a device's share of the
    cache (the partitioner used to gather the whole cache for every loop over it)."""
    for shape in ("2x4", "8x1"):
        runner = _runner_on(tiny_mqa_dir, shape)
        cache = runner.new_cache()
        share = cache.size // runner.mesh.shape[sharding.DATA]
        # A prefill chunk; one step for 4 rows picked by index; four steps in one call for them.
        for kind, size in ((PREFILL, 32), (DECODE, 4), (MULTI_STEP, 4)):
            hlo = runner.lower(kind, size).compile().as_text()
            assert max(_collective_sizes(hlo), default=0) < share, (shape, kind)
