"""The model benchmark runs end to end, ours beside transformers, on the test checkpoint.

Its figures are not checked (the machines are noisy): only that every row is measured."""

from __future__ import annotations

import math

from starcoder_lsp import bench, cpu_kernels
from starcoder_lsp.factory import ModelOptions
from starcoder_lsp.generate import GENERATOR_STEPS_PER_CALL


def test_bench_measures_every_row_on_both_sides(tiny_mqa_dir):
    report = bench.run(
        str(tiny_mqa_dir),
        prefill_lengths=(16, 100),
        batches=(1, 2),
        repeats=1,
        log=lambda message: None,
    )
    rows = {row.name: row for row in report.rows}
    expected = [
        "load",
        "compile all shapes (warm-up)",
        "weights on the devices",
        "prefill 16 tokens",
        "prefill 100 tokens",
        "read bandwidth",
        "decode floor: param bytes ÷ bandwidth",
        "decode batch 1, per step",
        "decode batch 2, per step",
        "decode batch 1, one step per call",
        "decode batch 2, one step per call",
    ]
    assert list(rows) == expected
    for name, row in rows.items():
        assert row.ours is not None and math.isfinite(row.ours) and row.ours > 0, name
    compared = [n for n in expected if n.startswith(("load", "prefill", "decode batch"))]
    for name in compared:
        assert rows[name].theirs is not None and rows[name].theirs > 0, name
    table = report.table()
    assert all(f"| {name} (" in table for name in expected)
    steps = f"{GENERATOR_STEPS_PER_CALL} steps per call"
    assert steps in rows["decode batch 2, per step"].note
    assert "× batch 1" in rows["decode batch 2, one step per call"].note


def test_bench_measures_int8_beside_float32(tiny_mqa_dir):
    options = ModelOptions(tiny_mqa_dir, quantize="int8")
    report = bench.run(
        options, prefill_lengths=(16,), batches=(1,), repeats=1, compare=False, log=lambda m: None
    )
    rows = {row.name: row for row in report.rows}
    for name in (
        "weights on the devices, int8",
        "decode floor: param bytes ÷ bandwidth, int8",
        "decode batch 1, int8, per step",
        "decode batch 1, int8, one step per call",
    ):
        assert rows[name].ours is not None and rows[name].ours > 0, name
    # The int8 weights take well under half the float32 bytes, and so does the floor.
    assert rows["weights on the devices, int8"].ours < 0.4 * rows["weights on the devices"].ours
    floor = rows["decode floor: param bytes ÷ bandwidth"].ours
    assert rows["decode floor: param bytes ÷ bandwidth, int8"].ours < 0.4 * floor
    # On one CPU device that rounds the activations of int8 products, the float form is
    # measured beside it, and the rows say which is which.
    exact = "decode batch 1, int8, float activations, per step"
    if cpu_kernels.has_int8_activations():
        assert rows[exact].ours > 0
        assert "activations rounded to int8" in rows["decode batch 1, int8, per step"].note
    else:
        assert exact not in rows
