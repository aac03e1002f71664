"""The VS Code extension (editors/vscode) built as users get it: compiled and packaged into a
.vsix with `vsce`, once per test session (the `vscode_vsix` fixture in conftest.py)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

EXTENSION = Path(__file__).resolve().parent.parent / "editors" / "vscode"


def run(
    *command: str, cwd: Path = EXTENSION, env: dict[str, str] | None = None, timeout: float = 600
) -> str:
    done = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(command)} failed ({done.returncode}):\n{output}"
    return output


def package(out: Path) -> Path:
    """Compiles the extension (its tests too, into out/) and packages it into `out`."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: ./setup.sh installs Node.js and npm")
    if not (EXTENSION / "node_modules" / ".package-lock.json").exists():
        run("npm", "ci", "--no-audit", "--no-fund")
    # vsce runs the `vscode:prepublish` script first: `npm run compile`.
    run("npx", "vsce", "package", "--allow-missing-repository", "--out", str(out))
    return out
