"""The VS Code extension (editors/vscode): it compiles, packages into a .vsix, and its Node
tests read its settings as package.json declares them and drive a real `starcoder-lsp serve`
with the extension's own messages.

Needs Node.js and npm (./setup.sh installs them and runs `npm ci`); no VS Code download."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

EXTENSION = Path(__file__).resolve().parent.parent / "editors" / "vscode"
SERVER = Path(sys.executable).parent / "starcoder-lsp"


def run(*command: str, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    result = subprocess.run(
        command, cwd=EXTENSION, env=env, capture_output=True, text=True, timeout=timeout
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} failed ({result.returncode}):\n{output}"
    return output


@pytest.fixture(scope="module")
def compiled() -> Path:
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: ./setup.sh installs Node.js and npm")
    if not (EXTENSION / "node_modules" / ".package-lock.json").exists():
        run("npm", "ci", "--no-audit", "--no-fund")
    run("npm", "run", "compile")
    return EXTENSION / "out"


def test_the_extension_compiles_and_packages(compiled: Path, tmp_path: Path) -> None:
    assert (compiled / "src" / "extension.js").exists()
    run("npx", "prettier", "--check", "src", "test", "e2e")
    vsix = tmp_path / "starcoder-lsp.vsix"
    run("npx", "vsce", "package", "--allow-missing-repository", "--out", str(vsix))
    with zipfile.ZipFile(vsix) as archive:
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


def test_the_extension_messages_against_the_server(compiled: Path, tiny_mqa_dir: Path) -> None:
    env = {
        **os.environ,
        "STARCODER_LSP_TEST_SERVER": str(SERVER),
        "STARCODER_LSP_TEST_MODEL": str(tiny_mqa_dir),
    }
    output = run("node", "--test", "out/test/server.test.js", env=env)
    assert "# fail 0" in output, output
