"""starcoder-lsp: inline completions from StarCoder-family models in JAX, served over LSP."""

__version__ = "0.1.0"
