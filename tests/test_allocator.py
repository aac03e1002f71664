"""glibc's malloc is tuned at import unless the user opts out."""

from __future__ import annotations

import platform

import pytest

import starcoder_lsp
from starcoder_lsp.allocator import retain_freed_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the tuning is glibc's mallopt")
def test_malloc_is_tuned_on_import_with_glibc():
    assert starcoder_lsp.MALLOC_TUNED is True
    assert retain_freed_memory() is True


def test_opting_out_leaves_malloc_alone(monkeypatch):
    monkeypatch.setenv("STARCODER_LSP_MALLOC", "default")
    assert retain_freed_memory() is False
