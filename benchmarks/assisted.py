"""Assisted generation, measured: what drafts cost and save, side by side in one process.

    python benchmarks/assisted.py --model models/tiny_starcoder_py [--big-model models/1b]

Part 1, the mechanism's costs: one verification of k drafts against one plain decode step
(batch 1, in turn), for k = 1..8, and a draft model's own step; from those, the speed-up
they give at acceptance 0.5, 0.7 and 0.9 (expected tokens per verification
(1 − a^(k+1)) / (1 − a), over the cost of the verification and of k draft steps).

Part 2, generation and typing: plain decoding and each draft source, greedy:
  (a) the model itself as draft (the upper bound on acceptance),
  (b) the model with noise added to its weights, at two levels,
  (c) prompt lookup, on a replay where the user retypes code from earlier in the file,
  (d) a draft that agrees with nothing (another random model): the cost of wasted drafts.
For each: model steps per generated token, acceptance, ms per generated token (generation of
64 tokens on 4 prompts), and the median keystroke-to-suggestion latency over a replay.

Random weights agree with nothing real, so (b) measures the mechanism at the acceptance the
noise leaves, not what a trained tiny_starcoder_py would reach beside a trained StarCoder.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from starcoder_lsp.assist import SpeculationStats
from starcoder_lsp.bench import alternating
from starcoder_lsp.cli import main as cli
from starcoder_lsp.factory import ModelOptions, build_completer, load_checkpoint
from starcoder_lsp.generator import Generator
from starcoder_lsp.runner import Runner
from starcoder_lsp.sampling import Sampling
from starcoder_lsp.settings import Settings

KS = range(1, 9)
ACCEPTANCE = (0.5, 0.7, 0.9)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ensure_model(directory: Path, preset: str, seed: int = 0) -> Path:
    if not directory.is_dir():
        cli(["make-random-model", str(directory), "--preset", preset, "--seed", str(seed)])
    return directory


def noisy_copy(source: Path, target: Path, level: float) -> Path:
    """The model with gaussian noise of `level` × each tensor's own spread added."""
    if target.is_dir():
        return target
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.suffix == ".safetensors":
            tensors = load_file(path)
            rng = np.random.default_rng(int(level * 1000))
            noisy = {
                name: (t + level * t.std() * rng.standard_normal(t.shape)).astype(t.dtype)
                for name, t in tensors.items()
            }
            save_file(noisy, target / path.name, metadata={"format": "pt"})
        elif path.is_file():
            (target / path.name).write_bytes(path.read_bytes())
    return target


# --- part 1: costs ----------------------------------------------------------------------------


def step_costs(model: Path, repeats: int) -> dict[str, float]:
    """Seconds of one decode step and of one verification of k drafts, batch 1, in turn."""
    ckpt = load_checkpoint(ModelOptions(model))
    prompt = np.random.default_rng(0).integers(20, ckpt.config.vocab_size, 256).tolist()
    greedy, key = Sampling.rows(0.0), jax.random.PRNGKey(0)
    # One runner per k (k is a compiled shape); each compiles what it runs at its first,
    # untimed, call.
    runners = {k: Runner.from_checkpoint(ckpt, slots=1, draft_tokens=k, chunks=(256,)) for k in KS}
    cases = {}
    for k, runner in runners.items():
        state = {"cache": runner.new_cache()}
        _, state["cache"], _ = runner.prefill(state["cache"], 0, prompt, 0)

        def verify(runner: Runner = runner, state: dict = state, k: int = k) -> None:
            drafts = [[7] * k]
            _, _, state["cache"] = runner.verify(
                state["cache"], [0], [7], drafts, [len(prompt)], greedy, key
            )

        cases[f"verify {k}"] = verify
        if k == 1:

            def decode(runner: Runner = runner, state: dict = state) -> None:
                # A plain step as the engine takes it: the model's step, then its token.
                logits, state["cache"] = runner.decode(state["cache"], [0], [7], [len(prompt)])
                runner.sample(logits, greedy, key)

            cases["decode"] = decode
    return alternating(cases, repeats)


def speedup(costs: dict[str, float], draft_step: float, k: int, acceptance: float) -> float:
    tokens = (1 - acceptance ** (k + 1)) / (1 - acceptance)
    return tokens * costs["decode"] / (costs[f"verify {k}"] + k * draft_step)


def cost_table(name: str, costs: dict[str, float], draft_step: float, draft: str) -> str:
    decode_ms = costs["decode"] * 1000
    lines = [
        f"\n{name}: decode step {decode_ms:.1f} ms; {draft} step {draft_step * 1000:.1f} ms",
        "| k | verify ms | ÷ decode | "
        + " | ".join(f"speed-up at {a}" for a in ACCEPTANCE)
        + " | (lookup: no draft cost) at 0.7",
        "|---|-----------|----------|" + "------------------|" * len(ACCEPTANCE) + "------",
    ]
    for k in KS:
        verify_ms = costs[f"verify {k}"] * 1000
        gains = " | ".join(f"{speedup(costs, draft_step, k, a):>16.2f}×" for a in ACCEPTANCE)
        lookup = speedup(costs, 0.0, k, 0.7)
        lines.append(
            f"| {k} | {verify_ms:>9.1f} | {verify_ms / decode_ms:>8.2f} | {gains} | {lookup:.2f}×"
        )
    return "\n".join(lines)


