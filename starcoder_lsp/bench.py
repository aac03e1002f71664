"""Model benchmark: ours against transformers on the same checkpoint, in the same process.

Rows: load time, prefill tokens/s at several prompt lengths, decode ms per step at several
batch sizes, and the memory-bandwidth floor for decoding (the bytes a decode step must read
÷ the bandwidth of a large array read measured in this run). Used by `starcoder-lsp bench`
and benchmarks/model_bench.py.
"""

from __future__ import annotations

import inspect
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from starcoder_lsp.factory import ModelOptions, load_checkpoint
from starcoder_lsp.generator import GENERATOR_STEPS_PER_CALL
from starcoder_lsp.runner import Runner
from starcoder_lsp.sampling import Sampling


@dataclass
class Row:
    name: str
    ours: float | None
    theirs: float | None = None
    unit: str = ""
    note: str = ""


@dataclass
class Report:
    device: str
    model: str
    dtype: str
    rows: list[Row] = field(default_factory=list)

    def table(self) -> str:
        width = max([42, *(len(f"{r.name} ({r.unit})") for r in self.rows)])
        lines = [
            f"model {self.model} · {self.dtype} · {self.device}",
            f"| {'measure':<{width}} | {'starcoder-lsp':>13} | {'transformers':>12} | "
            f"{'ratio':>7} | note",
            f"|{'-' * (width + 2)}|{'-' * 15}|{'-' * 14}|{'-' * 9}|------",
        ]
        for r in self.rows:
            ratio = ""
            if r.ours and r.theirs:
                # "x better" for ours: higher tok/s or GB/s is better, lower ms or s is better.
                better_high = r.unit in ("tok/s", "GB/s")
                ratio = f"{(r.ours / r.theirs if better_high else r.theirs / r.ours):.2f}x"
            lines.append(
                f"| {r.name + ' (' + r.unit + ')':<{width}} | {_fmt(r.ours):>13} | "
                f"{_fmt(r.theirs):>12} | {ratio:>7} | {r.note}"
            )
        return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:,.1f}" if v >= 10 else f"{v:.3f}"


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternating(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each case, run in turn (one call of each per round) after one
    untimed call each. On a shared machine the speed drifts by tens of percent over minutes;
    taking turns exposes every case to the same drift, so the ratios hold where the
    absolute figures wander."""
    for fn in cases.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            times[name].append(_seconds(fn))
    return {name: statistics.median(t) for name, t in times.items()}


class _BandwidthProbe:
    """Sums one large array: the rate at which streaming weights from memory can go."""

    def __init__(self, nbytes: int = 1 << 30) -> None:
        self.nbytes = nbytes
        self._data = jnp.ones((nbytes // 4,), jnp.float32)
        self._sum = jax.jit(jnp.sum)

    def __call__(self) -> None:
        self._sum(self._data).block_until_ready()


def weight_bytes(params: dict) -> int:
    """Bytes the parameters take on the devices (one copy of each)."""
    return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(params))


def decode_bytes(params: dict) -> int:
    """Parameter bytes one decode step reads: everything but a learned position table, of
    which a step reads one row. Counted from the arrays, so int8 weights count as int8."""
    table = params.get("wpe", {}).get("embedding")
    return weight_bytes(params) - (0 if table is None else table.nbytes - table[0].nbytes)


def _prompt(vocab: int, n: int) -> list[int]:
    return np.random.default_rng(n).integers(20, vocab, n).tolist()


DECODE_CONTEXT = 256  # decoding runs after a prompt of this length, in every row


class _Ours:
    """Our engine on a checkpoint, with every shape compiled: makes the timed calls."""

    def __init__(
        self,
        options: ModelOptions,
        batches: Sequence[int],
        log: Callable[[str], None],
        int8_activations: bool | None = None,
    ) -> None:
        start = time.perf_counter()
        self.checkpoint = ckpt = load_checkpoint(options)
        self.load = time.perf_counter() - start
        log(f"loaded in {self.load:.1f} s")
        self.runner = Runner.from_checkpoint(
            ckpt,
            slots=max(batches),
            batches=batches,
            steps_per_call=GENERATOR_STEPS_PER_CALL,
            int8_activations=int8_activations,
        )
        log(f"compiling {len(self.runner.shapes())} shapes...")
        start = time.perf_counter()
        self.cache = self.runner.warmup()
        self.warmup = time.perf_counter() - start

    def prefill(self, prompt: list[int]) -> Callable[[], None]:
        def run() -> None:
            logits, self.cache, _ = self.runner.prefill(self.cache, 0, prompt, 0)
            logits.block_until_ready()

        return run

    def decode(self, batch: int) -> Callable[[], None]:
        """A call of `steps_per_call` greedy steps, with the tokens back on the host."""
        rows, position = self._prefilled(batch), DECODE_CONTEXT
        greedy, key = Sampling.rows(0.0, batch=batch), jax.random.PRNGKey(0)

        def steps() -> None:
            nonlocal position
            _, self.cache = self.runner.decode_steps(
                self.cache, rows, [7] * batch, [position] * batch, greedy, key
            )
            position += self.runner.steps_per_call

        return steps

    def decode_one(self, batch: int) -> Callable[[], None]:
        """One step per call, as the server decodes (logits computed, not sampled)."""
        rows, position = self._prefilled(batch), DECODE_CONTEXT

        def step() -> None:
            nonlocal position
            logits, self.cache = self.runner.decode(
                self.cache, rows, [7] * batch, [position] * batch
            )
            logits.block_until_ready()
            position += 1

        return step

    def _prefilled(self, batch: int) -> list[int]:
        vocab = self.checkpoint.config.vocab_size
        for slot in range(batch):
            _, self.cache, _ = self.runner.prefill(
                self.cache, slot, _prompt(vocab, DECODE_CONTEXT), 0
            )
        return list(range(batch))


class _Transformers:
    """transformers' own model of the checkpoint's family (GPTBigCodeForCausalLM or
    Starcoder2ForCausalLM) on the same checkpoint (CPU, float32)."""

    def __init__(self, directory: str, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self._torch = torch
        start = time.perf_counter()
        self.model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        self.load = time.perf_counter() - start
        # transformers 5.24 renamed past_key_values to cache (the old name goes in 5.40).
        forward = inspect.signature(type(self.model).forward).parameters
        self._cache_name = "cache" if "cache" in forward else "past_key_values"

    def prefill(self, prompt: list[int]) -> Callable[[], None]:
        ids = self._torch.tensor([prompt])

        def run() -> None:
            with self._torch.inference_mode():
                # logits_to_keep=1: only the last position's logits, as our prefill computes.
                self.model(ids, use_cache=True, logits_to_keep=1)

        return run

    def decode(self, batch: int) -> Callable[[], None]:
        torch = self._torch
        ids = torch.tensor([_prompt(self.model.config.vocab_size, DECODE_CONTEXT)] * batch)
        with torch.inference_mode():
            past = self.model(ids, use_cache=True, logits_to_keep=1)[self._cache_name]
        token = torch.full((batch, 1), 7)

        def step() -> None:
            nonlocal past
            with torch.inference_mode():
                out = self.model(token, use_cache=True, **{self._cache_name: past})
                past = out[self._cache_name]

        return step


def run(
    model: ModelOptions | str | Path,
    prefill_lengths: Sequence[int] = (256, 1024, 4096),
    batches: Sequence[int] = (1, 4, 8),
    repeats: int = 3,
    compare: bool = True,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> Report:
    """Each row's cases (ours, transformers, and for batch-1 decode the bandwidth read) are
    measured in turn, round by round, so that they share the machine's mood. `model` is a
    checkpoint with the default options, or ModelOptions (mesh, dtype, ...)."""
    options = model if isinstance(model, ModelOptions) else ModelOptions(model)
    backend = jax.default_backend()
    ours = _Ours(replace(options, quantize=None), batches, log)
    config, jdtype = ours.checkpoint.config, ours.checkpoint.dtype
    quantized = _Ours(options, batches, log) if options.quantize else None
    # Where the int8 products round their activations (a CPU with VNNI), the float form too.
    exact: _Ours | None = None
    if quantized is not None and quantized.runner.model.int8_activations:
        exact = _Ours(options, batches, log, int8_activations=False)
    theirs: _Transformers | None = None
    if compare and (jdtype != jnp.float32 or backend != "cpu"):
        log("transformers comparison runs on CPU in float32 only; skipped")
    elif compare:
        theirs = _Transformers(str(ours.checkpoint.path), os.cpu_count() or 1)
    probe = _BandwidthProbe()

    def measure(
        label: str,
        make: Callable[[_Ours | _Transformers], Callable[[], None]],
        rounds: int,
        **extra: Callable[[], None],
    ) -> dict[str, float]:
        sides = {"ours": ours, "theirs": theirs}
        cases = {name: make(side) for name, side in sides.items() if side is not None}
        seconds = alternating(cases | extra, rounds)
        log(f"{label}: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in seconds.items()))
        return seconds

    devices = jax.devices()
    report = Report(
        f"{len(devices)}× {devices[0].device_kind} ({backend})", str(options.model), jdtype.name
    )
    rows = report.rows
    rows.append(
        Row(
            "load",
            ours.load,
            theirs and theirs.load,
            "s",
            "ours: read + place on devices; excludes imports",
        )
    )
    rows.append(
        Row(
            "compile all shapes (warm-up)",
            ours.warmup,
            None,
            "s",
            "once per process; cached on disk across restarts",
        )
    )
    for label, side in (("", ours), ("int8", quantized)):
        if side is not None:
            name = "weights on the devices" + (f", {label}" if label else "")
            read = f"{decode_bytes(side.checkpoint.params) / 2**20:,.0f} MiB read per step"
            rows.append(Row(name, weight_bytes(side.checkpoint.params) / 2**20, None, "MiB", read))
    for n in (n for n in prefill_lengths if n <= ours.runner.max_len):
        prompt = _prompt(config.vocab_size, n)
        t = measure(f"prefill {n}", lambda side, p=prompt: side.prefill(p), repeats)
        theirs_rate = n / t["theirs"] if "theirs" in t else None
        rows.append(Row(f"prefill {n} tokens", n / t["ours"], theirs_rate, "tok/s"))

    bytes_per_step = decode_bytes(ours.checkpoint.params)
    steps = ours.runner.steps_per_call
    decode: dict[int, dict[str, float]] = {}
    for b in batches:
        # The floor takes the bandwidth read beside batch 1's steps: a decode step streams
        # every weight once, and at batch 1 nothing else is read in bulk. One step per call,
        # the server's way, is measured beside every batch's calls.
        extra = {"one step": ours.decode_one(b)} | ({"read": probe} if b == batches[0] else {})
        if quantized is not None:
            extra |= {"int8": quantized.decode(b), "int8 one step": quantized.decode_one(b)}
        if exact is not None:
            extra |= {"int8 float": exact.decode(b)}
        make = lambda side, b=b: side.decode(b)
        decode[b] = measure(
            f"decode batch {b} (ours: a call of {steps} steps)", make, repeats * 4, **extra
        )
        for case in ("ours", "int8", "int8 float"):
            if case in decode[b]:
                decode[b][case] /= steps
    bandwidth = probe.nbytes / decode[batches[0]]["read"]
    floor_ms = bytes_per_step / bandwidth * 1000
    rows.append(
        Row(
            "read bandwidth",
            bandwidth / 1e9,
            None,
            "GB/s",
            "jnp.sum of a 1 GiB array, in turn with the batch-1 decode steps",
        )
    )
    rows.append(Row("decode floor: param bytes ÷ bandwidth", floor_ms, None, "ms"))
    int8_floor = 0.0
    if quantized is not None:
        int8_floor = decode_bytes(quantized.checkpoint.params) / bandwidth * 1000
        rows.append(Row("decode floor: param bytes ÷ bandwidth, int8", int8_floor, None, "ms"))
    cases = [("ours", "", f"{steps} steps per call"), ("one step", "", "as the server decodes")]
    if quantized is not None:
        rounding = ", activations rounded to int8" if exact is not None else ""
        cases += [
            ("int8", "int8", f"{steps} steps per call{rounding}"),
            ("int8 one step", "int8", f"as the server decodes{rounding}"),
        ]
    if exact is not None:
        cases += [("int8 float", "int8, float activations", f"{steps} steps per call")]
    for case, label, how in cases:
        floor = int8_floor if label else floor_ms
        first = decode[batches[0]][case]
        for b, t in decode.items():
            ms = t[case] * 1000
            note = f"{ms / floor:.2f}× floor; {ms / b:.1f} ms/token; {how}"
            if b != batches[0]:
                note += f"; {t[case] / first:.2f}× batch {batches[0]}"
            per = "one step per call" if case.endswith("one step") else "per step"
            name = f"decode batch {b}, " + (f"{label}, " if label else "") + per
            theirs_ms = t["theirs"] * 1000 if "theirs" in t else None
            rows.append(Row(name, ms, theirs_ms, "ms", note))
    return report
