"""LSP positions ⇄ character offsets in a document, in the encoding the client negotiated.

A position outside the document is the client's mistake, answered with InvalidParams that
says where the document ends; the server keeps serving.
"""

from __future__ import annotations

from lsprotocol import types
from pygls.exceptions import JsonRpcInvalidParams
from pygls.workspace import TextDocument


def offset_at(document: TextDocument, position: types.Position) -> int:
    """The character offset of `position`, or a clear error when it is not in the document."""
    lines = document.lines
    where = f"position {position.line}:{position.character}"
    if position.line < 0 or position.character < 0:
        raise JsonRpcInvalidParams(f"{where} is negative")
    if position.line > len(lines) or (position.line == len(lines) and position.character > 0):
        raise JsonRpcInvalidParams(
            f"{where} is past the end of {document.uri} ({len(lines)} lines)"
        )
    if position.line < len(lines):
        line = lines[position.line].rstrip("\r\n")
        width = document.position_codec.client_num_units(line)
        if position.character > width:
            raise JsonRpcInvalidParams(f"{where} is past the end of its line ({width} units)")
    return document.offset_at_position(position)


def position_at(document: TextDocument, offset: int) -> types.Position:
    """The client's position of a character offset (the inverse of `offset_at`)."""
    before = document.source[:offset]
    line = before.count("\n")
    server = types.Position(line=line, character=offset - (before.rfind("\n") + 1))
    return document.position_codec.position_to_client_units(document.lines, server)
