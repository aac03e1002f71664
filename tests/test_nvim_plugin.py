"""The Neovim plugin (editors/nvim) end to end: a headless Neovim, driven over its RPC API
with pynvim, loads the plugin against a real `starcoder-lsp serve --stdio` on a random
checkpoint, types, waits for the ghost text and accepts it.

Every test runs on Debian's Neovim (0.7.2: the suggestion drawn over the line) and on 0.11.4
(drawn inline, between characters); ./setup.sh installs both (see nvim_headless.py)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pynvim
import pytest
from lsp_wire import WireClient
from nvim_headless import PLUGIN, VERSIONS, nvim_binary

SERVER = [sys.executable, "-m", "starcoder_lsp", "serve", "--log-level", "WARNING"]
SERVE = [*SERVER, "--stdio"]
SETTINGS = {"multiline": "always", "maxNewTokens": 12, "minChars": 1}

# The cursor goes at the end of line 5, after characters that take 2 bytes and 1 UTF-16 unit
# (é) and 4 bytes and 2 UTF-16 units (𝔘): positions are converted right or the test fails.
PROGRAM = 'import os\n\n\ndef main(argv):\n    if argv:\n        label = "é𝔘" + \n'
CURSOR = (5, len('        label = "é𝔘" + '.encode()))
DOCSTRING_PROGRAM = "import os\n\n\ndef add(a, b):\n    return a + b\n"


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Editor:
    """A headless Neovim with the plugin set up against a real server."""

    def __init__(self, nvim: pynvim.Nvim, workspace: Path) -> None:
        self.nvim = nvim
        self.workspace = workspace

    def lua(self, code: str, *args: Any) -> Any:
        return self.nvim.exec_lua(code, *args)

    def stats(self) -> dict:
        result = self.lua(
            "local s, e = require('starcoder').stats(5000) return { s = s or false, e = e or '' }"
        )
        assert result["s"], result["e"]
        return result["s"]

    def open(self, name: str, text: str) -> None:
        path = self.workspace / name
        path.write_text(text)
        self.nvim.command(f"edit {path}")
        wait_for("the client to attach", lambda: self.lua(ATTACHED))

    def lines(self) -> list[str]:
        return self.nvim.current.buffer[:]

    def cursor(self) -> tuple[int, int]:
        row, col = self.nvim.current.window.cursor
        return row - 1, col

    def mode(self) -> str:
        return self.nvim.api.get_mode()["mode"]

    def insert_at(self, row: int, col: int) -> None:
        """Insert mode with the cursor before byte `col` of 0-based `row` (or at its end)."""
        self.nvim.input("<Esc>")
        wait_for("normal mode", lambda: self.mode() == "n", 5)
        at_end = col >= len(self.lines()[row].encode())
        self.nvim.current.window.cursor = (row + 1, 0 if at_end else col)
        self.nvim.input("A" if at_end else "i")
        wait_for("insert mode", lambda: self.mode() == "i", 5)
        assert self.cursor() == (row, col)

    def suggestion(self) -> str | None:
        return self.lua("return require('starcoder').suggestion()")

    def shown(self) -> str | None:
        return self.lua("return require('starcoder.render').shown(0)")

    def request_directly(self) -> dict | None:
        """The server's answer at the cursor, asked over the same connection, bypassing the
        plugin's own request and rendering."""
        return self.lua(DIRECT_REQUEST)

    def type_until_suggestion(self, keys: str) -> str:
        """Types `keys` one at a time until the plugin shows a (non-empty) suggestion."""
        for key in keys:
            self.nvim.input(key)
            try:
                return wait_for("a suggestion", self.suggestion, timeout=10)
            except AssertionError:
                continue
        raise AssertionError(f"no suggestion after typing {keys!r}")


STATUS = "return require('starcoder').status()"

ATTACHED = """
local c = require('starcoder.client').for_buffer(0)
return c ~= nil and c.initialized == true
"""

DIRECT_REQUEST = """
local compat = require('starcoder.compat')
local c = require('starcoder.client').for_buffer(0)
local pos = vim.api.nvim_win_get_cursor(0)
local line = vim.api.nvim_get_current_line()
local params = {
  textDocument = { uri = vim.uri_from_bufnr(0) },
  position = { line = pos[1] - 1, character = compat.character(line, pos[2], compat.encoding(c)) },
  context = { triggerKind = 1 },
}
local response = compat.request_sync(c, 'textDocument/inlineCompletion', params, 30000, 0)
local items = response and response.result and (response.result.items or response.result)
if not items or #items == 0 then return nil end
return { item = items[1], encoding = compat.encoding(c), line = line }
"""


def utf_units_to_bytes(line: str, units: int, encoding: str) -> int:
    """An LSP character offset in `line` as a byte offset of its UTF-8 encoding."""
    if encoding == "utf-8":
        return units
    width = 2 if encoding == "utf-16" else 4
    data = line.encode("utf-16-le" if width == 2 else "utf-32-le")[: units * width]
    return len(data.decode("utf-16-le" if width == 2 else "utf-32-le").encode())


