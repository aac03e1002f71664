"""What a user can set per connection: the one schema behind every place a setting appears.

`Settings` is the single source. Its fields give the wire names (camelCase, as the editors
send them in `initializationOptions` and `workspace/didChangeConfiguration`), the defaults,
the checks each value must pass, and the text the editors show; the VS Code extension's
`package.json` and the Neovim plugin are tested against it, so a setting added here and not
there fails CI.

A value from the wire is checked for its type as well as its range before anything is
applied: JSON gives `"abc"`, `null`, `5.5`, `true` or `NaN` as readily as a number. Then the
settings together are checked against the model's context (`check_context`): a prompt's two
windows, its special tokens and the new tokens must fit in it, or every request would fail.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

from starcoder_lsp.errors import StarcoderError
from starcoder_lsp.prompt import RESERVED_TOKENS, FimMode, default_budgets

FIM_MODES = ("spm", "psm")
MULTILINE_POLICIES = ("auto", "always", "never")
# context.py's sources, by name (kept here: the settings import nothing of the completer).
CONTEXT_SOURCES = ("open", "edited", "pushed")
MAX_NEW_TOKENS = 4096


class SettingsError(StarcoderError, ValueError):
    """A setting of the wrong type or out of range; nothing was applied."""


@dataclass(frozen=True)
class Rule:
    """How one setting is checked and documented."""

    kind: type  # bool, int, float or str
    description: str
    nullable: bool = False
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    choices: tuple[str, ...] = ()
    items: tuple[str, ...] = ()  # a comma-separated list of these (a string on the wire)

    @property
    def pattern(self) -> str | None:
        """The JSON schema pattern of a comma-separated list of `items` (empty allowed)."""
        if not self.items:
            return None
        item = "(" + "|".join(self.items) + ")"
        return f"^({item}(,{item})*)?$"


def setting(default: Any, kind: type, description: str, **rule: Any) -> Any:
    return field(default=default, metadata={"rule": Rule(kind, description, **rule)})


@dataclass(frozen=True)
class Settings:
    enabled: bool = setting(True, bool, "Show inline suggestions.")
    max_new_tokens: int = setting(
        64, int, "Most tokens generated for one suggestion.", minimum=1, maximum=MAX_NEW_TOKENS
    )
    temperature: float = setting(0.0, float, "Sampling temperature; 0 is greedy.", minimum=0)
    top_p: float = setting(
        1.0, float, "Nucleus sampling threshold.", exclusive_minimum=0, maximum=1
    )
    fim_mode: str | None = setting(
        None,
        str,
        "Fill-in-the-middle order. Empty: the order the model was trained with (SPM for "
        "StarCoder, which lets typing reuse the key/value cache; PSM for StarCoder2).",
        nullable=True,
        choices=FIM_MODES,
    )
    prefix_tokens: int | None = setting(
        None,
        int,
        "Tokens of text before the cursor in the prompt. Empty: the server's share of the context.",
        nullable=True,
        minimum=0,
    )
    suffix_tokens: int | None = setting(
        None,
        int,
        "Tokens of text after the cursor in the prompt. Empty: the server's share of the context.",
        nullable=True,
        minimum=0,
    )
    multiline: str = setting(
        "auto",
        str,
        "Whether suggestions may span several lines (auto: after a line that opens a block, "
        "or on an empty line).",
        choices=MULTILINE_POLICIES,
    )
    min_chars: int = setting(1, int, "Shortest suggestion worth showing, in characters.", minimum=0)
    filename: bool = setting(
        False,
        bool,
        "Start the prompt with the file's name (a <filename> header), where the model's "
        "tokenizer has that token.",
    )
    cross_file_context: bool = setting(
        True,
        bool,
        "Put chunks of the project's other files (open documents, recent edits, text the "
        "editor sends) ahead of the prompt, the chunks most like the code at the cursor.",
    )
    cross_file_tokens: int | None = setting(
        None,
        int,
        "Most tokens of cross-file context in a prompt. Empty: a quarter of the model's "
        "context (less where the other budgets leave less).",
        nullable=True,
        minimum=0,
    )
    cross_file_sources: str = setting(
        ",".join(CONTEXT_SOURCES),
        str,
        "Where cross-file context comes from, comma-separated: open (the other open "
        "documents), edited (regions edited recently), pushed (yanks and visited files the "
        "editor sends).",
        items=CONTEXT_SOURCES,
    )

    def __post_init__(self) -> None:
        errors = [e for f in fields(self) if (e := _check(f.name, getattr(self, f.name)))]
        if errors:
            raise SettingsError("; ".join(errors))

    def updated(self, wire: Mapping[str, Any]) -> Settings:
        """These settings with the known keys of `wire` (camelCase) applied; every value is
        checked first and a SettingsError names all that fail, with nothing applied."""
        changes, errors = {}, []
        for name in SETTING_NAMES:
            key = wire_name(name)
            if key not in wire:
                continue
            value, error = _coerce(name, wire[key])
            if error:
                errors.append(error)
            else:
                changes[name] = value
        if errors:
            raise SettingsError("; ".join(errors))
        return replace(self, **changes)

    def budgets(
        self,
        context: int,
        max_new_tokens: int | None = None,
        mode: FimMode = "spm",
        reserved: int = 0,
    ) -> tuple[int, int]:
        """(prefix, suffix) token budgets of a prompt in `mode` in a context of `context`
        tokens that leaves room for `max_new_tokens` (default: this maxNewTokens) and for
        `reserved` tokens of cross-file context. A budget not set takes its default share of
        what is left, capped so that the two fit together; SettingsError when they cannot."""
        new = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        self._check_room(context, new)
        available = context - new - RESERVED_TOKENS - reserved
        if available < 2:
            raise SettingsError(
                f"crossFileTokens {reserved} + maxNewTokens {new} leave no room for a prompt "
                f"in the model's context of {context} tokens"
            )
        default_prefix, default_suffix = default_budgets(context - reserved, new, mode)
        prefix, suffix = self.prefix_tokens, self.suffix_tokens
        if prefix is None and suffix is None:
            prefix, suffix = default_prefix, default_suffix
        elif suffix is None:
            suffix = max(0, min(default_suffix, available - prefix))
        elif prefix is None:
            prefix = max(0, min(default_prefix, available - suffix))
        if prefix + suffix > available:
            also = f" + crossFileTokens {reserved}" if reserved else ""
            raise SettingsError(
                f"prefixTokens {prefix} + suffixTokens {suffix}{also} + maxNewTokens {new} + "
                f"{RESERVED_TOKENS} special tokens exceed the model's context of {context} "
                f"tokens: the two budgets may take {available} together"
            )
        return prefix, suffix

    def context_budget(self, context: int, max_new_tokens: int | None = None) -> int:
        """Tokens of cross-file context a prompt may hold in a context of `context` tokens
        (0 when off): crossFileTokens, or a quarter of the context where the windows' own
        budgets leave that much (half of what they leave when one of them takes a share)."""
        if not self.cross_file_context or not self.sources():
            return 0
        if self.cross_file_tokens is not None:
            return self.cross_file_tokens
        new = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        available = context - new - RESERVED_TOKENS
        explicit = (self.prefix_tokens or 0) + (self.suffix_tokens or 0)
        shares = self.prefix_tokens is None or self.suffix_tokens is None
        left = (available - explicit - 2) // 2 if shares else available - explicit
        return max(0, min(context // 4, left))

    def sources(self) -> tuple[str, ...]:
        """crossFileSources as a tuple, in CONTEXT_SOURCES' order."""
        named = set(self.cross_file_sources.split(","))
        return tuple(s for s in CONTEXT_SOURCES if s in named)

    def check_context(self, context: int) -> None:
        """SettingsError unless a prompt made with these settings fits a context of
        `context` tokens with its new tokens and its cross-file context."""
        self.budgets(context, reserved=self.context_budget(context))

    @staticmethod
    def _check_room(context: int, new: int) -> None:
        if context - new - RESERVED_TOKENS < 2:
            raise SettingsError(
                f"maxNewTokens {new} leaves no room for a prompt in the model's context of "
                f"{context} tokens: at most {context - RESERVED_TOKENS - 2}"
            )

    def to_wire(self) -> dict[str, Any]:
        return {wire_name(f.name): getattr(self, f.name) for f in fields(self)}


