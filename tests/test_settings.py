"""The settings schema, without a server: wire names, defaults, checks, JSON schema."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest

from starcoder_lsp.settings import Settings, SettingsError, json_schema, unknown_keys, wire_name


def test_wire_names_are_the_fields_in_camel_case():
    assert wire_name("max_new_tokens") == "maxNewTokens"
    assert wire_name("enabled") == "enabled"
    assert list(Settings().to_wire()) == [
        "enabled",
        "maxNewTokens",
        "temperature",
        "topP",
        "fimMode",
        "prefixTokens",
        "suffixTokens",
        "multiline",
        "minChars",
        "filename",
        "crossFileContext",
        "crossFileTokens",
        "crossFileSources",
    ]


def test_updated_applies_known_keys_and_converts_numbers():
    settings = Settings().updated(
        {"maxNewTokens": 12.0, "temperature": 1, "prefixTokens": None, "filename": True}
    )
    assert settings.max_new_tokens == 12 and type(settings.max_new_tokens) is int
    assert settings.temperature == 1.0 and type(settings.temperature) is float
    assert settings.filename is True
    assert unknown_keys({"maxNewTokens": 1, "colour": "red"}) == ["colour"]


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        ({"minChars": "abc"}, "minChars must be a whole number"),
        ({"minChars": None}, "minChars must not be null"),
        ({"maxNewTokens": 5.5}, "maxNewTokens must be a whole number"),
        ({"maxNewTokens": True}, "maxNewTokens must be a whole number"),
        ({"maxNewTokens": 0}, "maxNewTokens must be between 1 and 4096"),
        ({"temperature": math.nan}, "temperature must be a finite number"),
        ({"temperature": math.inf}, "temperature must be a finite number"),
        ({"temperature": -1}, "temperature must be at least 0"),
        ({"enabled": "no"}, "enabled must be true or false"),
        ({"prefixTokens": -5}, "prefixTokens must be at least 0"),
        ({"topP": 0}, "topP must be in (0, 1]"),
        ({"fimMode": "backwards"}, "fimMode must be one of spm, psm"),
        ({"multiline": "sometimes"}, "multiline must be one of auto, always, never"),
    ],
)
def test_a_wrong_value_is_refused_and_nothing_is_applied(wire, message):
    before = Settings(max_new_tokens=7)
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace("]", r"\]")):
        before.updated({"maxNewTokens": 9, **wire})
    assert before.max_new_tokens == 7


def test_every_failing_value_is_named_at_once():
    with pytest.raises(SettingsError) as refused:
        Settings().updated({"minChars": "x", "topP": 2})
    assert "minChars" in str(refused.value) and "topP" in str(refused.value)


def test_settings_are_checked_when_made_directly():
    with pytest.raises(ValueError, match="fimMode"):
        Settings(fim_mode="mps")
    with pytest.raises(ValueError, match="maxNewTokens"):
        Settings(max_new_tokens=0)


def test_json_schema_follows_the_fields():
    schema = json_schema()
    assert list(schema) == list(Settings().to_wire())
    assert schema["maxNewTokens"] == {
        "type": "integer",
        "default": 64,
        "minimum": 1,
        "maximum": 4096,
        "description": "Most tokens generated for one suggestion.",
    }
    assert schema["prefixTokens"]["type"] == ["integer", "null"]
    assert schema["fimMode"]["enum"] == ["spm", "psm", None]  # None: the model's own order
    assert schema["multiline"]["enum"] == ["auto", "always", "never"]
    # A comma-separated list: the schema's pattern accepts what the check accepts.
    pattern = re.compile(schema["crossFileSources"]["pattern"])
    for value in ("open,edited,pushed", "pushed", "", "open,disk", "open,"):
        accepted = Settings().updated({"crossFileSources": value}) if pattern.match(value) else None
        assert (accepted is not None) == (value in ("open,edited,pushed", "pushed", ""))


def test_the_settings_command_prints_the_schema():
    printed = subprocess.run(
        [sys.executable, "-m", "starcoder_lsp", "settings", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(printed.stdout) == json_schema()


def test_settings_that_cannot_fit_the_model_s_context_are_refused():
    with pytest.raises(SettingsError, match="maxNewTokens 4000 leaves no room .* 512 tokens"):
        Settings(max_new_tokens=4000).check_context(512)
    with pytest.raises(SettingsError, match="exceed the model's context of 512 tokens"):
        Settings(prefix_tokens=400, suffix_tokens=100).check_context(512)
    with pytest.raises(SettingsError, match="prefixTokens 1000"):
        Settings(prefix_tokens=1000).check_context(512)
    Settings(prefix_tokens=400, suffix_tokens=44).check_context(512)  # 400 + 44 + 64 + 4


def test_a_budget_not_set_takes_its_share_of_what_is_left():
    # 512 - 64 new - 4 special tokens = 444: by default 3/4 before the cursor, 1/4 after.
    assert Settings().budgets(512) == (333, 111)
    assert Settings(prefix_tokens=400).budgets(512) == (400, 44)
    assert Settings(suffix_tokens=200).budgets(512) == (244, 200)
    assert Settings(prefix_tokens=0).budgets(512) == (0, 111)  # 0 is none, not the default
    assert Settings().budgets(512, max_new_tokens=128) == (285, 95)
