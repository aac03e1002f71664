"""The language server end to end: a real `starcoder-lsp serve` process on a random
checkpoint, driven over stdio by pytest-lsp's client and over TCP by a raw wire client."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import ssl
import subprocess
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
from lsp_servers import SERVE, Server, connect, start_tcp_server, stop
from lsp_wire import WireClient
from lsprotocol import types
from pygls.exceptions import JsonRpcException
from pytest_lsp import client_capabilities, make_test_lsp_client

from starcoder_lsp.backend import Backend
from starcoder_lsp.server import build_server

PROGRAM = (
    "import os\n"
    "\n"
    "\n"
    "def add(a, b):\n"
    "    return a + b\n"
    "\n"
    "\n"
    "class Shape:\n"
    '    """A shape."""\n'
    "\n"
    "    def area(self):\n"
    "        return 0\n"
    "\n"
    "\n"
    "def main():\n"
    "    "
)
END = types.Position(line=15, character=4)
SPECIAL_TOKENS = ("<fim_", "<|endoftext|>", "<filename>", "<file_sep>")


@pytest.fixture(scope="module")
def tcp_server(tiny_mqa_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_tcp_server(tiny_mqa_dir, tmp_path_factory.mktemp("tcp") / "server.log")
    yield server
    stop(server)


# --- stdio, with pytest-lsp's client -------------------------------------------------------


async def test_stdio_session(tiny_mqa_dir: Path) -> None:
    """initialize, progress, open, edit, complete, cancel, settings, docstring, accept."""
    client = make_test_lsp_client()
    edits: list[types.ApplyWorkspaceEditParams] = []

    @client.feature(types.WORKSPACE_APPLY_EDIT)
    def apply_edit(params: types.ApplyWorkspaceEditParams) -> types.ApplyWorkspaceEditResult:
        edits.append(params)
        return types.ApplyWorkspaceEditResult(applied=True)

    await client.start_io(*SERVE, "--stdio", "--model", str(tiny_mqa_dir))
    try:
        await _stdio_session(client, edits)
    finally:
        await client.shutdown_session()
        await client.stop()


async def _stdio_session(client, edits: list[types.ApplyWorkspaceEditParams]) -> None:
    uri = "file:///work/program.py"
    reply = await client.initialize_session(
        types.InitializeParams(
            capabilities=client_capabilities("neovim@v0.11.0"),
            initialization_options={"multiline": "always", "maxNewTokens": 24},
        )
    )
    assert reply.capabilities.inline_completion_provider is not None
    assert reply.capabilities.completion_provider is None  # the fallback is off by default
    document = types.TextDocumentItem(uri=uri, language_id="python", version=1, text=PROGRAM)
    client.text_document_did_open(types.DidOpenTextDocumentParams(document))
    params = _inline_params(uri, END)
    early = await client.text_document_inline_completion_async(params)
    stats = await client.protocol.send_request_async("starcoder/stats", None)
    if not stats.ready:  # answered while loading: an empty list, not an error
        assert list(early.items) == []

    async with asyncio.timeout(120):
        while not (await client.protocol.send_request_async("starcoder/stats", None)).ready:
            await asyncio.sleep(0.2)
    if client.progress_reports:  # it was still loading at `initialized`: progress to the end
        [reports] = client.progress_reports.values()
        async with asyncio.timeout(10):
            while not isinstance(reports[-1], types.WorkDoneProgressEnd):
                await asyncio.sleep(0.1)
        assert isinstance(reports[0], types.WorkDoneProgressBegin)
        assert reports[-1].message == "ready"
        assert any("compiling" in (r.message or "") for r in reports[1:-1])

    answer = await client.text_document_inline_completion_async(params)
    assert len(answer.items) == 1
    item = answer.items[0]
    assert item.insert_text.strip()
    assert not any(token in item.insert_text for token in SPECIAL_TOKENS)
    assert item.range.start == END
    assert item.command.command == "starcoder.accepted"

    # An incremental edit: (15, 10) exists only once "x = 1 " has been inserted.
    client.text_document_did_change(
        types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=2),
            content_changes=[
                types.TextDocumentContentChangePartial(
                    range=types.Range(start=END, end=END), text="x = 1 "
                )
            ],
        )
    )
    edited = await client.text_document_inline_completion_async(_inline_params(uri, (15, 10)))
    assert edited.items and edited.items[0].range.start == types.Position(15, 10)

    # $/cancelRequest stops the generation itself, not only the reply.
    client.workspace_did_change_configuration(
        types.DidChangeConfigurationParams(
            settings={"starcoder": {"maxNewTokens": 400, "multiline": "always"}}
        )
    )
    client.text_document_did_change(
        types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=3),
            content_changes=[
                types.TextDocumentContentChangePartial(
                    range=types.Range(start=types.Position(15, 10), end=types.Position(15, 10)),
                    text="\n    ",
                )
            ],
        )
    )
    long = _inline_params(uri, (16, 4))
    server_stats = lambda: client.protocol.send_request_async("starcoder/stats", None)
    requests_before = (await server_stats()).requests
    request = asyncio.ensure_future(
        client.protocol.send_request_async(
            types.TEXT_DOCUMENT_INLINE_COMPLETION, long, msg_id="long"
        )
    )
    # Cancel as soon as the server has started the generation: all 400 tokens of the test
    # model take only about 40 ms, so a fixed pause could outlast them.
    async with asyncio.timeout(10):
        while (await server_stats()).requests == requests_before:
            pass
    client.protocol.notify(types.CANCEL_REQUEST, types.CancelParams(id="long"))
    with pytest.raises(JsonRpcException) as cancelled:
        await request
    assert cancelled.value.code == types.LSPErrorCodes.RequestCancelled
    async with asyncio.timeout(30):
        while (await server_stats()).cancelled < 1:
            await asyncio.sleep(0.1)

    # Settings: disabled answers nothing; an invalid value is reported and not applied.
    client.workspace_did_change_configuration(
        types.DidChangeConfigurationParams(
            settings={"starcoder": {"enabled": False, "maxNewTokens": 24}}
        )
    )
    assert not (await client.text_document_inline_completion_async(params)).items
    client.workspace_did_change_configuration(
        types.DidChangeConfigurationParams(
            settings={"starcoder": {"enabled": True, "fimMode": "backwards"}}
        )
    )
    async with asyncio.timeout(10):
        while not any("fimMode" in m.message for m in client.messages):
            await asyncio.sleep(0.05)
    assert not (await client.text_document_inline_completion_async(params)).items

    client.workspace_did_change_configuration(
        types.DidChangeConfigurationParams(settings={"starcoder": {"enabled": True}})
    )
    at_def = [uri, {"line": 3, "character": 4}]
    result = await client.workspace_execute_command_async(
        types.ExecuteCommandParams(command="starcoder.generateDocstring", arguments=at_def)
    )
    assert result["applied"] is True
    [edit] = edits[0].edit.changes[uri]
    assert edit.range.start == edit.range.end == types.Position(4, 0)
    assert edit.new_text == result["docstring"]
    assert edit.new_text.startswith('    """') and edit.new_text.endswith('"""\n')
    compile(
        PROGRAM[: PROGRAM.index("    return a + b")] + edit.new_text + "    return 1\n",
        "docstring",
        "exec",
    )

    await client.workspace_execute_command_async(
        types.ExecuteCommandParams(command="starcoder.accepted", arguments=[uri])
    )
    stats = await client.protocol.send_request_async("starcoder/stats", None)
    assert stats.accepted == 1 and stats.docstrings == 1 and stats.requests >= 6


def _inline_params(uri: str, at: types.Position | tuple[int, int]) -> types.InlineCompletionParams:
    position = at if isinstance(at, types.Position) else types.Position(*at)
    return types.InlineCompletionParams(
        text_document=types.TextDocumentIdentifier(uri=uri),
        position=position,
        context=types.InlineCompletionContext(
            trigger_kind=types.InlineCompletionTriggerKind.Automatic
        ),
    )


# --- TCP: many clients, one engine ---------------------------------------------------------


async def test_two_clients_get_answers_for_their_own_documents(tcp_server: Server) -> None:
    uri = "file:///same/name.py"  # the same URI holds different text on each connection
    long_text = "".join(f"value_{i} = {i}\n" for i in range(20)) + "def f():\n    "
    short_text = "import sys\nprint("
    first, second = await connect(tcp_server), await connect(tcp_server)
    await first.open(uri, long_text)
    await second.open(uri, short_text)
    together = await asyncio.gather(first.inline(uri, 21, 4), second.inline(uri, 1, 6))
    assert [("result" in r) for r in together] == [True, True], together
    # Line 21 exists only in the first client's document.
    assert "error" in await second.inline(uri, 21, 4)
    alone = [await first.inline(uri, 21, 4), await second.inline(uri, 1, 6)]
    assert [r["result"] for r in together] == [r["result"] for r in alone]

    # One client vanishing (no shutdown) leaves the other served.
    first.writer.transport.abort()
    assert "result" in await second.inline(uri, 1, 6)
    third = await connect(tcp_server)
    await third.open(uri, long_text)
    assert (await third.inline(uri, 21, 4))["result"] == alone[0]["result"]
    for client in (second, third):
        await client.close()


SHAPES = (
    "class Rectangle:\n"
    "    def __init__(self, width, height):\n"
    "        self.width = width\n"
    "        self.height = height\n"
)
USES_SHAPES = "from shapes import Rectangle\n\nbox = Rectangle(width=3, height=4)\nprint(box."


async def test_cross_file_context_comes_from_the_connection_s_own_files(tcp_server: Server) -> None:
    """Chunks of a client's other files and pushed text reach its prompts; another client's
    documents and pushes never do, however much they resemble the code at the cursor."""
    mine, theirs = await connect(tcp_server), await connect(tcp_server)
    main, end = "file:///mine/main.py", (3, len("print(box."))
    await theirs.open("file:///theirs/secret.py", SHAPES)
    await theirs.notify("starcoder/context", {"uri": "file:///theirs/yank.py", "text": SHAPES})
    await mine.open(main, USES_SHAPES)
    assert "result" in await mine.inline(main, *end)
    stats = (await mine.request("starcoder/stats"))["result"]
    assert (stats["lastContext"], stats["contextTokens"]) == ([], 0)

    await mine.notify("starcoder/context", {"uri": "file:///mine/shapes.py", "text": SHAPES})
    await mine.open("file:///mine/unrelated.py", "import socket\nsocket.create_connection\n")
    assert "result" in await mine.inline(main, *end)
    assert "result" in await mine.inline(main, *end)  # the same block: built once
    stats = (await mine.request("starcoder/stats"))["result"]
    assert stats["lastContext"] == ["shapes.py:1"]
    assert stats["contextTokens"] > 0 and stats["contextRequests"] >= 1
    builds = stats["contextBuilds"]
    # Typing, even sent as whole texts, keeps the block (the cursor stays in its region).
    for version, typed in enumerate(("a", "ar", "are"), start=2):
        await mine.change(main, version, {"text": USES_SHAPES + typed})
        assert "result" in await mine.inline(main, end[0], end[1] + len(typed))
    assert (await mine.request("starcoder/stats"))["result"]["contextBuilds"] == builds
    await mine.notify(
        "textDocument/didSave", {"textDocument": {"uri": "file:///mine/unrelated.py"}}
    )
    await mine.inline(main, *end)
    assert (await mine.request("starcoder/stats"))["result"]["contextBuilds"] == builds + 1
    # A yank (a URI with a fragment) from another file is quoted under that file's path; one
    # from the current document is not (its text is in the prompt already).
    scale = "def scale(rectangle, width, height):\n    return Rectangle(width * 2, height * 2)\n"
    await mine.notify("starcoder/context", {"uri": "file:///mine/notes.py#yank", "text": scale})
    await mine.notify("starcoder/context", {"uri": main + "#yank", "text": USES_SHAPES * 2})
    await mine.inline(main, *end)
    stats = (await mine.request("starcoder/stats"))["result"]
    assert stats["lastContext"] == ["shapes.py:1", "notes.py:1"]
    # A push that is not {uri: string, text: string} is dropped, and the server serves on.
    await mine.notify("starcoder/context", {"uri": 5})
    assert "result" in await mine.inline(main, *end)
    for client in (mine, theirs):
        await client.close()


async def test_exit_ends_only_its_connection(tcp_server: Server) -> None:
    leaving = await connect(tcp_server)
    await leaving.request("shutdown")
    await leaving.notify("exit")
    assert await leaving.closed()
    assert tcp_server.process.poll() is None
    staying = await connect(tcp_server)
    assert (await staying.request("starcoder/stats"))["result"]["ready"]
    await staying.close()


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16"])
async def test_position_encodings_with_text_before_the_cursor(
    tcp_server: Server, encoding: str
) -> None:
    client = await WireClient.tcp(tcp_server.port)
    offered = ["utf-16", "utf-8"] if encoding == "utf-8" else None  # utf-8 wins when offered
    reply = await client.initialize({"multiline": "never"}, encodings=offered)
    assert reply["result"]["capabilities"]["positionEncoding"] == encoding
    await client.wait_ready()
    uri = "file:///unicode.py"
    line = 'name = "héllo 😀" + '
    await client.open(uri, f"{line}\nprint(name)\n")
    width = len(line.encode("utf-8" if encoding == "utf-8" else "utf-16-le"))
    width //= 1 if encoding == "utf-8" else 2
    at_end = await client.inline(uri, 0, width)
    assert "result" in at_end, at_end
    for item in at_end["result"]["items"]:
        assert item["range"]["start"] == {"line": 0, "character": width}
    # One unit past the end of the line, in the negotiated encoding, is refused.
    past = await client.inline(uri, 0, width + 1)
    assert past["error"]["code"] == types.ErrorCodes.InvalidParams
    # And the other encoding's end of line is not this one's: code points < UTF-16 < UTF-8.
    other = len(line.encode("utf-8")) if encoding == "utf-16" else len(line)
    assert ("error" in await client.inline(uri, 0, other)) == (other > width)
    await client.close()


async def test_bad_input_is_answered_and_the_server_keeps_serving(tcp_server: Server) -> None:
    client = await connect(tcp_server)
    uri = "file:///ok.py"
    await client.open(uri, PROGRAM)

    await client.send_body(b'{"jsonrpc": "2.0", "id": 99, "method": ')  # malformed JSON
    await client.send_body(b'{"jsonrpc": "2.0", "method": "x", "params": "\xff\xfe"}')  # bad UTF-8
    for _ in range(2):
        parse_error = await client.read()
        assert parse_error["id"] is None and parse_error["error"]["code"] == -32700
    unknown = await client.request("textDocument/frobnicate", {})
    assert unknown["error"]["code"] == types.ErrorCodes.MethodNotFound
    past = await client.inline(uri, 400, 0)
    assert past["error"]["code"] == types.ErrorCodes.InvalidParams
    assert "past the end" in past["error"]["message"]
    wide = await client.inline(uri, 0, 80)
    assert "past the end of its line" in wide["error"]["message"]
    missing = await client.inline("file:///never/opened.py", 0, 0)
    assert "unknown document" in missing["error"]["message"]
    shapeless = await client.request("textDocument/inlineCompletion", {"position": "here"})
    assert "error" in shapeless

    huge = "x = 1\n" * (5 * 2**20 // 6) + "def tail():\n    "
    await client.open("file:///huge.py", huge)
    lines = huge.count("\n")
    assert "result" in await client.inline("file:///huge.py", lines, 4, timeout=120)

    ok = await client.inline(uri, END.line, END.character)
    assert ok["result"]["items"], ok
    await client.close()


async def test_code_action_offers_docstrings_where_missing(tcp_server: Server) -> None:
    client = await connect(tcp_server)
    uri = "file:///actions.py"
    await client.open(uri, PROGRAM)

    async def actions(line: int) -> list[dict]:
        reply = await client.request(
            "textDocument/codeAction",
            {
                "textDocument": {"uri": uri},
                "range": {
                    "start": {"line": line, "character": 0},
                    "end": {"line": line, "character": 0},
                },
                "context": {"diagnostics": []},
            },
        )
        return reply["result"]

    [action] = await actions(4)  # inside add(), which has no docstring
    assert action["title"] == "Generate docstring"
    assert action["kind"] == "refactor.rewrite"
    assert action["command"]["command"] == "starcoder.generateDocstring"
    assert action["command"]["arguments"][0] == uri
    assert await actions(8) == []  # Shape has one
    assert await actions(0) == []  # not in a definition

    command = action["command"]
    applied = await client.request(
        "workspace/executeCommand",
        {"command": command["command"], "arguments": command["arguments"]},
    )
    assert applied["result"]["applied"] is True
    [edit_request] = [r for r in client.server_requests if r["method"] == "workspace/applyEdit"]
    [edit] = edit_request["params"]["edit"]["changes"][uri]
    assert edit["range"]["start"] == {"line": 4, "character": 0}
    assert edit["newText"].startswith('    """')
    await client.close()


