"""A bare headless Neovim (`nvim --embed --headless -u NONE`) with the plugin on its
runtimepath and no server: for the plugin's pure Lua functions, called through pynvim."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pynvim
import pytest

PLUGIN = Path(__file__).resolve().parent.parent / "editors" / "nvim"


def nvim_binary() -> str:
    binary = os.environ.get("STARCODER_TEST_NVIM") or shutil.which("nvim")
    if binary is None:
        pytest.fail("Neovim (nvim) is not installed: ./setup.sh installs it")
    return binary


@contextmanager
def bare_nvim() -> Iterator[pynvim.Nvim]:
    argv = [nvim_binary(), "--embed", "--headless", "-u", "NONE", "-i", "NONE", "-n"]
    nvim = pynvim.attach("child", argv=argv)
    try:
        nvim.command(f"set runtimepath^={PLUGIN}")
        yield nvim
    finally:
        with suppress(Exception):  # Neovim exits while answering
            nvim.command("qall!")
        nvim.close()
