"""The composition root: checkpoint → runner → engine → completer, built in one place.

The command line, the server, the benchmarks and the tests build their model stack here, so
that the options mean the same everywhere and a new stage (a draft model, quantized weights)
is wired once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from starcoder_lsp import checkpoint, sharding
from starcoder_lsp.checkpoint import Checkpoint
from starcoder_lsp.compilation import enable_compilation_cache
from starcoder_lsp.completer import Completer
from starcoder_lsp.engine import Engine
from starcoder_lsp.limits import Limits
from starcoder_lsp.progress import Progress
from starcoder_lsp.runner import Runner

DEFAULT_SLOTS = 8


@dataclass(frozen=True)
class ModelOptions:
    """Which model to run and how, as the command line's model options say it."""

    model: str | Path
    mesh: str = "1x1"  # DPxMP, or "auto"
    dtype: str | None = None  # None: checkpoint.default_dtype()
    slots: int = DEFAULT_SLOTS  # key/value cache rows: requests decoding at once
    prefix_cache: bool = True
    compilation_cache: str | Path | None = None  # where compiled programs persist; None: off
    limits: Limits | None = None  # the server's per-connection limits; None: none (one user)


def load_checkpoint(options: ModelOptions, progress: Progress | None = None) -> Checkpoint:
    """The checkpoint on its mesh, with the compilation cache enabled as the options say."""
    if options.compilation_cache is not None:
        enable_compilation_cache(options.compilation_cache)
    if progress is not None:
        progress(0, 1, f"loading {options.model}")
    mesh = sharding.make_mesh(options.mesh)
    return checkpoint.load(options.model, mesh, options.dtype, progress=progress)


def build_engine(
    ckpt: Checkpoint,
    runner: Runner | None = None,
    *,
    prefix_cache: bool = True,
    limits: Limits | None = None,
    **runner_options: object,
) -> Engine:
    """An engine (not started) over `runner`, or over a new runner made with the options;
    with the server's `limits` on what each connection may take of it."""
    runner = runner if runner is not None else Runner.from_checkpoint(ckpt, **runner_options)
    scheduling = {}
    if limits is not None:
        scheduling = {
            "max_queued": limits.max_queued_per_connection,
            "max_rows": limits.max_rows_per_connection,
            "prefill_chunk": limits.prefill_chunk,
        }
    return Engine(
        runner,
        ckpt.tokenizer.decode,
        ckpt.tokens.stop_ids,
        prefix_cache=prefix_cache,
        **scheduling,
    )


def completer_for(ckpt: Checkpoint, engine: Engine) -> Completer:
    return Completer(engine, ckpt.tokenizer, ckpt.tokens)


def build_completer(
    options: ModelOptions,
    *,
    warmup: bool = True,
    progress: Progress | None = None,
    **runner_options: object,
) -> Completer:
    """Everything, started: the engine compiles every shape first when `warmup` (a server),
    else each shape when first needed (a one-shot command)."""
    ckpt = load_checkpoint(options, progress)
    engine = build_engine(
        ckpt,
        prefix_cache=options.prefix_cache,
        limits=options.limits,
        slots=options.slots,
        **runner_options,
    )
    engine.start(progress, warmup=warmup)
    return completer_for(ckpt, engine)
