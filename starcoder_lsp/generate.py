"""The generation API in one import, as the README shows it and starcoder-jax's users expect.

The pieces live in their own modules: sampling.py (Sampling, sample), runner.py (the compiled
steps and `Runner`), generator.py (`Generator`), compilation.py (the compile counter and the
on-disk compilation cache).
"""

from starcoder_lsp.compilation import compilations, enable_compilation_cache
from starcoder_lsp.generator import (
    GENERATOR_STEPS_PER_CALL,
    Completion,
    GenerationState,
    Generator,
)
from starcoder_lsp.runner import DEFAULT_BATCHES, DEFAULT_CHUNKS, MULTI_STEP, Runner, StepRows
from starcoder_lsp.sampling import Sampling, sample

__all__ = [
    "DEFAULT_BATCHES",
    "DEFAULT_CHUNKS",
    "GENERATOR_STEPS_PER_CALL",
    "MULTI_STEP",
    "Completion",
    "GenerationState",
    "Generator",
    "Runner",
    "Sampling",
    "StepRows",
    "compilations",
    "enable_compilation_cache",
    "sample",
]
