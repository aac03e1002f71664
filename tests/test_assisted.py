"""Assisted generation: drafts verified in one step give exactly what plain decoding gives
(greedy), or exactly the model's distribution (sampling)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starcoder_lsp import assist, checkpoint, sharding
from starcoder_lsp.assist import Assistant
from starcoder_lsp.config import PRESETS
from starcoder_lsp.draft import PromptLookup
from starcoder_lsp.errors import CheckpointError
from starcoder_lsp.factory import ModelOptions, build_completer
from starcoder_lsp.generator import Generator
from starcoder_lsp.random_model import write_random_model
from starcoder_lsp.sampling import Sampling, accept_drafts
from starcoder_lsp.settings import Settings
from starcoder_lsp.speculate import DraftBudget, prompt_lookup

NO_STOP = checkpoint.SpecialTokens(-1, -2, -3, -4, None, None, None)
# Prompts that repeat themselves, so that prompt lookup finds drafts, of different lengths.
PROMPTS = [
    "def add(a, b):\n    return a + b\n\n\ndef add(a, b):\n    return",
    "for i in range(10):\n    print(i)\nfor i in range(10):\n",
    "x = [1, 2, 3]\ny = [1, 2, 3]\nz = [1, 2,",
    "import os\nimport sys\nimport os\nimport",
]


# --- the acceptance rule, on a vocabulary of six ------------------------------------------------


def _first_tokens(p_logits: np.ndarray, q: np.ndarray | None, drafts: np.ndarray, n: int):
    """The first token each of n verifications emits (a kept draft, or the next token)."""
    logits = jnp.broadcast_to(jnp.asarray(p_logits), (1, *p_logits.shape))
    counts = jnp.array([drafts.shape[0]])
    sampling = Sampling.rows(1.0, 1.0, 0, batch=1)
    probs = None if q is None else jnp.asarray(q)[None]

    def one(key: jax.Array) -> jax.Array:
        key_draft, key_verify = jax.random.split(key)
        draft = drafts
        if q is not None:  # the draft is drawn from q, as a draft model's would be
            draft = jax.random.categorical(key_draft, jnp.log(jnp.asarray(q)), axis=-1)
        accepted, following = accept_drafts(
            logits, draft[None].astype(jnp.int32), counts, probs, sampling, key_verify
        )
        return jnp.where(accepted[0] > 0, draft[0], following[0])

    keys = jax.random.split(jax.random.PRNGKey(0), n)
    return np.asarray(jax.jit(jax.vmap(one))(keys))


def _distance(samples: np.ndarray, target: np.ndarray) -> float:
    """Total variation between the samples' frequencies and a distribution."""
    counts = np.bincount(samples, minlength=len(target)) / len(samples)
    return 0.5 * float(np.abs(counts - target).sum())


def test_speculative_sampling_gives_the_models_distribution():
    p = np.array([0.05, 0.4, 0.25, 0.1, 0.15, 0.05])
    q = np.array([[0.4, 0.05, 0.05, 0.3, 0.1, 0.1], [1 / 6] * 6])  # a poor draft
    p_logits = np.log(np.stack([p, p, p]))
    samples = _first_tokens(p_logits, q, np.zeros(2, np.int32), 40_000)
    assert _distance(samples, p) < 0.015
    # The test can fail: what the draft proposes is far from the model's distribution.
    assert 0.5 * np.abs(q[0] - p).sum() > 0.3


def test_a_certain_draft_is_kept_with_the_models_probability():
    """Prompt lookup's drafts are certainties (q a point mass): token 3 is kept as often as the
    model would pick it, and otherwise the model's choice among the rest."""
    p = np.array([0.1, 0.3, 0.2, 0.25, 0.1, 0.05])
    samples = _first_tokens(np.log(np.stack([p, p])), None, np.array([3], np.int32), 40_000)
    assert _distance(samples, p) < 0.015


def test_a_greedy_row_keeps_drafts_while_they_are_the_argmax():
    logits = jnp.log(jnp.array([[[0.1, 0.6, 0.3], [0.7, 0.2, 0.1], [0.2, 0.2, 0.6]]]))
    greedy = Sampling.rows(0.0, batch=1)
    key = jax.random.PRNGKey(1)
    for drafts, expected in (([1, 0], (2, 2)), ([1, 2], (1, 0)), ([2, 0], (0, 1))):
        accepted, following = accept_drafts(
            logits, jnp.array([drafts]), jnp.array([2]), None, greedy, key
        )
        assert (int(accepted[0]), int(following[0])) == expected, drafts
    # Only the first `counts` drafts count.
    accepted, following = accept_drafts(
        logits, jnp.array([[1, 0]]), jnp.array([1]), None, greedy, key
    )
    assert (int(accepted[0]), int(following[0])) == (1, 0)


# --- drafts ---------------------------------------------------------------------------------


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    tokens = [5, 6, 7, 8, 9, 1, 5, 6, 7, 2, 3, 5, 6, 7]
    assert prompt_lookup(tokens, 3, ngram=3) == [2, 3, 5]  # the latest of two matches
    assert prompt_lookup(tokens, 10, ngram=3) == [2, 3, 5, 6, 7]
    assert prompt_lookup([1, 2, 3, 4], 2, ngram=2) == []
    assert prompt_lookup([4, 1, 2, 9, 2], 2, ngram=3) == [9, 2]  # falls back to one token


def test_a_draft_that_is_accepted_grows_from_one_token_to_k():
    budget = DraftBudget(4)
    asked = []
    for _ in range(4):
        asked.append(budget.drafts())
        budget.record(asked[-1], asked[-1])
    assert asked == [1, 2, 4, 4]