# --- part 2: generation and typing ------------------------------------------------------------

PROMPTS = [
    "import os\n\n\ndef walk(root):\n    for path in os.listdir(root):\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n",
    "def fib(n):\n    if n < 2:\n        return n\n",
    "x = [1, 2, 3]\nfor item in x:\n",
]


def generation(model: Path, draft: str, new: int) -> tuple[float, dict]:
    """ms per generated token over the prompts (after one untimed run), and the stats."""
    generator = Generator.from_pretrained(model, draft=draft, steps_per_call=1)
    generator.runner.warmup()
    if generator.assistant is not None:
        generator.assistant.drafter.warmup()
    generator.generate(PROMPTS, new)
    if generator.assistant is not None:
        generator.assistant.stats = SpeculationStats()
    start = time.perf_counter()
    completions = generator.generate(PROMPTS, new)
    seconds = time.perf_counter() - start
    tokens = sum(len(c.tokens) for c in completions)
    stats = generator.assistant.stats.as_json() if generator.assistant else {}
    return seconds * 1000 / tokens, stats


def retyping_document(chars: int) -> tuple[str, int, int]:
    """A standard-library file with one of its own earlier stretches inserted again further
    down, which is then typed back: the user retypes code that occurs earlier in the file."""
    source = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text()
    lines = source.splitlines(keepends=True)
    earlier = "".join(lines[200:260])[:chars]
    at = len("".join(lines[:400]))
    document = source[:at] + earlier + source[at:]
    return document, at, at + len(earlier)


def replay(model: Path, draft: str, chars: int, new: int) -> float:
    """Median seconds from a keystroke to its suggestion, typing a repeated stretch."""
    document, start, end = retyping_document(chars)
    options = ModelOptions(model, slots=2, draft=draft)
    completer = build_completer(options)
    settings = Settings(max_new_tokens=new, multiline="never")
    latencies = []
    with completer.engine:
        completer.engine.ready.wait()
        for point in range(start + 1, end + 1):
            if document[point - 1] not in " \n.,:;()[]{}=":
                continue
            text = document[:point] + document[end:]
            began = time.perf_counter()
            completer.complete("replay", text, point, settings)
            latencies.append(time.perf_counter() - began)
    return statistics.median(latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/tiny_starcoder_py"))
    parser.add_argument(
        "--big-model", type=Path, help="a starcoderbase-1b-shaped target for part 1 (optional)"
    )
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "assisted")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--chars", type=int, default=240, help="characters retyped")
    parser.add_argument("--skip-costs", action="store_true")
    args = parser.parse_args()

    model = ensure_model(args.model, "tiny_starcoder_py")
    if not args.skip_costs:
        tiny = step_costs(model, args.repeats)
        print(cost_table(f"target {model.name}, draft {model.name}", tiny, tiny["decode"], "draft"))
        if args.big_model:
            big = step_costs(ensure_model(args.big_model, "starcoderbase-1b"), args.repeats)
            print(
                cost_table(
                    f"target {args.big_model.name}, draft {model.name}",
                    big,
                    tiny["decode"],
                    "draft",
                )
            )

    sources = {
        "plain decoding": "off",
        "(a) the model itself": str(model),
        "(b) model + noise 0.05": str(noisy_copy(model, args.work / "noise-0.05", 0.05)),
        "(b) model + noise 0.3": str(noisy_copy(model, args.work / "noise-0.3", 0.3)),
        "(c) prompt lookup": "prompt-lookup",
        "(d) agrees with nothing": str(
            ensure_model(args.work / "unrelated", "tiny_starcoder_py", seed=7)
        ),
    }
    rows = []
    for name, draft in sources.items():
        log(f"generating with {name}")
        ms, stats = generation(model, draft, args.new_tokens)
        log(f"replaying with {name}")
        latency = replay(model, draft, args.chars, 16)
        rows.append((name, ms, stats, latency))
    plain_ms, plain_latency = rows[0][1], rows[0][3]
    print(
        f"\nassisted generation · target {model.name} · greedy · {args.new_tokens} new tokens × "
        f"{len(PROMPTS)} prompts · replay: {args.chars} chars retyped, 16 new tokens"
    )
    print(
        "| draft | model steps / token | acceptance | ms / token | × plain | "
        "replay median ms | × plain |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, ms, stats, latency in rows:
        steps = stats.get("modelStepsPerToken", 1.0)
        acceptance = f"{stats['acceptance']:.2f}" if stats.get("drafted") else "—"
        print(
            f"| {name} | {steps:.2f} | {acceptance} | {ms:.1f} | {ms / plain_ms:.2f} | "
            f"{latency * 1000:.0f} | {latency / plain_latency:.2f} |"
        )


if __name__ == "__main__":
    main()
