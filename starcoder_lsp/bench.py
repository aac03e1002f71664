"""Model benchmark: ours against transformers on the same checkpoint, in the same process.

Rows: load time, prefill tokens/s at several prompt lengths, decode ms per step at several
batch sizes, and the memory-bandwidth floor for decoding (the bytes a decode step must read
÷ the bandwidth of a large array read measured in this run). Used by `starcoder-lsp bench`
and benchmarks/model_bench.py.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from starcoder_lsp import checkpoint
from starcoder_lsp.generate import Runner


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
        lines = [
            f"model {self.model} · {self.dtype} · {self.device}",
            f"| {'measure':<42} | {'starcoder-lsp':>13} | {'transformers':>12} | {'ratio':>7} |"
            f" note",
            f"|{'-' * 44}|{'-' * 15}|{'-' * 14}|{'-' * 9}|------",
        ]
        for r in self.rows:
            ratio = ""
            if r.ours and r.theirs:
                # "x better" for ours: higher tok/s or GB/s is better, lower ms or s is better.
                better_high = r.unit in ("tok/s", "GB/s")
                ratio = f"{(r.ours / r.theirs if better_high else r.theirs / r.ours):.2f}x"
            lines.append(
                f"| {r.name + ' (' + r.unit + ')':<42} | {_fmt(r.ours):>13} | "
                f"{_fmt(r.theirs):>12} | {ratio:>7} | {r.note}"
            )
        return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:,.1f}" if v >= 10 else f"{v:.3f}"


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of summing one large array: what streaming weights from memory can reach."""
    data = jnp.ones((nbytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(data).block_until_ready()
    return nbytes / _median_seconds(lambda: total(data).block_until_ready(), repeats)


def decode_bytes(config: object, itemsize: int) -> int:
    """Parameter bytes one decode step reads: everything but the position table, of which a
    step reads one row."""
    return (config.num_parameters() - config.n_positions * config.n_embd) * itemsize


def _prompt(vocab: int, n: int) -> list[int]:
    return np.random.default_rng(n).integers(20, vocab, n).tolist()


def bench_ours(
    model: str,
    mesh: Mesh | None,
    dtype: jnp.dtype,
    prefill_lengths: Sequence[int],
    batches: Sequence[int],
    repeats: int,
    log: Callable[[str], None],
) -> tuple[dict[str, float], checkpoint.Checkpoint]:
    out: dict[str, float] = {}
    start = time.perf_counter()
    ckpt = checkpoint.load(model, mesh, dtype)
    out["load"] = time.perf_counter() - start
    log(f"loaded in {out['load']:.1f} s")
    max_len = ckpt.config.n_positions
    runner = Runner(ckpt.config, ckpt.params, ckpt.mesh, ckpt.dtype, max_len=max_len,
                    slots=max(batches), batches=batches)  # fmt: skip
    log(f"compiling {len(runner.shapes())} shapes...")
    start = time.perf_counter()
    cache = runner.warmup()
    out["warmup"] = time.perf_counter() - start
    for n in prefill_lengths:
        if n > max_len:
            continue
        prompt = _prompt(ckpt.config.vocab_size, n)

        def prefill(prompt: list[int] = prompt) -> None:
            nonlocal cache
            logits, cache, _ = runner.prefill(cache, 0, prompt, 0)
            logits.block_until_ready()

        out[f"prefill {n}"] = n / _median_seconds(prefill, repeats)
        log(f"prefill {n}: {out[f'prefill {n}']:.0f} tok/s")
    context = 256  # decode after a prompt of this length, in every row
    for b in batches:
        for slot in range(b):
            _, cache, _ = runner.prefill(cache, slot, _prompt(ckpt.config.vocab_size, context), 0)
        step = 0

        def decode(b: int = b) -> None:
            nonlocal cache, step
            logits, cache = runner.decode(cache, list(range(b)), [7] * b, [context + step] * b)
            logits.block_until_ready()
            step += 1

        out[f"decode {b}"] = _median_seconds(decode, repeats * 4) * 1000
        log(f"decode batch {b}: {out[f'decode {b}']:.1f} ms/step")
    del cache
    return out, ckpt


def bench_transformers(
    directory: str,
    prefill_lengths: Sequence[int],
    batches: Sequence[int],
    repeats: int,
    threads: int,
    log: Callable[[str], None],
) -> dict[str, float]:
    import torch
    from transformers import GPTBigCodeForCausalLM

    torch.set_num_threads(threads)
    out: dict[str, float] = {}
    start = time.perf_counter()
    model = GPTBigCodeForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    out["load"] = time.perf_counter() - start
    vocab = model.config.vocab_size
    with torch.inference_mode():
        for n in prefill_lengths:
            if n > model.config.n_positions:
                continue
            ids = torch.tensor([_prompt(vocab, n)])
            # logits_to_keep=1: only the last position's logits, as our prefill computes.
            run = lambda ids=ids: model(ids, use_cache=True, logits_to_keep=1)
            run()
            out[f"prefill {n}"] = n / _median_seconds(run, repeats)
            log(f"transformers prefill {n}: {out[f'prefill {n}']:.0f} tok/s")
        for b in batches:
            ids = torch.tensor([_prompt(vocab, 256)] * b)
            past = model(ids, use_cache=True, logits_to_keep=1).past_key_values
            token = torch.full((b, 1), 7)

            def step(token: torch.Tensor = token) -> None:
                nonlocal past
                past = model(token, past_key_values=past, use_cache=True).past_key_values

            step()
            out[f"decode {b}"] = _median_seconds(step, repeats * 4) * 1000
            log(f"transformers decode batch {b}: {out[f'decode {b}']:.1f} ms/step")
    return out


def run(
    model: str,
    mesh: Mesh | None = None,
    dtype: str | None = None,
    prefill_lengths: Sequence[int] = (256, 1024, 4096),
    batches: Sequence[int] = (1, 4, 8),
    repeats: int = 3,
    compare: bool = True,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> Report:
    backend = jax.default_backend()
    jdtype = jnp.dtype(dtype or ("float32" if backend == "cpu" else "bfloat16"))
    bandwidth = read_bandwidth()
    log(f"memory read bandwidth: {bandwidth / 1e9:.1f} GB/s")
    ours, ckpt = bench_ours(model, mesh, jdtype, prefill_lengths, batches, repeats, log)
    theirs: dict[str, float] = {}
    if compare:
        if jdtype != jnp.float32 or backend != "cpu":
            log("transformers comparison runs on CPU in float32 only; skipped")
        else:
            import os

            theirs = bench_transformers(
                str(ckpt.path), prefill_lengths, batches, repeats, os.cpu_count() or 1, log
            )
    devices = jax.devices()
    report = Report(
        f"{len(devices)}× {devices[0].device_kind} ({backend})", str(model), jdtype.name
    )
    rows = report.rows
    rows.append(Row("load", ours["load"], theirs.get("load"), "s",
                    "ours: read + place on devices; excludes imports"))  # fmt: skip
    rows.append(Row("compile all shapes (warm-up)", ours["warmup"], None, "s",
                    "once per process; cached on disk across restarts"))  # fmt: skip
    for key in ours:
        if key.startswith("prefill"):
            rows.append(Row(key + " tokens", ours[key], theirs.get(key), "tok/s"))
    floor_ms = decode_bytes(ckpt.config, jdtype.itemsize) / bandwidth * 1000
    rows.append(Row("read bandwidth", bandwidth / 1e9, None, "GB/s", "jnp.sum of a 1 GiB array"))
    rows.append(Row("decode floor: param bytes ÷ bandwidth", floor_ms, None, "ms"))
    for key in ours:
        if key.startswith("decode"):
            b = int(key.split()[1])
            note = f"{ours[key] / floor_ms:.2f}× floor; {ours[key] / b:.1f} ms/token"
            if b != batches[0]:
                note += f"; {ours[key] / ours[f'decode {batches[0]}']:.2f}× batch {batches[0]}"
            rows.append(Row(f"decode batch {b}, per step", ours[key], theirs.get(key), "ms", note))
    return report
