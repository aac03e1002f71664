"""Cut and clean what the model wrote, so that what reaches the editor is worth showing.

A suggestion is one line unless the cursor starts a block; it never shows a special token or
a character an editor should not insert (U+FFFD, control characters), does not repeat what
already follows the cursor, and ends at a closing bracket that closes something before the
cursor. When the editor has already auto-closed that bracket, the
suggestion replaces it instead of doubling it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Any StarCoder-family special token: the model may emit one instead of ending cleanly.
SPECIAL = re.compile(
    r"<\|endoftext\|>|<fim[_-][a-z]+>|<filename>|<file_sep>|<reponame>|<gh_stars>"
    r"|<issue_[a-z]+>|<jupyter_[a-z]+>|<empty_output>|<commit_[a-z]+>|<repo_name>"
)
# What no editor should insert: U+FFFD, which the tokenizer writes for bytes that are not
# UTF-8 (a multi-byte character cut by the token limit, or byte tokens the model strung
# together badly), and the control characters (C0, DEL, C1) other than tab and newline.
UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufffd]")
OPENERS = {"(": ")", "[": "]", "{": "}"}
CLOSERS = {v: k for k, v in OPENERS.items()}
BLOCK_OPENERS = (":", "{", "(", "[", "=>")


@dataclass(frozen=True)
class Cut:
    text: str
    replace_suffix_chars: int = 0  # characters after the cursor the suggestion replaces


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def _rest_of_line(suffix: str) -> str:
    return suffix.split("\n", 1)[0]


def _block_line(prefix: str) -> str | None:
    """The last non-blank line before the cursor's line."""
    for line in reversed(prefix.split("\n")[:-1]):
        if line.strip():
            return line
    return None


def wants_multiline(prefix: str, suffix: str) -> bool:
    """True when the cursor starts a block: it sits on a blank line after a line that opens
    one (`:`, `{`, `(`, `[`). Word characters after the cursor always mean a single line."""
    rest = _rest_of_line(suffix)
    if re.search(r"\w", rest):
        return False
    line = prefix.split("\n")[-1]
    if line.rstrip().endswith("{") and rest.strip().startswith("}"):
        return True  # an empty body between braces on one line: `function f() {|}`
    if line.strip():
        return False
    opener = _block_line(prefix)
    return opener is not None and opener.rstrip().endswith(BLOCK_OPENERS)


def strip_special(raw: str) -> str:
    match = SPECIAL.search(raw)
    return raw[: match.start()] if match else raw


def printable(text: str) -> str:
    """`text` without U+FFFD and control characters but tab and newline: a character the
    token limit cut in the middle of its bytes is dropped whole, never sent half."""
    return UNPRINTABLE.sub("", text)


def _cut_block(text: str, prefix: str) -> str:
    """Keep the lines of the block the cursor starts: stop at the first non-blank line that
    returns to the indentation of the line that opened it."""
    opener = _block_line(prefix)
    level = _indent(opener) if opener is not None else 0
    lines = text.split("\n")
    kept = [lines[0]]
    for line in lines[1:]:
        if line.strip() and _indent(line) <= level:
            break
        kept.append(line)
    return "\n".join(kept).rstrip()


def _drop_repeated_lines(text: str, suffix: str) -> str:
    """Stop where the suggestion starts rewriting the lines that already follow."""
    following = [ln.strip() for ln in suffix.split("\n")[1:] if ln.strip()][:3]
    if not following:
        return text
    lines = text.split("\n")
    for i, line in enumerate(lines[1:], start=1):
        if line.strip() and line.strip() == following[0]:
            return "\n".join(lines[:i]).rstrip()
    return text


def _close_brackets(text: str, rest: str) -> Cut:
    """End at the first bracket closing something opened before the cursor. If the editor
    put that bracket (and maybe more closers) right after the cursor, cover them."""
    depth: list[str] = []
    quote: str | None = None
    for i, ch in enumerate(text):
        if quote:  # brackets inside a string literal close nothing
            quote = None if ch == quote and text[i - 1] != "\\" else quote
            continue
        if ch in "'\"`":
            quote = ch
        elif ch in OPENERS:
            depth.append(ch)
        elif ch in CLOSERS:
            if depth and depth[-1] == CLOSERS[ch]:
                depth.pop()
                continue
            auto_closed = re.match(r"[)\]}]+", rest)
            if auto_closed and auto_closed.group()[0] == ch:
                closers = auto_closed.group()
                n = 0
                while n < len(closers) and i + n < len(text) and text[i + n] == closers[n]:
                    n += 1
                return Cut(text[: i + n], n)
            return Cut(text[: i + 1])
    return Cut(text)


def _next_line(suffix: str) -> str | None:
    following = [ln.strip() for ln in suffix.split("\n")[1:] if ln.strip()]
    return following[0] if following else None


def _trim_suffix_overlap(text: str, rest: str) -> str:
    """Drop a tail that the rest of the line already holds (e.g. the model rewrote `):`)."""
    stripped = rest.strip()
    if stripped and text.rstrip().endswith(stripped):
        return text.rstrip()[: -len(stripped)]
    return text


def cut_completion(raw: str, prefix: str, suffix: str, multiline: bool) -> Cut:
    text = printable(strip_special(raw))
    rest = _rest_of_line(suffix)
    if multiline:
        text = _drop_repeated_lines(_cut_block(text, prefix), suffix)
    else:
        text = text.split("\n", 1)[0].rstrip()
        if not prefix.split("\n")[-1].strip() and text.strip() == _next_line(suffix):
            return Cut("")  # on an empty line, rewriting the line below is no suggestion
    cut = _close_brackets(text, rest)
    if cut.replace_suffix_chars == 0 and not multiline:
        return Cut(_trim_suffix_overlap(cut.text, rest).rstrip())
    return cut


def acceptable(text: str, min_chars: int = 1) -> bool:
    """Worth showing: not empty, not only whitespace, not shorter than min_chars."""
    return len(text.strip()) >= max(min_chars, 1)
