"""Prompt windows in depth: exact piecewise encoding, caching, headers, long lines, limits."""

from __future__ import annotations

import dataclasses
import random
import sysconfig
from pathlib import Path

import pytest

from starcoder_lsp import checkpoint
from starcoder_lsp.prompt import (
    RESERVED_TOKENS,
    PromptOptions,
    TokenCounter,
    build_prompt,
    counter_for,
    default_budgets,
)

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SOURCE = (STDLIB / "argparse.py").read_text()
# Whitespace a per-line split could get wrong: blank lines, trailing blanks, tabs, CRLF,
# digits starting a line, non-ASCII text.
AWKWARD = (
    "def f(a):  \n\n\n\treturn [\n\t\t1,\r\n  2]\n12\n    34 + x\n# café ☕ 日本\n"
    "   \n}\n  'quote'\n" * 20
)


@pytest.fixture(scope="module")
def tok(tiny_mqa_dir):
    return checkpoint.load_tokenizer(tiny_mqa_dir)


def enc(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


class CountingTokenizer:
    """Forwards to a tokenizer and counts the characters it was asked to encode."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.chars = 0

    def encode(self, text, **kwargs):
        self.chars += len(text)
        return self.inner.encode(text, **kwargs)

    def __call__(self, texts, **kwargs):
        self.chars += sum(map(len, texts))
        return self.inner(texts, **kwargs)


class LengthTokenizer:
    """One token per text, its length: encoding pieces apart never equals encoding whole."""

    def encode(self, text, **kwargs):
        return [len(text)] if text else []

    def __call__(self, texts, **kwargs):
        return {"input_ids": [self.encode(t) for t in texts]}


@pytest.mark.parametrize("name", ["argparse.py", "json/decoder.py", "AWKWARD"])
def test_piecewise_encoding_equals_whole_encoding(tok, name):
    tokenizer, _ = tok
    text = AWKWARD if name == "AWKWARD" else (STDLIB / name).read_text()
    counter = TokenCounter(tokenizer)
    assert counter.piecewise
    rng = random.Random(0)
    for _ in range(40):
        a = rng.randrange(len(text))
        b = rng.randrange(a, min(len(text), a + 3000) + 1)
        assert counter.encode(text[a:b]) == enc(tokenizer, text[a:b]), (a, b)


def test_tokenizer_whose_pieces_do_not_compose_is_encoded_whole():
    counter = TokenCounter(LengthTokenizer())
    assert not counter.piecewise
    assert counter.encode("a = 1\nb = 22\n") == [13]


def test_document_text_never_becomes_a_control_token(tok):
    tokenizer, t = tok
    text = 'STOP = "<fim_middle>"  # and <|endoftext|>\nx = '
    for mode in ("spm", "psm"):
        ids = build_prompt(text, len(text), tokenizer, t, PromptOptions(mode=mode)).ids
        assert ids.count(t.fim_middle) == 1 and t.eos not in ids


def test_filename_header_token_by_token(tok):
    tokenizer, t = tok
    text = "import os\n\nprint(os.sep)\n"
    cursor = text.index("os.sep")
    prefix, suffix = text[:cursor], text[cursor:]
    header = [t.filename, *enc(tokenizer, "src/app/main.py\n")]
    options = PromptOptions(filename="src/app/main.py")
    psm = build_prompt(text, cursor, tokenizer, t, dataclasses.replace(options, mode="psm"))
    spm = build_prompt(text, cursor, tokenizer, t, options)
    assert psm.ids == [
        *header,
        t.fim_prefix,
        *enc(tokenizer, prefix),
        t.fim_suffix,
        *enc(tokenizer, suffix),
        t.fim_middle,
    ]
    assert spm.ids == [
        *header,
        t.fim_prefix,
        t.fim_suffix,
        *enc(tokenizer, suffix),
        t.fim_middle,
        *enc(tokenizer, prefix),
    ]
    # A tokenizer without <filename> gets no header.
    no_filename = dataclasses.replace(t, filename=None)
    plain = build_prompt(text, cursor, tokenizer, no_filename, options)
    assert plain.ids[0] == t.fim_prefix and len(plain.ids) == len(spm.ids) - len(header)


def test_header_name_counts_against_the_prefix_budget(tok):
    tokenizer, t = tok
    name = "a/rather/long/path/to/some_module_with_a_long_name.py"
    budget = 120
    options = PromptOptions(prefix_tokens=budget, suffix_tokens=50, filename=name)
    prompt = build_prompt(SOURCE, len(SOURCE) // 2, tokenizer, t, options)
    name_tokens = len(enc(tokenizer, name + "\n"))
    assert 0 < len(enc(tokenizer, prompt.prefix)) <= budget - name_tokens
    assert len(prompt.ids) <= RESERVED_TOKENS + budget + 50


def test_cursor_mid_line_windows_end_on_line_boundaries(tok):
    tokenizer, t = tok
    cursor = SOURCE.index("parse_known_args(", len(SOURCE) // 2) + 5
    prompt = build_prompt(
        SOURCE, cursor, tokenizer, t, PromptOptions(prefix_tokens=300, suffix_tokens=150)
    )
    assert SOURCE[prompt.prefix_start - 1] == "\n" and SOURCE[prompt.suffix_end - 1] == "\n"
    assert prompt.prefix == SOURCE[prompt.prefix_start : cursor]
    assert prompt.suffix == SOURCE[cursor : prompt.suffix_end]
    assert prompt.suffix.startswith("_known_args(")
    assert len(enc(tokenizer, prompt.prefix)) <= 300
    assert len(enc(tokenizer, prompt.suffix)) <= 150
    # The windows are well used: a cut jumps a quarter budget at most, plus a line.
    assert len(enc(tokenizer, prompt.prefix)) >= 300 * 0.6
    assert len(enc(tokenizer, prompt.suffix)) >= 150 * 0.6


def test_each_jump_of_the_prefix_window_is_about_a_step(tok):
    tokenizer, t = tok
    start = SOURCE.index("\n", len(SOURCE) // 2) + 1
    typed = SOURCE[start : start + 1500]
    options = PromptOptions(prefix_tokens=400, suffix_tokens=100, window_step=0.25)
    starts = []
    for n in range(0, len(typed) + 1, 3):
        text = SOURCE[:start] + typed[:n] + SOURCE[start:]
        starts.append(build_prompt(text, start + n, tokenizer, t, options).prefix_start)
    jumps = [(a, b) for a, b in zip(starts, starts[1:], strict=False) if a != b]
    assert jumps
    for a, b in jumps:
        assert b > a  # the window only moves forward while text is added
        assert len(enc(tokenizer, SOURCE[a:b])) >= 0.5 * 100  # half a step (100 tokens)


def test_keystrokes_re_encode_only_the_edited_line(tok):
    tokenizer, t = tok
    counting = CountingTokenizer(tokenizer)
    counter = TokenCounter(counting)
    document = "\n".join(SOURCE.split("\n")[:2000]) + "\n"
    cursor = document.index("\n", len(document) * 3 // 4) + 1
    options = PromptOptions(prefix_tokens=3000, suffix_tokens=1000)
    build_prompt(document, cursor, counting, t, options, counter)
    typed = "        value = namespace.get(name)"
    per_keystroke = []
    for n in range(1, len(typed) + 1):
        counting.chars = 0
        text = document[:cursor] + typed[:n] + document[cursor:]
        build_prompt(text, cursor + n, counting, t, options, counter)
        per_keystroke.append(counting.chars)
    # The document is ~73,000 characters; a keystroke encodes about its own line, twice.
    assert max(per_keystroke) < 4 * len(typed) + 200


def test_minified_line_is_windowed_within_budget(tok):
    tokenizer, t = tok
    line = "var a=1;b=[2,3];" * 6000  # one ~100,000-character line
    cursor = len(line) // 2
    options = PromptOptions(prefix_tokens=200, suffix_tokens=80)
    starts = []
    for n in range(0, 40, 2):
        text = line[:cursor] + "x" * n + line[cursor:]
        prompt = build_prompt(text, cursor + n, tokenizer, t, options)
        assert 0 < len(enc(tokenizer, prompt.prefix)) <= 200
        assert 0 < len(enc(tokenizer, prompt.suffix)) <= 80
        assert (
            prompt.prefix.endswith("x" * n)
            and prompt.suffix == text[cursor + n :][: len(prompt.suffix)]
        )
        starts.append(prompt.prefix_start)
    assert len(set(starts)) <= 3  # pieces of a long line are anchored at its start


def test_zero_budgets_give_the_bare_markers(tok):
    tokenizer, t = tok
    prompt = build_prompt(
        SOURCE, 1000, tokenizer, t, PromptOptions(prefix_tokens=0, suffix_tokens=0)
    )
    assert prompt.ids == [t.fim_prefix, t.fim_suffix, t.fim_middle]
    assert (prompt.prefix, prompt.suffix, prompt.prefix_start, prompt.suffix_end) == (
        "",
        "",
        1000,
        1000,
    )


def test_options_and_budgets_are_validated():
    with pytest.raises(ValueError, match="window_step"):
        PromptOptions(window_step=0)
    with pytest.raises(ValueError, match="window_step"):
        PromptOptions(window_step=1.5)
    with pytest.raises(ValueError, match="negative"):
        PromptOptions(prefix_tokens=-1)
    with pytest.raises(ValueError, match="no room"):
        default_budgets(64, 62)
    prefix, suffix = default_budgets(2048, 128)
    assert prefix + suffix == 2048 - 128 - RESERVED_TOKENS
    assert PromptOptions().prefix_tokens + PromptOptions().suffix_tokens == sum(
        default_budgets(8192, 64)
    )


def test_one_counter_per_tokenizer(tok):
    tokenizer, _ = tok
    assert counter_for(tokenizer) is counter_for(tokenizer)
    assert counter_for(tokenizer) is not counter_for(LengthTokenizer())
