"""The `starcoder-lsp` command line.

Each subcommand is two small functions: `_add_<name>` declares its arguments on the
subparsers and registers `_run_<name>`, which does the work and returns the exit status.
Heavy imports (JAX, transformers) happen inside the `_run_` functions so that `--help` and
the other subcommands stay fast. The module is longer than the others (its seven subcommands'
flags and help texts are most of it) so that every flag of the command line is in one file.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from starcoder_lsp import __version__
from starcoder_lsp.config import PRESETS
from starcoder_lsp.errors import StarcoderError
from starcoder_lsp.limits import Limits, add_arguments

# Exit status of a user error (bad arguments, unusable checkpoint), as argparse uses.
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

if TYPE_CHECKING:
    from typing import TypeAlias

    from starcoder_lsp.completer import Completer
    from starcoder_lsp.config import ModelConfig
    from starcoder_lsp.factory import ModelOptions
    from starcoder_lsp.progress import Progress

    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _add_make_random_model(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "make-random-model",
        help="write a StarCoder-shaped checkpoint with random weights (for tests, benchmarks)",
        description=(
            "Write a Hugging Face checkpoint (config.json, safetensors weights, tokenizer) with "
            "random weights and the architecture of a StarCoder model: GPTBigCode for the "
            "StarCoder presets, Starcoder2 for starcoder2-*. The tokenizer is a byte-level BPE "
            "trained on the Python standard library with the family's special tokens first "
            "(StarCoder's 19, StarCoder2's 38); it is cached under $STARCODER_LSP_CACHE "
            "(default ~/.cache/starcoder-lsp). Large presets are written shard by shard "
            "(starcoder in float32 needs ~62 GB of disk)."
        ),
        epilog="presets:\n"
        + "\n".join(
            f"  {name:<18} {_count(config.num_parameters()):>6} parameters, "
            f"{config.n_layer} layers, n_embd {config.n_embd}, {_attention(config)}"
            for name, config in PRESETS.items()
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("directory", metavar="DIR", type=Path, help="where to write the model")
    parser.add_argument(
        "--preset",
        required=True,
        choices=sorted(PRESETS),
        help="the model's architecture; test-tiny and test-tiny-2 are 2-layer models for tests",
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
        help="GPTBigCode presets: the multi-head attention variant (multi_query false), not MQA",
    )
    parser.set_defaults(handler=_run_make_random_model)


def _run_make_random_model(args: argparse.Namespace) -> int:
    from starcoder_lsp.random_model import write_random_model

    config = PRESETS[args.preset]
    if args.multi_head:
        if config.n_kv_head is not None:
            raise StarcoderError(f"--multi-head is for GPTBigCode presets, not {args.preset}")
        config = config.replace(multi_query=False)
    directory = write_random_model(args.directory, config, seed=args.seed, dtype=args.dtype)
    print(
        f"wrote {args.preset} ({_count(config.num_parameters())} parameters, "
        f"{_attention(config)}, {args.dtype}, seed {args.seed}) to {directory}"
    )
    return 0


def _attention(config: ModelConfig) -> str:
    if config.kv_heads == 1:
        return "multi-query"
    if config.kv_heads == config.n_head:
        return "multi-head"
    return f"grouped-query ({config.kv_heads} key/value heads)"


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
    _add_placement(parser, "also measure the model with int8 weights, beside --dtype's rows")
    parser.add_argument(
        "--prefill",
        type=_int_list,
        default=[256, 1024, 4096],
        help="prompt lengths (default: 256,1024,4096)",
    )
    parser.add_argument(
        "--batches", type=_int_list, default=[1, 4, 8], help="decode batch sizes (default: 1,4,8)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row (median)")
    parser.add_argument(
        "--no-transformers", action="store_true", help="skip the transformers comparison"
    )
    _add_compilation_cache(parser)
    parser.set_defaults(handler=_run_bench)


def _add_placement(parser: argparse.ArgumentParser, quantize_help: str | None = None) -> None:
    """Where the model runs and in which precision."""
    parser.add_argument("--mesh", default="1x1", help="DPxMP device mesh (default: 1x1)")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="default: float32 on CPU, bfloat16 on GPU/TPU",
    )
    parser.add_argument(
        "--quantize",
        choices=("int8",),
        default=None,
        help=quantize_help
        or "store the weights as int8 with a scale per output channel, quantized while "
        "loading (a checkpoint `starcoder-lsp quantize` wrote is int8 already)",
    )


def _add_compilation_cache(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--compilation-cache",
        metavar="DIR",
        default=None,
        help="where compiled programs persist, so that a restart skips most of the warm-up "
        "(default: ~/.cache/starcoder-lsp/jax; 'off' disables it)",
    )


def _run_bench(args: argparse.Namespace) -> int:
    from starcoder_lsp import bench

    report = bench.run(
        _model_options(args, slots=max(args.batches)),
        args.prefill,
        args.batches,
        args.repeats,
        compare=not args.no_transformers,
    )
    print(report.table())
    return 0


DEFAULT_MODEL = "bigcode/tiny_starcoder_py"


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by the commands that run the model."""
    parser.add_argument(
        "--model",
        default=os.environ.get("STARCODER_LSP_MODEL", DEFAULT_MODEL),
        help="checkpoint directory or Hugging Face hub id (default: "
        f"$STARCODER_LSP_MODEL or {DEFAULT_MODEL})",
    )
    _add_placement(parser)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--fim-mode",
        choices=("spm", "psm"),
        default=None,
        help="fill-in-the-middle order (default: the model's own: spm for StarCoder, which "
        "lets typing reuse the cache; psm for StarCoder2)",
    )
    parser.add_argument(
        "--cache-slots",
        type=int,
        default=8,
        help="key/value cache slots (requests decoding at once)",
    )
    parser.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="prefill every prompt whole (to measure what the cache saves)",
    )
    _add_compilation_cache(parser)
    _add_draft_options(parser)


