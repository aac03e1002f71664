"""Keystroke replay: type a real source file character by character and ask for a completion
at each pause, as an editor does; compare the prefix cache (SPM and PSM), no cache, and
transformers recomputing the whole prompt, in one process on one checkpoint.

    python benchmarks/keystroke_replay.py --model models/tiny_starcoder_py

The document is a Python standard-library file with a stretch of it removed after at least
--min-context tokens; the stretch is then typed back one character at a time. A pause (and so
a request) follows every word boundary. Each request waits for its answer before typing goes
on, so latencies never overlap: what is measured is the time from a keystroke to its
suggestion. Timing does not depend on weight values, so random weights in the real shapes
(`starcoder-lsp make-random-model --preset tiny_starcoder_py`) measure the real thing.

With --quantize int8 the same stretch is also typed with the weights in int8 (its median
against the plain SPM variant's is what 8-bit weights are worth per keystroke).

The cross-file variant types the same stretch with three other standard-library files open
(`--other`), their chunks most like the code at the cursor ahead of the prompt: its median
latency against the plain SPM variant's is the price of cross-file context per keystroke.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from starcoder_lsp.completer import Completer
from starcoder_lsp.context import CrossFile, Source
from starcoder_lsp.factory import ModelOptions, build_engine, completer_for, load_checkpoint
from starcoder_lsp.prompt import PSM_SUFFIX_TOKENS, default_budgets
from starcoder_lsp.runner import Runner
from starcoder_lsp.settings import Settings

PAUSE_AFTER = set(" \n.,:;()[]{}=")


@dataclass
class Stats:
    name: str
    latency: list[float] = field(default_factory=list)
    prefill: list[int] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)
    hits: int = 0
    through: int = 0
    note: str = ""
    context: list[int] = field(default_factory=list)  # cross-file tokens per model request

    def row(self) -> str:
        if not self.latency:
            return f"| {self.name:<26} | (no requests) |"
        ms = np.array(self.latency) * 1000
        ratio = [t / d for t, d in zip(self.latency, self.decode, strict=True) if d > 0]
        n = len(self.latency)
        model_requests = n - self.through
        hit_rate = self.hits / model_requests if model_requests else 0.0
        parts = [
            f"{statistics.median(self.context):.0f} context tokens" if any(self.context) else "",
            f"{self.through} typed through" if self.through else "",
            self.note,
        ]
        note = "; ".join(part for part in parts if part)
        return (
            f"| {self.name:<26} | {n:>4} | {np.median(ms):>9.0f} | {np.percentile(ms, 95):>9.0f} |"
            f" {statistics.median(self.prefill):>15.0f} | {hit_rate:>8.0%} |"
            f" {statistics.median(ratio) if ratio else float('nan'):>14.2f} | {note}"
        )


HEADER = (
    "(hit rate: of the requests that ran the model; ms ÷ decode ms: a request's latency over\n"
    " the time of its own decode steps)\n"
    "| variant                    |    n | median ms |    p95 ms | prefill tok/req |"
    " hit rate | ms ÷ decode ms | note\n"
    "|----------------------------|------|-----------|-----------|-----------------|"
    "----------|----------------|-----"
)


def pauses(typed: str) -> list[int]:
    """Offsets into `typed` after which the typist pauses."""
    return [i + 1 for i, ch in enumerate(typed) if ch in PAUSE_AFTER]


def pick_stretch(source: str, tokenizer: object, min_context: int, chars: int) -> tuple[int, int]:
    """A stretch starting at a line start with at least min_context tokens before it."""
    lines = source.splitlines(keepends=True)
    offset, tokens = 0, 0
    for line in lines:
        if tokens >= min_context:
            break
        offset += len(line)
        tokens = len(tokenizer.encode(source[:offset], add_special_tokens=False))
    if tokens < min_context or offset + chars >= len(source):
        raise SystemExit(f"the file is too short for {min_context} tokens of context")
    return offset, offset + chars


def replay(
    completer: Completer,
    stats: Stats,
    source: str,
    start: int,
    end: int,
    settings: Settings,
    every: int = 1,
    cpm: float = 0,
    context: CrossFile | None = None,
) -> list[tuple[list[int], int]]:
    """Type the stretch back at `cpm` characters per minute (0: as fast as answers come),
    with `context` the other files open; returns each model request's prompt and new-token
    count."""
    before, typed, after = source[:start], source[start:end], source[end:]
    requests = []
    points = pauses(typed)[::every]
    began_typing = time.perf_counter()
    for n, point in enumerate(points):
        if cpm:  # wait for the typist to reach this pause; a slow answer puts them behind
            time.sleep(max(0.0, began_typing + point * 60 / cpm - time.perf_counter()))
        text = before + typed[:point] + after
        cursor = start + point
        began = time.perf_counter()
        suggestion = completer.complete("replay", text, cursor, settings, context=context)
        stats.latency.append(time.perf_counter() - began)
        result = suggestion.result
        if suggestion.typed_through:
            stats.through += 1
            stats.prefill.append(0)
            stats.decode.append(0.0)
            continue
        requests.append((suggestion.prompt.ids, max(len(result.tokens), 1)))
        stats.prefill.append(result.prefilled_tokens)
        stats.decode.append(result.decode_seconds)
        stats.hits += result.reused_tokens > 0
        stats.context.append(len(suggestion.context))
        print(f"\r{stats.name}: {n + 1}/{len(points)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return requests


def transformers_baseline(directory: Path, prompts: list[tuple[list[int], int]]) -> Stats:
    """transformers' generate on the whole prompt, greedy, as many new tokens as ours made."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    stats = Stats("transformers, whole prompt")
    with torch.inference_mode():
        for ids, new in prompts:
            x = torch.tensor([ids])
            began = time.perf_counter()
            model.generate(
                x, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
            )
            stats.latency.append(time.perf_counter() - began)
            stats.prefill.append(len(ids))
            stats.decode.append(0.0)
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/tiny_starcoder_py")
    parser.add_argument(
        "--file", type=Path, default=Path(sysconfig.get_paths()["stdlib"]) / "argparse.py"
    )
    parser.add_argument("--chars", type=int, default=400, help="characters typed")
    parser.add_argument(
        "--other",
        nargs="+",
        default=["shlex.py", "textwrap.py", "gettext.py"],
        help="standard-library files open beside it, for the cross-file variant",
    )
    parser.add_argument(
        "--min-context", type=int, default=2000, help="tokens of file before the typed stretch"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=16,
        help="cap of a single-line suggestion (random weights rarely end a line by themselves)",
    )
    parser.add_argument(
        "--cpm",
        type=float,
        default=250,
        help="typing speed in characters per minute (0: type on as soon as "
        "each suggestion arrives)",
    )
    parser.add_argument(
        "--baseline-every", type=int, default=12, help="no-cache and transformers: every Nth pause"
    )
    parser.add_argument(
        "--quantize",
        choices=["int8"],
        help="also type with the model's weights quantized (a variant beside SPM + cache)",
    )
    parser.add_argument(
        "--no-transformers",
        action="store_true",
        help="skip transformers (a model whose float32 weights fit memory once, not twice)",
    )
    args = parser.parse_args()

    if not Path(args.model).is_dir():
        from starcoder_lsp.cli import main as cli

        cli(["make-random-model", args.model, "--preset", "tiny_starcoder_py"])
    ckpt = load_checkpoint(ModelOptions(args.model))
    source = args.file.read_text()
    start, end = pick_stretch(source, ckpt.tokenizer, args.min_context, args.chars)
    print(
        f"{args.file.name}: typing {args.chars} characters after "
        f"{len(ckpt.tokenizer.encode(source[:start]))} tokens",
        file=sys.stderr,
    )
    runner = Runner.from_checkpoint(ckpt, slots=4)
    all_stats: list[Stats] = []
    recorded: list[tuple[list[int], int]] = []
    # In PSM order a keystroke re-prefills the whole suffix window: with the default budget
    # (at most PSM_SUFFIX_TOKENS) at every pause, with a quarter of the context (SPM's
    # default) every few pauses, to keep the benchmark short.
    quarter = default_budgets(runner.max_len, args.max_new_tokens, "spm")[1]
    others = [Source(name, name, (args.file.parent / name).read_text()) for name in args.other]
    variants = [
        ("SPM + prefix cache", "spm", True, 1, None, False),
        (f"SPM + cache + {len(others)} files open", "spm", True, 1, None, True),
        (f"PSM + cache, suffix ≤{PSM_SUFFIX_TOKENS}", "psm", True, 1, None, False),
        (
            f"PSM + cache, suffix {quarter}",
            "psm",
            True,
            max(1, args.baseline_every // 2),
            quarter,
            False,
        ),
        ("SPM, no cache", "spm", False, args.baseline_every, None, False),
    ]
    models = {name: (ckpt, runner) for name, *_ in variants}
    if args.quantize:
        name = f"SPM + prefix cache, {args.quantize}"
        quantized = load_checkpoint(ModelOptions(args.model, quantize=args.quantize))
        models[name] = (quantized, Runner.from_checkpoint(quantized, slots=4))
        variants.insert(1, (name, "spm", True, 1, None, False))
    for name, mode, cached, every, suffix, cross_file in variants:
        model, model_runner = models[name]
        engine = build_engine(model, model_runner, prefix_cache=cached)
        engine.start(lambda i, n, what: print(f"\r{what} {i}/{n}", end="", file=sys.stderr))
        engine.ready.wait()
        completer = completer_for(model, engine)
        settings = Settings(
            fim_mode=mode,
            max_new_tokens=args.max_new_tokens,
            multiline="never",
            suffix_tokens=suffix,
        )
        stats = Stats(name, note="" if every == 1 else f"every {every}th pause")
        context = None
        if cross_file:  # the other files, opened before typing starts
            context = CrossFile(lambda: others, repo="stdlib")
            for other in others:
                context.opened(other.key)
        requests = replay(completer, stats, source, start, end, settings, every, args.cpm, context)
        if not cached:
            recorded = requests
        engine.close()
        all_stats.append(stats)
    if args.no_transformers:
        recorded = []
    if recorded:
        baseline = transformers_baseline(ckpt.path, recorded)
        baseline.note = f"every {args.baseline_every}th pause"
        all_stats.append(baseline)
    print(
        f"\nkeystroke replay · {args.file.name} · {args.chars} chars after ≥{args.min_context} "
        f"tokens · {args.cpm:g} cpm · single-line · greedy · {ckpt.path.name}"
    )
    print(HEADER)
    for stats in all_stats:
        print(stats.row())
    plain = all_stats[0]
    cross = next(s for s in all_stats if "files open" in s.name)
    if plain.latency and cross.latency:
        ratio = statistics.median(cross.latency) / statistics.median(plain.latency)
        print(f"\nmedian latency, {cross.name} ÷ {plain.name}: {ratio:.2f}×")
    for stats in all_stats:
        if args.quantize and stats.name.endswith(args.quantize) and stats.latency:
            ratio = statistics.median(plain.latency) / statistics.median(stats.latency)
            print(f"median latency, {plain.name} ÷ {stats.name}: {ratio:.2f}×")


if __name__ == "__main__":
    main()