async def test_completion_fallback_is_off_unless_asked_for(tcp_server: Server) -> None:
    plain = await connect(tcp_server)
    assert (
        await plain.request(
            "textDocument/completion",
            {
                "textDocument": {"uri": "file:///x.py"},
                "position": {"line": 0, "character": 0},
            },
        )
    )["error"]["code"] == types.ErrorCodes.MethodNotFound
    await plain.close()

    client = await WireClient.tcp(tcp_server.port)
    reply = await client.initialize({"completionFallback": True, "multiline": "always"})
    assert "completionProvider" in reply["result"]["capabilities"]
    await client.wait_ready()
    uri = "file:///fallback.py"
    await client.open(uri, PROGRAM)
    position = {"line": END.line, "character": END.character}
    completion = await client.request(
        "textDocument/completion", {"textDocument": {"uri": uri}, "position": position}
    )
    inline = await client.inline(uri, END.line, END.character)
    [item] = completion["result"]["items"]
    text = inline["result"]["items"][0]["insertText"]
    assert item["textEdit"]["newText"] == text
    assert item["label"] == (text.split("\n", 1)[0].strip() or text.strip())
    await client.close()


async def test_unknown_settings_are_logged_once(tcp_server: Server) -> None:
    client = await connect(tcp_server, {"someUnknownKnob": 1})
    for _ in range(2):
        await client.notify(
            "workspace/didChangeConfiguration", {"settings": {"starcoder": {"someUnknownKnob": 2}}}
        )
    assert "result" in await client.request("starcoder/stats")
    assert tcp_server.log_text().count("unknown setting 'someUnknownKnob'") == 1
    await client.close()


