"""Cross-file context: chunks of the project's other files, ranked by how much they share with
the code at the cursor, written ahead of the FIM prompt in the format the model was trained on.

Where the chunks come from, all of it sent by the client (the server never reads the disk: it
may run on another machine, with no copy of the project):
- "open": the connection's other open documents (didOpen/didChange);
- "edited": the lines around the regions the user edited recently in those documents;
- "pushed": text a client sent with `starcoder/context` {uri, text}: a yank, a visited file.

What goes in: windows of CHUNK_LINES lines, ranked by the Jaccard similarity of their
identifier sets with the lines around the cursor (as Copilot's "neighbouring tabs" rank
snippets of the other open files), best first, until the token budget is spent; a chunk
that does not fit is cut to the lines that do. The current document is never quoted: its
text is in the prompt's windows already.

Why the block costs nothing per keystroke: it is the prompt's first tokens, before the file
header and the FIM markers, so the prefix cache (cache.py: longest common token prefix) keeps
it as long as it does not change. It is rebuilt only when its inputs change materially (a
document opened, saved or closed, a push, the cursor moving to another REGION_LINES region or
another document), never because the user typed; and the chunks are ordered by when their
source last changed, oldest first, then by path and line, so that a new push or a saved file
moves the tail of the block and leaves the head, and its cache, where it was.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import count
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from starcoder_lsp.prompt import TokenCounter
    from starcoder_lsp.special_tokens import SpecialTokens

SOURCES: tuple[str, ...] = ("open", "edited", "pushed")
# Copilot's neighbouring tabs compare windows of about 60 lines; shorter ones fit a budget of a
# quarter of StarCoder's context several times over, so that several files can speak.
CHUNK_LINES = 24
CHUNK_STEP = 12  # windows overlap by half, so a match is never cut in two by a window edge
# The query: lines around the cursor whose identifiers chunks are compared with.
QUERY_LINES_BEFORE = 30
QUERY_LINES_AFTER = 10
# The cursor moving within a region of this many lines keeps the block as it is.
REGION_LINES = 32
# Lines quoted around a recent edit, and how much the edit adds to the chunk's similarity:
# code just written elsewhere is the likeliest to be used next (Tabby's recently edited
# snippets), but a chunk that shares nothing with the cursor's code still does not go in.
EDIT_LINES = 16
EDIT_BONUS = 0.1
# A chunk cut to fit the budget keeps at least this many lines, or it is left out.
MIN_CHUNK_LINES = 3
# What is kept of each source: its first characters, the most recent pushes and edits.
MAX_SOURCE_CHARS = 262_144
MAX_OPEN = 24  # open documents: the most recently opened or saved
MAX_PUSHED = 16
MAX_EDITED = 8

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Words of every program (keywords of the common languages): sharing them says nothing.
_KEYWORDS = (
    "and as assert async await break case catch class const continue def default del do elif "
    "else enum except export extends false finally fn for from func function global if impl "
    "import in is interface lambda let match mut new nil none nonlocal not null or package "
    "pass private protected pub public raise return self static struct super switch this "
    "throw true try type typeof use var void while with yield int str bool float string"
)
_COMMON = frozenset(_KEYWORDS.split())


def identifiers(text: str) -> frozenset[str]:
    """The identifiers of `text` worth comparing: no keywords, no single letters."""
    return frozenset(
        word for word in _IDENTIFIER.findall(text) if len(word) > 1 and word.lower() not in _COMMON
    )


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """|a ∩ b| / |a ∪ b|: 0 when either is empty."""
    if not a or not b:
        return 0.0
    shared = len(a & b)
    return shared / (len(a) + len(b) - shared)


@dataclass(frozen=True)
class Chunk:
    """Lines of another file, as the block quotes them."""

    path: str
    line: int  # of its first line, from 0
    text: str  # whole lines, each with its newline
    source: str  # "open", "edited" or "pushed"
    score: float = 0.0

    @property
    def lines(self) -> int:
        return self.text.count("\n") + (not self.text.endswith("\n"))


@dataclass(frozen=True)
class ContextBlock:
    """The cross-file context of a prompt: its ids (the prompt's first tokens) and chunks."""

    ids: tuple[int, ...] = ()
    chunks: tuple[Chunk, ...] = ()

    def __len__(self) -> int:
        return len(self.ids)


EMPTY = ContextBlock()


@dataclass(frozen=True)
class Source:
    """A text the block may quote: `key` names it as the completer names documents."""

    key: Hashable
    path: str
    text: str


# --- how each family writes other files ---------------------------------------------------


def chunk_ids(chunk: Chunk, tokens: SpecialTokens, counter: TokenCounter) -> list[int]:
    """One chunk as its model family saw another file in training.

    StarCoder2 (its paper, "StarCoder 2 and The Stack v2", section 5, repository-context
    format): a repository is one sequence, `<repo_name>name<file_sep>path\\ncode<file_sep>
    path\\ncode...`, so a chunk is `<file_sep>path\\ncode`.
    StarCoder ("StarCoder: may the source be with you!", section 5.1): each file was one
    document, its metadata ahead of it as `<reponame>repo<filename>path<gh_stars>stars\\n`
    (each part kept with probability 0.2), documents separated by `<|endoftext|>` in the
    packed sequences; so a chunk is `<filename>path\\ncode<|endoftext|>`. A tokenizer without
    `<filename>` (SantaCoder) gets the code alone between the separators.
    The path and the code are encoded together, as the training text was.
    """
    if tokens.repository_level:
        return [tokens.file_sep, *counter.encode(f"{chunk.path}\n{chunk.text}")]
    if tokens.filename is not None:
        return [tokens.filename, *counter.encode(f"{chunk.path}\n{chunk.text}"), tokens.eos]
    return [*counter.encode(chunk.text), tokens.eos]


def opening_ids(repo: str, tokens: SpecialTokens, counter: TokenCounter) -> list[int]:
    """What opens a block: StarCoder2's `<repo_name>name`; nothing for StarCoder."""
    if tokens.repository_level and tokens.repo_name is not None:
        return [tokens.repo_name, *counter.encode(repo)]
    return []


def write_block(
    chunks: Sequence[Chunk], repo: str, tokens: SpecialTokens, counter: TokenCounter
) -> ContextBlock:
    """The block of `chunks`, in their order; empty without chunks."""
    if not chunks:
        return EMPTY
    ids = opening_ids(repo, tokens, counter)
    for chunk in chunks:
        ids += chunk_ids(chunk, tokens, counter)
    return ContextBlock(tuple(ids), tuple(chunks))


# --- choosing chunks -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Window:
    line: int
    text: str
    words: frozenset[str]


def windows(text: str) -> list[_Window]:
    """Windows of CHUNK_LINES lines every CHUNK_STEP lines over the first MAX_SOURCE_CHARS
    characters of `text`, the last one reaching its end; blank ones left out."""
    lines = text[:MAX_SOURCE_CHARS].splitlines(keepends=True)
    words = [identifiers(line) for line in lines]
    starts = list(range(0, max(1, len(lines) - CHUNK_LINES + CHUNK_STEP), CHUNK_STEP))
    found = []
    for start in starts:
        stop = min(len(lines), start + CHUNK_LINES)
        chunk = "".join(lines[start:stop])
        if chunk.strip():
            found.append(_Window(start, chunk, frozenset().union(*words[start:stop])))
    return found


def query(before: str, after: str) -> frozenset[str]:
    """The identifiers around the cursor that chunks are compared with."""
    head = before.split("\n")[-QUERY_LINES_BEFORE:]
    tail = after.split("\n")[:QUERY_LINES_AFTER]
    return identifiers("\n".join(head) + "\n".join(tail))


def select(
    candidates: Iterable[tuple[Hashable, Chunk]],
    budget: int,
    cost: Callable[[Chunk], int],
) -> list[tuple[Hashable, Chunk]]:
    """The best candidates (highest score first) whose costs fit `budget` together; no two
    overlapping lines of one source, no text twice, nothing with a score of 0. The first
    candidate too large for what is left is cut to the lines that fit (at least
    MIN_CHUNK_LINES), and ends the block: the windows are alike in size, so the ones after
    it would rarely fit, and trying each of thousands of them (18 open files of the standard
    library) took 0.2 s of tokenizing per block, against 0.03 s."""
    ordered = sorted(candidates, key=lambda kc: (-kc[1].score, kc[1].path, kc[1].line))
    costs: dict[tuple[str, str], int] = {}

    def cost_of(chunk: Chunk) -> int:
        known = costs.get((chunk.path, chunk.text))
        if known is None:
            known = costs[(chunk.path, chunk.text)] = cost(chunk)
        return known

    chosen: list[tuple[Hashable, Chunk]] = []
    taken: dict[Hashable, list[tuple[int, int]]] = {}
    texts: set[str] = set()
    left = budget
    for key, chunk in ordered:
        if chunk.score <= 0 or left <= 0:
            break
        span = (chunk.line, chunk.line + chunk.lines)
        if chunk.text in texts or any(a < span[1] and span[0] < b for a, b in taken.get(key, ())):
            continue
        fitted = _fit(chunk, left, cost_of)
        if fitted is not None:
            chosen.append((key, fitted))
            taken.setdefault(key, []).append((fitted.line, fitted.line + fitted.lines))
            texts.add(chunk.text)
        if fitted is not chunk:
            break  # cut, or not even its first lines fit: the block is full
        left -= cost_of(fitted)
    return chosen


def _fit(chunk: Chunk, budget: int, cost: Callable[[Chunk], int]) -> Chunk | None:
    """`chunk`, or its first lines that cost at most `budget`; None when too few fit."""
    if cost(chunk) <= budget:
        return chunk
    lines = chunk.text.splitlines(keepends=True)
    low, high = 0, len(lines) - 1  # the most lines that fit lie in [low, high]
    while low < high:
        mid = (low + high + 1) // 2
        if cost(_first_lines(chunk, lines, mid)) <= budget:
            low = mid
        else:
            high = mid - 1
    return _first_lines(chunk, lines, low) if low >= MIN_CHUNK_LINES else None


def _first_lines(chunk: Chunk, lines: list[str], n: int) -> Chunk:
    return Chunk(chunk.path, chunk.line, "".join(lines[:n]), chunk.source, chunk.score)


# --- one connection's sources --------------------------------------------------------------


@dataclass
class _Pushed:
    path: str
    text: str
    origin: Hashable  # the document it was taken from (a yank's), or its own key


@dataclass
class CrossFile:
    """One connection's context sources, and the block it last built from them.

    `documents` lists the connection's open documents, keyed as the completer names them;
    the server tells this object what happens to them (`opened`, `saved`, `closed`,
    `edited`) and what a client pushes (`push`), from one thread; `later` takes what a
    block needs from that thread and lets any other build it (the engine's, when the request
    is admitted).
    """

    documents: Callable[[], Iterable[Source]] = lambda: ()
    repo: str = ""  # the repository's name, for StarCoder2's <repo_name>
    builds: int = 0  # blocks built, not reused: how often the context changed
    _pushed: OrderedDict[Hashable, _Pushed] = field(default_factory=OrderedDict)
    _edited: OrderedDict[tuple[Hashable, int], int] = field(default_factory=OrderedDict)
    _stamps: dict[Hashable, int] = field(default_factory=dict)
    _clock: count = field(default_factory=lambda: count(1))
    _generation: int = 0
    _windows: dict[Hashable, tuple[str, list[_Window]]] = field(default_factory=dict)
    _last: tuple[tuple, ContextBlock] | None = None
    # The window cache is shared by the builds (another thread) and the events.
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- events ----------------------------------------------------------------------------

    def opened(self, key: Hashable) -> None:
        """A document was opened (or its whole text sent again): a material change."""
        self._touch(key)

    def saved(self, key: Hashable) -> None:
        self._touch(key)

    def closed(self, key: Hashable) -> None:
        self._stamps.pop(key, None)
        with self._lock:
            self._windows.pop(key, None)
        self._generation += 1

    def edited(self, key: Hashable, line: int) -> None:
        """The user edited `line` of a document: its region is quoted first (not a material
        change: typing goes on in it, and the block must not follow every keystroke)."""
        region = (key, line // EDIT_LINES)
        self._edited.pop(region, None)
        self._edited[region] = line
        while len(self._edited) > MAX_EDITED:
            self._edited.popitem(last=False)

    def push(self, key: Hashable, path: str, text: str, origin: Hashable = None) -> None:
        """Text a client sent with `starcoder/context`; a newer push for `key` replaces it.
        `origin`: the document it was taken from (default `key`), never quoted in its own
        prompts, as a yank from the current document is in it already."""
        self._pushed.pop(key, None)
        self._pushed[key] = _Pushed(
            path, text[:MAX_SOURCE_CHARS], key if origin is None else origin
        )
        with self._lock:
            while len(self._pushed) > MAX_PUSHED:
                old, _ = self._pushed.popitem(last=False)
                self._windows.pop(("pushed", old), None)
            self._windows.pop(("pushed", key), None)
        self._touch(key)

    def _touch(self, key: Hashable) -> None:
        self._stamps[key] = next(self._clock)
        self._generation += 1

    # -- the block -------------------------------------------------------------------------

    def block(
        self,
        current: Hashable,
        before: str,
        after: str,
        anchor: int,
        budget: int,
        sources: Sequence[str],
        tokens: SpecialTokens,
        counter: TokenCounter,
    ) -> ContextBlock:
        """The block for a cursor in `current` after `before` and ahead of `after` (text
        around it, `before` starting at offset `anchor` of the document, a place that does
        not move while the user types), within `budget` tokens, from `sources`."""
        return self.later(current, before, after, anchor, budget, sources, tokens, counter)()

    def later(
        self,
        current: Hashable,
        before: str,
        after: str,
        anchor: int,
        budget: int,
        sources: Sequence[str],
        tokens: SpecialTokens,
        counter: TokenCounter,
    ) -> Callable[[], ContextBlock]:
        """`block`'s block, built when called, from any thread, out of the sources as they
        are now: a request that never reaches the model (superseded while it waits) never
        builds one, and the thread that reads the connection's messages never does."""
        if budget <= 0 or not sources:
            return lambda: EMPTY
        region = (anchor, before.count("\n") // REGION_LINES)
        inputs = (current, region, self._generation, budget, tuple(sources), tokens, self.repo)
        last = self._last
        if last is not None and last[0] == inputs:
            return lambda: last[1]
        snapshot = _Snapshot(
            list(self.documents()),
            list(self._edited.items()),
            list(self._pushed.items()),
            dict(self._stamps),
        )

        def build() -> ContextBlock:
            last = self._last
            if last is not None and last[0] == inputs:  # built for an earlier request
                return last[1]
            self.builds += 1
            wanted = query(before, after)
            block = self._build(snapshot, current, wanted, budget, sources, tokens, counter)
            self._last = (inputs, block)
            return block

        return build

    def _build(
        self,
        snapshot: _Snapshot,
        current: Hashable,
        wanted: frozenset[str],
        budget: int,
        sources: Sequence[str],
        tokens: SpecialTokens,
        counter: TokenCounter,
    ) -> ContextBlock:
        opening = len(opening_ids(self.repo, tokens, counter))
        candidates = list(self._candidates(snapshot, current, wanted, sources))
        chosen = select(candidates, budget - opening, lambda c: len(chunk_ids(c, tokens, counter)))
        # Oldest source first, then by place: a change moves the block's tail, not its head.
        chosen.sort(key=lambda kc: (snapshot.stamps.get(kc[0], 0), kc[1].path, kc[1].line))
        return write_block([chunk for _, chunk in chosen], self.repo, tokens, counter)

    def _candidates(
        self,
        snapshot: _Snapshot,
        current: Hashable,
        wanted: frozenset[str],
        sources: Sequence[str],
    ) -> Iterable[tuple[Hashable, Chunk]]:
        stamps = snapshot.stamps
        others = [s for s in snapshot.documents if s.key != current]
        others.sort(key=lambda s: stamps.get(s.key, 0), reverse=True)
        documents = {s.key: s for s in others[:MAX_OPEN]}
        live = set()
        if "open" in sources:
            for key, source in documents.items():
                live.add(key)
                for w in self._windows_of(key, source.text):
                    yield key, Chunk(source.path, w.line, w.text, "open", jaccard(w.words, wanted))
        if "edited" in sources:
            for (key, _), line in reversed(snapshot.edited):
                if key in documents:
                    yield key, _around(documents[key], line, wanted)
        if "pushed" in sources:
            for key, pushed in snapshot.pushed:
                if current in (key, pushed.origin) or ("open" in sources and key in documents):
                    continue  # the current document's own, or an open one's older text
                live.add(("pushed", key))
                for w in self._windows_of(("pushed", key), pushed.text):
                    yield (
                        key,
                        Chunk(pushed.path, w.line, w.text, "pushed", jaccard(w.words, wanted)),
                    )
        with self._lock:
            for gone in self._windows.keys() - live:
                del self._windows[gone]

    def _windows_of(self, key: Hashable, text: str) -> list[_Window]:
        """The windows of a source's text, cut again only when the text changed."""
        with self._lock:
            cached = self._windows.get(key)
        if cached is None or cached[0] is not text:
            cached = (text, windows(text))
            with self._lock:
                self._windows[key] = cached
        return cached[1]


@dataclass(frozen=True)
class _Snapshot:
    """What a block is built from, as it was when its request was made."""

    documents: list[Source]
    edited: list[tuple[tuple[Hashable, int], int]]
    pushed: list[tuple[Hashable, _Pushed]]
    stamps: dict[Hashable, int]


def _around(source: Source, line: int, wanted: frozenset[str]) -> Chunk:
    """The EDIT_LINES lines around `line` of a document, scored with EDIT_BONUS."""
    lines = source.text[:MAX_SOURCE_CHARS].splitlines(keepends=True)
    start = max(0, min(line - EDIT_LINES // 2, len(lines) - EDIT_LINES))
    text = "".join(lines[start : start + EDIT_LINES])
    score = jaccard(identifiers(text), wanted)
    return Chunk(source.path, start, text, "edited", score + EDIT_BONUS if score else 0.0)
