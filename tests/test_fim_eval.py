"""benchmarks/fim_eval.py: its tasks, its scores and its variants. Random weights score
nothing there, so the scoring is checked with a scripted completer whose answers are known;
one run through the real Completer checks the plumbing."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from starcoder_lsp import checkpoint
from starcoder_lsp.completer import Completer, Suggestion
from starcoder_lsp.context import EMPTY
from starcoder_lsp.engine import Engine
from starcoder_lsp.prompt import counter_for
from starcoder_lsp.runner import Runner
from starcoder_lsp.settings import Settings

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "fim_eval.py"
spec = importlib.util.spec_from_file_location("fim_eval", BENCHMARK)
fim_eval = sys.modules["fim_eval"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fim_eval)

FILES = {
    "shapes.py": (
        "class Rectangle:\n"
        "    def __init__(self, width, height):\n"
        "        self.width = width\n"
        "        self.height = height\n"
        "\n"
        "    def area(self):\n"
        "        return self.width * self.height\n"
    ),
    "main.py": (
        "from shapes import Rectangle\n"
        "\n"
        "def total_area(rectangles):\n"
        "    areas = [r.area() for r in rectangles]\n"
        "    return sum(areas)\n"
        "\n"
        "print(total_area([Rectangle(width=2, height=3)]))\n"
    ),
    "network.py": (
        "import socket\n\ndef fetch(host, port):\n"
        "    return socket.create_connection((host, port))\n"
    ),
}


def test_edit_similarity_and_exact_match():
    assert fim_eval.levenshtein("kitten", "sitting") == 3
    assert fim_eval.levenshtein("", "abc") == 3
    assert fim_eval.edit_similarity("return x", "return x  \n") == 1.0
    assert fim_eval.edit_similarity("return y", "return x") == pytest.approx(1 - 1 / 8)
    assert fim_eval.edit_similarity("", "") == 1.0
    assert fim_eval.exact_match("a = 1 ", "a = 1") and not fim_eval.exact_match("a = 2", "a = 1")


def test_tasks_hide_a_line_or_a_block_and_putting_it_back_gives_the_file():
    tasks = fim_eval.make_tasks(FILES, samples=12, seed=3)
    assert tasks == fim_eval.make_tasks(FILES, samples=12, seed=3)  # the same for a seed
    assert any(t.block for t in tasks) and any(not t.block for t in tasks)
    for task in tasks:
        restored = task.text[: task.cursor] + task.middle + task.text[task.cursor :]
        assert restored == FILES[task.path]
        assert ("\n" in task.middle) == task.block and task.middle.strip() == task.middle


@dataclass
class ScriptedCompleter:
    """Answers the hidden code in full when it is given cross-file context, and its first
    half without; checks that the context never quotes the file the code was hidden from."""

    tokenizer: object
    tokens: object
    answers: dict[tuple[str, int], str]
    asked: list[tuple[str, bool]]

    def complete(self, document, text, cursor, settings, filename=None, context=None):
        middle = self.answers[(document, cursor)]
        given = context is not None and settings.cross_file_context
        block = EMPTY
        if given:
            block = context.block(
                document,
                text[:cursor],
                text[cursor:],
                0,
                10_000,
                settings.sources(),
                self.tokens,
                counter_for(self.tokenizer),
            )
            assert block.chunks and all(c.path != document for c in block.chunks)
        self.asked.append((settings.fim_mode, given))
        return Suggestion(middle if given else middle[: len(middle) // 2], context=block)


def test_scores_per_variant_with_a_scripted_completer(tiny_mqa_dir):
    tokenizer, tokens = checkpoint.load_tokenizer(tiny_mqa_dir)
    tasks = [t for t in fim_eval.make_tasks(FILES, samples=8, seed=1) if t.path != "network.py"]
    answers = {(t.path, t.cursor): t.middle for t in tasks}
    completer = ScriptedCompleter(tokenizer, tokens, answers, [])
    results = fim_eval.evaluate(completer, tasks, FILES)
    assert list(results) == list(fim_eval.VARIANTS)
    half = [fim_eval.edit_similarity(t.middle[: len(t.middle) // 2], t.middle) for t in tasks]
    for variant, scores in results.items():
        assert len(scores.exact) == len(tasks)
        if variant.cross_file:
            assert all(scores.exact) and scores.similarity == [1.0] * len(tasks)
            assert min(scores.context_tokens) > 0
        else:
            assert not any(scores.exact) and scores.similarity == pytest.approx(half)
            assert scores.context_tokens == [0] * len(tasks)
    assert [mode for mode, _ in completer.asked] == [
        v.mode for v in fim_eval.VARIANTS for _ in tasks
    ]
    printed = fim_eval.table(results)
    assert "| PSM, cross-file context" in printed and "100.0%" in printed and "0.0%" in printed


def test_the_harness_runs_through_the_real_completer(tiny_mqa_dir):
    ckpt = checkpoint.load(tiny_mqa_dir)
    runner = Runner.from_checkpoint(ckpt, slots=2, chunks=(16, 64), batches=(1, 2))
    engine = Engine(runner, ckpt.tokenizer.decode, ckpt.tokens.stop_ids)
    engine.start()
    assert engine.ready.wait(120)
    try:
        completer = Completer(engine, ckpt.tokenizer, ckpt.tokens)
        tasks = [t for t in fim_eval.make_tasks(FILES, 6, seed=2) if t.path == "main.py"][:2]
        settings = Settings(max_new_tokens=4)
        results = fim_eval.evaluate(completer, tasks, FILES, settings=settings)
    finally:
        engine.close()
    for variant, scores in results.items():
        assert len(scores.similarity) == len(tasks)
        assert all(0.0 <= s <= 1.0 for s in scores.similarity)
        assert (max(scores.context_tokens) > 0) == variant.cross_file