def _add_draft_options(parser: argparse.ArgumentParser) -> None:
    """Assisted generation: drafts the model verifies several at a time."""
    group = parser.add_argument_group("assisted generation")
    draft = group.add_mutually_exclusive_group()
    draft.add_argument(
        "--draft",
        choices=("off", "prompt-lookup"),
        default="off",
        help="draft tokens from the prompt's own n-grams (default: off)",
    )
    draft.add_argument(
        "--draft-model",
        metavar="PATH_OR_HUB_ID",
        help="draft tokens from a small model with the same tokenizer (e.g. "
        "bigcode/tiny_starcoder_py for a larger StarCoder)",
    )
    group.add_argument(
        "--draft-tokens", type=int, default=4, help="draft tokens per step (default: 4)"
    )
    group.add_argument(
        "--draft-ngram",
        type=int,
        default=3,
        help="longest n-gram prompt lookup matches (default: 3)",
    )


def _model_options(
    args: argparse.Namespace, slots: int, server_limits: Limits | None = None
) -> ModelOptions:
    from starcoder_lsp.factory import ModelOptions

    return ModelOptions(
        model=args.model,
        mesh=args.mesh,
        dtype=args.dtype,
        slots=slots,
        prefix_cache=not getattr(args, "no_prefix_cache", False),
        compilation_cache=_compilation_cache(args),
        draft=getattr(args, "draft_model", None) or getattr(args, "draft", "off"),
        draft_tokens=getattr(args, "draft_tokens", 4),
        draft_ngram=getattr(args, "draft_ngram", 3),
        quantize=getattr(args, "quantize", None),
        limits=server_limits,
    )


def _compilation_cache(args: argparse.Namespace) -> str | None:
    """The --compilation-cache directory; None when it is 'off'."""
    if args.compilation_cache == "off":
        return None
    from starcoder_lsp.compilation import DEFAULT_CACHE_DIR

    return args.compilation_cache or str(DEFAULT_CACHE_DIR)


def _build_completer(
    options: ModelOptions,
    warmup: bool,
    progress: Progress | None = None,
    wrap_runner: Callable | None = None,
) -> Completer:
    from starcoder_lsp.factory import build_completer

    return build_completer(options, warmup=warmup, progress=progress, wrap_runner=wrap_runner)


