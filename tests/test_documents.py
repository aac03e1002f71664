"""The document store, without a server: one URI form, edits spliced in, refusals said."""

from __future__ import annotations

import pytest
from lsprotocol import types
from pygls.exceptions import JsonRpcInvalidParams

from starcoder_lsp.documents import Documents, RequestFailed, uri_key


def item(uri: str, text: str, version: int = 1) -> types.TextDocumentItem:
    return types.TextDocumentItem(uri=uri, language_id="python", version=version, text=text)


def edit(
    start: tuple[int, int], end: tuple[int, int], text: str
) -> types.TextDocumentContentChangePartial:
    return types.TextDocumentContentChangePartial(
        range=types.Range(start=types.Position(*start), end=types.Position(*end)), text=text
    )


def change(uri: str, version: int, *changes) -> types.DidChangeTextDocumentParams:
    return types.DidChangeTextDocumentParams(
        text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
        content_changes=list(changes),
    )


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("file:///home/me/a%20b.py", "file:///home/me/a b.py"),
        ("file:///c%3A/src/x.py", "file:///C:/src/x.py"),  # VS Code on Windows, and others
        ("file:///c%3a/src/x.py", "FILE:///c:/src/x.py"),
        ("file:///home/me/%C3%A9.py", "file:///home/me/é.py"),
    ],
)
def test_spellings_of_one_uri_are_one_document(one, other):
    assert uri_key(one) == uri_key(other)
    documents = Documents()
    documents.open(item(one, "x = 1"))
    assert documents.get(other).text == "x = 1"
    assert documents.get(other).uri == one  # replies name it as the editor did


def test_escapes_that_change_a_uri_s_structure_stay():
    assert uri_key("file:///a%2Fb.py") != uri_key("file:///a/b.py")
    assert uri_key("file:///a%23b.py") != uri_key("file:///a#b.py")


def test_incremental_edits_across_line_ends_of_every_kind():
    documents = Documents()
    documents.open(item("file:///a.py", "ab\r\ncd\ref\ngh"))
    documents.change(
        change("file:///a.py", 2, edit((1, 1), (2, 1), "X\r"), edit((0, 2), (1, 0), "\n"))
    )
    document = documents.get("file:///a.py")
    assert document.text == "ab\ncX\rf\ngh"
    assert document.version == 2
    assert document.offset_at(types.Position(2, 0)) == document.text.index("f")


def test_a_character_past_the_end_of_its_line_means_its_end():
    documents = Documents()
    documents.open(item("file:///a.py", "ab\ncd"))
    documents.change(change("file:///a.py", 2, edit((0, 9), (0, 9), "!")))
    assert documents.get("file:///a.py").text == "ab!\ncd"


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (edit((1, 1), (0, 0), "x"), "ends (0:0) before it starts (1:1)"),
        (edit((0, 2), (0, 1), ""), "ends (0:1) before it starts (0:2)"),
        (edit((5, 0), (5, 0), "x"), "past the end of the document"),
    ],
)
def test_an_edit_that_cannot_apply_makes_the_document_out_of_sync(bad, why):
    documents = Documents()
    documents.open(item("file:///a.py", "ab\ncd"))
    reason = documents.change(change("file:///a.py", 2, bad))
    assert "out of sync since version 2" in reason and why in reason
    with pytest.raises(RequestFailed, match="out of sync"):
        documents.get("file:///a.py")
    # Later edits cannot repair it and are not reported again; the whole text does.
    assert documents.change(change("file:///a.py", 3, edit((0, 0), (0, 0), "x"))) is None
    with pytest.raises(RequestFailed):
        documents.get("file:///a.py")
    documents.change(change("file:///a.py", 4, types.TextDocumentContentChangeWholeDocument("new")))
    assert documents.get("file:///a.py").text == "new"


def test_a_document_over_the_size_limit_is_not_kept():
    documents = Documents(max_size=10)
    reason = documents.open(item("file:///big.py", "x" * 11))
    assert "11 characters" in reason and "--max-document-size" in reason
    with pytest.raises(RequestFailed, match="--max-document-size"):
        documents.get("file:///big.py")
    documents.open(item("file:///small.py", "x" * 10))
    reason = documents.change(change("file:///small.py", 2, edit((0, 0), (0, 0), "grown")))
    assert "--max-document-size" in reason
    with pytest.raises(RequestFailed):
        documents.get("file:///small.py")


def test_unknown_and_closed_documents_are_the_client_s_mistake():
    documents = Documents()
    with pytest.raises(JsonRpcInvalidParams, match="open it first"):
        documents.get("file:///never.py")
    documents.open(item("file:///a.py", ""))
    documents.close("file:///a.py")
    with pytest.raises(JsonRpcInvalidParams, match="open it first"):
        documents.get("file:///a.py")
    with pytest.raises(JsonRpcInvalidParams, match="a document URI"):
        documents.get(42)
