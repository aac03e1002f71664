"""One connection's open documents: their text as the editor has it, kept edit by edit.

pygls' workspace is not used for documents: it keys them by a decoded URI that the server
then looked up raw (so `a%20b.py` was never found), splits lines where LSP does not (see
positions.py), rebuilds the whole text and its line list on every keystroke (a 20 MB file
made every other client wait) and quietly mangles an edit whose range runs backwards. Here:

- every URI goes through `uri_key`, once, whether it comes with didOpen or with a request;
- an edit costs the edited stretch, not the document (the text is one string, the line starts
  an array spliced around the edit);
- an edit that cannot be applied (a reversed range, a line past the end) is refused loudly:
  the document is marked out of sync, which every later request for it reports, until the
  editor sends its whole text again (didOpen, or a change without a range);
- a document over the size limit is not kept; requests for it say why.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import numpy as np
from lsprotocol import types
from pygls.exceptions import JsonRpcException, JsonRpcInvalidParams

from starcoder_lsp import positions

# Percent-escapes that must stay escaped: decoding them would change the URI's structure.
_KEEP_ESCAPED = re.compile(r"%(2[fF]|25|3[fF]|23)")
_DRIVE = re.compile(r"^/([A-Za-z])(:|%3[aA])")


class RequestFailed(JsonRpcException):
    """LSP's RequestFailed: the request was well formed, but the document cannot serve it."""

    CODE = -32803
    MESSAGE = "Request Failed"


class ChangeRefused(ValueError):
    """An edit that cannot be applied to the text the server holds."""


def uri_key(uri: str) -> str:
    """The one form of a URI that documents are stored and looked up by.

    Editors spell the same file differently: VS Code sends `file:///c%3A/src/a%20b.py` where
    others send `file:///C:/src/a b.py`. Escapes are decoded (except those of "/", "%", "?"
    and "#", which would change the URI's structure), the scheme is lower-cased and so is a
    Windows drive letter, as VS Code writes it.
    """
    protected = _KEEP_ESCAPED.sub(lambda m: "%25" + m.group(1).upper(), uri)
    parts = urlsplit(unquote(protected))
    path = _DRIVE.sub(lambda m: f"/{m.group(1).lower()}:", parts.path)
    return urlunsplit((parts.scheme.lower(), parts.netloc, path, parts.query, parts.fragment))


def display(uri: str) -> str:
    """A URI as a log line or a message shows it: quoted, never longer than a line."""
    return quote(uri[:200], safe=":/%@")


@dataclass
class Document:
    """An open document: its text, the start of each of its lines, and its version."""

    uri: str  # as the editor sent it at didOpen
    language_id: str
    version: int | None
    text: str
    encoding: str = positions.UTF16
    starts: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.starts = positions.line_starts(self.text)

    def offset_at(self, position: types.Position) -> int:
        return positions.offset_at(self.text, self.starts, position, self.encoding)

    def position_at(self, offset: int) -> types.Position:
        return positions.position_at(self.text, self.starts, offset, self.encoding)

    def line_count(self) -> int:
        return len(self.starts)

    def apply(self, change: types.TextDocumentContentChangeEvent) -> None:
        """Apply one change of didChange; ChangeRefused (with nothing applied) when its range
        is not a range of this text."""
        if not isinstance(change, types.TextDocumentContentChangePartial):
            self.text = change.text
            self.starts = positions.line_starts(self.text)
            return
        start, end = change.range.start, change.range.end
        if (end.line, end.character) < (start.line, start.character):
            raise ChangeRefused(
                f"its range ends ({end.line}:{end.character}) before it starts "
                f"({start.line}:{start.character})"
            )
        try:
            # LSP: a character past the end of its line means the end of the line.
            a, b = (self.offset_at(_within_line(self, p)) for p in (start, end))
        except JsonRpcInvalidParams as e:
            raise ChangeRefused(str(e)) from None
        self.text = self.text[:a] + change.text + self.text[b:]
        self.starts = positions.spliced_starts(self.starts, self.text, a, b, len(change.text))