def _add_complete(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "complete",
        help="print the suggestion the server would give at a position of a file",
        description="Print the inline completion at LINE:CHARACTER of FILE (both 0-based, as "
        "in LSP; CHARACTER counts Unicode code points), for scripts and for debugging.",
    )
    parser.add_argument("file", metavar="FILE", type=Path)
    parser.add_argument("--line", type=int, required=True)
    parser.add_argument("--character", type=int, required=True)
    parser.add_argument("--multiline", choices=("auto", "always", "never"), default="auto")
    parser.add_argument(
        "--context",
        metavar="OTHER",
        type=Path,
        action="append",
        default=[],
        help="another file of the project, as an editor's open document: its chunks most "
        "like the code at the cursor go ahead of the prompt (repeat for more files)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print JSON: prompt text, the cross-file context block, token counts, timings",
    )
    _add_model_options(parser)
    parser.set_defaults(handler=_run_complete)


def _offset(text: str, line: int, character: int) -> int:
    lines = text.split("\n")
    if not 0 <= line < len(lines):
        raise StarcoderError(f"line {line} is outside the file (0..{len(lines) - 1})")
    if not 0 <= character <= len(lines[line]):
        raise StarcoderError(
            f"character {character} is outside line {line} (0..{len(lines[line])})"
        )
    return sum(len(s) + 1 for s in lines[:line]) + character


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise StarcoderError(f"cannot read {path}: {e}") from None


def _run_complete(args: argparse.Namespace) -> int:
    import json

    from starcoder_lsp.context import CrossFile, Source
    from starcoder_lsp.settings import Settings

    text = _read(args.file)
    cursor = _offset(text, args.line, args.character)
    others = [Source(str(path), str(path), _read(path)) for path in args.context]
    cross = CrossFile(lambda: others, repo=Path.cwd().name)
    for other in others:
        cross.opened(other.key)
    settings = Settings(
        max_new_tokens=args.max_new_tokens, fim_mode=args.fim_mode, multiline=args.multiline
    )
    completer = _build_completer(_model_options(args, slots=1), warmup=False)
    # The server logs this line itself (Engine.start); this command configures no logging.
    print(completer.engine.describe(), file=sys.stderr)
    try:
        suggestion = completer.complete(
            str(args.file), text, cursor, settings, args.file.name, context=cross
        )
    finally:
        completer.engine.close()
    if not args.json:
        print(suggestion.text)
        return 0
    result, prompt = suggestion.result, suggestion.prompt
    print(
        json.dumps(
            {
                "text": suggestion.text,
                "replace_suffix_chars": suggestion.replace_suffix_chars,
                "raw": result.text,
                "finish_reason": result.finish_reason,
                "prompt": completer.tokenizer.decode(prompt.ids),
                "context": {
                    "text": completer.tokenizer.decode(list(suggestion.context.ids)),
                    "tokens": len(suggestion.context),
                    "chunks": [
                        {"path": c.path, "line": c.line, "source": c.source, "score": c.score}
                        for c in suggestion.context.chunks
                    ],
                },
                "prompt_tokens": result.prompt_tokens,
                "generated_tokens": len(result.tokens),
                "seconds": {
                    "prefill": result.prefill_seconds,
                    "decode": result.decode_seconds,
                    "total": suggestion.seconds,
                },
            },
            indent=2,
            ensure_ascii=False,
        )
    )
    return 0


