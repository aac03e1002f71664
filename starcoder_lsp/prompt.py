"""Fill-in-the-middle prompts: token ids in SPM or PSM order, from windows that stay put.

A long file does not fit the context, so the prompt holds a window of text before the cursor
(the prefix) and one after it (the suffix), each within a token budget. The windows are cut at
line boundaries chosen to be *stable*: candidate cuts sit where the token count measured from
the start of the file (for the prefix) or from its end (for the suffix) crosses a multiple of
`window_step × budget`. Typing at the cursor changes only text between the two cuts, so the
cuts, hence the prompt's first tokens and the KV cache built on them, stay put until a budget
overflows; then the cut jumps a whole step, not a line.

Two caches keep a keystroke cheap on a big file. Token counts are estimated per line and
cached by the line's text, so only edited lines are tokenized. The windows' exact ids are built
from pieces that end where a non-space character meets whitespace holding a newline: a
StarCoder-style pre-tokenizer (single digits, then GPT-2's byte-level regex) never lets a token
span such a point, so encoding the pieces apart and joining them gives exactly the ids of
encoding the window whole (checked on each tokenizer at first use, with a fallback to whole
encoding). Measured on a 2,000-line Python file with the 49152-token tokenizer: about 1 ms per
keystroke.
"""

from __future__ import annotations

import re
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from starcoder_lsp.special_tokens import SpecialTokens

FimMode = Literal["spm", "psm"]
FIM_MODES: tuple[str, ...] = ("spm", "psm")
# The order each model family was trained with, used unless a user picks one. StarCoder:
# FIM on half the samples, split evenly between PSM and SPM (bigcode's Megatron-LM,
# gpt_dataset.py `permute`), and SPM lets typing only append. StarCoder2: its paper ("StarCoder
# 2 and The Stack v2", section 5) gives the repository-level FIM format in PSM order only;
# SPM training is not documented there, so PSM is kept.
TRAINED_FIM_MODE: dict[str, FimMode] = {"gpt_bigcode": "spm", "starcoder2": "psm"}
# A PSM keystroke re-prefills the whole suffix window (it follows the prefix that typing
# changed): this bounds it (measured with benchmarks/keystroke_replay.py).
PSM_SUFFIX_TOKENS = 256
# <fim_prefix>, <fim_suffix>, <fim_middle> and a header's <filename> or <file_sep>: the tokens a
# prompt adds to its two windows (the file name's own tokens count against the prefix budget).
RESERVED_TOKENS = 4
# Lines longer than this (minified code) are windowed in pieces, so that one line can neither
# overflow a budget nor be re-tokenized whole on every keystroke.
MAX_UNIT_CHARS = 1000
# Per-line and per-piece caches are cleared when they grow past this many entries.
MAX_CACHE_ENTRIES = 200_000

# Maximal runs ending in a non-space character, each starting with the whitespace before it;
# consecutive runs meet where a non-space character is followed by whitespace with a newline.
_PIECE = re.compile(r"\s*[^\n]*\S|\s+")
# Text on which the piecewise encoding must match the whole one before it is trusted.
_PROBE = (
    "import os\n\n\ndef f(x: int) -> int:  \n    return x + 1\t\n\t\tif y:\n"
    "12 = 3\n    45\r\n\r\n  'a'\n\"s\"\n# é ü 日本\n<fim_middle>\n}\n  \n"
)


class Tokenizer(Protocol):
    """What this module needs of a Hugging Face tokenizer."""

    def encode(self, text: str, **kwargs: Any) -> list[int]: ...

    def __call__(self, text: list[str], **kwargs: Any) -> Any: ...


@dataclass(frozen=True, kw_only=True)
class PromptOptions:
    """How to build prompts: FIM order, token budgets of the two windows, file name header."""

    prefix_tokens: int = 6093  # default_budgets(8192, 64)
    suffix_tokens: int = 2031
    mode: FimMode = "spm"
    filename: str | None = None  # the file's name in the prompt, as file_header writes it
    window_step: float = 0.25

    def __post_init__(self) -> None:
        if self.mode not in FIM_MODES:
            raise ValueError(f"mode must be one of {', '.join(FIM_MODES)}, not {self.mode!r}")
        if self.prefix_tokens < 0 or self.suffix_tokens < 0:
            raise ValueError("token budgets must not be negative")
        if not 0 < self.window_step <= 1:
            raise ValueError(f"window_step must be in (0, 1], not {self.window_step}")


