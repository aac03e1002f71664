"""README.md's promises: its Python examples run, and the layers it draws hold."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from starcoder_lsp.limits import Limits, flag

REPO = Path(__file__).resolve().parents[1]
PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def python_examples() -> list[str]:
    return PYTHON_BLOCK.findall((REPO / "README.md").read_text())


def test_the_readme_has_its_examples():
    assert len(python_examples()) >= 2


@pytest.mark.parametrize("index", range(len(python_examples())))
def test_a_readme_example_runs(index, tiny_mqa_dir, tmp_path):
    """Each example runs as written, in a fresh process, with models/tiny the test
    checkpoint and eight host devices (the Generator example makes a 1x8 mesh)."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny").symlink_to(tiny_mqa_dir)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    ran = subprocess.run(
        [sys.executable, "-c", python_examples()[index]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip(), "the example printed nothing"


NO_JAX = [
    "starcoder_lsp.server",
    "starcoder_lsp.transport",
    "starcoder_lsp.backend",
    "starcoder_lsp.documents",
    "starcoder_lsp.positions",
    "starcoder_lsp.limits",
    "starcoder_lsp.completer",
    "starcoder_lsp.prompt",
    "starcoder_lsp.postprocess",
    "starcoder_lsp.docstring",
    "starcoder_lsp.special_tokens",
    "starcoder_lsp.settings",
    "starcoder_lsp.stopping",
    "starcoder_lsp.request",
    "starcoder_lsp.cli",
    "starcoder_lsp.health",
]


def test_the_language_side_imports_no_jax():
    """The server, the prompt and the post-processing know nothing of JAX: importing them
    must not import it (the engine, loaded in the background, does)."""
    imports = "; ".join(f"import {module}" for module in NO_JAX)
    heavy = "('jax', 'flax', 'torch')"
    check = f"import sys; {imports}; print([m for m in sys.modules if m.split('.')[0] in {heavy}])"
    ran = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, check=True, timeout=120
    )
    assert ran.stdout.strip() == "[]"


def test_the_readme_documents_every_limit():
    readme = (REPO / "README.md").read_text()
    for field in fields(Limits):
        assert f"`{flag(field.name)}`" in readme, field.name