def _add_serve(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the language server (stdio for one editor, TCP for many)",
        description="Serve inline completions over LSP. The model loads and compiles in the "
        "background; meanwhile editors get empty answers and $/progress. Logs go to stderr "
        "(--tcp) or to the editor as window/logMessage (--stdio).",
        epilog="remote use: on the accelerator host run `starcoder-lsp serve --tcp`, then "
        "`ssh -L 2087:localhost:2087 HOST` on the laptop; or bind a public address with "
        "--host 0.0.0.0 --token-file FILE --tls-cert CERT --tls-key KEY.",
    )
    transport = parser.add_mutually_exclusive_group()
    transport.add_argument(
        "--stdio", action="store_true", help="talk LSP over stdin/stdout (the default)"
    )
    transport.add_argument(
        "--tcp", action="store_true", help="listen for any number of editors on --host:--port"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=2087, help="TCP port (default: 2087; 0 picks a free one)"
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        help="a file holding the secret clients must send as initializationOptions.token; "
        "required off loopback unless $STARCODER_LSP_TOKEN holds it",
    )
    # A token on the command line shows in every user's process list: refused, with why.
    parser.add_argument("--token", help=argparse.SUPPRESS)
    parser.add_argument("--tls-cert", type=Path, help="serve TLS with this certificate (PEM)")
    parser.add_argument("--tls-key", type=Path, help="the certificate's private key (PEM)")
    parser.add_argument(
        "--health-port",
        type=int,
        metavar="PORT",
        help="with --tcp: answer HTTP GET /health on --host:PORT, 200 once the model is "
        "loaded, else 503, for a load balancer's checks (0 picks a free port)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="log level (default: INFO)",
    )
    _add_model_options(parser)
    _add_multihost_options(parser)
    add_arguments(parser)
    parser.set_defaults(handler=_run_serve)


def _token(args: argparse.Namespace) -> str | None:
    """The server's token: from --token-file, else $STARCODER_LSP_TOKEN; never from the
    command line, where every user of the host can read it."""
    if args.token is not None:
        raise StarcoderError(
            "--token would show the secret in the process list: put it in "
            "$STARCODER_LSP_TOKEN or in a file given with --token-file"
        )
    if args.token_file is None:
        return os.environ.get("STARCODER_LSP_TOKEN") or None
    try:
        token = args.token_file.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise StarcoderError(f"cannot read the token from {args.token_file}: {e}") from None
    if not token:
        raise StarcoderError(f"{args.token_file} is empty: it should hold the token")
    return token


def _run_serve(args: argparse.Namespace) -> int:
    from starcoder_lsp import transport
    from starcoder_lsp.health import HealthServer
    from starcoder_lsp.server import Backend
    from starcoder_lsp.settings import Settings

    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.log_level != "DEBUG":
        # pygls logs every message whole at INFO: megabytes per keystroke in a large file.
        logging.getLogger("pygls").setLevel(logging.WARNING)
    try:
        settings = Settings(max_new_tokens=args.max_new_tokens, fim_mode=args.fim_mode)
    except ValueError as e:
        raise StarcoderError(str(e)) from None
    token = _token(args)
    server_limits = Limits.from_args(args)
    if args.tcp:
        # Refuse a bad address, token or certificate before loading the model.
        tls = transport.tls_context(args.tls_cert, args.tls_key)
        transport.check_exposure(args.host, token)
    elif args.tls_cert or args.tls_key or args.token_file or args.health_port is not None:
        raise StarcoderError(
            "--token-file, --tls-cert/--tls-key and --health-port apply to --tcp only"
        )

    wrap_runner = None
    if args.coordinator is not None or args.num_processes is not None:
        wrap_runner = _join_processes(args, lambda reason: backend.abort(reason))
        if wrap_runner is None:  # a follower: it serves no editor
            return _follow(args)

    def load(progress: Progress) -> Completer:
        options = _model_options(args, args.cache_slots, server_limits)
        return _build_completer(options, warmup=True, progress=progress, wrap_runner=wrap_runner)

    backend = Backend(load, args.model, settings)
    # Bound before the model loads, so that a taken port fails at once; answers 503 till then.
    checks = (
        None if args.health_port is None else HealthServer(backend, args.host, args.health_port)
    )
    backend.start()
    try:
        if checks is not None:
            checks.start()
        if args.tcp:
            transport.serve_tcp(backend, args.host, args.port, token, tls, limits=server_limits)
        else:
            transport.serve_stdio(backend, server_limits)
    finally:
        if checks is not None:
            checks.close()
        backend.close()
    return 0