@dataclass(frozen=True)
class FimPrompt:
    """A prompt's ids and the windows they were made from (`text[prefix_start:cursor]` and
    `text[cursor:suffix_end]`)."""

    ids: list[int]
    prefix: str
    suffix: str
    prefix_start: int
    suffix_end: int
    mode: FimMode
    context_tokens: int = 0  # the cross-file context block's, the prompt's first ids


def default_budgets(
    context_len: int, max_new_tokens: int, mode: FimMode = "spm"
) -> tuple[int, int]:
    """(prefix, suffix) token budgets filling a context: 3/4 before the cursor, 1/4 after.

    In PSM order the suffix comes after the prefix, so every keystroke re-prefills all of it:
    there the suffix gets at most PSM_SUFFIX_TOKENS and the prefix the rest."""
    available = context_len - max_new_tokens - RESERVED_TOKENS
    if available < 2:
        raise ValueError(
            f"a context of {context_len} tokens leaves no room for a prompt after "
            f"{max_new_tokens} new tokens and {RESERVED_TOKENS} special tokens"
        )
    suffix = available - available * 3 // 4
    if mode == "psm":
        suffix = min(suffix, PSM_SUFFIX_TOKENS)
    return available - suffix, suffix


# --- token counting ------------------------------------------------------------------------


