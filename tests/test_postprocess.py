"""Cutting and cleaning raw completions."""

from __future__ import annotations

import pytest

from starcoder_lsp.postprocess import Cut, acceptable, cut_completion, wants_multiline


@pytest.mark.parametrize(
    ("prefix", "suffix", "expected"),
    [
        ("def f(x):\n    ", "\n", True),  # empty line after a line ending in ':'
        ("def f(x):\n", "", True),
        ("int main() {\n  ", "\n}", True),
        ("items = [\n    ", "\n]", True),
        ("x = foo(", ")\n", False),  # text before the cursor on its line
        ("def f(x):\n    ", "return x\n", False),  # word characters after the cursor
        ("x = 1\n", "\n", False),  # previous line opens nothing
        ("", "", False),
        ("function f() {", "}\n", True),  # empty body between braces on one line
    ],
)
def test_wants_multiline(prefix, suffix, expected):
    assert wants_multiline(prefix, suffix) is expected


def test_special_tokens_never_reach_the_user():
    for raw in (
        "x + 1<|endoftext|>junk",
        "x + 1<fim_middle>y",
        "x + 1<file_sep>z",
        "x + 1<filename>a.py",
    ):
        assert cut_completion(raw, "y = ", "\n", False).text == "x + 1"
    assert cut_completion("<fim_suffix>x", "y = ", "\n", False).text == ""


def test_single_line_ends_at_the_line_end():
    assert cut_completion("a + b\n    return c", "x = ", "\n", False) == Cut("a + b")


def test_block_ends_where_indentation_returns():
    raw = "total = 0\n    for v in xs:\n        total += v\n    return total\n\ndef g():\n"
    cut = cut_completion(raw, "def f(xs):\n    ", "\n", True)
    assert cut.text == "total = 0\n    for v in xs:\n        total += v\n    return total"
    braces = cut_completion("x++;\n  y--;\n}\nint z;", "void f() {\n  ", "\n}", True)
    assert braces.text == "x++;\n  y--;"


def test_repeated_following_lines_are_trimmed():
    suffix = "\n    return total\n"
    cut = cut_completion("total = sum(xs)\n    return total\n", "def f(xs):\n    ", suffix, True)
    assert cut.text == "total = sum(xs)"


def test_auto_closed_bracket_is_covered_not_doubled():
    # The editor typed the ')' already; the model writes the arguments and the ')'.
    cut = cut_completion("a, b)\nnext line", "print(", ")\n", False)
    assert cut == Cut("a, b)", 1)
    both = cut_completion("1, x[0]])", "f([", "])", False)
    assert both == Cut("1, x[0]])", 2)  # 'x[0]' is balanced; '])' closes what was open


def test_unmatched_closer_without_auto_close_ends_the_suggestion():
    cut = cut_completion("a, b) + c(d", "print(", "\n", False)
    assert cut == Cut("a, b)")


def test_tail_repeating_the_rest_of_the_line_is_dropped():
    cut = cut_completion("x > 0:", "if ", ":\n", False)
    assert cut.text == "x > 0"


@pytest.mark.parametrize(
    ("text", "ok"), [("", False), ("   ", False), ("\n\t", False), ("x", True), ("ab", True)]
)
def test_acceptable(text, ok):
    assert acceptable(text) is ok


def test_minimum_length():
    assert not acceptable("ab", min_chars=3)
    assert acceptable("abc", min_chars=3)


def test_brackets_inside_strings_close_nothing():
    assert cut_completion('":)")', "print(", ")\n", False) == Cut('":)")', 1)


def test_rewriting_the_next_line_is_no_suggestion():
    cut = cut_completion("return x", "def f(x):\n    ", "\n    return x\n", False)
    assert cut.text == ""


def test_no_replacement_character_or_control_characters_reach_the_editor():
    # U+FFFD (bytes that were not UTF-8), an escape sequence, NUL, BEL, CR, DEL and a C1
    # control: all dropped; tab and newline stay.
    raw = "x = 'caf\ufffd'\x1b[31m + 1\x00\x07\r\x7f\x85\t# ok\nnext"
    assert cut_completion(raw, "y = ", "\n", False).text == "x = 'caf'[31m + 1\t# ok"
    block = cut_completion("a = 1\x00\n    b = '\ufffd\ufffd'\n", "def f():\n    ", "\n", True)
    assert block.text == "a = 1\n    b = ''"
