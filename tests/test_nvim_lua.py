"""The Neovim plugin's pure Lua functions, called in a bare headless Neovim with no server:
text.lua (words, lines, normalizing an InlineCompletionItem), render.marks (the extmarks that
draw a suggestion, both before and after Neovim 0.10), compat's position conversions,
config (the command line, initializationOptions, the check of the server settings) and the
keymaps. Expected values are worked out by hand in the comments."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import pynvim
import pytest
from nvim_headless import VERSIONS, bare_nvim

# 'x = "é𝔘" + ': é is 2 bytes and 1 UTF-16 unit, 𝔘 4 bytes and 2 units (1 in UTF-32).
# Bytes: 5 + 2 + 4 + 4 = 15; UTF-16 units: 5 + 1 + 2 + 4 = 12; UTF-32: 5 + 1 + 1 + 4 = 11.
WIDE = 'x = "é𝔘" + '
HL = "StarcoderSuggestion"


@pytest.fixture(scope="module")
def nvim() -> Iterator[pynvim.Nvim]:
    with bare_nvim() as nvim:
        yield nvim


def lua(nvim: pynvim.Nvim, code: str, *args: Any) -> Any:
    return nvim.exec_lua(code, *args)


def word(nvim: pynvim.Nvim, text: str) -> str:
    return lua(nvim, "return require('starcoder.text').word(...)", text)


def line(nvim: pynvim.Nvim, text: str) -> str:
    return lua(nvim, "return require('starcoder.text').line(...)", text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("foo(bar)", "foo"),  # a run of word characters
        ("  foo bar", "  foo"),  # with the blanks before it
        ("\n    return x", "\n    return"),  # newlines too
        ("(bar)", "("),  # else a run of other non-blank characters
        (") + 1", ")"),
        ("é = 1", "é"),  # Lua's %w is ASCII: é's bytes are "other"
        ("snake_case.x", "snake_case"),
        ("   ", "   "),  # no word at all: everything
        ("", ""),
    ],
)
def test_text_word_is_the_next_word_with_the_blanks_before_it(nvim, text, expected):
    assert word(nvim, text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("foo\nbar", "foo\n"),  # the rest of the line, with its newline
        ("\nbar\nbaz", "\nbar\n"),  # starting with a newline: the line after it
        ("foo", "foo"),
        ("", ""),
    ],
)
def test_text_line_is_the_rest_of_the_line(nvim, text, expected):
    assert line(nvim, text) == expected


NORMALIZE = """
local item, buffer, row, col, encoding = ...
local lines = function(r) return buffer[r + 1] or "" end
return require('starcoder.text').normalize(item, lines, row, col, encoding) or false
"""


def normalize(nvim, item: dict, buffer: list[str], row: int, col: int, encoding="utf-16"):
    return lua(nvim, NORMALIZE, item, buffer, row, col, encoding)


def at(line: int, character: int) -> dict:
    return {"line": line, "character": character}


def test_normalize_without_a_range_inserts_at_the_cursor(nvim):
    result = normalize(nvim, {"insertText": "hello"}, ["abc"], 0, 3)
    assert result == {"text": "hello", "end_row": 0, "end_col": 3}


def test_normalize_drops_what_is_typed_already(nvim):
    # The item starts at column 0, where "pri" is typed; the cursor is after it.
    item = {"insertText": "print(x)", "range": {"start": at(0, 0), "end": at(0, 3)}}
    assert normalize(nvim, item, ["pri"], 0, 3) == {"text": "nt(x)", "end_row": 0, "end_col": 3}
    # What is typed does not start the item, or is all of it: nothing to show.
    assert normalize(nvim, {**item, "insertText": "format(x)"}, ["pri"], 0, 3) is False
    assert normalize(nvim, {**item, "insertText": "pri"}, ["pri"], 0, 3) is False
    # A range that ends before the cursor does not apply at it, though "pri" starts the item.
    before = {"insertText": "print", "range": {"start": at(0, 0), "end": at(0, 1)}}
    assert normalize(nvim, before, ["pri"], 0, 3) is False


def test_normalize_keeps_the_range_past_the_cursor_and_the_command(nvim):
    # print(|): the item replaces the auto-closed ")" (byte 6 to 7).
    command = {"title": "accepted", "command": "starcoder.accepted", "arguments": [7]}
    item = {"insertText": "x)", "range": {"start": at(0, 6), "end": at(0, 7)}, "command": command}
    expected = {"text": "x)", "end_row": 0, "end_col": 7, "command": command}
    assert normalize(nvim, item, ["print()"], 0, 6) == expected


def test_normalize_converts_positions_in_the_server_encoding(nvim):
    # The cursor at the end of WIDE: byte 15, UTF-16 character 12, UTF-32 character 11.
    expected = {"text": "1", "end_row": 0, "end_col": 15}
    for encoding, character in [("utf-16", 12), ("utf-32", 11), ("utf-8", 15)]:
        item = {"insertText": "1", "range": {"start": at(0, character), "end": at(0, character)}}
        assert normalize(nvim, item, [WIDE], 0, 15, encoding) == expected, encoding
    # Read as UTF-8, character 12 is byte 12, before the cursor: the item does not apply.
    item = {"insertText": "1", "range": {"start": at(0, 12), "end": at(0, 12)}}
    assert normalize(nvim, item, [WIDE], 0, 15, "utf-8") is False


def test_normalize_takes_a_snippet_as_text_and_refuses_other_lines(nvim):
    snippet = {"insertText": {"kind": "snippet", "value": "abc"}}
    assert normalize(nvim, snippet, ["x"], 0, 1) == {"text": "abc", "end_row": 0, "end_col": 1}
    elsewhere = {"insertText": "abc", "range": {"start": at(1, 0), "end": at(1, 0)}}
    assert normalize(nvim, elsewhere, ["x", "y"], 0, 1) is False
    assert normalize(nvim, {"insertText": 5}, ["x"], 0, 1) is False


@pytest.mark.parametrize(
    ("col", "encoding", "character"),
    [
        (15, "utf-16", 12),
        (15, "utf-32", 11),
        (15, "utf-8", 15),
        (7, "utf-16", 6),  # after é
        (11, "utf-16", 8),  # after 𝔘: two units
        (11, "utf-32", 7),
        (99, "utf-16", 12),  # past the end: the end
    ],
)
def test_compat_character_counts_in_the_encoding(nvim, col, encoding, character):
    code = "return require('starcoder.compat').character(...)"
    assert lua(nvim, code, WIDE, col, encoding) == character


@pytest.mark.parametrize(
    ("character", "encoding", "col"),
    [
        (12, "utf-16", 15),
        (11, "utf-32", 15),
        (6, "utf-16", 7),
        (8, "utf-16", 11),
        (7, "utf-32", 11),
        (12, "utf-8", 12),
        (99, "utf-16", 15),  # past the end: the end
        (99, "utf-8", 15),
    ],
)
def test_compat_byte_col_is_the_inverse(nvim, character, encoding, col):
    code = "return require('starcoder.compat').byte_col(...)"
    assert lua(nvim, code, WIDE, character, encoding) == col


MARKS = """
local inline, line, row, col, text, end_row, end_col = ...
local compat = require('starcoder.compat')
local saved = compat.inline_virt_text
compat.inline_virt_text = inline
local ok, marks = pcall(require('starcoder.render').marks, line, row, col, text, end_row,
  end_col, 'StarcoderSuggestion')
