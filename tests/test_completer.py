"""Document + cursor → suggestion: exact reuse across keystrokes, typing through a suggestion."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
from scripted_runner import ScriptedRunner

from starcoder_lsp import checkpoint
from starcoder_lsp.completer import ALIGN, Completer, Settings, stretch
from starcoder_lsp.context import CrossFile, Source
from starcoder_lsp.engine import Engine
from starcoder_lsp.generate import Runner
from starcoder_lsp.request import Handle, Request, RequestError, Result
from starcoder_lsp.settings import SettingsError

SOURCE = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()


@pytest.fixture(scope="module")
def ckpt(tiny_mqa_dir):
    return checkpoint.load(tiny_mqa_dir)


def _completer(ckpt, prefix_cache: bool) -> Completer:
    runner = Runner(
        ckpt.config, ckpt.params, ckpt.mesh, ckpt.dtype, slots=2, chunks=(4, 16, 64), batches=(1, 2)
    )
    engine = Engine(runner, ckpt.tokenizer.decode, ckpt.tokens.stop_ids, prefix_cache)
    engine.start()
    assert engine.ready.wait(120)
    return Completer(engine, ckpt.tokenizer, ckpt.tokens)


def _typing(start_line: int, chars: int) -> list[tuple[str, int]]:
    """(document, cursor) after each character of typing a stretch of a real file back."""
    start = sum(len(line) for line in SOURCE.splitlines(keepends=True)[:start_line])
    before, typed, after = SOURCE[:start], SOURCE[start : start + chars], SOURCE[start + chars :]
    return [(before + typed[:n] + after, start + n) for n in range(1, chars + 1)]


# The test model's context is 512 tokens: budgets that make the windows move while typing.
SETTINGS = Settings(max_new_tokens=8, prefix_tokens=300, suffix_tokens=120)


@pytest.mark.parametrize("mode", ["spm", "psm"])
def test_suggestions_with_and_without_the_cache_are_identical(ckpt, mode):
    settings = Settings(**{**SETTINGS.__dict__, "fim_mode": mode})
    keystrokes = _typing(60, 120)
    runs = {}
    for cached in (True, False):
        completer = _completer(ckpt, cached)
        try:
            runs[cached] = [
                completer.complete("doc", text, cursor, settings) for text, cursor in keystrokes
            ]
        finally:
            completer.engine.close()
    model_made = [
        (a, b)
        for a, b in zip(runs[True], runs[False], strict=True)
        if not a.typed_through and not b.typed_through
    ]
    assert len(model_made) > 20
    assert [a.result.tokens for a, _ in model_made] == [b.result.tokens for _, b in model_made]
    assert [a.text for a in runs[True]] == [b.text for b in runs[False]]
    cached_prefill = sorted(a.result.prefilled_tokens for a, _ in model_made)
    full_prefill = sorted(b.result.prefilled_tokens for _, b in model_made)
    if mode == "spm":  # a keystroke appends to an SPM prompt: a few tokens to prefill
        assert cached_prefill[len(cached_prefill) // 2] <= 8
    assert full_prefill[0] > 100  # the cache-less run prefilled whole prompts


def test_typing_through_a_suggestion_answers_without_the_model(ckpt):
    completer = _completer(ckpt, True)
    try:
        settings = Settings(max_new_tokens=12, min_chars=1, multiline="never")
        text, cursor = _typing(40, 30)[-1]
        for _ in range(10):  # find a position where the model suggests at least 2 characters
            first = completer.complete("doc", text, cursor, settings)
            if len(first.text) >= 2:
                break
            text, cursor = text[:cursor] + "x" + text[cursor:], cursor + 1
        assert len(first.text) >= 2, "the test model never suggested anything"
        typed = first.text[0]
        after = completer.complete(
            "doc", text[:cursor] + typed + text[cursor:], cursor + 1, settings
        )
        assert after.typed_through and after.text == first.text[1:]
        requests = completer.engine.prefix_cache.stats.requests
        # Typing something else asks the model again.
        other = "\x01" if first.text[0] != "\x01" else "\x02"
        again = completer.complete(
            "doc", text[:cursor] + other + text[cursor:], cursor + 1, settings
        )
        assert not again.typed_through
        assert completer.engine.prefix_cache.stats.requests == requests + 1
    finally:
        completer.engine.close()


def test_a_newer_keystroke_supersedes_the_older_request(ckpt):
    completer = _completer(ckpt, True)
    try:
        (text1, cur1), (text2, cur2) = _typing(50, 2)
        slow = completer.start("doc", text1, cur1, Settings(max_new_tokens=400, multiline="always"))
        fast = completer.start("doc", text2, cur2, SETTINGS)
        older = slow.future.result(60)
        assert older.text == "" and older.result.finish_reason in ("superseded", "stop")
        assert fast.future.result(60).result.finish_reason in ("stop", "length")
    finally:
        completer.engine.close()


def test_settings_are_checked():
    with pytest.raises(ValueError, match="fimMode"):
        Settings(fim_mode="mps")
    with pytest.raises(ValueError, match="maxNewTokens"):
        Settings(max_new_tokens=0)
    with pytest.raises(ValueError, match="multiline"):
        Settings(multiline="sometimes")


class _Answers:
    """An engine stand-in that answers every request with `tokens`, decoded by `decode`, as
    if the token limit had stopped it there."""

    context = 512

    def __init__(self, tokens: list[int], decode) -> None:
        self.tokens = tokens
        self.decode = decode

    def submit(self, request: Request) -> Handle:
        handle = Handle(request)
        text = self.decode(self.tokens)
        n = len(request.ids)
        result = Result(self.tokens, text, "length", n, 0, n, 0.0, 0.0, 0.0, len(self.tokens))
        handle.future.set_result(result)
        return handle


def test_a_character_cut_by_the_token_limit_is_never_sent_half(tiny_mqa_dir):
    """The byte-level tokenizer splits a rare 4-byte character into byte tokens; a limit that
    stops after some of them leaves U+FFFD in the decoded text. The suggestion drops it, and
    the control characters the model wrote."""
    tokenizer, tokens = checkpoint.load_tokenizer(tiny_mqa_dir)
    written = "name = 'ab\x1b[1m\x07\U0001d518'"
    ids = tokenizer.encode(written)
    cuts = [k for k in range(1, len(ids)) if "\ufffd" in tokenizer.decode(ids[:k])]
    assert cuts, "the test tokenizer kept the 4-byte character in one token"
    settings = Settings(max_new_tokens=len(ids), multiline="never")
    for k in cuts:
        completer = Completer(_Answers(ids[:k], tokenizer.decode), tokenizer, tokens)
        suggestion = completer.complete("doc", "x = 1\n", 6, settings)
        assert suggestion.text == "name = 'ab[1m", (k, suggestion.result.text)
    whole = Completer(_Answers(ids, tokenizer.decode), tokenizer, tokens)
    assert whole.complete("doc", "x = 1\n", 6, settings).text == "name = 'ab[1m\U0001d518'"


def test_settings_that_do_not_fit_the_model_are_refused_before_the_engine(ckpt):
    completer = _completer(ckpt, True)
    try:
        text, cursor = _typing(40, 1)[0]
        with pytest.raises(SettingsError, match="context of 512"):
            completer.start("doc", text, cursor, Settings(max_new_tokens=600))
        with pytest.raises(SettingsError, match="prefixTokens 500"):
            completer.start("doc", text, cursor, Settings(prefix_tokens=500, suffix_tokens=50))
    finally:
        completer.engine.close()


def test_a_failure_while_making_the_suggestion_resolves_it_with_the_error(ckpt, monkeypatch):
    completer = _completer(ckpt, True)
    try:

        def broken(*args, **kwargs):
            raise KeyError("post-processing broke")

        monkeypatch.setattr("starcoder_lsp.postprocess.cut_completion", broken)
        text, cursor = _typing(40, 1)[0]
        pending = completer.start("doc", text, cursor, Settings(multiline="never"))
        with pytest.raises(RequestError, match="post-processing broke"):
            pending.future.result(60)
    finally:
        completer.engine.close()


def test_the_text_around_the_cursor_is_whole_lines_and_stays_put_while_typing():
    line = "x = 12345678\n"
    text = line * 100_000  # 1.3 MB
    cursor = len(text) // 2
    start, end = stretch(text, cursor, 10_000, 5_000)
    assert start <= cursor - 10_000 and cursor - start < 10_000 + ALIGN + len(line)
    assert end >= cursor + 5_000 and end - cursor < 5_000 + len(line)
    assert text[start - 1] == "\n" and text[end] == "\n"
    # Typing at the cursor moves neither the start nor the text after the cursor.
    typed = text[:cursor] + "abc" + text[cursor:]
    start2, end2 = stretch(typed, cursor + 3, 10_000, 5_000)
    assert start2 == start and typed[cursor + 3 : end2] == text[cursor:end]
    # A short document is taken whole.
    assert stretch("a\nb", 1, 10_000, 5_000) == (0, 3)
    # Cut again out of a wider stretch (what a waiting request holds), it is the same.
    for cursor in (len(text) // 2, len(text) // 2 + 70_000, 3 * ALIGN + 5, 12_000):
        wide_start, wide_end = stretch(text, cursor, 200_000, 80_000)
        wide = text[wide_start:wide_end]
        for before, after in ((10_000, 5_000), (150_000, 1), (0, 0)):
            start, end = stretch(wide, cursor - wide_start, before, after, wide_start)
            assert (wide_start + start, wide_start + end) == stretch(text, cursor, before, after)


def test_a_request_superseded_while_it_waits_costs_no_prompt_and_no_context(ckpt):
    """A client that sends keystroke after keystroke while the model is busy costs the
    server what it admits, not what it sends: the cross-file block and the prompt are made
    when the engine admits a request, and only the newest of a document's is admitted."""
    runner = ScriptedRunner(slots=1, max_len=512)
    runner.hold()
    engine = Engine(runner, ckpt.tokenizer.decode, stop_ids=[])
    engine.start()
    assert engine.ready.wait(60)
    try:
        completer = Completer(engine, ckpt.tokenizer, ckpt.tokens)
        others = [Source("other.py", "other.py", SOURCE[:6000])]
        cross = CrossFile(lambda: others)
        cross.opened("other.py")
        settings = Settings(max_new_tokens=4, prefix_tokens=100, suffix_tokens=50)
        busy = completer.start("busy.py", "import textwrap\n", 16, settings, context=cross)
        runner.wait_for_step()  # busy holds the only slot
        assert cross.builds == 1
        starts = [0]
        for line in SOURCE.splitlines(keepends=True):
            starts.append(starts[-1] + len(line))
        # Each keystroke in another region of the file: each would need a block of its own.
        keystrokes = [
            completer.start("doc.py", SOURCE, starts[n], settings, context=cross)
            for n in (100, 200, 300, 400)
        ]
        assert cross.builds == 1
        runner.run_freely()
        assert busy.future.result(10).result.finish_reason == "length"
        reasons = [k.future.result(10).result.finish_reason for k in keystrokes]
        assert reasons == ["superseded"] * 3 + ["length"]
        assert [k.future.result(10).prompt is None for k in keystrokes] == [True] * 3 + [False]
        assert cross.builds == 2
        assert len(keystrokes[-1].future.result(10).context) > 0
    finally:
        engine.close()