# --- hardening: what careless and hostile clients send ----------------------------------------


@pytest.fixture(scope="module")
def limited_server(
    tiny_mqa_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """One cache slot, one row and two waiting requests per connection, small documents
    and a short wait for applyEdit: the limits, small enough to reach in a test."""
    server = start_tcp_server(
        tiny_mqa_dir,
        tmp_path_factory.mktemp("limited") / "server.log",
        "--cache-slots",
        "1",
        "--max-rows-per-connection",
        "1",
        "--max-queued-per-connection",
        "2",
        "--max-document-size",
        "100K",
        "--apply-edit-timeout",
        "1",
    )
    yield server
    stop(server)


async def test_a_wrong_setting_is_refused_and_completions_are_still_answered(
    tcp_server: Server,
) -> None:
    """minChars "abc" used to raise in the engine's callback and hang every completion;
    values past the model's context (512 tokens here) used to break every request."""
    client = await connect(tcp_server, {"maxNewTokens": 8})
    uri = "file:///settings.py"
    await client.open(uri, PROGRAM)
    for wrong, said in (
        ({"minChars": "abc"}, "minChars must be a whole number"),
        ({"minChars": None}, "minChars must not be null"),
        ({"enabled": "no"}, "enabled must be true or false"),
        ({"maxNewTokens": 4000}, "maxNewTokens 4000 leaves no room"),
        ({"prefixTokens": 1000}, "exceed the model's context of 512"),
    ):
        await client.notify("workspace/didChangeConfiguration", {"settings": {"starcoder": wrong}})
        answer = await client.inline(uri, END.line, END.character, timeout=30)
        assert "result" in answer, (wrong, answer)
        assert any(said in m for m in client.shown_messages()), (wrong, client.shown_messages())
    await client.close()


async def test_percent_encoded_uris_are_served(tcp_server: Server) -> None:
    client = await connect(tcp_server)
    for opened, asked in (
        ("file:///home/me/a%20b.py", "file:///home/me/a%20b.py"),
        ("file:///c%3A/src/x.py", "file:///c%3A/src/x.py"),  # VS Code on Windows
        ("file:///c%3A/src/y.py", "file:///C:/src/y.py"),
    ):
        await client.open(opened, PROGRAM)
        answer = await client.inline(asked, END.line, END.character)
        assert "result" in answer, (opened, asked, answer)
    await client.close()


async def test_lines_end_only_at_lsp_line_ends(tcp_server: Server) -> None:
    """A CR-only file's ranges run forward on the cursor's line; a form feed or U+2028 in a
    line does not shift the lines after it."""
    client = await connect(tcp_server)
    await client.open("file:///cr.py", PROGRAM.replace("\n", "\r"))
    answer = await client.inline("file:///cr.py", END.line, END.character)
    [item] = answer["result"]["items"]
    assert item["range"]["start"] == {"line": END.line, "character": END.character}
    assert item["range"]["end"]["line"] == END.line
    assert item["range"]["end"]["character"] >= END.character
    for separator in ("\x0c", "\u2028", "\x85", "\x1e"):
        uri = f"file:///separator-{ord(separator)}.py"
        await client.open(uri, f"x = 1{separator}  # not a line end\ny = ")
        answer = await client.inline(uri, 1, 4)
        assert "result" in answer, (separator, answer)
    await client.close()


async def test_a_reversed_edit_is_refused_loudly(tcp_server: Server) -> None:
    client = await connect(tcp_server)
    uri = "file:///reversed.py"
    await client.open(uri, PROGRAM)
    backwards = {"start": {"line": 4, "character": 4}, "end": {"line": 3, "character": 0}}
    await client.change(uri, 2, {"range": backwards, "text": "x"})
    refused = await client.inline(uri, END.line, END.character)
    assert refused["error"]["code"] == -32803
    assert "out of sync since version 2" in refused["error"]["message"]
    assert any("out of sync" in m for m in client.shown_messages())
    await client.open(uri, PROGRAM, version=3)  # the editor sends its text again
    assert "result" in await client.inline(uri, END.line, END.character)
    await client.close()


async def test_generate_docstring_stops_waiting_for_an_editor_that_never_applies(
    limited_server: Server,
) -> None:
    client = await connect(limited_server)
    client.answer_server_requests = False
    uri = "file:///silent.py"
    await client.open(uri, PROGRAM)
    arguments = [uri, {"line": 3, "character": 4}]
    reply = await client.request(
        "workspace/executeCommand",
        {"command": "starcoder.generateDocstring", "arguments": arguments},
        timeout=30,
    )
    assert reply["result"]["applied"] is False
    assert "did not answer workspace/applyEdit within 1 s" in reply["result"]["reason"]
    assert "workspace/applyEdit" in [r["method"] for r in client.server_requests]
    await client.close()


async def test_a_document_over_the_size_limit_gets_a_clear_error(limited_server: Server) -> None:
    client = await connect(limited_server)
    big = "x = 1\n" * 20_000  # 120,000 characters; this server takes 100K
    await client.open("file:///big.py", big)
    answer = await client.inline("file:///big.py", 20_000, 0)
    assert answer["error"]["code"] == -32803
    assert "--max-document-size" in answer["error"]["message"]
    assert any("--max-document-size" in m for m in client.shown_messages())
    await client.open("file:///small.py", PROGRAM)
    assert "result" in await client.inline("file:///small.py", END.line, END.character)
    await client.close()


async def long_requests(client: WireClient, count: int) -> list[int]:
    """`count` long completions on as many documents, sent at once; their ids."""
    ids = []
    for n in range(count):
        uri = f"file:///flood/{n}.py"
        await client.open(uri, PROGRAM + f"# {n}\n    ")
        ids.append(1000 + n)
        params = {
            "textDocument": {"uri": uri},
            "position": {"line": END.line + 1, "character": 4},
            "context": {"triggerKind": 2},
        }
        await client.send(
            {"id": ids[-1], "method": "textDocument/inlineCompletion", "params": params}
        )
    return ids


async def test_a_connection_s_oldest_waiting_requests_are_superseded(
    limited_server: Server,
) -> None:
    client = await connect(limited_server, {"maxNewTokens": 400, "minChars": 0})
    before = (await client.request("starcoder/stats"))["result"]["superseded"]
    ids = await long_requests(client, 30)
    replies = [await client.reply(n, timeout=120) for n in ids]
    assert all("result" in r for r in replies)
    superseded = (await client.request("starcoder/stats"))["result"]["superseded"] - before
    # One row and two waiting at most: the rest give way to newer ones as they come.
    assert superseded >= 20, superseded
    await client.close()


async def test_a_closed_connection_s_requests_are_dropped(limited_server: Server) -> None:
    leaving = await connect(limited_server, {"maxNewTokens": 400, "minChars": 0})
    await long_requests(leaving, 10)
    await leaving.close()
    staying = await connect(limited_server)
    async with asyncio.timeout(60):
        while True:
            totals = (await staying.request("starcoder/stats"))["result"]["totals"]
            if totals["disconnected"] >= 1:
                break
            await asyncio.sleep(0.1)
    await staying.open("file:///after.py", PROGRAM)
    assert "result" in await staying.inline("file:///after.py", END.line, END.character)
    await staying.close()


async def test_nothing_more_is_read_from_a_connection_with_too_many_requests_in_flight(
    tiny_mqa_dir: Path, tmp_path: Path
) -> None:
    """No queue limit here: requests wait their turn instead of being superseded. With four
    in flight, the server reads the connection's next message only once one is answered."""
    server = start_tcp_server(
        tiny_mqa_dir,
        tmp_path / "server.log",
        "--cache-slots",
        "1",
        "--max-queued-per-connection",
        "0",
        "--max-in-flight-per-connection",
        "4",
    )
    try:
        client = await connect(server, {"maxNewTokens": 64, "minChars": 0})
        ids = await long_requests(client, 12)
        await client.send({"id": 99, "method": "starcoder/stats"})
        replies_before_stats = 0
        async with asyncio.timeout(120):
            while True:
                message = await client.read()
                if message.get("id") == 99:
                    stats = message["result"]
                    break
                replies_before_stats += message.get("id") in ids
        # When the stats request was read, at most 4 completions were being served.
        assert stats["requests"] - replies_before_stats <= 4, (stats, replies_before_stats)
        assert stats["requests"] >= 9
        await client.close()
    finally:
        stop(server)


async def test_json_rpc_errors_for_what_is_not_a_message(tcp_server: Server) -> None:
    client = await WireClient.tcp(tcp_server.port)
    for body, code, reply_id in (
        (b"{not json", -32700, None),
        (b'"just a string"', -32600, None),
        (b"[]", -32600, None),
        (b'{"jsonrpc": "2.0"}', -32600, None),
        (b'{"jsonrpc": "1.0", "id": 5, "method": "initialize"}', -32600, 5),
        (b'{"jsonrpc": "2.0", "id": 6, "method": 7}', -32600, 6),
    ):
        await client.send_body(body)
        reply = await client.read()
        assert (reply["id"], reply["error"]["code"]) == (reply_id, code), (body, reply)
    # Before initialize: requests get -32002, notifications are dropped.
    await client.notify("textDocument/didOpen", {"textDocument": {}})
    early = await client.request("starcoder/stats")
    assert early["error"]["code"] == -32002
    assert "result" in await client.initialize()
    # A request without params (JSON-RPC allows it), with a lower-case header name.
    body = b'{"jsonrpc": "2.0", "id": 77, "method": "starcoder/stats"}'
    client.writer.write(b"content-length: %d\r\n\r\n" % len(body) + body)
    assert "ready" in (await client.reply(77))["result"]
    assert "result" in await client.request("shutdown")
    after = await client.request("starcoder/stats")
    assert after["error"]["code"] == -32600 and "shutting down" in after["error"]["message"]
    await client.close()


async def test_an_invalid_position_is_logged_in_one_line(tcp_server: Server) -> None:
    client = await connect(tcp_server)
    await client.open("file:///short.py", "x = 1\n")
    answer = await client.inline("file:///short.py", 7, 0)
    assert answer["error"]["code"] == types.ErrorCodes.InvalidParams
    await client.close()
    log = tcp_server.log_text()
    assert "7:0 is past the end" in log
    assert "Traceback" not in log


async def test_stats_on_a_local_server_list_every_connection(tcp_server: Server) -> None:
    first, second = await connect(tcp_server), await connect(tcp_server)
    await first.open("file:///mine.py", PROGRAM)
    await first.inline("file:///mine.py", END.line, END.character)
    mine = (await first.request("starcoder/stats"))["result"]
    theirs = (await second.request("starcoder/stats"))["result"]
    assert mine["requests"] == 1 and theirs["requests"] == 0
    assert theirs["totals"]["requests"] >= 1
    assert len(theirs["connections"]) >= 2
    for client in (first, second):
        await client.close()


# --- tokens and TLS -------------------------------------------------------------------------


async def test_token_and_tls(tiny_mqa_dir: Path, tmp_path: Path, certificate) -> None:
    cert, key = certificate
    server = start_tcp_server(
        tiny_mqa_dir,
        tmp_path / "server.log",
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        env={**os.environ, "STARCODER_LSP_TOKEN": "s3cret"},
    )
    tls = ssl.create_default_context(cafile=str(cert))
    try:
        # Plain TCP to a TLS server gets nowhere.
        plain = await WireClient.tcp(server.port)
        await plain.send({"id": 1, "method": "initialize", "params": {"capabilities": {}}})
        assert await plain.closed()

        for token in (None, "wrong"):
            client = await WireClient.tcp(server.port, tls=tls)
            reply = await client.initialize({"token": token} if token else {})
            assert "token" in reply["error"]["message"]
            assert await client.closed()  # and nothing else

        sneaky = await WireClient.tcp(server.port, tls=tls)
        await sneaky.send({"id": 1, "method": "starcoder/stats", "params": None})
        assert await sneaky.closed()

        client = await connect(server, {"token": "s3cret"}, tls=tls)
        await client.open("file:///t.py", PROGRAM)
        assert "result" in await client.inline("file:///t.py", END.line, END.character)
        await client.close()
        assert server.process.poll() is None
    finally:
        stop(server)


def test_public_address_needs_a_token(tiny_mqa_dir: Path) -> None:
    done = subprocess.run(
        [*SERVE, "--tcp", "--host", "0.0.0.0", "--model", str(tiny_mqa_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--token" in done.stderr and "STARCODER_LSP_TOKEN" in done.stderr


def test_tls_needs_a_readable_certificate(tiny_mqa_dir: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [
            *SERVE,
            "--tcp",
            "--tls-cert",
            str(tmp_path / "missing.pem"),
            "--tls-key",
            str(tmp_path / "missing.key"),
            "--model",
            str(tiny_mqa_dir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "missing.pem" in done.stderr


def test_a_missing_model_is_reported_and_the_server_keeps_serving(tmp_path: Path) -> None:
    async def session() -> dict:
        server = start_tcp_server(tmp_path / "no-such-model", tmp_path / "server.log")
        try:
            client = await WireClient.tcp(server.port)
            await client.initialize()
            stats = await client.wait_ready()
            await client.open("file:///a.py", "x = ")
            assert (await client.inline("file:///a.py", 0, 4))["result"] == {"items": []}
            await client.close()
            return stats
        finally:
            stop(server)

    stats = asyncio.run(session())
    assert stats["ready"] is False
    assert "no-such-model" in stats["error"]


def test_stats_is_json(tcp_server: Server) -> None:
    async def stats() -> dict:
        client = await connect(tcp_server)
        reply = await client.request("starcoder/stats")
        await client.close()
        return reply["result"]

    result = asyncio.run(stats())
    assert json.loads(json.dumps(result)) == result
    assert {"requests", "shown", "accepted", "cacheHits", "latencyMs", "model"} <= set(result)


def test_a_connection_that_ended_is_not_kept_alive():
    """pygls caches message types per protocol object (functools.lru_cache on a method):
    the last 128 (connection, method) pairs kept ended connections alive, with their
    documents; and it made a cattrs converter, compiling ~1,000 functions, per connection."""
    backend = Backend(lambda progress: None)
    servers = [build_server(backend) for _ in range(2)]
    assert servers[0].protocol._converter is servers[1].protocol._converter
    for method in ("initialize", "textDocument/inlineCompletion", "starcoder/stats"):
        for protocol in (servers[0].protocol, servers[1].protocol):
            protocol.get_message_type(method)
            protocol.get_result_type(method)
    del protocol
    ended = weakref.ref(servers.pop())
    gc.collect()
    assert ended() is None
