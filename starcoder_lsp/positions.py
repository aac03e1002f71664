"""LSP positions ⇄ character offsets, on the lines LSP means, in the negotiated encoding.

LSP lines end at "\\n", "\\r\\n" or "\\r" and nowhere else. `str.splitlines`, which pygls'
TextDocument uses, also ends them at form feeds, U+2028, U+0085 and five more, so a file with
one of those would number its lines differently here than in the editor; and counting "\\n"
alone puts every position of a CR-only file on line 0. Every conversion here goes through
`line_starts`, which the document store (documents.py) keeps up to date edit by edit.

`character` counts UTF-16 code units unless the client negotiated UTF-8 (bytes) or UTF-32
(code points). A position outside the document is the client's mistake: InvalidParams that
says where the document ends; the server keeps serving.
"""

from __future__ import annotations

import re

import numpy as np
from lsprotocol import types
from pygls.exceptions import JsonRpcInvalidParams

LINE_END = re.compile(r"\r\n|\r|\n")
UTF8, UTF16, UTF32 = "utf-8", "utf-16", "utf-32"
# What each encoding's code unit is in Python's codecs, and its width in bytes.
_CODECS = {UTF8: ("utf-8", 1), UTF16: ("utf-16-le", 2), UTF32: ("utf-32-le", 4)}


def line_starts(text: str) -> np.ndarray:
    """The offset at which each line of `text` starts (int64); a text of n line ends has
    n + 1 lines, the last one possibly empty."""
    ends = [m.end() for m in LINE_END.finditer(text)]
    return np.array([0, *ends], dtype=np.int64)


def spliced_starts(
    starts: np.ndarray, text: str, start: int, end: int, inserted: int
) -> np.ndarray:
    """The line starts after `inserted` characters replaced old[start:end], given those of the
    old text and `text`, the new one; only the edited stretch is scanned again.

    A line end may change meaning at either edge of the edit ("\\r" before it and "\\n" after
    it become one "\\r\\n"), so the scan covers one character before and two after the
    inserted text; line starts outside that stretch are kept (shifted after it).
    """
    low = max(0, start - 1)
    high = start + inserted + 2  # in the new text; old[end + 2] is new[high]
    kept_before = starts[starts <= low]
    scanned = [m.end() for m in LINE_END.finditer(text, low, min(len(text), high + 1))]
    scanned = [e for e in scanned if low < e < high]
    kept_after = starts[starts >= end + 2] + (start + inserted - end)
    return np.concatenate([kept_before, np.array(scanned, dtype=np.int64), kept_after])


def line_text(text: str, starts: np.ndarray, line: int) -> str:
    """Line `line` without its line end."""
    begin = int(starts[line])
    stop = int(starts[line + 1]) if line + 1 < len(starts) else len(text)
    content = text[begin:stop]
    if content.endswith("\r\n"):
        return content[:-2]
    return content[:-1] if content.endswith(("\n", "\r")) else content


def units(text: str, encoding: str) -> int:
    """The length of `text` in the encoding's code units."""
    if encoding == UTF32 or text.isascii():
        return len(text)
    codec, width = _CODECS.get(encoding, _CODECS[UTF16])
    return len(text.encode(codec, "surrogatepass")) // width


def characters(text: str, count: int, encoding: str) -> int:
    """How many characters of `text` its first `count` code units cover (a position inside a
    character counts as before it)."""
    if encoding == UTF32 or text.isascii():
        return min(count, len(text))
    codec, width = _CODECS.get(encoding, _CODECS[UTF16])
    head = text.encode(codec, "surrogatepass")[: count * width]
    return len(head.decode(codec, "ignore"))


def offset_at(text: str, starts: np.ndarray, position: types.Position, encoding: str) -> int:
    """The character offset of `position`, or InvalidParams that says why it is not one."""
    line, character = position.line, position.character
    where = f"position {line}:{character}"
    if line >= len(starts):
        raise JsonRpcInvalidParams(f"{where} is past the end of the document ({len(starts)} lines)")
    content = line_text(text, starts, line)
    width = units(content, encoding)
    if character > width:
        raise JsonRpcInvalidParams(f"{where} is past the end of its line ({width} units)")
    return int(starts[line]) + characters(content, character, encoding)


def position_at(text: str, starts: np.ndarray, offset: int, encoding: str) -> types.Position:
    """The position of a character offset (the inverse of `offset_at`)."""
    offset = max(0, min(offset, len(text)))
    line = int(np.searchsorted(starts, offset, side="right")) - 1
    begin = int(starts[line])
    return types.Position(line=line, character=units(text[begin:offset], encoding))