def apply_item(lines: list[str], answer: dict) -> list[str]:
    """The buffer after inserting an InlineCompletionItem, computed here in Python."""
    item, encoding = answer["item"], answer["encoding"]
    start, end = item["range"]["start"], item["range"]["end"]
    data = [line.encode() for line in lines]
    start_col = utf_units_to_bytes(lines[start["line"]], start["character"], encoding)
    end_col = utf_units_to_bytes(lines[end["line"]], end["character"], encoding)
    before = data[start["line"]][:start_col].decode()
    after = data[end["line"]][end_col:].decode()
    middle = (before + item["insertText"] + after).split("\n")
    return lines[: start["line"]] + middle + lines[end["line"] + 1 :]


@contextmanager
def running_editor(workspace: Path, options: dict, version: str) -> Iterator[Editor]:
    """A headless Neovim whose plugin is set up with `options`, the model loaded."""
    argv = [nvim_binary(version), "--embed", "--headless", "--clean", "-n"]
    nvim = pynvim.attach("child", argv=argv)
    try:
        nvim.command(f"set runtimepath^={PLUGIN} noswapfile")
        nvim.command("runtime plugin/starcoder.lua")
        nvim.command(f"cd {workspace}")
        nvim.exec_lua("require('starcoder').setup(...)", {"settings": SETTINGS, **options})
        ed = Editor(nvim, workspace)
        ed.open("warmup.py", "x = 1\n")
        wait_for("the model to load", lambda: ed.stats()["ready"], timeout=120)
        yield ed
    finally:
        try:
            nvim.exec_lua("require('starcoder.client').stop()")
            nvim.command("qall!")
        except Exception:  # Neovim exits while answering
            pass
        nvim.close()


@pytest.fixture(scope="module", params=VERSIONS)
def editor(
    request: pytest.FixtureRequest, tiny_mqa_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Editor]:
    workspace = tmp_path_factory.mktemp("nvim-workspace")
    options = {"cmd": [*SERVE, "--model", str(tiny_mqa_dir)]}
    with running_editor(workspace, options, request.param) as ed:
        yield ed


def test_ghost_text_is_shown_and_accepting_inserts_the_suggestion(editor: Editor) -> None:
    editor.open("typing.py", PROGRAM)
    editor.insert_at(*CURSOR)
    accepted_before = editor.stats()["accepted"]

    suggestion = editor.type_until_suggestion("rxyzq")
    row, col = editor.cursor()
    before = editor.lines()
    # What is drawn is what the plugin will insert (the cursor is at the end of its line).
    assert editor.shown() == suggestion.replace("\t", " " * 8)  # tabstop 8
    # The server's own answer at this position, asked directly, is what the plugin shows.
    answer = editor.request_directly()
    assert answer is not None
    expected = apply_item(before, answer)
    assert answer["item"]["insertText"].endswith(suggestion)

    editor.nvim.input("<Tab>")
    wait_for("the suggestion to be inserted", lambda: editor.lines() != before, 10)
    assert editor.lines() == expected
    # buffer after == buffer before + the suggestion at the cursor
    text_before = "\n".join(before).encode()
    at = sum(len(line.encode()) + 1 for line in before[:row]) + col
    assert "\n".join(editor.lines()).encode() == (
        text_before[:at] + suggestion.encode() + text_before[at:]
    )
    assert editor.suggestion() is None and editor.shown() is None
    # The cursor ends after the inserted text; the server counted the acceptance.
    last = suggestion.split("\n")
    end_row = row + len(last) - 1
    end_col = (col if len(last) == 1 else 0) + len(last[-1].encode())
    assert editor.cursor() == (end_row, end_col)
    wait_for("the acceptance to be counted", lambda: editor.stats()["accepted"] > accepted_before)
    editor.nvim.input("<Esc>")


def test_typing_through_accepting_words_and_lines_and_a_range_past_the_cursor(
    editor: Editor,
) -> None:
    """Deterministic: items made up here are shown as if the server had sent them."""
    editor.open("parts.py", "def f(a):\n    return g()\n")
    editor.insert_at(1, 13)  # return g(|)
    item = {
        "insertText": "a, b + 1)\n    # done",
        "range": {"start": {"line": 1, "character": 13}, "end": {"line": 1, "character": 14}},
    }
    editor.lua("require('starcoder.suggestion')._show_items({ ... })", item)
    assert editor.suggestion() == "a, b + 1)\n    # done"

    editor.nvim.input("a")  # typing the suggestion's first character keeps it shown
    wait_for("typing through", lambda: editor.suggestion() == ", b + 1)\n    # done", 5)
    editor.nvim.input("<M-Right>")  # accept a word: ","
    wait_for("a word accepted", lambda: editor.suggestion() == " b + 1)\n    # done", 5)
    assert editor.lines()[1] == "    return g(a,)"
    editor.nvim.input("<M-C-Right>")  # accept the line; it replaces the auto-closed ")"
    wait_for("a line accepted", lambda: editor.suggestion() == "    # done", 5)
    assert editor.lines()[1:3] == ["    return g(a, b + 1)", ""]
    assert editor.cursor() == (2, 0)
    editor.nvim.input("<C-]>")  # dismiss
    wait_for("the suggestion dismissed", lambda: editor.shown() is None, 5)
    assert editor.suggestion() is None

    # Accepting all of an item whose range covers text after the cursor replaces that text.
    editor.open("brackets.py", "print()\n")
    editor.insert_at(0, 6)  # print(|)
    item = {
        "insertText": "'hi')",
        "range": {"start": {"line": 0, "character": 6}, "end": {"line": 0, "character": 7}},
    }
    editor.lua("require('starcoder.suggestion')._show_items({ ... })", item)
    editor.nvim.input("<Tab>")
    wait_for("the item accepted", lambda: editor.lines()[0] != "print()", 5)
    assert editor.lines() == ["print('hi')"]
    assert editor.cursor() == (0, 11)
    editor.nvim.input("<Esc>")


