"""The command line, run as a user runs it: a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "starcoder_lsp", *args], capture_output=True, text=True, timeout=300
    )


def test_complete_prints_the_suggestion_and_its_json(tmp_path, tiny_mqa_dir):
    source = tmp_path / "example.py"
    source.write_text("def add(a, b):\n    return a + b\n\n\nprint(add(1, \n")
    other = tmp_path / "other.py"  # shares `add` with the code at the cursor
    other.write_text("def add_all(pairs):\n    return [add(a, b) for a, b in pairs]\n")
    unrelated = tmp_path / "unrelated.py"
    unrelated.write_text("import socket\n")
    common = [
        "complete",
        str(source),
        "--line",
        "4",
        "--character",
        "13",
        "--model",
        str(tiny_mqa_dir),
        "--max-new-tokens",
        "6",
        "--compilation-cache",
        "off",
        "--context",
        str(other),
        "--context",
        str(unrelated),
    ]
    as_json = _cli(*common, "--json")
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    # StarCoder's format for another file, then the FIM prompt (SPM by default).
    context = data["context"]
    assert context["text"] == f"<filename>{other}\n{other.read_text()}<|endoftext|>"
    assert [c["path"] for c in context["chunks"]] == [str(other)] and context["tokens"] > 10
    assert data["prompt"].startswith(context["text"] + "<fim_prefix><fim_suffix>")
    assert data["prompt"].endswith("print(add(1, ")
    assert 0 < data["generated_tokens"] <= 6 and data["seconds"]["total"] > 0
    assert "key/value cache: 1 slots" in as_json.stderr
    plain = _cli(*common)
    assert plain.returncode == 0
    assert plain.stdout == data["text"] + "\n"  # greedy: the same suggestion both times


def test_complete_rejects_a_position_outside_the_file(tmp_path, tiny_mqa_dir):
    source = tmp_path / "short.py"
    source.write_text("x = 1\n")
    result = _cli(
        "complete", str(source), "--line", "9", "--character", "0", "--model", str(tiny_mqa_dir)
    )
    assert result.returncode == 2
    assert "error: line 9 is outside the file" in result.stderr
    assert "Traceback" not in result.stderr


def test_complete_with_a_missing_model_says_so(tmp_path):
    source = tmp_path / "a.py"
    source.write_text("x = 1\n")
    result = _cli(
        "complete",
        str(source),
        "--line",
        "0",
        "--character",
        "0",
        "--model",
        str(tmp_path / "nowhere"),
    )
    assert result.returncode == 2 and "no checkpoint directory" in result.stderr
