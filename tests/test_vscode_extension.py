"""The VS Code extension (editors/vscode): it compiles, packages into a .vsix, and its Node
tests read its settings as package.json declares them and drive a real `starcoder-lsp serve`
with the extension's own messages; its remote link retries as a load balancer makes it.

Needs Node.js and npm (./setup.sh installs them and runs `npm ci`); no VS Code download."""

from __future__ import annotations

import os
import sys
import zipfile
from pathlib import Path

import pytest
from vscode_build import EXTENSION, run

SERVER = Path(sys.executable).parent / "starcoder-lsp"


@pytest.fixture(scope="module")
def compiled(vscode_vsix: Path) -> Path:
    """out/, as packaging compiled it (the Node tests too)."""
    return EXTENSION / "out"


def test_the_extension_compiles_and_packages(compiled: Path, vscode_vsix: Path) -> None:
    assert (compiled / "src" / "extension.js").exists()
    run("npx", "prettier", "--check", "src", "test", "e2e")
    with zipfile.ZipFile(vscode_vsix) as archive:
        names = set(archive.namelist())
    assert "extension/package.json" in names
    assert "extension/out/src/extension.js" in names
    assert "extension/node_modules/vscode-languageclient/package.json" in names
    assert not any(name.startswith("extension/src/") for name in names)


def test_the_extension_reads_its_settings_from_package_json(compiled: Path) -> None:
    output = run("node", "--test", "out/test/options.test.js")
    assert "# fail 0" in output, output


def test_the_extension_logs_stderr_lines_at_their_level(compiled: Path) -> None:
    output = run("node", "--test", "out/test/serverLog.test.js")
    assert "# fail 0" in output and "# pass 2" in output, output


def test_the_remote_link_retries_until_the_server_answers(compiled: Path) -> None:
    """Refused, then closed by a balancer with no replica up, then answered: the client's
    initialize is sent again and it sees only the answer; a drop after that ends the reader."""
    output = run("node", "--test", "out/test/connection.test.js")
    assert "# fail 0" in output and "# pass 4" in output, output


def test_the_extension_messages_against_the_server(compiled: Path, tiny_mqa_dir: Path) -> None:
    env = {
        **os.environ,
        "STARCODER_LSP_TEST_SERVER": str(SERVER),
        "STARCODER_LSP_TEST_MODEL": str(tiny_mqa_dir),
    }
    output = run("node", "--test", "out/test/server.test.js", env=env)
    assert "# fail 0" in output, output
