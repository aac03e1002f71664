"""The `starcoder-lsp` command line.

Each subcommand is two small functions: `_add_<name>` declares its arguments on the
subparsers and registers `_run_<name>`, which does the work and returns the exit status.
Heavy imports (JAX, transformers) happen inside the `_run_` functions so that `--help` and
the other subcommands stay fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from starcoder_lsp import __version__
from starcoder_lsp.config import PRESETS
from starcoder_lsp.errors import StarcoderError

# Exit status of a user error (bad arguments, unusable checkpoint), as argparse uses.
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

if TYPE_CHECKING:
    from typing import TypeAlias

    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _add_make_random_model(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "make-random-model",
        help="write a StarCoder-shaped checkpoint with random weights (for tests, benchmarks)",
        description=(
            "Write a Hugging Face GPTBigCode checkpoint (config.json, safetensors weights, "
            "tokenizer) with random weights and the architecture of a StarCoder model. "
            "The tokenizer is a byte-level BPE trained on the Python standard library with "
            "StarCoder's special tokens at ids 0-18; it is cached under $STARCODER_LSP_CACHE "
            "(default ~/.cache/starcoder-lsp). Large presets are written shard by shard "
            "(starcoder in float32 needs ~62 GB of disk)."
        ),
        epilog="presets:\n"
        + "\n".join(
            f"  {name:<18} {_count(config.num_parameters()):>6} parameters, "
            f"{config.n_layer} layers, n_embd {config.n_embd}"
            for name, config in PRESETS.items()
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("directory", metavar="DIR", type=Path, help="where to write the model")
    parser.add_argument(
        "--preset",
        required=True,
        choices=sorted(PRESETS),
        help="the model's architecture; test-tiny is a 2-layer model for unit tests",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="dtype of the stored weights (default: float32)",
    )
    parser.add_argument(
        "--multi-head",
        action="store_true",
        help="write the multi-head attention variant (multi_query false) instead of MQA",
    )
    parser.set_defaults(handler=_run_make_random_model)


def _run_make_random_model(args: argparse.Namespace) -> int:
    from starcoder_lsp.random_model import write_random_model

    config = PRESETS[args.preset]
    if args.multi_head:
        config = config.replace(multi_query=False)
    directory = write_random_model(args.directory, config, seed=args.seed, dtype=args.dtype)
    attention = "multi-head" if args.multi_head else "multi-query"
    print(
        f"wrote {args.preset} ({_count(config.num_parameters())} parameters, "
        f"{attention}, {args.dtype}, seed {args.seed}) to {directory}"
    )
    return 0


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list like 256,1024") from None


def _add_bench(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure load, prefill and decode speed against transformers and the memory floor",
        description=(
            "Load a checkpoint, compile every shape, then measure prefill tokens/s and decode "
            "ms per step, beside transformers' GPTBigCodeForCausalLM on the same checkpoint "
            "(CPU, float32) and the memory-bandwidth floor of a decode step. Prints a table."
        ),
    )
    parser.add_argument("--model", required=True, help="checkpoint directory or hub id")
    parser.add_argument("--mesh", default="1x1", help="DPxMP device mesh (default: 1x1)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="default: float32 on CPU, bfloat16 on GPU/TPU")  # fmt: skip
    parser.add_argument("--prefill", type=_int_list, default=[256, 1024, 4096],
                        help="prompt lengths (default: 256,1024,4096)")  # fmt: skip
    parser.add_argument("--batches", type=_int_list, default=[1, 4, 8],
                        help="decode batch sizes (default: 1,4,8)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row (median)")
    parser.add_argument("--no-transformers", action="store_true",
                        help="skip the transformers comparison")  # fmt: skip
    _add_compilation_cache(parser)
    parser.set_defaults(handler=_run_bench)


def _add_compilation_cache(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--compilation-cache", metavar="DIR", default=None,
        help="where compiled programs persist, so that a restart skips most of the warm-up "
        "(default: ~/.cache/starcoder-lsp/jax; 'off' disables it)",
    )  # fmt: skip


def _use_compilation_cache(args: argparse.Namespace) -> None:
    if args.compilation_cache != "off":
        from starcoder_lsp.generate import enable_compilation_cache

        enable_compilation_cache(args.compilation_cache)


def _run_bench(args: argparse.Namespace) -> int:
    from starcoder_lsp import bench, sharding

    _use_compilation_cache(args)
    report = bench.run(
        args.model, sharding.make_mesh(args.mesh), args.dtype, args.prefill, args.batches,
        args.repeats, compare=not args.no_transformers,
    )  # fmt: skip
    print(report.table())
    return 0


# Each adds one subcommand; other subcommands register here the same way.
SUBCOMMANDS: tuple[Callable[[Subparsers], None], ...] = (_add_make_random_model, _add_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="starcoder-lsp",
        description="Inline code completions from StarCoder-family models in JAX, over LSP.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except StarcoderError as e:
        # The message says what to do; a traceback would only hide it.
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
