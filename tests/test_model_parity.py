"""Our Flax GPTBigCode against transformers' PyTorch GPTBigCodeForCausalLM, same checkpoint."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import GPTBigCodeForCausalLM

from starcoder_lsp import checkpoint
from starcoder_lsp.generate import Generator
from starcoder_lsp.model import GPTBigCode, PastKV, empty_past

TOL = 1e-4


@pytest.fixture(scope="module", params=["mqa", "mha"])
def pair(request, tiny_mqa_dir, tiny_mha_dir):
    directory = tiny_mqa_dir if request.param == "mqa" else tiny_mha_dir
    config = checkpoint.load_config(directory)
    assert config.multi_query == (request.param == "mqa")
    params = checkpoint.load_params(directory, config)
    reference = GPTBigCodeForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return GPTBigCode(config), {"params": params}, reference, directory


def _hf_logits(reference, tokens, mask=None, positions=None) -> np.ndarray:
    with torch.no_grad():
        out = reference(
            torch.tensor(np.asarray(tokens)),
            attention_mask=None if mask is None else torch.tensor(np.asarray(mask, np.int64)),
            position_ids=None if positions is None else torch.tensor(np.asarray(positions)),
        )
    return out.logits.numpy()


def _ours(model, variables, tokens, positions, valid, past=None):
    tokens = jnp.asarray(tokens, jnp.int32)
    past = past if past is not None else empty_past(model.config, tokens.shape[0], model.dtype)
    return model.apply(variables, tokens, jnp.asarray(positions), jnp.asarray(valid), past)


def test_logits_match_transformers(pair):
    model, variables, reference, _ = pair
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 40))
    positions = np.broadcast_to(np.arange(40), tokens.shape)
    logits, _ = _ours(model, variables, tokens, positions, np.ones(tokens.shape, bool))
    expected = _hf_logits(reference, tokens)
    assert np.abs(np.asarray(logits) - expected).max() <= TOL
    # The check must be able to fail: the logits are far from trivial.
    assert np.abs(expected).max() > 0.1


def test_padded_batch_matches_transformers(pair):
    model, variables, reference, _ = pair
    rng = np.random.default_rng(1)
    lengths = [30, 17, 5]
    width = max(lengths)
    tokens = np.zeros((len(lengths), width), np.int64)
    mask = np.zeros_like(tokens, bool)
    for row, n in enumerate(lengths):  # left padding, as a batch for generation is laid out
        tokens[row, width - n :] = rng.integers(1, model.config.vocab_size, n)
        mask[row, width - n :] = True
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    logits, _ = _ours(model, variables, tokens, positions, mask)
    expected = _hf_logits(reference, tokens, mask, positions)
    for row, n in enumerate(lengths):
        diff = np.abs(np.asarray(logits)[row, width - n :] - expected[row, width - n :]).max()
        assert diff <= TOL, f"row {row}: {diff}"
        # and each row equals that row alone, unpadded
        alone = _hf_logits(reference, tokens[row : row + 1, width - n :])[0]
        assert np.abs(np.asarray(logits)[row, width - n :] - alone).max() <= TOL


def test_prompt_split_across_two_calls_through_the_cache(pair):
    model, variables, reference, _ = pair
    tokens = np.random.default_rng(2).integers(0, model.config.vocab_size, (1, 48))
    first, second = tokens[:, :29], tokens[:, 29:]
    _, kv = _ours(model, variables, first, np.arange(29)[None], np.ones_like(first, bool))
    past = PastKV(kv, jnp.array([29], jnp.int32))
    logits, _ = _ours(
        model, variables, second, np.arange(29, 48)[None], np.ones_like(second, bool), past
    )
    expected = _hf_logits(reference, tokens)[:, 29:]
    assert np.abs(np.asarray(logits) - expected).max() <= TOL


def test_cached_keys_beyond_the_row_length_are_ignored(pair):
    """A reused cache slot may hold a longer, older prompt: what lies past the row's length
    must not leak into attention."""
    model, variables, reference, _ = pair
    tokens = np.random.default_rng(3).integers(0, model.config.vocab_size, (1, 20))
    _, kv = _ours(model, variables, tokens, np.arange(20)[None], np.ones_like(tokens, bool))
    stale = jnp.concatenate([kv, jnp.ones_like(kv) * 3.0], axis=3)  # junk after position 20
    nxt = np.array([[7, 8]])
    logits, _ = _ours(
        model,
        variables,
        nxt,
        np.array([[20, 21]]),
        np.ones_like(nxt, bool),
        PastKV(stale, jnp.array([20], jnp.int32)),
    )
    expected = _hf_logits(reference, np.concatenate([tokens, nxt], axis=1))[:, 20:]
    assert np.abs(np.asarray(logits) - expected).max() <= TOL


def test_cache_read_block_by_block_from_another_row(pair):
    """Attention reads the cache in blocks: 37 cached positions in blocks of 16 are three
    blocks, the last moved back inside a 40-position cache, and the batch row reads kv row 2
    of 3, whose neighbours and tail are junk."""
    model, variables, reference, _ = pair
    blocked = GPTBigCode(model.config, model.dtype, past_block=16)
    tokens = np.random.default_rng(5).integers(0, model.config.vocab_size, (1, 40))
    _, kv = _ours(blocked, variables, tokens[:, :37], np.arange(37)[None], np.ones((1, 37), bool))
    rows = jnp.full((*kv.shape[:2], 3, 40, *kv.shape[4:]), 5.0, kv.dtype)
    rows = rows.at[:, :, 2, :37].set(kv[:, :, 0])
    past = PastKV(rows, jnp.array([37], jnp.int32), jnp.array([2], jnp.int32))
    logits, _ = _ours(
        blocked, variables, tokens[:, 37:], np.arange(37, 40)[None], np.ones((1, 3), bool), past
    )
    expected = _hf_logits(reference, tokens)[:, 37:]
    assert np.abs(np.asarray(logits) - expected).max() <= TOL


def test_greedy_generation_matches_transformers_generate(pair):
    model, variables, reference, directory = pair
    generator = Generator.from_pretrained(directory, dtype=jnp.float32, chunks=(8, 32))
    prompt = generator.encode("def fibonacci(n):\n    if n < 2:\n        return n\n")
    with torch.no_grad():
        expected = reference.generate(
            torch.tensor([prompt]),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    # No early stop, so that all 32 tokens are compared.
    generator.tokens = checkpoint.SpecialTokens(-1, -2, -3, -4, None, None, None)
    (completion,) = generator.generate([prompt], max_new_tokens=32)
    assert completion.tokens == expected
    assert len(set(expected)) > 1  # not a degenerate repetition that anything would match


def test_bfloat16_runs_close_to_float32(tiny_mqa_dir):
    config = checkpoint.load_config(tiny_mqa_dir)
    tokens = np.random.default_rng(4).integers(0, config.vocab_size, (1, 16))
    positions, valid = np.arange(16)[None], np.ones_like(tokens, bool)
    out = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        params = checkpoint.load_params(tiny_mqa_dir, config, dtype=dtype)
        model = GPTBigCode(config, dtype)
        assert jax.tree_util.tree_leaves(params)[0].dtype == dtype
        out[dtype], _ = _ours(model, {"params": params}, tokens, positions, valid)
    assert out[jnp.bfloat16].dtype == jnp.float32  # logits and softmax stay in float32
    assert np.abs(np.asarray(out[jnp.bfloat16]) - np.asarray(out[jnp.float32])).max() < 0.1