def rule(name: str) -> Rule:
    return _FIELDS[name].metadata["rule"]


def wire_name(name: str) -> str:
    """max_new_tokens → maxNewTokens."""
    first, *rest = name.split("_")
    return first + "".join(word.capitalize() for word in rest)


def unknown_keys(wire: Mapping[str, Any]) -> list[str]:
    return [key for key in wire if key not in WIRE_NAMES]


def json_schema() -> dict[str, dict[str, Any]]:
    """Each setting as a JSON schema, keyed by wire name: what VS Code's package.json
    contributes under `starcoder.`."""
    schema = {}
    for f in fields(Settings):
        r = rule(f.name)
        kind = {bool: "boolean", int: "integer", float: "number", str: "string"}[r.kind]
        entry: dict[str, Any] = {"type": [kind, "null"] if r.nullable else kind}
        if r.choices:
            entry["enum"] = [*r.choices, None] if r.nullable else list(r.choices)
        entry["default"] = f.default if f.default is not MISSING else None
        if r.pattern is not None:
            entry["pattern"] = r.pattern
        for key, bound in (
            ("minimum", r.minimum),
            ("exclusiveMinimum", r.exclusive_minimum),
            ("maximum", r.maximum),
        ):
            if bound is not None:
                entry[key] = bound
        entry["description"] = r.description
        schema[wire_name(f.name)] = entry
    return schema


