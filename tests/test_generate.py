"""The generation engine: compiled steps, sampling, the starcoder-jax API, meshes."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starcoder_lsp import checkpoint, sharding
from starcoder_lsp.generate import (
    Generator,
    Runner,
    Sampling,
    _decode_steps,
    _forward,
    compilations,
    sample,
)  # fmt: skip

PROMPTS = [
    "def add(a, b):\n    return",
    "import os\n\nclass Path:\n    def __init__(self, p):\n",
    "for i in range(10):\n",
    "x = [",
]


@pytest.fixture(scope="module")
def generator(tiny_mqa_dir) -> Generator:
    return Generator.from_pretrained(tiny_mqa_dir, dtype=jnp.float32, chunks=(8, 32, 128))


def _no_stop(generator: Generator) -> checkpoint.SpecialTokens:
    """Special tokens that never occur, so that a comparison runs all max_new_tokens."""
    saved = generator.tokens
    generator.tokens = checkpoint.SpecialTokens(-1, -2, -3, -4, None, None, None)
    return saved


# --- sampling ------------------------------------------------------------------------------


def test_sample_greedy_top_k_top_p():
    logits = jnp.log(jnp.array([[0.1, 0.4, 0.3, 0.2]] * 3))
    keys = jax.random.split(jax.random.PRNGKey(0), 300)
    draws = lambda s: np.asarray(jax.jit(jax.vmap(lambda k: sample(logits, k, s)))(keys))
    greedy = draws(Sampling.rows(0.0, 1.0, 0, batch=3))
    assert (greedy == 1).all()
    free = draws(Sampling.rows([1.0, 1.0, 1.0], [1.0, 0.5, 1.0], [0, 0, 2], batch=3))
    assert set(free[:, 0]) == {0, 1, 2, 3}  # unrestricted: every token appears
    assert set(free[:, 1]) == {1, 2}  # top_p 0.5: 0.4 + 0.3 reaches it
    assert set(free[:, 2]) == {1, 2}  # top_k 2


def test_sampling_rows_accepts_starcoder_jax_shapes():
    s = Sampling.rows(np.array([[0.5], [0.0]]), np.array([[0.9], [1.0]]), batch=2)
    assert s.temperature.shape == (2,) and s.top_p.tolist() == pytest.approx([0.9, 1.0])


# --- whole generations ---------------------------------------------------------------------


def test_sampled_output_is_reproducible_for_a_seed(generator):
    run = lambda seed: [
        c.tokens for c in generator.generate(PROMPTS, 12, temperature=1.0, seed=seed)
    ]
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_per_row_temperature_in_one_batch(generator):
    saved = _no_stop(generator)
    try:
        greedy = generator.generate(PROMPTS[:2], 16)
        mixed = generator.generate(PROMPTS[:2], 16, temperature=[0.0, 1.5], top_p=[1.0, 1.0])
    finally:
        generator.tokens = saved
    assert mixed[0].tokens == greedy[0].tokens  # the greedy row is untouched by its neighbour
    assert mixed[1].tokens != greedy[1].tokens  # while the neighbour samples


def test_batch_rows_equal_single_rows(generator):
    saved = _no_stop(generator)
    try:
        together = [c.tokens for c in generator.generate(PROMPTS, 10)]
        alone = [generator.generate([p], 10)[0].tokens for p in PROMPTS]
    finally:
        generator.tokens = saved
    assert together == alone


def test_stops_at_stop_string_and_max_tokens(generator):
    saved = _no_stop(generator)
    try:
        (free,) = generator.generate([PROMPTS[0]], 12)
        stop = generator.decode(free.tokens[3:5])
        (cut,) = generator.generate([PROMPTS[0]], 12, stop=[stop])
    finally:
        generator.tokens = saved
    assert free.finish_reason == "length" and len(free.tokens) == 12
    assert cut.finish_reason == "stop" and len(cut.tokens) < 12
    assert stop not in cut.text and free.text.startswith(cut.text)


def test_stops_on_end_of_text(generator):
    saved = _no_stop(generator)
    try:
        (free,) = generator.generate([PROMPTS[1]], 8)
    finally:
        generator.tokens = saved
    # Pretend the fourth generated token ends the text.
    end = free.tokens[3]
    generator.tokens = checkpoint.SpecialTokens(end, -2, -3, -4, None, None, None)
    try:
        (stopped,) = generator.generate([PROMPTS[1]], 8)
    finally:
        generator.tokens = saved
    assert stopped.finish_reason == "stop"
    assert stopped.tokens == free.tokens[: free.tokens.index(end) + 1]


# --- starcoder-jax's API -------------------------------------------------------------------


def test_generate_at_once_matches_generate(generator):
    initial, hparams = generator.prepare_context(PROMPTS[0], max_length=64, temperature=0.0)
    assert initial["tokens"].shape == (1, 64) and hparams["temperature"].shape == (1, 1)
    saved = _no_stop(generator)
    try:
        with generator.checkpoint.mesh:  # as starcoder-jax's README uses it
            tokens, rng = generator.generate_at_once(
                **initial, **hparams, rng=jax.random.PRNGKey(0), max_new_tokens=10
            )
        expected = generator.generate([PROMPTS[0]], 10)[0].tokens
    finally:
        generator.tokens = saved
    assert tokens.dtype == np.int32 and tokens.shape == (1, 10)
    assert tokens[0].tolist() == expected
    assert rng.shape == jax.random.PRNGKey(0).shape


def test_stacked_contexts_make_a_batch_and_streaming_agrees(generator):
    contexts = [generator.prepare_context(p, max_length=64, temperature=0.0) for p in PROMPTS[:3]]
    initial = {k: np.concatenate([c[0][k] for c in contexts]) for k in contexts[0][0]}
    hparams = {k: np.concatenate([c[1][k] for c in contexts]) for k in contexts[0][1]}
    saved = _no_stop(generator)
    try:
        at_once, _ = generator.generate_at_once(
            **initial, **hparams, rng=jax.random.PRNGKey(0), max_new_tokens=6
        )
        outputs = generator.generate_from_context(**initial, **hparams, rng=jax.random.PRNGKey(0))
        streamed = [outputs[0]]
        for _ in range(5):
            outputs = generator.generate_next_tokens(*outputs, **hparams)
            streamed.append(outputs[0])
        singles = [generator.generate([p], 6)[0].tokens for p in PROMPTS[:3]]
    finally:
        generator.tokens = saved
    assert np.stack(streamed, axis=1).tolist() == at_once.tolist() == singles


def test_generate_at_once_pads_with_minus_one_after_the_end(generator):
    initial, hparams = generator.prepare_context(PROMPTS[2], max_length=64, temperature=0.0)
    saved = _no_stop(generator)
    try:
        free, _ = generator.generate_at_once(
            **initial, **hparams, rng=jax.random.PRNGKey(0), max_new_tokens=8
        )
    finally:
        generator.tokens = saved
    end = int(free[0, 2])
    generator.tokens = checkpoint.SpecialTokens(end, -2, -3, -4, None, None, None)
    try:
        tokens, _ = generator.generate_at_once(
            **initial, **hparams, rng=jax.random.PRNGKey(0), max_new_tokens=8
        )
    finally:
        generator.tokens = saved
    first_end = free[0].tolist().index(end)
    assert tokens[0, : first_end + 1].tolist() == free[0, : first_end + 1].tolist()
    assert (tokens[0, first_end + 1 :] == -1).all()


def test_prompts_that_do_not_fit_the_context_are_refused(generator):
    context = generator.runner.max_len
    with pytest.raises(ValueError, match="does not fit the context"):
        generator.generate([[30] * (context - 4)], max_new_tokens=5)
    with pytest.raises(ValueError, match="a prompt needs at least one token"):
        generator.generate([[]], max_new_tokens=5)
    initial, hparams = generator.prepare_context("x = 1", max_length=64, temperature=0.0)
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="does not fit the context"):
        generator.generate_at_once(**initial, **hparams, rng=key, max_new_tokens=context)
    empty = {k: np.concatenate([v, v]) for k, v in initial.items()}
    empty["mask"][1] = False  # the second row of the batch has no prompt
    hparams = {k: np.concatenate([v, v]) for k, v in hparams.items()}
    with pytest.raises(ValueError, match="a prompt needs at least one token"):
        generator.generate_at_once(**empty, **hparams, rng=key, max_new_tokens=4)


# --- static shapes -------------------------------------------------------------------------


def test_no_compilation_after_warmup(tiny_mqa_dir):
    ckpt = checkpoint.load(tiny_mqa_dir)
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


def test_prefill_in_chunks_equals_one_pass(tiny_mqa_dir):
    ckpt = checkpoint.load(tiny_mqa_dir)
    prompt = np.random.default_rng(5).integers(20, ckpt.config.vocab_size, 37).tolist()
    results = {}
    for chunks in ((4,), (4, 16), (64,)):
        runner = Runner(ckpt.config, ckpt.params, ckpt.mesh, ckpt.dtype, chunks=chunks)
        results[chunks] = runner.prefill(runner.new_cache(), 0, prompt, 0)
    # 37 = 9·4 + 1 padded; 16 + 16 + 4 + 1 padded; one padded chunk of 64.
    assert [calls for _, _, calls in results.values()] == [10, 4, 1]
    for logits, _, _ in results.values():
        np.testing.assert_allclose(np.asarray(logits), np.asarray(results[(64,)][0]), atol=1e-4)


def test_a_step_over_every_slot_equals_rows_run_alone(tiny_mqa_dir):
    """Five rows in shuffled slots of eight take the step that reads the cache in place
    (their batch bucket is the whole cache); each must get what it gets alone."""
    ckpt = checkpoint.load(tiny_mqa_dir)
    runner = Runner(ckpt.config, ckpt.params, ckpt.mesh, ckpt.dtype, slots=8, chunks=(8, 32))
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
def test_several_steps_per_call_equal_single_steps(tiny_mqa_dir, slots):
    """Greedy tokens and the cache written by calls of four steps equal those of one step at a
    time, for a row alone, rows picked by index, and every slot in shuffled order."""
    ckpt = checkpoint.load(tiny_mqa_dir)
    runner = Runner(ckpt.config, ckpt.params, ckpt.mesh, ckpt.dtype, max_len=64, slots=4,
                    chunks=(8, 32), batches=(1, 2, 4), steps_per_call=4)  # fmt: skip
    rng = np.random.default_rng(1)
    prompts = [rng.integers(20, ckpt.config.vocab_size, 9 + 6 * s).tolist() for s in range(4)]
    greedy = Sampling.rows(0.0, batch=len(slots))

    def prefilled() -> tuple[jax.Array, list[int]]:
        cache = runner.new_cache()
        for slot, prompt in enumerate(prompts):
            _, cache, _ = runner.prefill(cache, slot, prompt, 0)
        return cache, [len(prompts[s]) for s in slots]

    cache, positions = prefilled()
    tokens, one_by_one = [11, 12, 13, 14][: len(slots)], []
    for step in range(8):
        logits, cache = runner.decode(cache, slots, tokens, [p + step for p in positions])
        tokens = np.asarray(runner.sample(logits, runner.pad_sampling(greedy, len(slots)),
                                          jax.random.PRNGKey(0)))[: len(slots)]  # fmt: skip
        one_by_one.append(tokens)
    expected_cache = np.asarray(cache)

    cache, positions = prefilled()
    tokens, calls = [11, 12, 13, 14][: len(slots)], []
    for call in range(2):
        new, cache = runner.decode_steps(cache, slots, tokens, [p + 4 * call for p in positions],
                                         greedy, jax.random.PRNGKey(0))  # fmt: skip
        assert new.shape == (len(slots), 4)
        calls.append(new)
        tokens = new[:, -1]
    assert np.concatenate(calls, axis=1).tolist() == np.stack(one_by_one, axis=1).tolist()
    # Both wrote the keys and values of the first 8 tokens of each row (the 8th new token's
    # are written by the next call), and nothing else.
    np.testing.assert_allclose(np.asarray(cache), expected_cache, atol=1e-4)


def test_several_steps_per_call_sample_reproducibly_per_row(tiny_mqa_dir):
    ckpt = checkpoint.load(tiny_mqa_dir)
    runner = Runner(ckpt.config, ckpt.params, ckpt.mesh, ckpt.dtype, max_len=64, slots=2,
                    chunks=(8,), batches=(2,), steps_per_call=8)  # fmt: skip
    cache = runner.new_cache()
    for slot in range(2):
        _, cache, _ = runner.prefill(cache, slot, [30 + slot] * 5, 0)
    mixed = Sampling.rows([0.0, 2.0], 1.0, 0, batch=2)
    runs = {}
    for seed in (0, 0, 1):
        # Cache positions 5.. are rewritten by each call, so every call sees the same past.
        new, cache = runner.decode_steps(cache, [0, 1], [7, 7], [5, 5], mixed,
                                         jax.random.PRNGKey(seed))  # fmt: skip
        runs.setdefault(seed, []).append(new.tolist())
    all_greedy = Sampling.rows(0.0, batch=2)
    greedy, cache = runner.decode_steps(cache, [0, 1], [7, 7], [5, 5], all_greedy,
                                        jax.random.PRNGKey(0))  # fmt: skip
    assert runs[0][0] == runs[0][1]  # the same seed gives the same tokens
    assert runs[0][0][1] != runs[1][0][1]  # another seed, other tokens for the sampled row
    assert runs[0][0][0] == runs[1][0][0] == greedy[0].tolist()  # the greedy row is greedy


def test_runner_rejects_fewer_than_one_step_per_call(tiny_mqa_dir):
    ckpt = checkpoint.load(tiny_mqa_dir)
    with pytest.raises(ValueError, match="steps_per_call"):
        Runner(ckpt.config, ckpt.params, ckpt.mesh, ckpt.dtype, steps_per_call=0)


# --- meshes --------------------------------------------------------------------------------


def test_same_greedy_output_on_every_mesh(tiny_mqa_dir):
    if jax.device_count() < 8:
        pytest.fail("conftest forces 8 host devices; JAX was imported before it could")
    outputs = {}
    prompts = PROMPTS * 2  # 8 rows, so that dp=8 splits them
    for shape in ("1x1", "1x8", "2x4", "8x1"):
        mesh = sharding.make_mesh(shape)
        generator = Generator.from_pretrained(tiny_mqa_dir, mesh=mesh, dtype=jnp.float32,
                                              chunks=(8, 32))  # fmt: skip
        q_proj = generator.checkpoint.params["h_0"]["attn"]["q_proj"]["kernel"]
        assert len(q_proj.sharding.device_set) == mesh.size
        saved = _no_stop(generator)
        outputs[shape] = [c.tokens for c in generator.generate(prompts, 12)]
        generator.tokens = saved
    assert outputs["1x8"] == outputs["1x1"]
    assert outputs["2x4"] == outputs["1x1"]
    assert outputs["8x1"] == outputs["1x1"]


def _runner_on(directory, mesh_shape: str) -> Runner:
    ckpt = checkpoint.load(directory, sharding.make_mesh(mesh_shape), jnp.float32)
    return Runner(ckpt.config, ckpt.params, ckpt.mesh, ckpt.dtype, max_len=128, slots=8,
                  chunks=(8, 32), batches=(1, 4, 8), steps_per_call=4)  # fmt: skip


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
        last, cache = runner.decode(cache, slots, [11] * len(slots),
                                    [len(prompts[s]) for s in slots])  # fmt: skip
        logits.append(np.asarray(last)[: len(slots)])
    greedy = Sampling.rows(0.0, batch=3)
    new, cache = runner.decode_steps(cache, [6, 1, 3], [12] * 3,
                                     [len(prompts[s]) + 1 for s in (6, 1, 3)], greedy,
                                     jax.random.PRNGKey(0))  # fmt: skip
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
            sizes += [math.prod(map(int, d.split(",")) if d else [1])
                      for d in re.findall(r"\w+\[([\d,]*)\]", result)]  # fmt: skip
    return sizes


def test_each_device_reads_only_its_own_cache_rows(tiny_mqa_dir):
    """Rows split across dp stay where they are: no collective moves a device's share of the
    cache (the partitioner used to gather the whole cache for every loop over it)."""
    for shape in ("2x4", "8x1"):
        runner = _runner_on(tiny_mqa_dir, shape)
        cache = runner.new_cache()
        share = cache.size // runner.mesh.shape[sharding.DATA]
        for batch, length in ((1, 32), (4, 1)):  # a prefill chunk; decoding some rows
            args = [np.zeros((batch, length), np.int32), np.full((batch, length), 40, np.int32),
                    np.ones((batch, length), bool), np.arange(batch, dtype=np.int32),
                    np.arange(batch, dtype=np.int32)]  # fmt: skip
            hlo = _forward.lower(runner.model, runner.params, cache, *args).compile().as_text()
            assert max(_collective_sizes(hlo), default=0) < share, (shape, batch)
        # Four decode steps in one call, for four rows.
        rows = np.arange(4, dtype=np.int32)
        hlo = _decode_steps.lower(
            runner.model, runner.params, cache, rows, rows + 40, rows >= 0, rows, rows,
            jax.random.PRNGKey(0), Sampling.rows(0.0, batch=4), 4,
        ).compile().as_text()  # fmt: skip
        assert max(_collective_sizes(hlo), default=0) < share, (shape, "steps")


def test_shard_moves_params_to_a_new_mesh(tiny_mqa_dir):
    generator = Generator.from_pretrained(tiny_mqa_dir, dtype=jnp.float32, chunks=(8, 32))
    saved = _no_stop(generator)
    before = generator.generate(PROMPTS[:2], 8)
    generator.shard(sharding.make_mesh("2x4"))
    after = generator.generate(PROMPTS[:2], 8)
    generator.tokens = saved
    fc = generator.checkpoint.params["h_1"]["mlp"]["c_fc"]["kernel"]
    assert fc.sharding.spec == sharding.P("mp", None)
    assert [c.tokens for c in before] == [c.tokens for c in after]


def test_mesh_strings():
    assert sharding.parse_mesh_shape("2x4", 8) == (2, 4)
    assert sharding.parse_mesh_shape("auto", 8) == (1, 8)
    with pytest.raises(sharding.MeshError, match="DPxMP"):
        sharding.parse_mesh_shape("four", 8)
    with pytest.raises(sharding.MeshError, match="needs 16 devices"):
        sharding.make_mesh("4x4")


def test_compilation_cache_persists_programs(tmp_path, tiny_mqa_dir):
    """A restarted server finds its programs on disk: run in a fresh process, because a
    process that already compiled a program never asks the disk for it."""
    import subprocess
    import sys

    script = (
        "import sys; from starcoder_lsp.generate import Generator, enable_compilation_cache;"
        "enable_compilation_cache(sys.argv[1]);"
        "g = Generator.from_pretrained(sys.argv[2], chunks=(8,), batches=(1,));"
        "g.runner.warmup()"
    )
    cache_dir = tmp_path / "jax-cache"
    subprocess.run([sys.executable, "-c", script, str(cache_dir), str(tiny_mqa_dir)], check=True)
    written = [p for p in cache_dir.rglob("*") if p.is_file()]
    assert len(written) >= 2  # at least the forward step and the cache write
