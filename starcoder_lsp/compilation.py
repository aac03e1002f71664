"""How many programs XLA compiled, and the disk cache that lets a restart skip compiling."""

from __future__ import annotations

from pathlib import Path

import jax

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "starcoder-lsp" / "jax"
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compilations = 0


def _count_compilation(event: str, duration: float, **_: object) -> None:
    global _compilations
    if event == _COMPILE_EVENT:
        _compilations += 1


jax.monitoring.register_event_duration_secs_listener(_count_compilation)


def compilations() -> int:
    """How many XLA programs this process has compiled (or loaded from the disk cache)."""
    return _compilations


def enable_compilation_cache(directory: str | Path | None = None) -> Path:
    """Persist compiled programs so that a restarted server skips most of its warm-up."""
    path = Path(directory or DEFAULT_CACHE_DIR).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path
