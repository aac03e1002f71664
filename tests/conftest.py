"""Shared fixtures: small random StarCoder checkpoints written once per test session."""

from __future__ import annotations

import os

# Eight simulated CPU devices, so that sharded meshes (1x8, 2x4, 8x1) run in tests. This must
# happen before JAX is first imported anywhere in the session.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from vscode_build import package  # noqa: E402

from starcoder_lsp.config import PRESETS  # noqa: E402
from starcoder_lsp.random_model import write_random_model  # noqa: E402

# Larger than the usual 0.02 so that random weights give varied, not repetitive, greedy text:
# a comparison of two token streams means something only if the streams vary.
INIT_STD = 0.1


@pytest.fixture(scope="session")
def tiny_mqa_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test-tiny preset (multi-query attention, as StarCoder) in Hugging Face format."""
    return write_random_model(
        tmp_path_factory.mktemp("tiny-mqa"), PRESETS["test-tiny"], seed=0, init_std=INIT_STD
    )


@pytest.fixture(scope="session")
def tiny_mha_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test-tiny preset with multi-head attention (multi_query false)."""
    config = PRESETS["test-tiny"].replace(multi_query=False)
    return write_random_model(
        tmp_path_factory.mktemp("tiny-mha"), config, seed=1, init_std=INIT_STD
    )


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed (cert, key) for localhost, for the TLS tests."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture(scope="session")
def vscode_vsix(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The VS Code extension compiled and packaged, as users install it (once a session)."""
    return package(tmp_path_factory.mktemp("vsix") / "starcoder-lsp.vsix")
