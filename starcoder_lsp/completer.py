"""From a document and a cursor to a suggestion: prompt, engine, post-processing.

This is the tested core behind the server's inline completions, the `complete` command and
the keystroke benchmark. It knows documents as text and offsets, not LSP; it talks to the
engine through requests and futures, not JAX.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

from starcoder_lsp import docstring, postprocess
from starcoder_lsp.checkpoint import SpecialTokens
from starcoder_lsp.engine import Engine, Handle, Request, Result
from starcoder_lsp.prompt import FimPrompt, PromptOptions, build_prompt, default_budgets
from starcoder_lsp.settings import Settings

DOCSTRING_TOKENS = 128  # at least this many new tokens for a docstring


@dataclass
class Suggestion:
    """text is "" when there is nothing worth showing (empty after cleaning, superseded)."""

    text: str
    # How many characters after the cursor the suggestion replaces (auto-closed brackets).
    replace_suffix_chars: int = 0
    typed_through: bool = False  # answered from the previous suggestion, without the model
    result: Result | None = None
    prompt: FimPrompt | None = None
    seconds: float = 0.0


@dataclass
class _Shown:
    """The last suggestion of a document, to answer typing that follows it."""

    before: str  # the document text before the cursor when it was made
    after: str  # and after the cursor
    suggestion: Suggestion


@dataclass
class Pending:
    """A suggestion on its way: `future` resolves to the Suggestion."""

    future: Future = field(default_factory=Future)
    handle: Handle | None = None

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()


class Completer:
    def __init__(self, engine: Engine, tokenizer: object, tokens: SpecialTokens) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.tokens = tokens
        self._shown: dict[Hashable, _Shown] = {}

    def options(self, settings: Settings, filename: str | None = None) -> PromptOptions:
        context = self.engine.runner.max_len
        prefix, suffix = default_budgets(context, settings.max_new_tokens)
        return PromptOptions(
            mode=settings.fim_mode,
            prefix_tokens=settings.prefix_tokens or prefix,
            suffix_tokens=settings.suffix_tokens or suffix,
            filename=filename if settings.filename else None,
        )

    def start(
        self,
        document: Hashable,
        text: str,
        cursor: int,
        settings: Settings,
        filename: str | None = None,
    ) -> Pending:
        """Begin a suggestion for `cursor` in `text`; a newer one for the same document
        supersedes this one between two decode steps."""
        start = time.perf_counter()
        pending = Pending()
        through = self._typed_through(document, text, cursor)
        if through is not None:
            through.seconds = time.perf_counter() - start
            pending.future.set_result(through)
            return pending
        prompt = build_prompt(text, cursor, self.tokenizer, self.tokens,
                              self.options(settings, filename))  # fmt: skip
        multiline = self._multiline(settings, text, cursor)
        request = Request(
            prompt.ids,
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            stop=self._stop_rule(text, cursor, multiline),
            group=document,
        )
        pending.handle = self.engine.submit(request)
        _resolve_with(pending, lambda result: self._suggestion(
            document, text, cursor, prompt, result, multiline, settings, start))  # fmt: skip
        return pending

    def complete(self, document: Hashable, text: str, cursor: int, settings: Settings,
                 filename: str | None = None) -> Suggestion:  # fmt: skip
        """The blocking form of `start`, for the CLI and benchmarks."""
        return self.start(document, text, cursor, settings, filename).future.result()

    def docstring(self, document: Hashable, text: str, target: docstring.Target,
                  settings: Settings) -> Pending:  # fmt: skip
        """Begin a docstring for `target`: the future resolves to a Suggestion whose text is
        the lines to insert before `target.body_line` ("" when the model wrote nothing)."""
        start = time.perf_counter()
        prefix, suffix = docstring.fim_split(text, target)
        prompt = build_prompt(prefix + suffix, len(prefix), self.tokenizer, self.tokens,
                              self.options(settings))  # fmt: skip
        request = Request(
            prompt.ids,
            max_new_tokens=max(settings.max_new_tokens, DOCSTRING_TOKENS),
            temperature=settings.temperature,
            top_p=settings.top_p,
            stop=docstring.stop_at_quotes,
            group=(document, "docstring"),
        )
        pending = Pending(handle=self.engine.submit(request))

        def suggestion(result: Result) -> Suggestion:
            stopped = result.finish_reason in ("cancelled", "superseded")
            lines = "" if stopped else docstring.format_docstring(result.text, target.indent)
            return Suggestion(lines, 0, False, result, prompt, time.perf_counter() - start)

        _resolve_with(pending, suggestion)
        return pending

    def forget(self, document: Hashable) -> None:
        self._shown.pop(document, None)

    # -- pieces --------------------------------------------------------------------------

    @staticmethod
    def _multiline(settings: Settings, text: str, cursor: int) -> bool:
        if settings.multiline != "auto":
            return settings.multiline == "always"
        return postprocess.wants_multiline(text[:cursor], text[cursor:])

    @staticmethod
    def _stop_rule(text: str, cursor: int, multiline: bool) -> Callable[[str], bool]:
        prefix, suffix = text[:cursor], text[cursor:]
        if not multiline:
            return lambda generated: "\n" in generated
        # A block is complete once a later line has come back to the block's indentation.
        return lambda generated: (
            generated.count("\n") >= 2
            and len(postprocess.cut_completion(generated, prefix, suffix, True).text)
            < len(generated.rstrip())
        )

    def _suggestion(
        self,
        document: Hashable,
        text: str,
        cursor: int,
        prompt: FimPrompt,
        result: Result,
        multiline: bool,
        settings: Settings,
        start: float,
    ) -> Suggestion:
        seconds = time.perf_counter() - start
        if result.finish_reason in ("cancelled", "superseded"):
            return Suggestion("", 0, False, result, prompt, seconds)
        cut = postprocess.cut_completion(result.text, text[:cursor], text[cursor:], multiline)
        if not postprocess.acceptable(cut.text, settings.min_chars):
            self._shown.pop(document, None)
            return Suggestion("", 0, False, result, prompt, seconds)
        suggestion = Suggestion(cut.text, cut.replace_suffix_chars, False, result, prompt, seconds)
        self._shown[document] = _Shown(text[:cursor], text[cursor:], suggestion)
        return suggestion

    def _typed_through(self, document: Hashable, text: str, cursor: int) -> Suggestion | None:
        """When what was typed since the last suggestion is its beginning, the rest of it."""
        shown = self._shown.get(document)
        if shown is None:
            return None
        before, after = text[:cursor], text[cursor:]
        shown_text = shown.suggestion.text
        replaced = shown.after[shown.suggestion.replace_suffix_chars :]
        if not before.startswith(shown.before) or after not in (shown.after, replaced):
            return None
        typed = before[len(shown.before) :]
        if not typed or not shown_text.startswith(typed) or typed == shown_text:
            return None
        rest = shown_text[len(typed) :]
        covered = shown.suggestion.replace_suffix_chars if after == shown.after else 0
        return replace(shown.suggestion, text=rest, replace_suffix_chars=covered,
                       typed_through=True)  # fmt: skip


def _resolve_with(pending: Pending, suggestion: Callable[[Result], Suggestion]) -> None:
    """When the engine's result arrives, resolve `pending` with `suggestion(result)`, or with
    the engine's error."""

    def finish(done: Future) -> None:
        try:
            result = done.result()
        except Exception as e:
            pending.future.set_exception(e)
            return
        pending.future.set_result(suggestion(result))

    pending.handle.future.add_done_callback(finish)
