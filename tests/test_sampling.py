"""Sampling: greedy, top-k and top-p per row, and starcoder-jax's shapes of the settings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starcoder_lsp.sampling import GREEDY_SLICES, Sampling, greedy, sample


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


def test_select_takes_rows_in_the_order_given():
    s = Sampling.rows([0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [1, 2, 3], batch=3)
    picked = s.select([2, 0])
    assert picked.temperature.tolist() == pytest.approx([0.3, 0.1])
    assert picked.top_k.tolist() == [3, 1]
    assert s.select(slice(1, 3)).top_p.tolist() == pytest.approx([0.5, 0.6])


@pytest.mark.parametrize("vocab", [7, GREEDY_SLICES, 1000, 49152])
def test_greedy_is_argmax_and_takes_the_first_of_ties(vocab):
    rng = np.random.default_rng(vocab)
    logits = rng.standard_normal((3, 2, vocab)).astype(np.float32)
    logits[0, 0, :] = 1.0  # all tied: the first
    logits[0, 1, vocab // 2 :] = 9.0  # tied across chunks: the first of them
    logits[1, 0, vocab - 1] = 9.0  # the last entry, in a padded chunk
    logits[1, 1, [vocab // 3, vocab - 1]] = 9.0
    logits[2, 0, :] = -np.inf
    got = np.asarray(jax.jit(greedy)(jnp.asarray(logits)))
    assert got.dtype == np.int32
    assert got.tolist() == np.asarray(jnp.argmax(jnp.asarray(logits), axis=-1)).tolist()
    assert got[0].tolist() == [0, vocab // 2] and got[1].tolist() == [vocab - 1, vocab // 3]
    # XLA's CPU max does not always carry NaN: a broken model's NaN logits still give a token.
    logits[1, 1, vocab // 3] = np.nan
    assert 0 <= np.asarray(jax.jit(greedy)(jnp.asarray(logits)))[1, 1] < vocab