def _within_line(document: Document, position: types.Position) -> types.Position:
    if not 0 <= position.line < document.line_count():
        return position  # offset_at says what is wrong with it
    line = positions.line_text(document.text, document.starts, position.line)
    width = positions.units(line, document.encoding)
    return types.Position(line=position.line, character=min(position.character, width))


@dataclass(frozen=True)
class _Unusable:
    """A document the server does not hold in full, and what requests for it hear."""

    uri: str
    language_id: str
    reason: str


class Documents:
    """The documents one connection has open, keyed by `uri_key`."""

    def __init__(self, encoding: str = positions.UTF16, max_size: int = 0) -> None:
        self.encoding = encoding
        self.max_size = max_size  # characters; 0: no limit
        self._open: dict[str, Document | _Unusable] = {}

    def open(self, item: types.TextDocumentItem) -> str | None:
        """Keep a newly opened document; returns why it is not kept, or None."""
        held = self._keep(item.uri, item.language_id, item.version, item.text)
        return held.reason if isinstance(held, _Unusable) else None

    def change(self, params: types.DidChangeTextDocumentParams) -> str | None:
        """Apply didChange's changes in order. Returns why the document has just become
        unusable (a change could not be applied, or it grew too large), or None."""
        uri, version = params.text_document.uri, params.text_document.version
        held = self._open.get(uri_key(uri))
        if held is None:
            return f"{display(uri)} changed but was never opened"
        became_unusable = None
        for change in params.content_changes:
            if not isinstance(change, types.TextDocumentContentChangePartial):
                held = self._keep(held.uri, held.language_id, version, change.text)
                became_unusable = held.reason if isinstance(held, _Unusable) else None
                continue
            if isinstance(held, _Unusable):
                continue  # nothing to apply it to: only a whole text makes it usable again
            try:
                held.apply(change)
            except ChangeRefused as e:
                reason = (
                    f"the server's copy of {display(uri)} is out of sync since version "
                    f"{version}: a change was refused ({e}); close and reopen it"
                )
                held = self._unusable(held, reason)
                became_unusable = reason
                continue
            if self._too_large(held.uri, len(held.text)) is not None:
                held = self._unusable(held, self._too_large(held.uri, len(held.text)))
                became_unusable = held.reason
        if isinstance(held, Document):
            held.version = version
        return became_unusable

    def close(self, uri: str) -> None:
        self._open.pop(uri_key(uri), None)

    def get(self, uri: object) -> Document:
        """The open document at `uri`, or an error reply that says why there is none."""
        if not isinstance(uri, str):
            raise JsonRpcInvalidParams(f"expected a document URI, not {uri!r}")
        held = self._open.get(uri_key(uri))
        if held is None:
            raise JsonRpcInvalidParams(f"unknown document {display(uri)}: open it first (didOpen)")
        if isinstance(held, _Unusable):
            raise RequestFailed(held.reason)
        return held

    def __iter__(self) -> Iterator[str]:
        """The keys (`uri_key`) of the open documents."""
        return iter(list(self._open))

    def _keep(
        self, uri: str, language_id: str, version: int | None, text: str
    ) -> Document | _Unusable:
        too_large = self._too_large(uri, len(text))
        held: Document | _Unusable = (
            _Unusable(uri, language_id, too_large)
            if too_large is not None
            else Document(uri, language_id, version, text, self.encoding)
        )
        self._open[uri_key(uri)] = held
        return held

    def _unusable(self, document: Document, reason: str) -> _Unusable:
        held = self._open[uri_key(document.uri)] = _Unusable(
            document.uri, document.language_id, reason
        )
        return held

    def _too_large(self, uri: str, size: int) -> str | None:
        if not self.max_size or size <= self.max_size:
            return None
        return (
            f"{display(uri)} has {size:,} characters, more than this server takes "
            f"({self.max_size:,}, --max-document-size): no suggestions for it"
        )