def test_docstring_command_inserts_the_docstring(editor: Editor) -> None:
    editor.open("doc.py", DOCSTRING_PROGRAM)
    before = editor.lines()
    editor.nvim.current.window.cursor = (4, 0)  # the `def add` line
    editor.nvim.command("StarcoderDocstring")
    reply = wait_for(
        "the docstring command's reply",
        lambda: editor.lua("return require('starcoder.docstring').last"),
        timeout=60,
    )
    assert not reply.get("err"), reply
    result = reply["result"]
    assert result["applied"] is True, result
    docstring = result["docstring"].rstrip("\n").split("\n")
    assert docstring and '"""' in result["docstring"]
    assert editor.lines() == before[:4] + docstring + before[4:]


GEOMETRY = "class Rectangle:\n    def __init__(self, width, height):\n        self.width = width\n"
NOTES = "import socket\nperimeter = 2 * (rectangle.width + rectangle.height)\n"
USES = "from geometry import Rectangle\n\nbox = Rectangle(width=3, height=4)\nprint(box."


def test_visited_files_and_yanks_reach_the_server_as_context(editor: Editor) -> None:
    """The server knows geometry.py only from the plugin's push at BufEnter (the buffer is
    wiped before the request), and the perimeter line only from the yank: the cut removed it
    from notes.py, which was written and wiped before the request."""
    editor.open("geometry.py", GEOMETRY)
    editor.nvim.command("bwipeout!")
    editor.open("notes.py", NOTES)
    editor.nvim.command("2delete")  # TextYankPost: a cut is a yank too
    editor.nvim.command("write")
    editor.nvim.command("bwipeout!")
    editor.open("uses.py", USES)
    editor.insert_at(3, len("print(box."))
    editor.request_directly()
    editor.nvim.input("<Esc>")
    context = editor.stats()["lastContext"]
    assert "geometry.py:1" in context and "notes.py:1" in context, context
    assert not any(chunk.startswith("uses.py") for chunk in context), context


def test_checkhealth_reports_the_model_loaded(editor: Editor) -> None:
    editor.nvim.command("checkhealth starcoder")
    report = "\n".join(editor.nvim.current.buffer[:])
    editor.nvim.command("bwipeout!")
    assert "the server answers" in report, report
    assert "model loaded" in report, report


async def wait_until_loaded(port: int, token: str) -> None:
    client = await WireClient.tcp(port)
    assert "result" in await client.initialize({"token": token})
    assert (await client.wait_ready())["ready"]
    await client.close()


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_a_remote_server_with_a_token(
    tls: bool, version: str, tiny_mqa_dir: Path, tmp_path: Path, certificate: tuple[Path, Path]
) -> None:
    """setup({ host, port, token }): Neovim's TCP client (a pipe on 0.7), or openssl for TLS.
    Over TCP the editor comes after the model has loaded (no $/progress for it), over TLS while
    it loads: the status turns "ready" both ways."""
    token = "secret-token"
    extra: list[str] = []
    options: dict[str, Any] = {"host": "127.0.0.1", "token": token}
    if tls:
        cert, key = certificate
        extra = ["--tls-cert", str(cert), "--tls-key", str(key)]
        options = {"host": "localhost", "token": token, "tls": True, "tls_ca": str(cert)}
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [*SERVER, "--tcp", "--port", "0", "--model", str(tiny_mqa_dir), *extra],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env={**os.environ, "STARCODER_LSP_TOKEN": token},
    )
    try:
        listening = server.stdout.readline()
        assert "listening on" in listening, listening
        options["port"] = int(listening.rsplit(":", 1)[1].split()[0])
        if not tls:
            asyncio.run(wait_until_loaded(options["port"], token))
        with running_editor(tmp_path, options, version) as editor:
            wait_for("the status ready", lambda: editor.lua(STATUS) == "ready", 10)
            editor.open("remote.py", PROGRAM)
            editor.insert_at(*CURSOR)
            suggestion = editor.type_until_suggestion("rxyzq")
            before = editor.lines()
            editor.nvim.input("<Tab>")
            wait_for("the suggestion to be inserted", lambda: editor.lines() != before, 10)
            assert editor.lines()[5] == before[5] + suggestion.split("\n")[0]
    finally:
        server.terminate()
        server.wait(10)
        log.close()
