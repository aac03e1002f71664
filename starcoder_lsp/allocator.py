"""Keep freed memory in the process instead of handing it back to the kernel.

XLA on CPU allocates the temporary buffers of a compiled program at every call and frees
them after. glibc serves blocks that large with fresh mmaps (or, from a worker thread's
arena, heaps it trims), so every call faulted in every page again. Measured on 8 rows of
tiny_starcoder_py's attention over 1024 cached positions: 20,900 page faults and 63 ms a
call, against none and 25 ms with this tuning. With one arena, no mmaps and no
trimming, the second call reuses the first one's pages. The price is that the process keeps
its peak memory, which a server holding a model and a key/value cache does anyway.

Set STARCODER_LSP_MALLOC=default to leave glibc's settings alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def retain_freed_memory() -> bool:
    """Tune glibc's malloc as above. Returns False where that is not possible (no glibc, or
    opted out). Takes full effect only before other threads allocate, so it runs when the
    package is imported."""
    if os.environ.get("STARCODER_LSP_MALLOC") == "default":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False  # not glibc (macOS, musl without mallopt): nothing to tune
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
    return all(mallopt(param, value) == 1 for param, value in settings)
