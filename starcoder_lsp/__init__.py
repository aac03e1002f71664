"""starcoder-lsp: inline completions from StarCoder-family models in JAX, served over LSP."""

from starcoder_lsp.allocator import retain_freed_memory

__version__ = "0.1.0"

# Before jax starts its threads: see allocator.py.
MALLOC_TUNED = retain_freed_memory()