def _add_multihost_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "several hosts",
        "one mesh over the devices of several processes (a TPU pod slice): start the same "
        "command on every host; process 0 serves editors, the others follow it. On TPU VMs "
        "JAX can read the process count and index from the environment; --coordinator is "
        "always needed (the followers' side channel reaches the leader there)",
    )
    group.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address")
    group.add_argument("--num-processes", type=int, help="how many processes in all")
    group.add_argument("--process-id", type=int, help="this process's index (0 leads)")
    group.add_argument(
        "--follower-port",
        type=int,
        help="where followers reach the leader's side channel (default: the coordinator's "
        "port + 1)",
    )


def _join_processes(args: argparse.Namespace, on_lost: Callable[[str], None]) -> Callable | None:
    """Join the other processes; the leader gets how to wrap its runner, a follower None."""
    import jax

    from starcoder_lsp import multihost

    if args.draft_model:
        raise StarcoderError("--draft-model is not supported across several processes yet")
    if args.coordinator is None:
        raise StarcoderError("several processes need --coordinator HOST:PORT (process 0's)")
    multihost.initialize(args.coordinator, args.num_processes, args.process_id)
    if jax.process_index() != 0:
        return None

    def lost(reason: str) -> None:
        on_lost(reason)
        multihost.abort_soon(reason)

    _, port = multihost.side_channel(args.coordinator, args.follower_port)
    return multihost.leader_runner(port, lost)


def _follow(args: argparse.Namespace) -> int:
    from starcoder_lsp import multihost
    from starcoder_lsp.factory import build_assistant, build_runner, load_checkpoint

    options = _model_options(args, args.cache_slots)
    ckpt = load_checkpoint(options)
    runner = build_runner(options, ckpt, build_assistant(options, ckpt))
    leader = multihost.side_channel(args.coordinator, args.follower_port)
    return multihost.follow(runner, leader)


def _add_quantize(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "quantize",
        help="write an int8 copy of a checkpoint, so a server starts without converting",
        description="Write SRC's weights to DST as int8 with a float scale per output channel "
        "(plain safetensors, the scales beside the weights as <name>_scale, the quantization "
        "recorded in config.json), one tensor at a time. The position table and the biases and "
        "layer norms stay as they are. Serve DST as any checkpoint.",
    )
    parser.add_argument("source", metavar="SRC", help="checkpoint directory or hub id")
    parser.add_argument("target", metavar="DST", type=Path, help="where to write the copy")
    parser.set_defaults(handler=_run_quantize)


def _run_quantize(args: argparse.Namespace) -> int:
    from starcoder_lsp.checkpoint import resolve
    from starcoder_lsp.quantize import quantize_checkpoint

    source = resolve(args.source)
    quantize_checkpoint(source, args.target, progress=lambda line: print(line, file=sys.stderr))
    before = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    after = sum(p.stat().st_size for p in args.target.glob("*.safetensors"))
    print(f"wrote {args.target}: {after / 1e9:.2f} GB of weights (from {before / 1e9:.2f} GB)")
    return 0


def _add_settings(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "settings",
        help="list the settings editors send (initializationOptions, didChangeConfiguration)",
        description="The per-connection settings the server accepts, with their defaults and "
        "limits. --json prints them as the JSON schema VS Code's package.json contributes.",
    )
    parser.add_argument("--json", action="store_true", help="print the JSON schema")
    parser.set_defaults(handler=_run_settings)


def _run_settings(args: argparse.Namespace) -> int:
    import json

    from starcoder_lsp.settings import json_schema

    schema = json_schema()
    if args.json:
        print(json.dumps(schema, indent=2))
        return 0
    for name, entry in schema.items():
        limits = ", ".join(
            f"{key} {entry[key]}"
            for key in ("minimum", "exclusiveMinimum", "maximum")
            if key in entry
        )
        kind = "|".join(entry["enum"]) if "enum" in entry else entry["type"]
        kind = "/".join(kind) if isinstance(kind, list) else kind
        limits = f"; {limits}" if limits else ""
        print(f"{name} ({kind}; default {json.dumps(entry['default'])}{limits})")
        print(f"    {entry['description']}")
    return 0


# Each adds one subcommand; other subcommands register here the same way.
SUBCOMMANDS: tuple[Callable[[Subparsers], None], ...] = (
    _add_make_random_model,
    _add_bench,
    _add_complete,
    _add_serve,
    _add_quantize,
    _add_settings,
)


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
