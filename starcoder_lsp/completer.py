"""From a document and a cursor to a suggestion: prompt, engine, post-processing.

This is the tested core behind the server's inline completions, the `complete` command and
the keystroke benchmark. It knows documents as text and offsets, not LSP; it talks to the
engine through requests and futures, not JAX.

A keystroke costs the text near the cursor, not the document: the prompt is built from a
stretch around the cursor long enough for the prompt's windows (`CHARS_PER_TOKEN` characters
per token of budget), and the post-processing (run at every decode step by a block's stop
rule) sees `LOCAL_CHARS` of it. Each stretch starts at a line boundary that moves only in
steps of `ALIGN` characters, so typing leaves its start, and the prompt's first tokens and
the cache built on them, where they were. A 20 MB file then costs a keystroke what a 200 KB
one does.

Every pending suggestion resolves: with a Suggestion, or with the error that stopped it (a
RequestError, logged once where it happened).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from starcoder_lsp import docstring, postprocess
from starcoder_lsp.context import EMPTY, ContextBlock, CrossFile
from starcoder_lsp.prompt import FimMode, FimPrompt, PromptOptions, build_prompt, counter_for
from starcoder_lsp.request import Handle, Request, RequestError, Result
from starcoder_lsp.settings import Settings, SettingsError
from starcoder_lsp.special_tokens import SpecialTokens

if TYPE_CHECKING:  # the engine imports JAX; this module must not
    from starcoder_lsp.engine import Engine

log = logging.getLogger(__name__)

DOCSTRING_TOKENS = 128  # at least this many new tokens for a docstring
# More characters than any token of a code tokenizer spans (StarCoder's average 3-4): the
# prompt's stretch holds this many per token of its windows' budgets.
CHARS_PER_TOKEN = 16
# The text around the cursor that the post-processing and the typing-through check see.
LOCAL_CHARS = 16_384
# Stretches of text start at the line before a multiple of this many characters.
ALIGN = 65_536


@dataclass
class Suggestion:
    """text is "" when there is nothing worth showing (empty after cleaning, superseded)."""

    text: str
    # How many characters after the cursor the suggestion replaces (auto-closed brackets).
    replace_suffix_chars: int = 0
    typed_through: bool = False  # answered from the previous suggestion, without the model
    result: Result | None = None
    prompt: FimPrompt | None = None  # None when the request never left the queue
    seconds: float = 0.0
    context: ContextBlock = EMPTY  # the cross-file context ahead of the prompt


@dataclass(frozen=True)
class _Ask:
    """One request for a suggestion: what travels from `start` to the finished Suggestion."""

    document: Hashable
    before: str  # the document's text before the cursor
    after: str  # and after it
    settings: Settings
    multiline: bool
    started: float = field(default_factory=time.perf_counter)

    def seconds(self) -> float:
        return time.perf_counter() - self.started


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
    def __init__(
        self, engine: Engine, tokenizer: object, tokens: SpecialTokens, fim_mode: FimMode = "spm"
    ) -> None:
        """fim_mode: the order used where the settings name none (the model's trained one)."""
        self.engine = engine
        self.tokenizer = tokenizer
        self.tokens = tokens
        self.fim_mode = fim_mode
        self._shown: dict[Hashable, _Shown] = {}

    def options(
        self,
        settings: Settings,
        filename: str | None = None,
        max_new_tokens: int | None = None,
        context_tokens: int = 0,
    ) -> PromptOptions:
        """How to build prompts with `settings`; SettingsError when they cannot fit the
        model's context (with `max_new_tokens` new tokens, default the settings' own, and
        `context_tokens` of cross-file context ahead of the prompt)."""
        mode = settings.fim_mode or self.fim_mode
        prefix, suffix = settings.budgets(self.engine.context, max_new_tokens, mode, context_tokens)
        return PromptOptions(
            mode=mode,
            prefix_tokens=prefix,
            suffix_tokens=suffix,
            filename=filename if settings.filename else None,
        )

    def start(
        self,
        document: Hashable,
        text: str,
        cursor: int,
        settings: Settings,
        filename: str | None = None,
        owner: Hashable | None = None,
        context: CrossFile | None = None,
    ) -> Pending:
        """Begin a suggestion for `cursor` in `text`; a newer one for the same document
        supersedes this one between two decode steps. `owner` (a connection) is whose
        limits the request counts against in the engine; `context` its cross-file sources,
        which name documents as `document` is named."""
        started = time.perf_counter()
        pending = Pending()
        start, end = stretch(text, cursor, LOCAL_CHARS, LOCAL_CHARS)
        before, after = text[start:cursor], text[cursor:end]
        through = self._typed_through(document, before, after)
        if through is not None:
            through.seconds = time.perf_counter() - started
            pending.future.set_result(through)
            return pending
        block = self._context(context, document, before, after, start, settings)

        def prompt_options(block: ContextBlock) -> PromptOptions:
            return self.options(settings, filename, context_tokens=len(block))

        # The stretch that the widest budgets (an empty block's) need: a request waiting to be
        # admitted holds that much of a document edited since, not all of it.
        widest = prompt_options(EMPTY)
        start, end = stretch(
            text,
            cursor,
            widest.prefix_tokens * CHARS_PER_TOKEN,
            widest.suffix_tokens * CHARS_PER_TOKEN,
        )
        prompt = _LazyPrompt(
            self, text[start:end], cursor - start, prompt_options, block, offset=start
        )
        multiline = _multiline(settings, before, after)
        ask = _Ask(document, before, after, settings, multiline, started)
        request = Request(
            [],
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            stop=_stop_rule(before, after, multiline),
            group=document,
            owner=owner,
            prompt=prompt.ids,
        )
        pending.handle = self.engine.submit(request)
        _resolve_with(pending, lambda result: self._suggestion(ask, prompt, result))
        return pending

    def complete(
        self,
        document: Hashable,
        text: str,
        cursor: int,
        settings: Settings,
        filename: str | None = None,
        context: CrossFile | None = None,
    ) -> Suggestion:
        """The blocking form of `start`, for the CLI and benchmarks."""
        pending = self.start(document, text, cursor, settings, filename, context=context)
        return pending.future.result()

    def _context(
        self,
        context: CrossFile | None,
        document: Hashable,
        before: str,
        after: str,
        anchor: int,
        settings: Settings,
    ) -> Callable[[], ContextBlock]:
        """What builds the cross-file block for a cursor between `before` and `after`
        (`before` starts at `anchor`, which typing does not move) when the request is
        admitted; SettingsError now when the settings leave no room for it, or no room for
        a prompt at all."""
        budget = 0
        if context is not None and settings.cross_file_context:
            budget = settings.context_budget(self.engine.context)
        self.options(settings, context_tokens=budget)  # fits, or SettingsError
        if budget == 0:
            return lambda: EMPTY
        counter = counter_for(self.tokenizer)
        return context.later(
            document, before, after, anchor, budget, settings.sources(), self.tokens, counter
        )

    def docstring(
        self,
        document: Hashable,
        text: str,
        target: docstring.Target,
        settings: Settings,
        owner: Hashable | None = None,
    ) -> Pending:
        """Begin a docstring for `target`: the future resolves to a Suggestion whose text is
        the lines to insert before `target.body_line` ("" when the model wrote nothing)."""
        start = time.perf_counter()
        # As many new tokens as a docstring needs, where the context leaves room for them.
        new_tokens = max(settings.max_new_tokens, DOCSTRING_TOKENS)
        try:
            options = self.options(settings, max_new_tokens=new_tokens)
        except SettingsError:
            new_tokens, options = settings.max_new_tokens, self.options(settings)
        prefix, suffix = docstring.fim_split(text, target)
        prompt = _LazyPrompt(self, prefix + suffix, len(prefix), lambda _: options)
        request = Request(
            [],
            max_new_tokens=new_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            stop=docstring.stop_at_quotes,
            group=(document, "docstring"),
            owner=owner,
            prompt=prompt.ids,
        )
        pending = Pending(handle=self.engine.submit(request))

        def suggestion(result: Result) -> Suggestion:
            stopped = result.finish_reason in STOPPED
            lines = "" if stopped else docstring.format_docstring(result.text, target.indent)
            seconds = time.perf_counter() - start
            return Suggestion(lines, result=result, prompt=prompt.made, seconds=seconds)

        _resolve_with(pending, suggestion)
        return pending

    def drop(self, owner: Hashable, documents: list[Hashable]) -> int:
        """`owner` left: stop its requests and forget its documents' last suggestions.
        Returns how many requests were stopped."""
        for document in documents:
            self.forget(document)
        return self.engine.drop(owner)

    def forget(self, document: Hashable) -> None:
        self._shown.pop(document, None)

    # -- pieces --------------------------------------------------------------------------

    def _suggestion(self, ask: _Ask, lazy: _LazyPrompt, result: Result) -> Suggestion:
        seconds = ask.seconds()
        made = dict(result=result, prompt=lazy.made, seconds=seconds, context=lazy.context)
        if result.finish_reason in STOPPED:
            return Suggestion("", **made)
        cut = postprocess.cut_completion(result.text, ask.before, ask.after, ask.multiline)
        if not postprocess.acceptable(cut.text, ask.settings.min_chars):
            self._shown.pop(ask.document, None)
            return Suggestion("", **made)
        suggestion = Suggestion(cut.text, replace_suffix_chars=cut.replace_suffix_chars, **made)
        self._shown[ask.document] = _Shown(ask.before, ask.after, suggestion)
        return suggestion

    def _typed_through(self, document: Hashable, before: str, after: str) -> Suggestion | None:
        """When what was typed since the last suggestion is its beginning, the rest of it."""
        shown = self._shown.get(document)
        if shown is None:
            return None
        shown_text = shown.suggestion.text
        replaced = shown.after[shown.suggestion.replace_suffix_chars :]
        if not before.startswith(shown.before) or after not in (shown.after, replaced):
            return None
        typed = before[len(shown.before) :]
        if not typed or not shown_text.startswith(typed) or typed == shown_text:
            return None
        rest = shown_text[len(typed) :]
        covered = shown.suggestion.replace_suffix_chars if after == shown.after else 0
        return replace(
            shown.suggestion, text=rest, replace_suffix_chars=covered, typed_through=True
        )


class _LazyPrompt:
    """A prompt made when the engine admits its request (`ids`), in the engine's thread: a
    request superseded while it waits never costs one, nor its cross-file block. `options`
    gives the prompt's budgets once the block's length is known. With an `offset`, `text` is
    a stretch of the document that starts there, and the prompt is made from the `stretch`
    of it that the budgets need. `made` is the FimPrompt once made, `context` its block."""

    def __init__(
        self,
        completer: Completer,
        text: str,
        cursor: int,
        options: Callable[[ContextBlock], PromptOptions],
        context: Callable[[], ContextBlock] = lambda: EMPTY,
        offset: int | None = None,
    ):
        self._completer, self._text, self._cursor = completer, text, cursor
        self._options, self._context, self._offset = options, context, offset
        self.context = EMPTY
        self.made: FimPrompt | None = None

    def ids(self) -> list[int]:
        c = self._completer
        self.context = self._context()
        options = self._options(self.context)
        text, cursor = self._text, self._cursor
        if self._offset is not None:
            start, end = stretch(
                text,
                cursor,
                options.prefix_tokens * CHARS_PER_TOKEN,
                options.suffix_tokens * CHARS_PER_TOKEN,
                self._offset,
            )
            text, cursor = text[start:end], cursor - start
        self.made = build_prompt(
            text, cursor, c.tokenizer, c.tokens, options, context=self.context.ids
        )
        self._text = ""  # the document's text is no longer needed
        return self.made.ids


# Finish reasons of a generation stopped before it ended on its own: nothing to show.
STOPPED = ("cancelled", "superseded", "disconnected")


def stretch(text: str, cursor: int, before: int, after: int, offset: int = 0) -> tuple[int, int]:
    """(start, end) of whole lines around `cursor`: at least `before` characters before it
    and `after` after it where the text has them. The start is the line start before a
    multiple of ALIGN, so it stays put while the user types at the cursor; the end is a
    line end counted from the cursor, and the text after the cursor does not change.

    `text` may be a wider stretch that starts at `offset` of the document: the narrower one
    in it is the one that the whole document would give."""
    start = 0
    at = offset + cursor - before
    if at > ALIGN:
        start = text.rfind("\n", 0, max(0, at // ALIGN * ALIGN - offset)) + 1
    end = len(text)
    if cursor + after < len(text):
        found = text.find("\n", cursor + after)
        end = len(text) if found < 0 else found
    return start, end


def _multiline(settings: Settings, before: str, after: str) -> bool:
    if settings.multiline != "auto":
        return settings.multiline == "always"
    return postprocess.wants_multiline(before, after)


def _stop_rule(before: str, after: str, multiline: bool) -> Callable[[str], bool]:
    """When the engine may stop: a single line ends at its newline; a block once a later line
    has come back to the block's indentation."""
    if not multiline:
        return lambda generated: "\n" in generated
    return lambda generated: (
        generated.count("\n") >= 2
        and len(postprocess.cut_completion(generated, before, after, True).text)
        < len(generated.rstrip())
    )


def _resolve_with(pending: Pending, suggestion: Callable[[Result], Suggestion]) -> None:
    """When the engine's result arrives, resolve `pending` with `suggestion(result)`, or with
    the error that stopped it (logged once: by the engine, or here)."""

    def finish(done: Future) -> None:
        # Whatever goes wrong resolves the future: an exception raised in a done-callback
        # would be swallowed and leave the editor waiting forever.
        try:
            pending.future.set_result(suggestion(done.result()))
        except RequestError as e:
            pending.future.set_exception(e)
        except Exception as e:
            log.exception("making the suggestion failed")
            failure = RequestError(f"making the suggestion failed: {e}")
            failure.__cause__ = e
            pending.future.set_exception(failure)

    pending.handle.future.add_done_callback(finish)
