"""FIM prompts: exact token sequences, budgets, line-boundary cuts, windows that hold still."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from starcoder_lsp import checkpoint
from starcoder_lsp.cache import common_prefix
from starcoder_lsp.prompt import PromptOptions, build_prompt, default_budgets

SOURCE = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text()


@pytest.fixture(scope="module")
def tok(tiny_mqa_dir):
    return checkpoint.load_tokenizer(tiny_mqa_dir)


def enc(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_psm_and_spm_token_by_token(tok):
    tokenizer, t = tok
    text = "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n"
    cursor = text.index("a + b")
    prefix, suffix = text[:cursor], text[cursor:]
    big = dict(prefix_tokens=1000, suffix_tokens=1000)
    psm = build_prompt(text, cursor, tokenizer, t, PromptOptions(mode="psm", **big))
    spm = build_prompt(text, cursor, tokenizer, t, PromptOptions(mode="spm", **big))
    assert psm.ids == [
        t.fim_prefix,
        *enc(tokenizer, prefix),
        t.fim_suffix,
        *enc(tokenizer, suffix),
        t.fim_middle,
    ]
    assert spm.ids == [
        t.fim_prefix,
        t.fim_suffix,
        *enc(tokenizer, suffix),
        t.fim_middle,
        *enc(tokenizer, prefix),
    ]
    assert (spm.prefix, spm.suffix, spm.prefix_start, spm.suffix_end) == (
        prefix,
        suffix,
        0,
        len(text),
    )
    # The special ids come from the tokenizer's vocabulary, by name.
    vocab = tokenizer.get_vocab()
    assert spm.ids[:2] == [vocab["<fim_prefix>"], vocab["<fim_suffix>"]]


def test_filename_header_only_when_asked(tok):
    tokenizer, t = tok
    options = PromptOptions(prefix_tokens=100, suffix_tokens=100, filename="pkg/mod.py")
    with_name = build_prompt("x = 1\n", 4, tokenizer, t, options)
    assert with_name.ids[0] == t.filename
    assert with_name.ids[1 : 1 + len(enc(tokenizer, "pkg/mod.py\n"))] == enc(
        tokenizer, "pkg/mod.py\n"
    )
    plain = build_prompt(
        "x = 1\n", 4, tokenizer, t, PromptOptions(prefix_tokens=100, suffix_tokens=100)
    )
    assert plain.ids[0] == t.fim_prefix and t.filename not in plain.ids


def test_budgets_are_respected_and_cuts_fall_on_line_boundaries(tok):
    tokenizer, t = tok
    cursor = len(SOURCE) // 2
    options = PromptOptions(prefix_tokens=600, suffix_tokens=200)
    prompt = build_prompt(SOURCE, cursor, tokenizer, t, options)
    assert 0 < len(enc(tokenizer, prompt.prefix)) <= 600
    assert 0 < len(enc(tokenizer, prompt.suffix)) <= 200
    assert prompt.prefix_start > 0 and SOURCE[prompt.prefix_start - 1] == "\n"
    assert prompt.suffix_end < len(SOURCE) and SOURCE[prompt.suffix_end - 1] == "\n"
    assert prompt.prefix == SOURCE[prompt.prefix_start : cursor]
    assert len(prompt.ids) == 3 + len(enc(tokenizer, prompt.prefix)) + len(
        enc(tokenizer, prompt.suffix)
    )
    # Most of the budget is used: the window is not cut needlessly short.
    assert len(enc(tokenizer, prompt.prefix)) > 600 * 0.5


def test_windows_hold_still_while_typing(tok):
    tokenizer, t = tok
    start = SOURCE.index("\n", len(SOURCE) // 2) + 1
    typed = SOURCE[start : start + 1200]
    before, after = SOURCE[:start], SOURCE[start + 1200 :]
    options = PromptOptions(prefix_tokens=400, suffix_tokens=300)
    prompts = []
    for n in range(0, len(typed) + 1, 2):
        text = before + typed[:n] + after
        prompts.append(build_prompt(text, start + n, tokenizer, t, options))
    starts = [p.prefix_start for p in prompts]
    ends_from_end = [
        len(before) + n - p.suffix_end
        for n, p in zip(range(0, len(typed) + 1, 2), prompts, strict=True)
    ]
    # 600 keystrokes, most of a budget typed, and the window moved in a few coarse jumps...
    moves = sum(a != b for a, b in zip(starts, starts[1:], strict=False))
    assert 1 <= moves <= 8
    # ...each of several lines at once (the text before the cursor is the original's).
    jumps = [(a, b) for a, b in zip(starts, starts[1:], strict=False) if b != a]
    assert all(b > a and SOURCE[a:b].count("\n") >= 5 for a, b in jumps)
    # The suffix window, counted from the document's end, never moved.
    assert (
        len(
            {
                p.suffix_end - (len(before) + n)
                for n, p in zip(range(0, len(typed) + 1, 2), prompts, strict=True)
            }
        )
        == 1
    )
    assert ends_from_end  # computed for every prompt


def test_spm_prompts_share_all_but_their_tail_while_typing(tok):
    tokenizer, t = tok
    start = SOURCE.index("\n", len(SOURCE) // 3) + 1
    typed = "    result = self.parse_known_args(args, namespace)\n"
    before, after = SOURCE[:start], SOURCE[start:]
    options = PromptOptions(prefix_tokens=4000, suffix_tokens=1000)
    previous = None
    appended = []
    for n in range(1, len(typed) + 1):
        prompt = build_prompt(before + typed[:n] + after, start + n, tokenizer, t, options)
        if previous is not None and prompt.prefix_start == previous.prefix_start:
            shared = common_prefix(previous.ids, prompt.ids)
            appended.append(len(prompt.ids) - shared)
            assert shared >= len(previous.ids) - 3  # only the last word may re-tokenise
        previous = prompt
    assert len(appended) > len(typed) // 2
    assert sorted(appended)[len(appended) // 2] <= 3  # median new tokens per keystroke


def test_psm_prompts_change_after_the_prefix(tok):
    tokenizer, t = tok
    text = "a = 1\nb = 2\n"
    one = build_prompt(text, 6, tokenizer, t, PromptOptions(mode="psm"))
    two = build_prompt(text[:6] + "c" + text[6:], 7, tokenizer, t, PromptOptions(mode="psm"))
    assert common_prefix(one.ids, two.ids) <= len(enc(tokenizer, "a = 1\n")) + 1


def test_edges(tok):
    tokenizer, t = tok
    empty = build_prompt("", 0, tokenizer, t, PromptOptions())
    assert empty.ids == [t.fim_prefix, t.fim_suffix, t.fim_middle]
    start = build_prompt("x = 1\n", 0, tokenizer, t, PromptOptions())
    assert start.prefix == "" and start.suffix == "x = 1\n"
    end = build_prompt("x = 1\n", 6, tokenizer, t, PromptOptions())
    assert end.prefix == "x = 1\n" and end.suffix == ""
    for bad in (-1, 7):
        with pytest.raises(ValueError, match="outside the document"):
            build_prompt("x = 1\n", bad, tokenizer, t, PromptOptions())
    with pytest.raises(ValueError, match="spm"):
        PromptOptions(mode="pms")


def test_default_budgets_fit_the_context():
    prefix, suffix = default_budgets(8192, 64)
    assert prefix + suffix + 64 + 4 <= 8192
    assert prefix > 2 * suffix > 0