class TokenCounter:
    """A tokenizer's encodings, cached by content so that a keystroke re-tokenizes little.

    Document text is encoded with `split_special_tokens=True`: a file that contains the text
    `<fim_middle>` (this project's own sources do) must not put a control token in the prompt.
    """

    def __init__(self, tokenizer: Tokenizer, max_entries: int = MAX_CACHE_ENTRIES) -> None:
        self._tokenizer = tokenizer
        self._max_entries = max_entries
        self._line_counts: dict[str, int] = {}
        self._piece_ids: dict[str, tuple[int, ...]] = {}
        self.piecewise = self._encode_pieces(_PROBE) == self._encode_whole(_PROBE)

    def encode(self, text: str) -> list[int]:
        """Exactly the ids of encoding `text` whole, without special tokens."""
        return self._encode_pieces(text) if self.piecewise else self._encode_whole(text)

    def line_counts(self, lines: Sequence[str]) -> list[int]:
        """Estimated tokens of each line with a newline.

        The line is encoded after its newline, which a byte-level BPE merges with the next
        line's indentation: the sum over a window is then within a few percent of its exact
        count, and rarely below it (the exact count is checked anyway).
        """
        return self._cached(self._line_counts, lines, len, lambda line: "\n" + line)

    def _encode_whole(self, text: str) -> list[int]:
        return list(
            self._tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
        )

    def _encode_pieces(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._cached(self._piece_ids, _PIECE.findall(text), tuple, str):
            ids.extend(piece)
        return ids

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        batch = self._tokenizer(texts, add_special_tokens=False, split_special_tokens=True)
        return batch["input_ids"]

    def _cached(
        self,
        cache: dict,
        keys: Sequence[str],
        convert: Callable[[list[int]], Any],
        source: Callable[[str], str],
    ) -> list:
        """`convert(encoding of source(key))` for each key, encoding only keys not cached."""
        values = [cache.get(key) for key in keys]
        if None not in values:
            return values
        missing = list(dict.fromkeys(k for k, v in zip(keys, values, strict=True) if v is None))
        if len(cache) + len(missing) > self._max_entries:
            cache.clear()
        encoded = self._encode_batch([source(key) for key in missing])
        # Read back from `new`, not `cache`: the prompt's thread and the context's may share
        # this counter, and the other one may clear `cache` meanwhile.
        new = {key: convert(ids) for key, ids in zip(missing, encoded, strict=True)}
        cache.update(new)
        return [
            new[key] if value is None else value for key, value in zip(keys, values, strict=True)
        ]


_counters: weakref.WeakKeyDictionary[Any, TokenCounter] = weakref.WeakKeyDictionary()


def counter_for(tokenizer: Tokenizer) -> TokenCounter:
    """The shared `TokenCounter` of a tokenizer, made at first use."""
    counter = _counters.get(tokenizer)
    if counter is None:
        counter = _counters[tokenizer] = TokenCounter(tokenizer)
    return counter


# --- windows -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Units:
    """Text cut into lines (long lines in pieces); `newline[i]` says whether unit i ends one."""

    texts: list[str]
    newline: list[int] | None  # None: every unit but the last ends with a newline

    @classmethod
    def split(cls, text: str) -> _Units:
        lines = text.split("\n")
        if max(map(len, lines)) <= MAX_UNIT_CHARS:
            return cls(lines, None)
        texts: list[str] = []
        newline: list[int] = []
        for number, line in enumerate(lines):
            pieces = [line[i : i + MAX_UNIT_CHARS] for i in range(0, len(line), MAX_UNIT_CHARS)]
            texts += pieces or [""]
            newline += [0] * (len(pieces or [""]) - 1) + [int(number < len(lines) - 1)]
        return cls(texts, newline)

    def chars(self, start: int, stop: int) -> int:
        """Characters in units start..stop-1, newlines included."""
        if self.newline is None:
            newlines = max(0, min(stop, len(self.texts) - 1) - start)
        else:
            newlines = sum(self.newline[start:stop])
        return sum(map(len, self.texts[start:stop])) + newlines


def _stable_cuts(counts: list[int], budget: int, step: int) -> Iterator[int]:
    """Cuts to try, best first, as numbers of units dropped from the far end of `counts`
    (ordered from the far end toward the cursor): the stable cuts that fit `budget` by
    estimate, then the cut keeping only the unit next to the cursor.

    Stable cuts are the first unit boundaries at or past each multiple of `step` tokens counted
    from the far end; they move only when text beyond them changes.
    """
    cum = [0, *accumulate(counts)]
    total, n = cum[-1], len(counts)
    tried = set()
    multiple = max(0, (total - budget) // step)
    while (cut := bisect_left(cum, multiple * step)) < n:
        if total - cum[cut] <= budget and cut not in tried:
            tried.add(cut)
            yield cut
        multiple += 1
    if n - 1 not in tried:
        yield n - 1


def _fit_tail(counter: TokenCounter, text: str, budget: int) -> int:
    """The smallest start such that `text[start:]` fits `budget` (for a line too long)."""
    low, high = 0, len(text)
    while low < high:
        mid = (low + high) // 2
        if len(counter.encode(text[mid:])) <= budget:
            high = mid
        else:
            low = mid + 1
    return low


def _fit_head(counter: TokenCounter, text: str, budget: int) -> int:
    """The largest end such that `text[:end]` fits `budget` (for a line too long)."""
    low, high = 0, len(text)
    while low < high:
        mid = (low + high + 1) // 2
        if len(counter.encode(text[:mid])) <= budget:
            low = mid
        else:
            high = mid - 1
    return low


def _prefix_window(
    text: str, cursor: int, budget: int, step: int, counter: TokenCounter
) -> tuple[int, list[int]]:
    """Where the prefix window starts, and its ids."""
    if budget <= 0:
        return cursor, []
    units = _Units.split(text[:cursor])
    counts = counter.line_counts(units.texts)
    for cut in _stable_cuts(counts, budget, step):
        start = units.chars(0, cut)
        ids = counter.encode(text[start:cursor])
        if len(ids) <= budget:
            return start, ids
    line_start = units.chars(0, len(units.texts) - 1)
    start = line_start + _fit_tail(counter, text[line_start:cursor], budget)
    return start, counter.encode(text[start:cursor])


def _suffix_window(
    text: str, cursor: int, budget: int, step: int, counter: TokenCounter
) -> tuple[int, list[int]]:
    """Where the suffix window ends, and its ids."""
    if budget <= 0:
        return cursor, []
    units = _Units.split(text[cursor:])
    n = len(units.texts)
    # Counted from the end of the file, so that cuts stay put while text before them changes.
    counts = counter.line_counts(units.texts[::-1])
    for cut in _stable_cuts(counts, budget, step):
        end = cursor + units.chars(0, n - cut)
        ids = counter.encode(text[cursor:end])
        if len(ids) <= budget:
            return end, ids
    first = text[cursor : cursor + units.chars(0, 1)]
    end = cursor + _fit_head(counter, first, budget)
    return end, counter.encode(text[cursor:end])


# --- prompts -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileHeader:
    """How the current file is introduced: `before` goes ahead of the FIM tokens, `lead`
    right after `<fim_prefix>`, before the text of the prefix window."""

    before: list[int]
    lead: list[int]

    def __len__(self) -> int:
        return len(self.before) + len(self.lead)


def file_header(tokens: SpecialTokens, options: PromptOptions, counter: TokenCounter) -> FileHeader:
    """The file's name, in the format its model family was trained with, when one is given.

    StarCoder: `<filename>name\n` ahead of the FIM tokens. StarCoder2 was trained on whole
    repositories, each file as `<file_sep>path\ncode`, and FIM applied inside one file as
    `<file_sep><fim_prefix>path\nprefix<fim_suffix>suffix<fim_middle>` (its paper, "StarCoder 2
    and The Stack v2", section 5, repository-context format): the path opens the prefix.
    """
    if options.filename is None:
        return FileHeader([], [])
    name = counter.encode(options.filename + "\n")
    if tokens.repository_level:
        return FileHeader([tokens.file_sep], name)
    if tokens.filename is not None:
        return FileHeader([tokens.filename, *name], [])
    return FileHeader([], [])


def build_prompt(
    text: str,
    cursor: int,
    tokenizer: Tokenizer,
    tokens: SpecialTokens,
    options: PromptOptions,
    counter: TokenCounter | None = None,
    context: Sequence[int] = (),
) -> FimPrompt:
    """The FIM prompt for a cursor at character offset `cursor` of `text`.

    PSM: `[context] [header] <fim_prefix> [lead] prefix <fim_suffix> suffix <fim_middle>`;
    SPM: `[context] [header] <fim_prefix> <fim_suffix> suffix <fim_middle> [lead] prefix`
    (see `file_header`; `context` is context.py's cross-file block, which changes far less
    often than anything after it). The file name counts against the prefix budget, so a
    prompt never exceeds `RESERVED_TOKENS` plus both budgets plus the context. A constant
    header keeps SPM prompts growing only at their end.
    """
    if not 0 <= cursor <= len(text):
        raise ValueError(f"cursor {cursor} is outside the document ({len(text)} characters)")
    counter = counter if counter is not None else counter_for(tokenizer)
    header = file_header(tokens, options, counter)
    prefix_budget = max(0, options.prefix_tokens - max(0, len(header) - 1))
    start, prefix_ids = _prefix_window(
        text, cursor, prefix_budget, _step(options, prefix_budget), counter
    )
    end, suffix_ids = _suffix_window(
        text, cursor, options.suffix_tokens, _step(options, options.suffix_tokens), counter
    )
    before, prefix_ids = [*context, *header.before], [*header.lead, *prefix_ids]
    if context and tokens.repository_level and not header.before:
        # StarCoder2's files follow one another after <file_sep>: without it the current
        # file would read as the end of the last quoted one (the header's reserved token).
        before.append(tokens.file_sep)
    if options.mode == "psm":
        middle = [tokens.fim_prefix, *prefix_ids, tokens.fim_suffix, *suffix_ids]
        ids = [*before, *middle, tokens.fim_middle]
    else:
        middle = [tokens.fim_prefix, tokens.fim_suffix, *suffix_ids, tokens.fim_middle]
        ids = [*before, *middle, *prefix_ids]
    prefix, suffix = text[start:cursor], text[cursor:end]
    return FimPrompt(ids, prefix, suffix, start, end, options.mode, len(context))


def _step(options: PromptOptions, budget: int) -> int:
    return max(1, int(options.window_step * budget))