def test_a_draft_that_keeps_failing_is_turned_off_and_retried_ever_less_often():
    budget = DraftBudget(4, retry=5, max_retry=20)
    asked = []
    for _ in range(60):
        asked.append(budget.drafts())
        if asked[-1]:
            budget.record(asked[-1], 0)
    assert max(asked) == 1  # never more than one wasted draft token at a time
    tries = [i for i, n in enumerate(asked) if n]
    turned_off = 3  # three misses bring the acceptance rate under `low`
    assert tries[:turned_off] == [0, 1, 2]
    # Off: a retry after 5 idle steps, then after 10, 20 and 20 (the cap) as each one fails.
    gaps = [b - a for a, b in zip(tries[turned_off - 1 :], tries[turned_off:], strict=False)]
    assert gaps == [5, 10, 20, 20]
    while not budget.drafts():
        pass
    budget.record(1, 1)  # a retry that succeeds turns the draft back on
    for _ in range(3):
        n = budget.drafts()
        budget.record(n, n)
    assert budget.current == 4


# --- on the test checkpoints ---------------------------------------------------------------------


@contextmanager
def no_stop(generator: Generator) -> Iterator[Generator]:
    saved, generator.tokens = generator.tokens, NO_STOP
    try:
        yield generator
    finally:
        generator.tokens = saved


def _greedy(generator: Generator, new: int = 24) -> list[list[int]]:
    with no_stop(generator):
        return [c.tokens for c in generator.generate(PROMPTS, new)]


@pytest.fixture(scope="module", params=["mqa", "mha"])
def model_dir(request, tiny_mqa_dir, tiny_mha_dir):
    return tiny_mqa_dir if request.param == "mqa" else tiny_mha_dir


@pytest.fixture(scope="module")
def plain(model_dir) -> list[list[int]]:
    generator = Generator.from_pretrained(model_dir, dtype=jnp.float32, chunks=(4, 16))
    return _greedy(generator)


@pytest.mark.parametrize("draft", ["prompt-lookup", "itself", "other"])
def test_greedy_output_is_that_of_plain_decoding(
    model_dir, plain, draft, tiny_mqa_dir, tiny_mha_dir
):
    other = tiny_mha_dir if model_dir == tiny_mqa_dir else tiny_mqa_dir
    source = {"itself": model_dir, "other": other}
    generator = Generator.from_pretrained(
        model_dir, dtype=jnp.float32, chunks=(4, 16), draft=str(source.get(draft, draft))
    )
    assert _greedy(generator) == plain
    stats = generator.assistant.stats
    assert stats.drafted > 0 and stats.tokens >= sum(map(len, plain)) - len(plain)
    if draft == "itself":  # a draft equal to the model is always right
        assert stats.accepted == stats.drafted
        assert stats.model_steps < stats.tokens / 2


def test_greedy_output_is_that_of_plain_decoding_on_a_2x4_mesh(tiny_mqa_dir):
    mesh = sharding.make_mesh("2x4")
    options = dict(mesh=mesh, dtype=jnp.float32, chunks=(4, 16), batches=(4,))
    plain = _greedy(Generator.from_pretrained(tiny_mqa_dir, **options), 12)
    assisted = Generator.from_pretrained(tiny_mqa_dir, draft=str(tiny_mqa_dir), **options)
    assert _greedy(assisted, 12) == plain
    looked_up = Generator.from_pretrained(tiny_mqa_dir, draft="prompt-lookup", **options)
    assert _greedy(looked_up, 12) == plain


def test_streaming_yields_the_accepted_tokens_as_they_come(tiny_mqa_dir):
    generator = Generator.from_pretrained(
        tiny_mqa_dir, dtype=jnp.float32, chunks=(4, 16), draft=str(tiny_mqa_dir)
    )
    with no_stop(generator):
        pieces = list(generator.stream(PROMPTS[0], max_new_tokens=20))
        (whole,) = generator.generate([PROMPTS[0]], 20)
    assert sum(pieces, []) == whole.tokens
    assert max(map(len, pieces)) > 1  # several tokens came out of one step


def test_a_draft_with_another_vocabulary_is_refused(tiny_mqa_dir, tmp_path):
    other = write_random_model(tmp_path / "sc2", PRESETS["test-tiny-2"])
    ckpt = checkpoint.load(tiny_mqa_dir)
    with pytest.raises(CheckpointError, match="another tokenizer"):
        assist.build(str(other), ckpt, slots=2)


def test_a_keystroke_replay_with_drafts_gives_the_suggestions_without(tiny_mqa_dir):
    """The server's path: the engine verifies prompt-lookup drafts with the prefix cache on;
    what a keystroke gets is what it gets with plain decoding and no cache at all."""
    before = "def total(items):\n    result = 0\n    for item in items:\n"
    typed = "        result = result + item\n    return result\n"
    settings = Settings(max_new_tokens=12, multiline="never")
    suggestions = {}
    for draft, cached in (("prompt-lookup", True), ("off", False)):
        options = ModelOptions(tiny_mqa_dir, slots=2, prefix_cache=cached, draft=draft)
        completer = build_completer(options, warmup=False, chunks=(4, 16, 64), batches=(1, 2))
        with completer.engine:
            suggestions[draft] = [
                completer.complete("doc", before + typed[:n], len(before) + n, settings).text
                for n in range(1, len(typed) + 1)
            ]
            if draft != "off":
                stats = completer.engine.assistant.stats
    assert suggestions["prompt-lookup"] == suggestions["off"]
    assert stats.drafted > 0


def test_assistant_needs_a_draft_token():
    with pytest.raises(ValueError, match="at least one draft token"):
        Assistant(PromptLookup(), 0)
