"""The engine: batching across requests, prefix reuse, cancellation, supersession.

The scheduling tests run on a scripted runner whose tokens are worked out by hand and whose
decode steps the test releases one by one; the rest run the test checkpoint."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from scripted_runner import ScriptedRunner

from starcoder_lsp import checkpoint
from starcoder_lsp.engine import Engine, Request
from starcoder_lsp.generator import Generator
from starcoder_lsp.request import RequestError
from starcoder_lsp.runner import Runner


@pytest.fixture(scope="module")
def ckpt(tiny_mqa_dir):
    return checkpoint.load(tiny_mqa_dir)


@contextmanager
def running(engine: Engine) -> Iterator[Engine]:
    with engine:
        engine.start()
        assert engine.ready.wait(120)
        yield engine


def model_engine(ckpt, prefix_cache: bool = True, slots: int = 3) -> Engine:
    runner = Runner.from_checkpoint(ckpt, slots=slots, chunks=(4, 16, 64), batches=(1, 2))
    # No stop tokens, so that every comparison runs all max_new_tokens.
    return Engine(runner, ckpt.tokenizer.decode, stop_ids=[], prefix_cache=prefix_cache)


def scripted_engine(
    runner: ScriptedRunner, stop_ids: tuple[int, ...] = (), **limits: int
) -> Engine:
    decode = lambda ids: " ".join(map(str, ids))
    return Engine(runner, decode, stop_ids, clock=runner.clock, **limits)


def prefilled(runner: ScriptedRunner) -> list[list[int]]:
    return [call.tokens for call in runner.calls if call.kind == "prefill"]


def _prompt(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(20, 1000, n).tolist()


# --- scheduling, on the scripted runner ------------------------------------------------------


def test_tokens_follow_the_script_and_stop_on_a_stop_token():
    with running(scripted_engine(ScriptedRunner(), stop_ids=(12,))) as engine:
        result = engine.generate(Request([5, 6, 7], max_new_tokens=4), timeout=10)
        assert result.tokens == [8, 9, 10, 11] and result.finish_reason == "length"
        assert result.text == "8 9 10 11"
        stopped = engine.generate(Request([9], max_new_tokens=8), timeout=10)
        assert stopped.tokens == [10, 11, 12] and stopped.finish_reason == "stop"
        assert stopped.text == "10 11"  # the stop token is not part of the text


def test_requests_decode_together_and_wait_for_a_free_slot():
    runner = ScriptedRunner(slots=2)
    runner.hold()
    with running(scripted_engine(runner)) as engine:
        first = engine.submit(Request([1], max_new_tokens=3))
        runner.wait_for_step()  # decoding [1]'s second token, alone
        second = engine.submit(Request([20], max_new_tokens=3))
        third = engine.submit(Request([40], max_new_tokens=2))
        runner.run_freely()
        results = [h.result(10) for h in (first, second, third)]
    assert [r.tokens for r in results] == [[2, 3, 4], [21, 22, 23], [41, 42]]
    decodes = [call.tokens for call in runner.calls if call.kind == "decode"]
    # [1] alone, then [1] beside [20]; [40] waits for the first slot to free.
    assert decodes[:2] == [[2], [3, 21]]
    assert [call.tokens for call in runner.calls if call.kind == "prefill"] == [[1], [20], [40]]
    assert decodes[2:] == [[22, 41]]


def test_cancel_stops_between_two_steps():
    runner = ScriptedRunner()
    runner.hold()
    with running(scripted_engine(runner)) as engine:
        handle = engine.submit(Request([1], max_new_tokens=50))
        runner.wait_for_step()
        runner.release()
        runner.wait_for_step()  # inside the second decode step
        handle.cancel()
        runner.release()
        result = handle.result(10)
    # The first token came from prefill, two from the decode steps that ran.
    assert result.finish_reason == "cancelled" and result.tokens == [2, 3, 4]


def test_a_request_cancelled_in_the_queue_never_runs():
    runner = ScriptedRunner(slots=1)
    runner.hold()
    with running(scripted_engine(runner)) as engine:
        busy = engine.submit(Request([1], max_new_tokens=3))
        runner.wait_for_step()
        queued = engine.submit(Request([30], max_new_tokens=3))
        queued.cancel()
        runner.run_freely()
        result = queued.result(10)
        assert busy.result(10).finish_reason == "length"
    assert result.finish_reason == "cancelled" and result.tokens == []
    assert [30] not in [call.tokens for call in runner.calls]


def test_a_newer_request_of_the_same_group_supersedes_the_older():
    runner = ScriptedRunner()
    runner.hold()
    with running(scripted_engine(runner)) as engine:
        old = engine.submit(Request([1], max_new_tokens=50, group="doc"))
        runner.wait_for_step()
        new = engine.submit(Request([1, 2, 3], max_new_tokens=2, group="doc"))
        other = engine.submit(Request([7], max_new_tokens=2, group="other"))
        runner.run_freely()
        assert old.result(10).finish_reason == "superseded"
        assert old.result().tokens == [2, 3]
        assert new.result(10).tokens == [4, 5] and new.result().finish_reason == "length"
        assert other.result(10).tokens == [8, 9]


def test_the_prefix_cache_reuses_exactly_what_a_slot_holds():
    runner = ScriptedRunner(slots=1)
    with running(scripted_engine(runner)) as engine:
        engine.generate(Request([5, 6, 7], max_new_tokens=3), timeout=10)  # the slot: 5..9
        again = engine.generate(Request([5, 6, 7, 8, 9, 10], max_new_tokens=2), timeout=10)
    # 5, 6, 7 and the generated 8, 9 were written (10 was sampled, never run).
    assert again.reused_tokens == 5 and again.prefilled_tokens == 1
    assert runner.calls[-2].kind == "prefill" and runner.calls[-2].start == [5]


# --- many owners: round robin, limits, leaving ------------------------------------------------


def test_slots_go_to_the_owners_in_turn_not_first_come_first_served():
    runner = ScriptedRunner(slots=1)
    runner.hold()
    with running(scripted_engine(runner)) as engine:
        busy = engine.submit(Request([1], max_new_tokens=2, owner="a"))
        runner.wait_for_step()
        handles = [
            engine.submit(Request(ids, max_new_tokens=1, owner=owner))
            for ids, owner in (([2], "a"), ([3], "a"), ([4], "a"), ([10], "b"), ([20], "c"))
        ]
        runner.run_freely()
        assert all(h.result(10).finish_reason == "length" for h in [busy, *handles])
    # First come first served would be 2, 3, 4, 10, 20: a flooding owner would go first.
    assert prefilled(runner) == [[1], [2], [10], [20], [3], [4]]


def test_an_owner_s_oldest_waiting_request_is_superseded_past_its_queue_limit():
    runner = ScriptedRunner(slots=1)
    runner.hold()
    with running(scripted_engine(runner, max_queued=2)) as engine:
        busy = engine.submit(Request([1], max_new_tokens=2, owner="a"))
        runner.wait_for_step()
        waiting = [engine.submit(Request([n], max_new_tokens=1, owner="a")) for n in (2, 3, 4, 5)]
        other = engine.submit(Request([9], max_new_tokens=1, owner="b"))  # b's own limit
        runner.run_freely()
        reasons = [h.result(10).finish_reason for h in [busy, *waiting, other]]
    assert reasons == ["length", "superseded", "superseded", "length", "length", "length"]
    assert [2] not in prefilled(runner) and [3] not in prefilled(runner)


def test_an_owner_decodes_in_at_most_its_rows_while_others_take_the_rest():
    runner = ScriptedRunner(slots=2)
    runner.hold()
    with running(scripted_engine(runner, max_rows=1)) as engine:
        first = engine.submit(Request([1], max_new_tokens=3, owner="a"))
        runner.wait_for_step()
        second = engine.submit(Request([30], max_new_tokens=1, owner="a"))
        other = engine.submit(Request([20], max_new_tokens=3, owner="b"))
        runner.run_freely()
        for handle in (first, second, other):
            assert handle.result(10).finish_reason == "length"
    decodes = [call.tokens for call in runner.calls if call.kind == "decode"]
    # a's second request waits for a's first, though a slot is free; b's takes that slot.
    assert decodes[:3] == [[2], [3, 21], [22]]
    assert prefilled(runner) == [[1], [20], [30]]


def test_dropping_an_owner_stops_its_requests_running_or_waiting():
    runner = ScriptedRunner(slots=1)
    runner.hold()
    with running(scripted_engine(runner)) as engine:
        running_one = engine.submit(Request([1], max_new_tokens=50, owner="gone"))
        runner.wait_for_step()
        waiting = engine.submit(Request([5], max_new_tokens=50, owner="gone"))
        staying = engine.submit(Request([9], max_new_tokens=2, owner="here"))
        assert engine.drop("gone") == 2
        runner.run_freely()
        assert running_one.result(10).finish_reason == "disconnected"
        assert len(running_one.result().tokens) < 50
        assert waiting.result(10).finish_reason == "disconnected"
        assert staying.result(10).tokens == [10, 11]
    assert [5] not in prefilled(runner)


def test_a_long_prompt_is_prefilled_in_chunks_between_the_other_rows_steps():
    runner = ScriptedRunner(slots=2)
    runner.hold()
    with running(scripted_engine(runner, prefill_chunk=4)) as engine:
        decoding = engine.submit(Request([1], max_new_tokens=12, owner="a"))
        runner.wait_for_step()
        long = engine.submit(Request(list(range(20, 30)), max_new_tokens=1, owner="b"))
        runner.run_freely()
        assert long.result(10).tokens == [30]
        assert decoding.result(10).tokens == list(range(2, 14))
    kinds = [(call.kind, len(call.tokens)) for call in runner.calls]
    # a keeps decoding while b's 10 tokens go in as 4 + 4 + 2, a chunk (costing as much as
    # a step) after every two steps; a's own prefill is owed like a chunk.
    chunk, step, last = ("prefill", 4), ("decode", 1), ("prefill", 2)
    assert kinds[:10] == [("prefill", 1), *[step, step, chunk] * 2, step, step, last]


def test_prefill_takes_a_third_of_the_time_while_rows_decode():
    """A chunk that costs two decode steps (by the runner's clock) is followed by four steps
    of the decoding rows before the next chunk (and so is the decoding row's own prefill)."""
    runner = ScriptedRunner(slots=3, prefill_cost=2)
    runner.hold()
    with running(scripted_engine(runner, prefill_chunk=4)) as engine:
        decoding = engine.submit(Request([1], max_new_tokens=20, owner="a"))
        runner.wait_for_step()
        long = engine.submit(Request(list(range(20, 32)), max_new_tokens=1, owner="b"))
        runner.run_freely()
        assert long.result(10).tokens == [32]
        assert decoding.result(10).finish_reason == "length"
    kinds = [(call.kind, len(call.tokens)) for call in runner.calls]
    chunk, step = ("prefill", 4), ("decode", 1)
    assert kinds[:16] == [("prefill", 1), *([step] * 4 + [chunk]) * 3]


def test_a_row_that_starts_decoding_just_after_a_chunk_does_not_get_the_next_at_once():
    """A chunk that ran while nothing decoded is owed as much as one beside decoding rows:
    the keystroke that arrives during it decodes for twice its cost before the next."""
    runner = ScriptedRunner(slots=3, prefill_cost=2)
    engine = scripted_engine(runner, prefill_chunk=4)
    keystroke: list = []
    prefill = runner.prefill

    def prefill_then_type(*args: object) -> object:
        if not keystroke:  # the first chunk is running: the user types
            keystroke.append(engine.submit(Request([40], max_new_tokens=8, owner="a")))
        return prefill(*args)

    runner.prefill = prefill_then_type
    first = engine.submit(Request(list(range(20, 32)), max_new_tokens=1, owner="b"))
    second = engine.submit(Request(list(range(60, 72)), max_new_tokens=1, owner="c"))
    with running(engine):
        for handle in (first, second, *keystroke):
            handle.result(10)
    kinds = [(call.kind, call.tokens[0]) for call in runner.calls]
    step = ("decode", None)
    kinds = [step if kind == "decode" else (kind, token) for kind, token in kinds]
    assert kinds[:8] == [
        ("prefill", 20),
        ("prefill", 40),
        *[step] * 4,
        ("prefill", 60),
        step,
    ]


def test_owners_take_turns_for_prefill_however_many_rows_they_have():
    runner = ScriptedRunner(slots=4)
    runner.hold()
    with running(scripted_engine(runner, prefill_chunk=4)) as engine:
        busy = engine.submit(Request([1], max_new_tokens=40, owner="c"))
        runner.wait_for_step()
        first = engine.submit(Request(list(range(20, 32)), max_new_tokens=1, owner="a"))
        second = engine.submit(Request(list(range(40, 52)), max_new_tokens=1, owner="a"))
        other = engine.submit(Request(list(range(60, 72)), max_new_tokens=1, owner="b"))
        runner.run_freely()
        for handle in (busy, first, second, other):
            handle.result(10)
    starts = [call.tokens[0] for call in runner.calls if call.kind == "prefill"][1:]
    # a has two prompts and b one: b's chunks come every other turn, not every third.
    assert starts[:6] == [20, 60, 40, 64, 24, 68]


def test_a_keystroke_s_prompt_goes_before_a_long_one():
    runner = ScriptedRunner(slots=3, prefill_cost=2)
    runner.hold()
    with running(scripted_engine(runner, prefill_chunk=4)) as engine:
        decoding = engine.submit(Request([1], max_new_tokens=12, owner="a"))
        runner.wait_for_step()
        long = engine.submit(Request(list(range(20, 32)), max_new_tokens=1, owner="b"))
        keystroke = engine.submit(Request([40, 41], max_new_tokens=1, owner="c"))
        runner.run_freely()
        for handle in (decoding, long, keystroke):
            handle.result(10)
    assert prefilled(runner)[:3] == [[1], [40, 41], [20, 21, 22, 23]]


def test_a_long_prompt_alone_is_prefilled_in_the_largest_pieces():
    runner = ScriptedRunner(slots=2, max_len=1024)
    prompt = [n % 50 + 1 for n in range(600)]
    with running(scripted_engine(runner, prefill_chunk=4)) as engine:
        assert engine.generate(Request(prompt, max_new_tokens=1), 10).finish_reason == "length"
    assert [len(tokens) for tokens in prefilled(runner)] == [256, 256, 88]


def test_a_prompt_is_made_only_for_a_request_that_leaves_the_queue():
    made = []

    def prompt(ids: list[int]):
        return lambda: made.append(ids) or ids

    runner = ScriptedRunner(slots=1)
    runner.hold()
    with running(scripted_engine(runner, max_queued=1)) as engine:
        busy = engine.submit(Request([], max_new_tokens=2, owner="a", prompt=prompt([1])))
        runner.wait_for_step()
        waiting = [
            engine.submit(Request([], max_new_tokens=1, owner="a", prompt=prompt([n])))
            for n in (2, 3, 4)
        ]
        runner.run_freely()
        reasons = [h.result(10).finish_reason for h in [busy, *waiting]]
    assert reasons == ["length", "superseded", "superseded", "length"]
    assert made == [[1], [4]]


def test_a_request_whose_prompt_is_being_made_is_not_pushed_out_by_newer_ones():
    """Newer requests keep coming while each prompt is made (a client keeping many in
    flight): the one being admitted is served, not superseded after its prompt was made."""
    engine = scripted_engine(ScriptedRunner(slots=2), max_queued=1)

    def prompt(n: int):
        def make() -> list[int]:
            if n < 5:  # the next request arrives while this prompt is being made
                later.append(engine.submit(Request([], 1, owner="a", prompt=prompt(n + 1))))
            return [n]

        return make

    with running(engine):
        later = [engine.submit(Request([], 1, owner="a", prompt=prompt(1)))]
        reasons = [later[n].result(10).finish_reason for n in range(5)]
    assert reasons == ["length"] * 5


class FailingRunner(ScriptedRunner):
    """Fails to prefill any prompt that holds the token 99."""

    def prefill(self, cache, slot, tokens, start):
        if 99 in tokens:
            raise RuntimeError("the device is on fire")
        return super().prefill(cache, slot, tokens, start)


def test_a_request_that_fails_is_answered_with_the_error_logged_once(caplog):
    def stop(text: str) -> bool:
        raise ZeroDivisionError("a stop rule divided by zero")

    with running(scripted_engine(FailingRunner())) as engine, caplog.at_level(logging.ERROR):

        def prompt() -> list[int]:
            raise ValueError("the tokenizer choked")

        failing = [
            engine.submit(Request([99], max_new_tokens=2)),
            engine.submit(Request([7], max_new_tokens=2, stop=stop)),
            engine.submit(Request([], max_new_tokens=2, prompt=prompt)),
        ]
        causes = ("on fire", "divided by zero", "choked")
        for handle, cause in zip(failing, causes, strict=True):
            with pytest.raises(RequestError, match=cause):
                handle.result(10)
        # The engine goes on serving, and the slots came back.
        for _ in range(3):
            assert engine.generate(Request([5], max_new_tokens=2), timeout=10).tokens == [6, 7]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 3, [r.getMessage() for r in errors]


# --- on the test checkpoint ----------------------------------------------------------------


def test_engine_matches_the_generator(ckpt):
    generator = Generator(ckpt, chunks=(8,))
    generator.tokens = checkpoint.SpecialTokens(-1, -2, -3, -4, None, None, None)
    with running(model_engine(ckpt)) as engine:
        for seed in range(3):
            prompt = _prompt(30 + seed * 7, seed)
            result = engine.generate(Request(prompt, max_new_tokens=10), timeout=60)
            assert result.tokens == generator.generate([prompt], 10)[0].tokens
            assert result.finish_reason == "length"


def test_prefix_cache_gives_identical_output_and_prefills_only_the_new_tokens(ckpt):
    # A prompt that grows a few tokens at a time, as typing does in SPM order.
    base = _prompt(80, 1)
    growing = [base + _prompt(k, 2)[:k] for k in range(1, 12, 2)]
    outputs = {}
    for cached in (True, False):
        with running(model_engine(ckpt, prefix_cache=cached)) as engine:
            outputs[cached] = [
                engine.generate(Request(p, max_new_tokens=6), timeout=60) for p in growing
            ]
    assert [r.tokens for r in outputs[True]] == [r.tokens for r in outputs[False]]
    assert [r.prefilled_tokens for r in outputs[False]] == [len(p) for p in growing]
    later = outputs[True][1:]
    # Reused: the previous prompt plus the tokens generated after it, as far as they agree.
    assert all(r.reused_tokens >= 80 for r in later)
    assert all(r.prefilled_tokens <= 2 + 6 for r in later)


def test_more_requests_than_slots_all_finish_and_match_alone(ckpt):
    with running(model_engine(ckpt, slots=2)) as engine:
        prompts = [_prompt(10 + 5 * i, 10 + i) for i in range(5)]
        alone = [engine.generate(Request(p, max_new_tokens=5), timeout=60).tokens for p in prompts]
        handles = [engine.submit(Request(p, max_new_tokens=5)) for p in prompts]
        together = [h.result(60).tokens for h in handles]
    assert together == alone


def test_newer_request_supersedes_older_of_the_same_group(ckpt):
    with running(model_engine(ckpt)) as engine:
        old = engine.submit(Request(_prompt(40, 3), max_new_tokens=200, group="doc"))
        new = engine.submit(Request(_prompt(41, 3), max_new_tokens=3, group="doc"))
        other = engine.submit(Request(_prompt(20, 4), max_new_tokens=3, group="other"))
        assert old.result(60).finish_reason == "superseded"
        assert len(old.result().tokens) < 200
        assert new.result(60).finish_reason == "length"
        assert other.result(60).finish_reason == "length"


def test_cancel_stops_between_steps_and_the_slot_stays_reusable(ckpt):
    with running(model_engine(ckpt)) as engine:
        prompt = _prompt(50, 5)
        early = engine.submit(Request(prompt, max_new_tokens=400))
        early.cancel()  # most likely still queued: then it never runs
        assert early.result(60).finish_reason == "cancelled"

        started = threading.Event()
        running_request = engine.submit(
            Request(prompt, max_new_tokens=400, stop=lambda _: started.set() or False)
        )
        assert started.wait(60)  # it is decoding now
        running_request.cancel()
        result = running_request.result(60)
        assert result.finish_reason == "cancelled" and len(result.tokens) < 400
        # What it wrote stays valid: the same prompt reuses all of it but the last token.
        again = engine.generate(Request(prompt, max_new_tokens=2), timeout=60)
        assert again.reused_tokens == len(prompt) - 1


def test_cache_memory_is_reported(ckpt):
    with running(model_engine(ckpt, slots=3)) as engine:
        c = ckpt.config
        expected = 3 * c.n_layer * 2 * c.n_positions * c.kv_heads * c.head_dim * 4
        assert engine.runner.cache_bytes == expected
        assert f"3 slots × {c.n_positions} positions" in engine.describe()


def test_stop_rule_and_bad_requests(ckpt):
    with running(model_engine(ckpt)) as engine:
        free = engine.generate(Request(_prompt(20, 6), max_new_tokens=8), timeout=60)
        target = free.text[: max(1, len(free.text) // 2)]
        stop = lambda text: text.startswith(target) and len(text) >= len(target)
        stopped = engine.generate(Request(_prompt(20, 6), max_new_tokens=8, stop=stop), 60)
        assert stopped.finish_reason == "stop" and len(stopped.tokens) <= len(free.tokens)
        with pytest.raises(ValueError, match="at least one"):
            engine.submit(Request([]))
        with pytest.raises(ValueError, match="exceed the context"):
            engine.submit(Request(_prompt(500), max_new_tokens=100))
