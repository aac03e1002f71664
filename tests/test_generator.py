"""starcoder-jax's Generator API and whole generations, on the test checkpoint."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starcoder_lsp import checkpoint, sharding
from starcoder_lsp.generate import Generator

PROMPTS = [
    "def add(a, b):\n    return",
    "import os\n\nclass Path:\n    def __init__(self, p):\n",
    "for i in range(10):\n",
    "x = [",
]


@pytest.fixture(scope="module")
def generator(tiny_mqa_dir) -> Generator:
    return Generator.from_pretrained(tiny_mqa_dir, dtype=jnp.float32, chunks=(8, 32, 128))


@contextmanager
def stop_tokens(generator: Generator, eos: int = -1) -> Iterator[Generator]:
    """The generator with `eos` as its only stop token (by default none that occurs), so that
    a comparison runs all max_new_tokens."""
    saved = generator.tokens
    generator.tokens = checkpoint.SpecialTokens(eos, -2, -3, -4, None, None, None)
    try:
        yield generator
    finally:
        generator.tokens = saved


# --- whole generations ---------------------------------------------------------------------


def test_sampled_output_is_reproducible_for_a_seed(generator):
    run = lambda seed: [
        c.tokens for c in generator.generate(PROMPTS, 12, temperature=1.0, seed=seed)
    ]
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_per_row_temperature_in_one_batch(generator):
    with stop_tokens(generator):
        greedy = generator.generate(PROMPTS[:2], 16)
        mixed = generator.generate(PROMPTS[:2], 16, temperature=[0.0, 1.5], top_p=[1.0, 1.0])
    assert mixed[0].tokens == greedy[0].tokens  # the greedy row is untouched by its neighbour
    assert mixed[1].tokens != greedy[1].tokens  # while the neighbour samples


def test_batch_rows_equal_single_rows(generator):
    with stop_tokens(generator):
        together = [c.tokens for c in generator.generate(PROMPTS, 10)]
        alone = [generator.generate([p], 10)[0].tokens for p in PROMPTS]
    assert together == alone


def test_stops_at_stop_string_and_max_tokens(generator):
    with stop_tokens(generator):
        (free,) = generator.generate([PROMPTS[0]], 12)
        stop = generator.decode(free.tokens[3:5])
        (cut,) = generator.generate([PROMPTS[0]], 12, stop=[stop])
    assert free.finish_reason == "length" and len(free.tokens) == 12
    assert cut.finish_reason == "stop" and len(cut.tokens) < 12
    assert stop not in cut.text and free.text.startswith(cut.text)


def test_stops_on_end_of_text(generator):
    with stop_tokens(generator):
        (free,) = generator.generate([PROMPTS[1]], 8)
    # Pretend the fourth generated token ends the text.
    end = free.tokens[3]
    with stop_tokens(generator, eos=end):
        (stopped,) = generator.generate([PROMPTS[1]], 8)
    assert stopped.finish_reason == "stop"
    assert stopped.tokens == free.tokens[: free.tokens.index(end) + 1]


# --- starcoder-jax's API -------------------------------------------------------------------


def test_generate_at_once_matches_generate(generator):
    initial, hparams = generator.prepare_context(PROMPTS[0], max_length=64, temperature=0.0)
    assert initial["tokens"].shape == (1, 64) and hparams["temperature"].shape == (1, 1)
    with stop_tokens(generator):
        with generator.checkpoint.mesh:  # as starcoder-jax's README uses it
            tokens, rng = generator.generate_at_once(
                **initial, **hparams, rng=jax.random.PRNGKey(0), max_new_tokens=10
            )
        expected = generator.generate([PROMPTS[0]], 10)[0].tokens
    assert tokens.dtype == np.int32 and tokens.shape == (1, 10)
    assert tokens[0].tolist() == expected
    assert rng.shape == jax.random.PRNGKey(0).shape


def test_stacked_contexts_make_a_batch_and_streaming_agrees(generator):
    contexts = [generator.prepare_context(p, max_length=64, temperature=0.0) for p in PROMPTS[:3]]
    initial = {k: np.concatenate([c[0][k] for c in contexts]) for k in contexts[0][0]}
    hparams = {k: np.concatenate([c[1][k] for c in contexts]) for k in contexts[0][1]}
    with stop_tokens(generator):
        at_once, _ = generator.generate_at_once(
            **initial, **hparams, rng=jax.random.PRNGKey(0), max_new_tokens=6
        )
        outputs = generator.generate_from_context(**initial, **hparams, rng=jax.random.PRNGKey(0))
        streamed = [outputs[0]]
        for _ in range(5):
            outputs = generator.generate_next_tokens(*outputs, **hparams)
            streamed.append(outputs[0])
        singles = [generator.generate([p], 6)[0].tokens for p in PROMPTS[:3]]
    assert np.stack(streamed, axis=1).tolist() == at_once.tolist() == singles


def test_generate_at_once_pads_with_minus_one_after_the_end(generator):
    initial, hparams = generator.prepare_context(PROMPTS[2], max_length=64, temperature=0.0)
    key = jax.random.PRNGKey(0)
    with stop_tokens(generator):
        free, _ = generator.generate_at_once(**initial, **hparams, rng=key, max_new_tokens=8)
    end = int(free[0, 2])
    with stop_tokens(generator, eos=end):
        tokens, _ = generator.generate_at_once(**initial, **hparams, rng=key, max_new_tokens=8)
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


# --- meshes --------------------------------------------------------------------------------


def test_same_greedy_output_on_every_mesh(tiny_mqa_dir):
    if jax.device_count() < 8:
        pytest.fail("conftest forces 8 host devices; JAX was imported before it could")
    outputs = {}
    prompts = PROMPTS * 2  # 8 rows, so that dp=8 splits them
    for shape in ("1x1", "1x8", "2x4", "8x1"):
        mesh = sharding.make_mesh(shape)
        generator = Generator.from_pretrained(
            tiny_mqa_dir, mesh=mesh, dtype=jnp.float32, chunks=(8, 32)
        )
        q_proj = generator.checkpoint.params["h_0"]["attn"]["q_proj"]["kernel"]
        assert len(q_proj.sharding.device_set) == mesh.size
        with stop_tokens(generator):
            outputs[shape] = [c.tokens for c in generator.generate(prompts, 12)]
    assert outputs["1x8"] == outputs["1x1"]
    assert outputs["2x4"] == outputs["1x1"]
    assert outputs["8x1"] == outputs["1x1"]


def test_shard_moves_params_to_a_new_mesh(tiny_mqa_dir):
    generator = Generator.from_pretrained(tiny_mqa_dir, dtype=jnp.float32, chunks=(8, 32))
    with stop_tokens(generator):
        before = generator.generate(PROMPTS[:2], 8)
        generator.shard(sharding.make_mesh("2x4"))
        after = generator.generate(PROMPTS[:2], 8)
    fc = generator.checkpoint.params["h_1"]["mlp"]["c_fc"]["kernel"]
    assert fc.sharding.spec == sharding.P("mp", None)
    assert [c.tokens for c in before] == [c.tokens for c in after]


def test_compilation_cache_persists_programs(tmp_path, tiny_mqa_dir):
    """A restarted server finds its programs on disk: run in a fresh process, because a
    process that already compiled a program never asks the disk for it."""
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
