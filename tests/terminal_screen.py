"""A terminal program's screen as a person sees it: tmux runs the program, `capture-pane -e`
reads the screen with its colours, and each cell's look is parsed from the SGR escapes. The
screen can also be drawn as a PNG (HTML in headless Chromium), for the README."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

SGR = re.compile(r"\x1b\[([0-9;:]*)m")


@dataclass(frozen=True)
class Look:
    """How a cell is drawn: colours as "default", "5:<0-255>" or "2:<r>,<g>,<b>"."""

    fg: str = "default"
    bg: str = "default"
    bold: bool = False
    dim: bool = False
    italic: bool = False
    underline: bool = False
    reverse: bool = False


@dataclass(frozen=True)
class Cell:
    char: str
    look: Look


def _colour(codes: list[int], i: int) -> tuple[str, int]:
    """The extended colour at codes[i:] (after 38 or 48) and how many codes it took."""
    if codes[i] == 5:
        return f"5:{codes[i + 1]}", 2
    if codes[i] == 2:
        return "2:" + ",".join(str(c) for c in codes[i + 1 : i + 4]), 4
    return "default", 1


def _apply(look: Look, codes: list[int]) -> Look:
    i = 0
    while i < len(codes):
        code = codes[i]
        if code == 0:
            look = Look()
        elif code in (1, 2, 3, 4, 7):
            attribute = {1: "bold", 2: "dim", 3: "italic", 4: "underline", 7: "reverse"}[code]
            look = replace(look, **{attribute: True})
        elif code == 22:
            look = replace(look, bold=False, dim=False)
        elif code in (23, 24, 27):
            attribute = {23: "italic", 24: "underline", 27: "reverse"}[code]
            look = replace(look, **{attribute: False})
        elif 30 <= code <= 37 or 90 <= code <= 97:
            look = replace(look, fg=f"5:{code - 30 if code < 90 else code - 82}")
        elif 40 <= code <= 47 or 100 <= code <= 107:
            look = replace(look, bg=f"5:{code - 40 if code < 100 else code - 92}")
        elif code in (38, 48):
            colour, taken = _colour(codes, i + 1)
            look = replace(look, **{"fg" if code == 38 else "bg": colour})
            i += taken
        elif code == 39:
            look = replace(look, fg="default")
        elif code == 49:
            look = replace(look, bg="default")
        i += 1
    return look


def parse(captured: str) -> list[list[Cell]]:
    """The rows of `tmux capture-pane -e -p` output, cell by cell (one character each)."""
    rows = []
    look = Look()
    for line in captured.split("\n"):
        row: list[Cell] = []
        at = 0
        for match in SGR.finditer(line):
            row.extend(Cell(ch, look) for ch in line[at : match.start()])
            codes = [int(c) if c else 0 for c in re.split("[;:]", match.group(1))]
            look = _apply(look, codes)
            at = match.end()
        row.extend(Cell(ch, look) for ch in line[at:])
        rows.append(row)
    return rows


def text(row: list[Cell]) -> str:
    return "".join(cell.char for cell in row)


class Tmux:
    """One tmux server of its own (a socket in `directory`) running one program."""

    def __init__(self, directory: Path, width: int = 90, height: int = 16) -> None:
        if shutil.which("tmux") is None:
            raise AssertionError("tmux is not installed: ./setup.sh installs it")
        self.directory = directory
        self.socket = directory / "tmux.sock"
        self.width, self.height = width, height

    def tmux(self, *args: str) -> str:
        command = ["tmux", "-S", str(self.socket), *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"{' '.join(command)}: {done.stderr}"
        return done.stdout

    def start(self, command: list[str], env: dict[str, str], cwd: Path) -> None:
        """Runs `command` in a new session; none of the user's tmux settings apply."""
        config = self.directory / "tmux.conf"
        # 256 colours and RGB inside; no status bar of tmux's own below the program's screen.
        config.write_text(
            "set -g default-terminal tmux-256color\n"
            'set -ga terminal-features ",*:RGB"\n'
            "set -g status off\n"
        )
        size = ["-x", str(self.width), "-y", str(self.height)]
        variables = [arg for name, value in env.items() for arg in ("-e", f"{name}={value}")]
        self.tmux(
            "-f",
            str(config),
            "new-session",
            "-d",
            "-c",
            str(cwd),
            "-s",
            "test",
            *size,
            *variables,
            " ".join(map(_quote, command)),
        )

    def keys(self, *keys: str, literal: bool = False) -> None:
        self.tmux("send-keys", "-t", "test", *(["-l"] if literal else []), *keys)

    def capture(self) -> str:
        return self.tmux("capture-pane", "-t", "test", "-e", "-p", "-N")

    def screen(self) -> list[list[Cell]]:
        return parse(self.capture())

    def wait_for_screen(
        self, what: str, check: Callable[[list[list[Cell]]], bool], timeout: float = 60
    ) -> list[list[Cell]]:
        deadline = time.monotonic() + timeout
        while True:
            rows = self.screen()
            if check(rows):
                return rows
            if time.monotonic() > deadline:
                shown = "\n".join(text(row) for row in rows)
                raise AssertionError(
                    f"timed out after {timeout:.0f} s waiting for {what}:\n{shown}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        subprocess.run(["tmux", "-S", str(self.socket), "kill-server"], capture_output=True)


def _quote(word: str) -> str:
    return "'" + word.replace("'", "'\\''") + "'"


# --- drawing the screen as a picture ----------------------------------------------------------

# xterm's 16 colours, then its 6x6x6 cube and grey ramp; default colours of a dark terminal.
BASE16 = [
    "#000000",
    "#cd0000",
    "#00cd00",
    "#cdcd00",
    "#0000ee",
    "#cd00cd",
    "#00cdcd",
    "#e5e5e5",
    "#7f7f7f",
    "#ff0000",
    "#00ff00",
    "#ffff00",
    "#5c5cff",
    "#ff00ff",
    "#00ffff",
    "#ffffff",
]
DEFAULT_FG, DEFAULT_BG = "#d0d0d0", "#1c1c1c"


def _xterm(n: int) -> str:
    if n < 16:
        return BASE16[n]
    if n < 232:
        n -= 16
        steps = [0, 95, 135, 175, 215, 255]
        return f"#{steps[n // 36]:02x}{steps[n // 6 % 6]:02x}{steps[n % 6]:02x}"
    grey = 8 + 10 * (n - 232)
    return f"#{grey:02x}{grey:02x}{grey:02x}"


def _css(colour: str, default: str) -> str:
    if colour.startswith("5:"):
        return _xterm(int(colour[2:]))
    if colour.startswith("2:"):
        return "#" + "".join(f"{int(c):02x}" for c in colour[2:].split(","))
    return default


def to_html(rows: list[list[Cell]], title: str) -> str:
    lines = []
    for row in rows:
        spans = []
        for cell in row:
            fg, bg = _css(cell.look.fg, DEFAULT_FG), _css(cell.look.bg, DEFAULT_BG)
            if cell.look.reverse:
                fg, bg = bg, fg
            style = f"color:{fg};background:{bg}"
            style += ";font-weight:bold" if cell.look.bold else ""
            style += ";font-style:italic" if cell.look.italic else ""
            style += ";text-decoration:underline" if cell.look.underline else ""
            spans.append(f'<span style="{style}">{html.escape(cell.char)}</span>')
        lines.append("".join(spans))
    body = "\n".join(lines)
    return (
        f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<body style='margin:0;background:{DEFAULT_BG}'>"
        '<pre style=\'margin:0;padding:8px;font:15px/1.25 "DejaVu Sans Mono",monospace;'
        f"color:{DEFAULT_FG}'>{body}</pre></body>"
    )


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise AssertionError("Chromium is not installed: ./setup.sh installs Debian's")


def save_png(rows: list[list[Cell]], title: str, path: Path, width: int, height: int) -> None:
    """The screen drawn by headless Chromium into `path` (width x height CSS pixels)."""
    page = path.with_suffix(".html")
    page.write_text(to_html(rows, title))
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--window-size={width},{height}",
        f"--screenshot={path}",
        page.as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and path.exists(), done.stderr
