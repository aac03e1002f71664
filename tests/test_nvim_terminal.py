"""What a person sees of the Neovim plugin in a terminal: tmux runs a real Neovim (a 256-colour
terminal) with the plugin against a real `starcoder-lsp serve --stdio`, keys are typed with
`tmux send-keys`, and the screen is read back with its colours.

- The statusline, `require('starcoder').status()`, turns "ready" by itself, with no key
  pressed (Neovim 0.11 redraws a statusline only for its own events).
- The ghost text is drawn in colours that no code on its line has, without and with
  'termguicolors' (Neovim 0.10+'s default colour scheme gives Comment no terminal colour).

Each run writes PNG screenshots into its temporary folder (named in a failure);
$STARCODER_TEST_SCREENSHOTS=DIR writes them there instead (the README's pictures)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pynvim
import pytest
from nvim_headless import PLUGIN, VERSIONS, nvim_binary
from terminal_screen import Cell, Tmux, save_png, text

SERVE = [sys.executable, "-m", "starcoder_lsp", "serve", "--stdio", "--log-level", "WARNING"]
# ASCII only, so that a screen column is a byte column; no comment, whose colour is the
# suggestion's on Neovim 0.7.
PROGRAM = 'import os\n\n\ndef main(argv):\n    if argv:\n        label = argv[0] + "x" + \n'
ROW = 5  # the cursor goes at the end of this (0-based) line
STATUS = "starcoder: %{v:lua.require'starcoder'.status()}"
WIDTH, HEIGHT = 90, 14

INIT = """
vim.opt.swapfile = false
vim.opt.laststatus = 2
vim.opt.statusline = {statusline}
vim.opt.termguicolors = false
require("starcoder").setup({{
  cmd = {cmd},
  settings = {{ multiline = "never", maxNewTokens = 12, minChars = 2 }},
}})
"""


def lua_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class Terminal:
    tmux: Tmux
    socket: Path
    screenshots: Path
    _nvim: pynvim.Nvim | None = None

    @property
    def nvim(self) -> pynvim.Nvim:
        """Neovim's API, for what the screen cannot tell; connected on first use, so that
        nothing but keys reaches Neovim before that."""
        if self._nvim is None:
            self._nvim = pynvim.attach("socket", path=str(self.socket))
        return self._nvim

    def lua(self, code: str) -> object:
        return self.nvim.exec_lua(code)

    def screenshot(self, rows: list[list[Cell]], name: str) -> Path:
        path = self.screenshots / f"{name}.png"
        save_png(rows, name, path, 8 + 9 * WIDTH + 8, 8 + 19 * HEIGHT + 8)
        return path


@contextmanager
def terminal(version: str, model: Path, directory: Path) -> Iterator[Terminal]:
    workspace = directory / "workspace"
    workspace.mkdir()
    (workspace / "program.py").write_text(PROGRAM)
    init = workspace / "init.lua"
    cmd = "{ " + ", ".join(lua_string(a) for a in [*SERVE, "--model", str(model)]) + " }"
    init.write_text(INIT.format(statusline=lua_string(STATUS), cmd=cmd))
    socket = directory / "nvim.sock"
    command = [nvim_binary(version), "--clean", "-n", "--listen", str(socket)]
    command += ["--cmd", f"set runtimepath^={PLUGIN}", "-c", f"luafile {init}", "program.py"]
    env = {name: os.environ[name] for name in ("PATH", "PYTHONPATH", "HOME") if name in os.environ}
    tmux = Tmux(directory, WIDTH, HEIGHT)
    screenshots = Path(os.environ.get("STARCODER_TEST_SCREENSHOTS") or directory)
    screenshots.mkdir(parents=True, exist_ok=True)
    term = Terminal(tmux, socket, screenshots)
    try:
        tmux.start(command, env, workspace)
        tmux.wait_for_screen("Neovim", lambda rows: any("import os" in text(r) for r in rows), 30)
        yield term
    finally:
        if term._nvim is not None:
            term._nvim.close()
        tmux.stop()


def status_line(rows: list[list[Cell]]) -> str:
    return next((text(row) for row in rows if text(row).startswith("starcoder: ")), "")


def suggestion_cells(term: Terminal) -> tuple[list[Cell], list[Cell], list[list[Cell]]]:
    """The code cells and the ghost-text cells of the cursor line, as the screen shows them."""
    line = term.lua("return vim.api.nvim_get_current_line()")
    ghost = term.lua("return require('starcoder').suggestion()")
    assert isinstance(line, str) and isinstance(ghost, str)

    def drawn(rows: list[list[Cell]]) -> bool:
        return any(text(row).startswith(line + ghost) for row in rows)

    rows = term.tmux.wait_for_screen(f"the suggestion {ghost!r} after {line!r}", drawn, 10)
    row = next(row for row in rows if text(row).startswith(line + ghost))
    code = [cell for cell in row[: len(line)] if cell.char.strip()]
    shown = [cell for cell in row[len(line) : len(line) + len(ghost)] if cell.char.strip()]
    return code, shown, rows


def colours(cells: list[Cell]) -> set[tuple[str, str, bool]]:
    """The colours the cells are drawn in (bold or italic alone does not tell text apart)."""
    return {(cell.look.fg, cell.look.bg, cell.look.reverse) for cell in cells}


@pytest.mark.parametrize("version", VERSIONS)
def test_ghost_text_has_its_own_colour_and_the_statusline_turns_ready(
    version: str, tiny_mqa_dir: Path, tmp_path: Path
) -> None:
    with terminal(version, tiny_mqa_dir, tmp_path) as term:
        tmux = term.tmux
        # No key is pressed until the statusline says "ready".
        try:
            tmux.wait_for_screen(
                "the statusline to say ready", lambda r: "ready" in status_line(r), 120
            )
        except AssertionError as e:
            path = term.screenshot(tmux.screen(), f"{version}-statusline")
            raise AssertionError(f"{e}\n(screenshot: {path})") from None

        tmux.keys(f"{ROW + 1}G", "A")
        for key in "rxyzqw":
            tmux.keys(key, literal=True)
            try:
                tmux.wait_for_screen("", lambda _: term.lua(SUGGESTED), 5)
                break
            except AssertionError:
                continue
        assert term.lua(SUGGESTED), "no suggestion while typing"

        for guicolors in (False, True):
            term.nvim.command(f"set {'' if guicolors else 'no'}termguicolors")
            code, shown, rows = suggestion_cells(term)
            name = f"{version}-{'' if guicolors else 'no'}termguicolors"
            path = term.screenshot(rows, name)
            assert shown and code, f"nothing drawn (screenshot: {path})"
            same = colours(shown) & colours(code)
            assert not same, (
                f"with{'' if guicolors else 'out'} termguicolors the suggestion is drawn like "
                f"code: {same} (screenshot: {path})"
            )

        before = term.lua("return vim.api.nvim_get_current_line()")
        ghost = term.lua("return require('starcoder').suggestion()")
        tmux.keys("Tab")
        tmux.wait_for_screen("the suggestion inserted", lambda _: term.lua(LINE) == before + ghost)


SUGGESTED = "local s = require('starcoder').suggestion() return s ~= nil and #vim.trim(s) >= 2"
LINE = "return vim.api.nvim_get_current_line()"