compat.inline_virt_text = saved
assert(ok, marks)
return marks
"""


def marks(nvim, inline: bool, line: str, col: int, text: str, end_col: int, end_row=0):
    """render.marks for a suggestion on row 0, as Neovim >= 0.10 (inline) or before draws it."""
    return lua(nvim, MARKS, inline, line, 0, col, text, end_row, end_col)


def overlay(shown: str, **more: Any) -> dict:
    return {"virt_text": [[shown, HL]], "virt_text_pos": "overlay", "hl_mode": "combine", **more}


def inline(shown: str, **more: Any) -> dict:
    return {"virt_text": [[shown, HL]], "virt_text_pos": "inline", "hl_mode": "combine", **more}


def test_marks_at_the_end_of_a_line(nvim):
    # Nothing after the cursor: the text as it is, over nothing or between characters.
    assert marks(nvim, False, "x = ", 4, "foo()", 4) == overlay("foo()")
    assert marks(nvim, True, "x = ", 4, "foo()", 4) == inline("foo()")


def test_marks_over_an_auto_closed_bracket(nvim):
    # print(|) with "x)" replacing ")": drawn over ")" before 0.10 ("x)" hides it); from
    # 0.10, "x" goes in before the ")" that stays.
    assert marks(nvim, False, "print()", 6, "x)", 7) == overlay("x)")
    assert marks(nvim, True, "print()", 6, "x)", 7) == inline("x")


def test_marks_before_the_rest_of_the_line(nvim):
    # ab|= cd with "c" inserted: before 0.10 the overlay draws the line's rest after it.
    assert marks(nvim, False, "ab = cd", 2, "c", 2) == overlay("c = cd")
    assert marks(nvim, True, "ab = cd", 2, "c", 2) == inline("c")


def test_marks_blank_out_replaced_text_by_display_width(nvim):
    # "a" replaces 日本 (6 bytes, 4 cells): 3 spaces hide the rest, in both versions.
    assert marks(nvim, False, "x = 日本", 4, "a", 10) == overlay("a   ")
    assert marks(nvim, True, "x = 日本", 4, "a", 10) == overlay("a   ")
    # A range past this line replaces the whole rest ("bar").
    assert marks(nvim, True, "foo(bar", 4, "x", 1, end_row=1) == overlay("x  ")


def test_marks_of_several_lines_put_the_rest_of_the_line_after_the_last(nvim):
    # x = |foo with "bar\nbaz": "bar" over "foo", then the virtual line "baz" + "foo".
    expected = overlay("bar", virt_lines=[[["baz", HL], ["foo", HL]]])
    assert marks(nvim, False, "x = foo", 4, "bar\nbaz", 4) == expected
    assert marks(nvim, True, "x = foo", 4, "bar\nbaz", 4) == expected
    # At the end of a line, from 0.10: the first line inline, the others below.
    expected = inline("a,", virt_lines=[[["  b", HL]], [["", HL]]])
    assert marks(nvim, True, "f(", 2, "a,\n  b\n", 2) == expected


def test_config_command_and_init_options(nvim):
    command = lua(
        nvim,
        "return require('starcoder.config').command(...)",
        {"model": "/models/tiny", "server_args": ["--mesh", "1x8"]},
    )
    expected = ["starcoder-lsp", "serve", "--stdio", "--model", "/models/tiny", "--mesh", "1x8"]
    assert command == expected
    code = """
    local options, env = ...
    vim.env.STARCODER_LSP_TOKEN = env
    return require('starcoder.config').init_options(options)
    """
    assert lua(nvim, code, {"settings": {}}, None) == {}
    assert lua(nvim, code, {"settings": {"minChars": 2}}, "t") == {"minChars": 2, "token": "t"}
    assert lua(nvim, code, {"settings": {}, "token": "mine"}, "t") == {"token": "mine"}


SETUP = """
local user = ...
local notes = {}
local notify = vim.notify
vim.notify = function(message, level) notes[#notes + 1] = { message, level } end
local ok, options = pcall(require('starcoder.config').set, user)
vim.notify = notify
assert(ok, options)
return { settings = options.settings, notes = notes }
"""


def test_config_keeps_the_right_settings_and_warns_about_the_rest(nvim):
    user = {
        "settings": {
            "maxNewTokens": 12,
            "filename": True,
            "colour": "red",  # unknown: dropped
            "temperature": "hot",  # wrong type: dropped
            "enabled": "no",  # wrong type: dropped
            "completionFallback": True,  # read at initialize: kept
        }
    }
    result = lua(nvim, SETUP, user)
    assert result["settings"] == {"maxNewTokens": 12, "filename": True, "completionFallback": True}
    warn = lua(nvim, "return vim.log.levels.WARN")
    message = (
        "starcoder: settings ignored: "
        'enabled must be a boolean, not "no"; '
        'temperature must be a number, not "hot"; '
        'unknown setting "colour"'
    )
    assert result["notes"] == [[message, warn]]


def test_config_takes_vim_nil_only_where_the_server_takes_null(nvim):
    nulls = "local user = { settings = { prefixTokens = vim.NIL, minChars = vim.NIL } }"
    result = lua(nvim, SETUP.replace("local user = ...", nulls))
    assert result["settings"] == {"prefixTokens": None}  # vim.NIL comes back as None
    expected = "starcoder: settings ignored: minChars must be a number, not vim.NIL"
    assert [message for message, _ in result["notes"]] == [expected]
    # No settings, no warning (an empty Lua table comes back as a list).
    assert lua(nvim, SETUP, {}) == {"settings": [], "notes": []}


KEYS = """
local keys, typed, items = ...
require('starcoder.keymaps').set(keys)
local client = require('starcoder.client')
local for_buffer = client.for_buffer
-- A client that is never asked anything: the suggestion is shown from `items`.
client.for_buffer = function()
  return { id = -1, server_capabilities = { positionEncoding = 'utf-8' } }
end
vim.g.starcoder_test_items = items
vim.cmd('enew!')
local ok, err = pcall(function()
  local feed = vim.api.nvim_replace_termcodes(typed, true, false, true)
  vim.api.nvim_feedkeys(feed, 'x', false)
end)
client.for_buffer = for_buffer
assert(ok, err)
local mapped = {}
for _, lhs in ipairs({ '<Tab>', '<C-]>', '<M-]>' }) do
  mapped[lhs] = vim.fn.maparg(lhs, 'i', false, true).desc or false
end
return { line = vim.api.nvim_get_current_line(), mapped = mapped }
"""
SHOW = "<Cmd>lua require('starcoder.suggestion')._show_items(vim.g.starcoder_test_items)<CR>"


def test_keymaps_accept_a_suggestion_and_keep_the_key_without_one(nvim):
    keys = {"accept": "<Tab>", "dismiss": False, "next": "<M-]>"}
    items = [{"insertText": "bar()"}]
    # No suggestion shown: <Tab> inserts a tab.
    result = lua(nvim, KEYS, keys, "ifoo<Tab><Esc>", items)
    assert result["line"] == "foo\t"
    mapped = {"<Tab>": "starcoder: accept", "<C-]>": False, "<M-]>": "starcoder: next"}
    assert result["mapped"] == mapped  # dismiss = false: <C-]> is left alone
    # A suggestion shown at the cursor: <Tab> inserts it.
    result = lua(nvim, KEYS, keys, f"ifoo{SHOW}<Tab><Esc>", items)
    assert result["line"] == "foobar()"


def test_client_retry_delays_double_from_half_a_second_to_thirty(nvim):
    delays = lua(
        nvim,
        "return vim.tbl_map(require('starcoder.client').retry_delay, ...)",
        [1, 2, 3, 4, 6, 7, 20],
    )
    assert delays == [500, 1000, 2000, 4000, 16000, 30000, 30000]


@pytest.mark.parametrize("version", VERSIONS)
def test_a_remote_server_that_refuses_is_retried_quietly_then_reported_once(version, tmp_path):
    """Nothing listens on the port: the plugin keeps trying with backoff, status() says so, and
    one message says so after three tries, not one per try (Neovim 0.11's own TCP client would
    print "Could not connect" at every try, and its client would never end)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with bare_nvim(version) as nvim:
        nvim.command("runtime plugin/starcoder.lua")
        lua(nvim, "require('starcoder').setup({ host = '127.0.0.1', port = ... })", port)
        nvim.command(f"edit {tmp_path / 'a.py'}")
        statuses = set()
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            statuses.add(lua(nvim, "return require('starcoder').status()"))
            time.sleep(0.05)
        messages = nvim.command_output("messages")
        stats = lua(nvim, "local s, e = require('starcoder').stats(100) return { s or false, e }")
        lua(nvim, "require('starcoder.client').stop()")
    assert statuses == {"connecting"}, statuses  # "reconnecting" is for a connection that was
    # 0.5 + 1 + 2 s: the third try failed, the fourth waits 4 s; one message.
    assert messages.count(f"starcoder: cannot reach 127.0.0.1:{port}") == 1, messages
    assert "ECONNREFUSED" in messages, messages
    assert "Could not connect" not in messages and "quit with exit code" not in messages, messages
    assert stats[0] is False
    assert re.match(rf"connecting to 127.0.0.1:{port} \(try \d\): .*ECONNREFUSED", stats[1]), stats


def test_context_sends_at_most_max_chars_of_a_buffer_and_of_a_yank(nvim):
    """context.lua: a visit sends the buffer's first lines within MAX_CHARS bytes (the
    server keeps no more), a yank its lines with a final newline."""
    code = """
    local context = require('starcoder.context')
    context.MAX_CHARS = 10
    local buf = vim.api.nvim_create_buf(false, true)
    vim.api.nvim_buf_set_lines(buf, 0, -1, false, { 'abc', 'defg', 'hijklm', 'n' })
    local head = context.head(buf)
    vim.api.nvim_buf_set_lines(buf, 0, -1, false, { string.rep('x', 30) })
    local one = context.head(buf)
    local long = context.text({ string.rep('y', 30) })
    context.MAX_CHARS = 262144
    return { head, one, context.text({ 'a', 'b' }), long, context.yank_uri(buf):sub(-5) }
    """
    head, one, text, long, fragment = lua(nvim, code)
    # Offsets of the line starts: abc\n = 4, defg\n = 9, hijklm\n = 16: two lines fit 10.
    assert head == ["abc", "defg"]
    assert one == ["x" * 30]  # one line at least, cut by text()
    assert text == "a\nb\n" and long == "y" * 10 and fragment == "#yank"
