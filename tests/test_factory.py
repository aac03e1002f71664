"""The composition root: one call builds checkpoint → runner → engine → completer."""

from __future__ import annotations

from starcoder_lsp.factory import ModelOptions, build_completer
from starcoder_lsp.settings import Settings


def test_build_completer_reports_loading_and_compiling_then_completes(tiny_mqa_dir):
    reports: list[tuple[int, int, str]] = []
    options = ModelOptions(tiny_mqa_dir, slots=2, prefix_cache=False)
    completer = build_completer(
        options, progress=lambda *report: reports.append(report), chunks=(16,), batches=(1,)
    )
    with completer.engine:
        assert completer.engine.ready.wait(120)
        text = "def add(a, b):\n    return "
        suggestion = completer.complete("doc", text, len(text), Settings(max_new_tokens=4))
    assert completer.engine.runner.slots == 2 and not completer.engine.prefix_cache.enabled
    assert suggestion.result.finish_reason in ("stop", "length")
    messages = [what for _, _, what in reports]
    weights = [r for r in reports if r[2].startswith("loading h_0/")]
    # The weights, each leaf of the parameter tree in turn, then every compiled shape.
    assert messages[0] == f"loading {tiny_mqa_dir}"
    assert weights and all(done <= total for done, total, _ in weights)
    assert any(m.startswith("compiling prefill 16") for m in messages)
    assert messages.index("compiling prefill 16") > messages.index(weights[-1][2])
    assert reports[-1] == (3, 3, "compiled")  # prefill 16, decode 1, decode 2
