"""The composition root: checkpoint → runner → engine → completer, built in one place.

The command line, the server, the benchmarks and the tests build their model stack here, so
that the options mean the same everywhere and a new stage (a draft model, quantized weights)
is wired once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from starcoder_lsp import assist, checkpoint, sharding
from starcoder_lsp.assist import Assistant
from starcoder_lsp.checkpoint import Checkpoint
from starcoder_lsp.compilation import enable_compilation_cache
from starcoder_lsp.completer import Completer
from starcoder_lsp.engine import Engine
from starcoder_lsp.limits import Limits
from starcoder_lsp.progress import Progress
from starcoder_lsp.prompt import TRAINED_FIM_MODE
from starcoder_lsp.runner import Runner
from starcoder_lsp.speculate import OFF, PROMPT_LOOKUP

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
    # Assisted generation: "off", "prompt-lookup", or a draft model's checkpoint (a directory
    # or hub id with the model's tokenizer); draft_tokens per step; the lookup's n-gram.
    draft: str = OFF
    draft_tokens: int = 4
    draft_ngram: int = 3
    quantize: str | None = None  # "int8": weights as int8 with a scale per channel

    @property
    def draft_model(self) -> str | None:
        return None if self.draft in (OFF, PROMPT_LOOKUP) else self.draft

    limits: Limits | None = None  # the server's per-connection limits; None: none (one user)


def load_checkpoint(options: ModelOptions, progress: Progress | None = None) -> Checkpoint:
    """The checkpoint on its mesh, with the compilation cache enabled as the options say."""
    if options.compilation_cache is not None:
        enable_compilation_cache(options.compilation_cache)
    if progress is not None:
        progress(0, 1, f"loading {options.model}")
    mesh = sharding.make_mesh(options.mesh)
    return checkpoint.load(
        options.model, mesh, options.dtype, progress=progress, quantize=options.quantize
    )


def build_engine(
    ckpt: Checkpoint,
    runner: Runner | None = None,
    *,
    prefix_cache: bool = True,
    assistant: Assistant | None = None,
    limits: Limits | None = None,
    **runner_options: object,
) -> Engine:
    """An engine (not started) over `runner`, or over a new runner made with the options;
    with the server's `limits` on what each connection may take of it."""
    if runner is None:
        if assistant is not None:
            runner_options.setdefault("draft_tokens", assistant.k)
            runner_options.setdefault("draft_distributions", assistant.drafter.distributions)
        runner = Runner.from_checkpoint(ckpt, **runner_options)
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
        assistant=assistant,
        **scheduling,
    )


def build_assistant(
    options: ModelOptions, ckpt: Checkpoint, progress: Progress | None = None
) -> Assistant | None:
    """The drafter the options ask for, on the model's mesh; None when assisting is off."""
    return assist.build(
        options.draft, ckpt, options.slots, options.draft_tokens, options.draft_ngram, progress
    )


def completer_for(ckpt: Checkpoint, engine: Engine) -> Completer:
    """A completer that writes prompts in the order the checkpoint's family was trained with."""
    fim_mode = TRAINED_FIM_MODE[ckpt.config.model_type]
    return Completer(engine, ckpt.tokenizer, ckpt.tokens, fim_mode)


def build_runner(
    options: ModelOptions,
    ckpt: Checkpoint,
    assistant: Assistant | None = None,
    **runner_options: object,
) -> Runner:
    """The model's runner as the options make it: what every process of a multi-host
    server must build alike."""
    runner_options.setdefault("slots", options.slots)
    if assistant is not None:
        runner_options.setdefault("draft_tokens", assistant.k)
        runner_options.setdefault("draft_distributions", assistant.drafter.distributions)
        if options.draft_model is not None:  # a draft cannot propose past its own context
            runner_options.setdefault("max_len", assistant.drafter.runner.max_len)
    return Runner.from_checkpoint(ckpt, **runner_options)


def build_completer(
    options: ModelOptions,
    *,
    warmup: bool = True,
    progress: Progress | None = None,
    wrap_runner: Callable[[Runner], Runner] | None = None,
    **runner_options: object,
) -> Completer:
    """Everything, started: the engine compiles every shape first when `warmup` (a server),
    else each shape when first needed (a one-shot command). wrap_runner: what the engine
    drives in place of the runner (a multi-host leader's)."""
    ckpt = load_checkpoint(options, progress)
    assistant = build_assistant(options, ckpt, progress)
    runner = build_runner(options, ckpt, assistant, **runner_options)
    if wrap_runner is not None:
        runner = wrap_runner(runner)
    engine = build_engine(
        ckpt,
        runner,
        prefix_cache=options.prefix_cache,
        assistant=assistant,
        limits=options.limits,
    )
    engine.start(progress, warmup=warmup)
    return completer_for(ckpt, engine)
