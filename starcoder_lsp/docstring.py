"""Docstrings on demand: find the Python function or class at a line, build the FIM split
that asks for its docstring, and turn what the model wrote into an indented docstring.

Works on text that does not parse (the user is in the middle of editing): a definition is
found by its header line and the bracket depth of what follows, not by `ast`.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass

from starcoder_lsp.postprocess import printable

QUOTES = '"""'
HEADER = re.compile(r"^(?P<indent>[ \t]*)(?:async[ \t]+def|def|class)[ \t]+(?P<name>\w+)")
STRING_START = re.compile(r"^[ \t]*(?:[rRuUbBfF]{0,2})(?:\"\"\"|'''|\"|')")
OPENING = "([{"
CLOSING = ")]}"


@dataclass(frozen=True)
class Target:
    """Where a docstring goes: a new line `body_line` (0-based) indented by `indent`."""

    name: str
    header_line: int
    body_line: int  # the docstring is inserted before this line
    indent: str


def _strip_comment(line: str) -> str:
    """The line without a trailing comment; strings are skipped so a '#' in them stays."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            return line[:i]
    return line


def _header_end(lines: list[str], start: int) -> int | None:
    """The line where the definition starting at `start` ends with ':' at bracket depth 0."""
    depth = 0
    for number in range(start, min(len(lines), start + 200)):
        code = _strip_comment(lines[number]).rstrip()
        for ch in code:
            depth += (ch in OPENING) - (ch in CLOSING)
        if depth <= 0 and code.endswith(":"):
            return number
        if depth <= 0 and number > start and not code.endswith(("\\", ",")):
            return None
    return None


def _unit(lines: list[str]) -> str:
    """The file's indentation step: a tab, or the smallest run of leading spaces (≥ 2)."""
    widths = []
    for line in lines:
        if line.startswith("\t"):
            return "\t"
        width = len(line) - len(line.lstrip(" "))
        if width and line.strip():
            widths.append(width)
    return " " * max(2, min(widths)) if widths else "    "


def find_target(text: str, line: int) -> Target | None:
    """The definition whose header covers `line`, or which `line` is in the body of, that has
    a block body and no docstring yet; None when there is none."""
    lines = text.split("\n")
    if not 0 <= line < len(lines):
        return None
    for start in range(line, -1, -1):
        match = HEADER.match(lines[start])
        if match is None:
            continue
        end = _header_end(lines, start)
        if end is None:
            continue
        if start <= line <= end or _in_body(lines, start, end, line):
            return _target(lines, start, end, match)
        if len(match["indent"]) == 0:
            return None  # a top-level definition that does not cover the line
    return None


def _in_body(lines: list[str], start: int, end: int, line: int) -> bool:
    indent = len(lines[start]) - len(lines[start].lstrip())
    for number in range(end + 1, line + 1):
        text = lines[number]
        if text.strip() and len(text) - len(text.lstrip()) <= indent:
            return False
    return True


def _target(lines: list[str], start: int, end: int, match: re.Match[str]) -> Target | None:
    body = next((n for n in range(end + 1, len(lines)) if lines[n].strip()), None)
    header_indent = match["indent"]
    if body is not None:
        body_text = lines[body]
        body_indent = body_text[: len(body_text) - len(body_text.lstrip())]
        if len(body_indent) > len(header_indent):
            if STRING_START.match(body_text):
                return None  # it has a docstring already
            return Target(match["name"], start, end + 1, body_indent)
    return Target(match["name"], start, end + 1, header_indent + _unit(lines))


def fim_split(text: str, target: Target) -> tuple[str, str]:
    """(prefix, suffix) around the docstring's middle: the prefix ends with the opening quotes,
    the suffix begins with the closing ones."""
    lines = text.split("\n")
    before = "\n".join(lines[: target.body_line]) + "\n"
    after = "\n".join(lines[target.body_line :])
    return before + target.indent + QUOTES, QUOTES + "\n" + after


def format_docstring(generated: str, indent: str) -> str:
    """The lines to insert: the model's text up to any closing quotes, its continuation lines
    re-indented to the body, closed on its own line when it spans several. Nothing an editor
    should not insert (postprocess.printable) gets through."""
    text = printable(generated.split(QUOTES, 1)[0])
    text = text.rstrip().rstrip("\\\"'").rstrip()
    first, _, rest = text.lstrip().partition("\n")
    body = [line.rstrip() for line in textwrap.dedent(rest).split("\n")] if rest else []
    while body and not body[-1]:
        body.pop()
    if not first.strip() and not body:
        return ""
    if not body:
        return f"{indent}{QUOTES}{first.strip()}{QUOTES}\n"
    continuation = "".join(f"{indent}{line}\n" if line else "\n" for line in body)
    return f"{indent}{QUOTES}{first.strip()}\n{continuation}{indent}{QUOTES}\n"


def stop_at_quotes(generated: str) -> bool:
    """A stop rule: the model closed the docstring."""
    return QUOTES in generated
