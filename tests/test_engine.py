"""The engine: batching across requests, prefix reuse, cancellation, supersession."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from starcoder_lsp import checkpoint
from starcoder_lsp.engine import Engine, Request
from starcoder_lsp.generate import Generator, Runner


@pytest.fixture(scope="module")
def ckpt(tiny_mqa_dir):
    return checkpoint.load(tiny_mqa_dir)


def _engine(ckpt, prefix_cache: bool = True, slots: int = 3) -> Engine:
    runner = Runner(ckpt.config, ckpt.params, ckpt.mesh, ckpt.dtype, slots=slots,
                    chunks=(4, 16, 64), batches=(1, 2))  # fmt: skip
    # No stop tokens, so that every comparison runs all max_new_tokens.
    engine = Engine(runner, ckpt.tokenizer.decode, stop_ids=[], prefix_cache=prefix_cache)
    engine.start()
    assert engine.ready.wait(120)
    return engine


def _prompt(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(20, 1000, n).tolist()


def test_engine_matches_the_generator(ckpt):
    engine = _engine(ckpt)
    generator = Generator(ckpt, chunks=(8,))
    generator.tokens = checkpoint.SpecialTokens(-1, -2, -3, -4, None, None, None)
    try:
        for seed in range(3):
            prompt = _prompt(30 + seed * 7, seed)
            result = engine.generate(Request(prompt, max_new_tokens=10), timeout=60)
            assert result.tokens == generator.generate([prompt], 10)[0].tokens
            assert result.finish_reason == "length"
    finally:
        engine.close()


def test_prefix_cache_gives_identical_output_and_prefills_only_the_new_tokens(ckpt):
    # A prompt that grows a few tokens at a time, as typing does in SPM order.
    base = _prompt(80, 1)
    growing = [base + _prompt(k, 2)[:k] for k in range(1, 12, 2)]
    outputs = {}
    for cached in (True, False):
        engine = _engine(ckpt, prefix_cache=cached)
        try:
            outputs[cached] = [
                engine.generate(Request(p, max_new_tokens=6), timeout=60) for p in growing
            ]
        finally:
            engine.close()
    assert [r.tokens for r in outputs[True]] == [r.tokens for r in outputs[False]]
    assert [r.prefilled_tokens for r in outputs[False]] == [len(p) for p in growing]
    later = outputs[True][1:]
    # Reused: the previous prompt plus the tokens generated after it, as far as they agree.
    assert all(r.reused_tokens >= 80 for r in later)
    assert all(r.prefilled_tokens <= 2 + 6 for r in later)


def test_more_requests_than_slots_all_finish_and_match_alone(ckpt):
    engine = _engine(ckpt, slots=2)
    try:
        prompts = [_prompt(10 + 5 * i, 10 + i) for i in range(5)]
        alone = [engine.generate(Request(p, max_new_tokens=5), timeout=60).tokens for p in prompts]
        handles = [engine.submit(Request(p, max_new_tokens=5)) for p in prompts]
        together = [h.result(60).tokens for h in handles]
    finally:
        engine.close()
    assert together == alone


def test_newer_request_supersedes_older_of_the_same_group(ckpt):
    engine = _engine(ckpt)
    try:
        old = engine.submit(Request(_prompt(40, 3), max_new_tokens=200, group="doc"))
        new = engine.submit(Request(_prompt(41, 3), max_new_tokens=3, group="doc"))
        other = engine.submit(Request(_prompt(20, 4), max_new_tokens=3, group="other"))
        assert old.result(60).finish_reason == "superseded"
        assert len(old.result().tokens) < 200
        assert new.result(60).finish_reason == "length"
        assert other.result(60).finish_reason == "length"
    finally:
        engine.close()


def test_cancel_stops_between_steps_and_the_slot_stays_reusable(ckpt):
    engine = _engine(ckpt)
    try:
        prompt = _prompt(50, 5)
        early = engine.submit(Request(prompt, max_new_tokens=400))
        early.cancel()  # most likely still queued: then it never runs
        assert early.result(60).finish_reason == "cancelled"

        started = threading.Event()
        running = engine.submit(
            Request(prompt, max_new_tokens=400, stop=lambda _: started.set() or False)
        )
        assert started.wait(60)  # it is decoding now
        running.cancel()
        result = running.result(60)
        assert result.finish_reason == "cancelled" and len(result.tokens) < 400
        # What it wrote stays valid: the same prompt reuses all of it but the last token.
        again = engine.generate(Request(prompt, max_new_tokens=2), timeout=60)
        assert again.reused_tokens == len(prompt) - 1
    finally:
        engine.close()


def test_cache_memory_is_reported(ckpt):
    engine = _engine(ckpt, slots=3)
    try:
        c = ckpt.config
        expected = 3 * c.n_layer * 2 * c.n_positions * c.kv_heads * c.head_dim * 4
        assert engine.runner.cache_bytes == expected
        assert f"3 slots × {c.n_positions} positions" in engine.describe()
    finally:
        engine.close()


def test_stop_rule_and_bad_requests(ckpt):
    engine = _engine(ckpt)
    try:
        free = engine.generate(Request(_prompt(20, 6), max_new_tokens=8), timeout=60)
        target = free.text[: max(1, len(free.text) // 2)]
        stopped = engine.generate(
            Request(_prompt(20, 6), max_new_tokens=8, stop=lambda text: text.startswith(target)
                    and len(text) >= len(target)),
            timeout=60,
        )  # fmt: skip
        assert stopped.finish_reason == "stop" and len(stopped.tokens) <= len(free.tokens)
        with pytest.raises(ValueError, match="at least one"):
            engine.submit(Request([]))
        with pytest.raises(ValueError, match="exceed the context"):
            engine.submit(Request(_prompt(500), max_new_tokens=100))
    finally:
        engine.close()
