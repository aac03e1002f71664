"""LSP positions ⇄ offsets, without a server: LSP's line ends, the three encodings."""

from __future__ import annotations

import random

import pytest
from lsprotocol import types
from pygls.exceptions import JsonRpcInvalidParams

from starcoder_lsp.positions import (
    UTF8,
    UTF16,
    UTF32,
    line_starts,
    offset_at,
    position_at,
    spliced_starts,
)


def at(line: int, character: int) -> types.Position:
    return types.Position(line=line, character=character)


@pytest.mark.parametrize(
    ("text", "starts"),
    [
        ("", [0]),
        ("a\nb", [0, 2]),
        ("a\r\nb\r\n", [0, 3, 6]),
        ("a\rb\rc", [0, 2, 4]),  # CR alone ends a line
        ("a\r\n\nb", [0, 3, 4]),
        # Form feed, U+2028, U+0085, vertical tab and the rest end no LSP line.
        ("a\x0cb\u2028c\x85d\x0be\x1cf\nz", [0, 12]),
    ],
)
def test_lines_end_where_lsp_says(text, starts):
    assert line_starts(text).tolist() == starts


def test_a_cr_only_file_has_its_positions_on_their_own_lines():
    text = "x = 1\ry = 2\r    "
    starts = line_starts(text)
    assert offset_at(text, starts, at(1, 4), UTF16) == 10
    assert position_at(text, starts, len(text), UTF16) == at(2, 4)
    assert position_at(text, starts, 6, UTF16) == at(1, 0)


def test_characters_count_in_the_negotiated_encoding():
    text = 'n = "é😀" + x\nnext'
    starts = line_starts(text)
    end_of_emoji = text.index("😀") + 1
    # é is 1 UTF-16 unit and 2 UTF-8 bytes; 😀 is 2 units and 4 bytes.
    for encoding, character in ((UTF32, 7), (UTF16, 8), (UTF8, 11)):
        assert offset_at(text, starts, at(0, character), encoding) == end_of_emoji
        assert position_at(text, starts, end_of_emoji, encoding) == at(0, character)
    assert offset_at(text, starts, at(0, 13), UTF16) == text.index("\n")  # 13 units wide
    with pytest.raises(JsonRpcInvalidParams, match="past the end of its line"):
        offset_at(text, starts, at(0, 14), UTF16)


@pytest.mark.parametrize(
    ("position", "message"),
    [
        (at(2, 0), "past the end of the document"),
        (at(0, 6), "past the end of its line"),
    ],
)
def test_a_position_outside_the_document_says_where_it_ends(position, message):
    text = "x = 1\n"
    with pytest.raises(JsonRpcInvalidParams, match=message):
        offset_at(text, line_starts(text), position, UTF16)


def test_the_last_line_after_a_final_line_end_is_empty_and_valid():
    text = "x = 1\r\n"
    assert offset_at(text, line_starts(text), at(1, 0), UTF16) == len(text)


def test_splicing_an_edit_gives_the_line_starts_of_the_new_text():
    """Edits that join or split "\\r\\n" at either edge included: every random edit of texts
    made of line ends and other characters, against scanning the new text whole."""
    rng = random.Random(0)
    pieces = ["a", "\n", "\r", "\r\n", "é", "😀", "\x0c"]
    for _ in range(5000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        start = rng.randint(0, len(text))
        end = rng.randint(start, len(text))
        inserted = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 4)))
        new = text[:start] + inserted + text[end:]
        spliced = spliced_starts(line_starts(text), new, start, end, len(inserted))
        assert spliced.tolist() == line_starts(new).tolist(), (text, start, end, inserted)
