"""The editors know the server's settings exactly as the schema (starcoder_lsp/settings.py)
declares them, so that a setting added in one place and not in the other fails here: VS Code's
package.json. No server, no model."""

from __future__ import annotations

import json
from pathlib import Path

from starcoder_lsp.settings import json_schema

EDITORS = Path(__file__).resolve().parent.parent / "editors"
PACKAGE_JSON = EDITORS / "vscode" / "package.json"

# The VS Code extension's own settings (src/options.ts CONNECTION_KEYS): how it reaches the
# server. Every other `starcoder.*` property is one of the server's settings.
EXTENSION_ONLY = {"serverCommand", "serverArgs", "model", "logLevel"}
EXTENSION_ONLY_PREFIXES = ("remote.",)


def vscode_properties() -> dict[str, dict]:
    manifest = json.loads(PACKAGE_JSON.read_text())
    properties = manifest["contributes"]["configuration"]["properties"]
    assert all(key.startswith("starcoder.") for key in properties), list(properties)
    return {key.removeprefix("starcoder."): entry for key, entry in properties.items()}


def is_extension_only(key: str) -> bool:
    return key in EXTENSION_ONLY or key.startswith(EXTENSION_ONLY_PREFIXES)


def test_vscode_contributes_every_server_setting_as_the_schema_declares_it():
    properties = vscode_properties()
    server = {key: entry for key, entry in properties.items() if not is_extension_only(key)}
    schema = json_schema()
    missing, unknown = schema.keys() - server.keys(), server.keys() - schema.keys()
    assert not missing, f"server settings missing from package.json: {sorted(missing)}"
    assert not unknown, f"package.json settings the server does not have: {sorted(unknown)}"
    for key, entry in schema.items():
        assert server[key] == entry, f"starcoder.{key}"


def test_vscode_keeps_its_own_settings():
    properties = vscode_properties()
    assert set(properties) >= EXTENSION_ONLY
    assert {key for key in properties if key.startswith("remote.")} == {
        "remote.host",
        "remote.port",
        "remote.token",
        "remote.tls",
        "remote.tlsCaFile",
    }