def _coerce(name: str, value: Any) -> tuple[Any, str | None]:
    """(the value as the field's type, None) or (None, why it is refused)."""
    r = rule(name)
    # JSON numbers may arrive as 64.0; a whole float is the integer it spells.
    if r.kind is int and type(value) is float and value.is_integer():
        value = int(value)
    if r.kind is float and type(value) is int:
        value = float(value)
    return value, _check(name, value)


def _check(name: str, value: Any) -> str | None:
    r = rule(name)
    key = wire_name(name)
    if value is None:
        return None if r.nullable else f"{key} must not be null"
    # bool is an int in Python, but `true` is no token count.
    if type(value) is not r.kind and not (r.kind is float and type(value) is int):
        return f"{key} must be {_KIND_NAMES[r.kind]}, not {value!r}"
    if r.kind is float and not math.isfinite(value):
        return f"{key} must be a finite number, not {value!r}"
    if r.choices and value not in r.choices:
        return f"{key} must be one of {', '.join(r.choices)}, not {value!r}"
    if r.items and value and not set(value.split(",")) <= set(r.items):
        return f"{key} must list some of {', '.join(r.items)}, comma-separated, not {value!r}"
    low, high = r.minimum, r.maximum
    if r.exclusive_minimum is not None and value <= r.exclusive_minimum:
        bounds = f"in ({r.exclusive_minimum:g}, {high:g}]" if high is not None else "positive"
        return f"{key} must be {bounds}, not {value!r}"
    if low is not None and high is not None and not low <= value <= high:
        return f"{key} must be between {low:g} and {high:g}, not {value!r}"
    if low is not None and value < low:
        return f"{key} must be at least {low:g}, not {value!r}"
    if high is not None and value > high:
        return f"{key} must be at most {high:g}, not {value!r}"
    return None


_KIND_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}
_FIELDS = {f.name: f for f in fields(Settings)}
SETTING_NAMES = tuple(_FIELDS)
WIRE_NAMES = frozenset(wire_name(name) for name in SETTING_NAMES)
