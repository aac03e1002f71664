"""The editors know the server's settings exactly as the schema (starcoder_lsp/settings.py)
declares them, so that a setting added in one place and not in the other fails here: VS Code's
package.json, and the Neovim plugin's config.server_settings (read in a bare headless Neovim).
No server, no model."""

from __future__ import annotations

import json
from pathlib import Path

from nvim_headless import bare_nvim

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


# JSON schema types as Lua sees them.
LUA_TYPES = {"boolean": "boolean", "integer": "number", "number": "number", "string": "string"}


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


def lua_kind(entry: dict) -> str:
    """The schema's type as the plugin's config.server_settings spells it: a nullable
    setting ("number?") also takes vim.NIL, which Neovim sends as null."""
    kinds = entry["type"] if isinstance(entry["type"], list) else [entry["type"]]
    (kind,) = [k for k in kinds if k != "null"]
    return LUA_TYPES[kind] + ("?" if "null" in kinds else "")


def test_neovim_knows_every_server_setting_and_its_type():
    with bare_nvim() as nvim:
        plugin = nvim.exec_lua("return require('starcoder.config').server_settings")
    expected = {key: lua_kind(entry) for key, entry in json_schema().items()}
    missing, unknown = expected.keys() - plugin.keys(), plugin.keys() - expected.keys()
    assert not missing, f"server settings missing from the Neovim plugin: {sorted(missing)}"
    assert not unknown, f"Neovim plugin settings the server does not have: {sorted(unknown)}"
    assert plugin == expected
