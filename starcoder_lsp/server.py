"""The language server: one pygls LanguageServer per connection, one shared Backend.

Every feature is registered in `build_server`. Handlers are thin: they turn LSP positions into
offsets, ask the Completer, and turn its Suggestion back into LSP items. The model loads in
the background; until it is ready, completion requests get an empty list and the client sees
`$/progress`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable, Generator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from lsprotocol import types
from pygls.exceptions import JsonRpcException, JsonRpcInvalidParams, JsonRpcInvalidRequest
from pygls.lsp.server import LanguageServer
from pygls.protocol import LanguageServerProtocol
from pygls.protocol.language_server import lsp_method
from pygls.workspace import TextDocument

from starcoder_lsp import __version__, docstring
from starcoder_lsp import settings as settings_schema
from starcoder_lsp.completer import Completer, Pending, Suggestion
from starcoder_lsp.settings import Settings

log = logging.getLogger(__name__)

ACCEPTED = "starcoder.accepted"
GENERATE_DOCSTRING = "starcoder.generateDocstring"
STATS = "starcoder/stats"

# Keys read at initialize only, not settings: they change what the server advertises.
INIT_ONLY_KEYS = {"token", "completionFallback"}


@dataclass
class Stats:
    """Counts and latencies for `starcoder/stats`, shared by every connection."""

    requests: int = 0
    shown: int = 0
    accepted: int = 0
    typed_through: int = 0
    empty: int = 0
    docstrings: int = 0
    cancelled: int = 0  # generations stopped early by $/cancelRequest
    superseded: int = 0  # ... or by a newer request for the same document
    latencies: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count_request(self) -> None:
        with self.lock:
            self.requests += 1

    def record(self, seconds: float, shown: bool, typed_through: bool) -> None:
        with self.lock:
            self.shown += shown
            self.empty += not shown
            self.typed_through += typed_through
            self.latencies.append(seconds)
            del self.latencies[:-10_000]  # percentiles of the recent past, in bounded memory

    def count_stopped(self, reason: str) -> None:
        with self.lock:
            self.cancelled += reason == "cancelled"
            self.superseded += reason == "superseded"

    def as_json(self) -> dict[str, Any]:
        with self.lock:
            ordered = sorted(self.latencies)
            counts = {
                "requests": self.requests,
                "shown": self.shown,
                "accepted": self.accepted,
                "typedThrough": self.typed_through,
                "empty": self.empty,
                "docstrings": self.docstrings,
                "cancelled": self.cancelled,
                "superseded": self.superseded,
            }

        def percentile(p: float) -> float:
            return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000, 1)

        percentiles = (0.5, 0.9, 0.99) if ordered else ()
        return {**counts, "latencyMs": {f"p{round(p * 100)}": percentile(p) for p in percentiles}}


Loader = Callable[[Callable[[int, int, str], None]], Completer]


class Backend:
    """The model and engine, loaded once per process in a thread, shared by all connections."""

    def __init__(self, load: Loader, model: str = "", settings: Settings | None = None) -> None:
        self._load = load
        self.model = model
        self.settings = settings or Settings()  # each connection starts from these
        self.completer: Completer | None = None
        self.error: str | None = None
        self.progress = (0, 1, "loading the model")
        self.ready = threading.Event()  # set once loaded, or once loading failed
        self.stats = Stats()

    def start(self) -> Backend:
        threading.Thread(target=self._run, name="starcoder-load", daemon=True).start()
        return self

    def close(self) -> None:
        if self.completer is not None:
            self.completer.engine.close()

    def _run(self) -> None:
        try:
            completer = self._load(self._report)
            completer.engine.ready.wait()
            self.completer = completer
            self.progress = (1, 1, "ready")
        except Exception as e:  # the server keeps answering, with the reason in its log
            log.exception("the model could not be loaded")
            self.error = str(e)
            self.progress = (1, 1, f"failed: {e}")
        self.ready.set()

    def _report(self, done: int, total: int, what: str) -> None:
        self.progress = (done, max(total, 1), what)

    def status(self) -> dict[str, Any]:
        cache = self.completer.engine.prefix_cache.stats if self.completer else None
        return {
            "ready": self.completer is not None,
            "loading": self.progress[2],
            "error": self.error,
            "model": self.model,
            **self.stats.as_json(),
            "cacheHits": cache.hits if cache else 0,
            "cacheRequests": cache.requests if cache else 0,
        }


class StarcoderProtocol(LanguageServerProtocol):
    """pygls' protocol with what a shared, possibly remote server needs: UTF-8 positions
    when the client offers them, no message before a token-checked initialize, and `exit`
    ending only its own connection."""

    _server: StarcoderServer

    @lsp_method(types.INITIALIZE)
    def lsp_initialize(self, params: types.InitializeParams) -> Generator[Any, Any, Any]:
        general = params.capabilities.general
        if general is not None and general.position_encodings:
            offered = list(general.position_encodings)
            if types.PositionEncodingKind.Utf8 in offered:
                general.position_encodings = [types.PositionEncodingKind.Utf8]
        return (yield from super().lsp_initialize(params))

    @lsp_method(types.EXIT)
    def lsp_exit(self, *args: Any) -> Generator[Any, Any, None]:
        close = self._server.close_connection
        if close is None:
            return (yield from super().lsp_exit(*args))
        close()
        return None

    def structure_message(self, data: dict[str, Any]) -> Any:
        try:
            return super().structure_message(data)
        except JsonRpcException as e:
            # pygls only logs a request whose params do not fit; the client would wait forever.
            if "id" in data and "method" in data:
                reason = f"{data['method']}: the params do not fit the method's type ({e})"
                self._send_response(
                    data["id"], error=JsonRpcInvalidParams(reason).to_response_error()
                )
            raise

    def handle_message(self, message: Any) -> None:
        server = self._server
        method = getattr(message, "method", None)
        if server.token is not None and not server.authenticated and method != types.INITIALIZE:
            log.warning("connection %d: %r before a token-checked initialize; closing",
                        server.connection, method)  # fmt: skip
            if server.close_connection is not None:
                server.close_connection()
            return
        super().handle_message(message)


class StarcoderServer(LanguageServer):
    def __init__(self, backend: Backend, token: str | None = None) -> None:
        super().__init__("starcoder-lsp", __version__, protocol_cls=StarcoderProtocol)
        self.backend = backend
        self.token = token
        self.authenticated = False
        self.settings = backend.settings
        self.completion_fallback = False
        self.connection = next(_connections)
        self.unknown_reported: set[str] = set()
        # Set by a transport that serves many connections: ends this one only.
        self.close_connection: Callable[[], None] | None = None

    def apply_settings(self, options: Any) -> None:
        if not isinstance(options, dict):
            return
        options = options.get("starcoder", options)
        if not isinstance(options, dict):
            return
        for key in settings_schema.unknown_keys(options):
            if key not in INIT_ONLY_KEYS and key not in self.unknown_reported:
                self.unknown_reported.add(key)
                log.warning("connection %d: unknown setting %r ignored", self.connection, key)
        try:
            self.settings = self.settings.updated(options)
        except settings_schema.SettingsError as e:
            self.show_error(f"settings not applied: {e}")

    def show_error(self, message: str) -> None:
        self.window_show_message(
            types.ShowMessageParams(types.MessageType.Error, f"starcoder-lsp: {message}")
        )


_connections = itertools.count(1)


def build_server(backend: Backend, token: str | None = None) -> StarcoderServer:
    """A server for one connection; every LSP feature the project offers is registered here."""
    server = StarcoderServer(backend, token)

    @server.feature(types.INITIALIZE)
    def initialize(ls: StarcoderServer, params: types.InitializeParams) -> None:
        options = params.initialization_options
        options = options if isinstance(options, dict) else {}
        if ls.token is not None:
            if options.get("token") != ls.token:
                # The reply carries the reason; the connection closes right after it.
                if ls.close_connection is not None:
                    asyncio.get_running_loop().call_later(0.2, ls.close_connection)
                raise JsonRpcInvalidRequest(
                    "starcoder-lsp: wrong or missing token: pass the server's --token as "
                    "initializationOptions.token"
                )
            ls.authenticated = True
        ls.apply_settings(options)
        if options.get("completionFallback") is True:
            ls.completion_fallback = True
            ls.feature(types.TEXT_DOCUMENT_COMPLETION)(completion)

    @server.feature(types.INITIALIZED)
    def initialized(ls: StarcoderServer, params: types.InitializedParams) -> None:
        if not backend.ready.is_set():
            asyncio.ensure_future(_report_loading(ls))
        elif backend.error is not None:
            ls.show_error(f"the model could not be loaded: {backend.error}")

    @server.feature(types.WORKSPACE_DID_CHANGE_CONFIGURATION)
    def did_change_configuration(ls: StarcoderServer,
                                 params: types.DidChangeConfigurationParams) -> None:  # fmt: skip
        ls.apply_settings(params.settings)

    @server.feature(types.TEXT_DOCUMENT_DID_CLOSE)
    def did_close(ls: StarcoderServer, params: types.DidCloseTextDocumentParams) -> None:
        if backend.completer is not None:
            backend.completer.forget((ls.connection, params.text_document.uri))

    @server.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
    async def inline_completion(
        ls: StarcoderServer, params: types.InlineCompletionParams
    ) -> types.InlineCompletionList:
        found = await _suggest(ls, params.text_document.uri, params.position)
        if found is None:
            return types.InlineCompletionList(items=[])
        text, replaced = found
        item = types.InlineCompletionItem(
            insert_text=text,
            range=replaced,
            command=types.Command(
                title="accepted", command=ACCEPTED, arguments=[params.text_document.uri]
            ),
        )
        return types.InlineCompletionList(items=[item])

    async def completion(ls: StarcoderServer,
                         params: types.CompletionParams) -> types.CompletionList:  # fmt: skip
        """For clients without inline completion: one item, labelled with its first line."""
        found = await _suggest(ls, params.text_document.uri, params.position)
        if found is None:
            return types.CompletionList(is_incomplete=True, items=[])
        text, replaced = found
        item = types.CompletionItem(
            label=text.split("\n", 1)[0].strip() or text.strip(),
            kind=types.CompletionItemKind.Text,
            detail="starcoder",
            insert_text_format=types.InsertTextFormat.PlainText,
            text_edit=types.TextEdit(range=replaced, new_text=text),
            command=types.Command(
                title="accepted", command=ACCEPTED, arguments=[params.text_document.uri]
            ),
        )
        return types.CompletionList(is_incomplete=True, items=[item])

    @server.feature(
        types.TEXT_DOCUMENT_CODE_ACTION,
        types.CodeActionOptions(code_action_kinds=[types.CodeActionKind.RefactorRewrite]),
    )
    def code_action(ls: StarcoderServer,
                    params: types.CodeActionParams) -> list[types.CodeAction]:  # fmt: skip
        document = _document(ls, params.text_document.uri)
        if not _is_python(document):
            return []
        position = params.range.start
        if docstring.find_target(document.source, position.line) is None:
            return []
        arguments = [document.uri, {"line": position.line, "character": position.character}]
        return [
            types.CodeAction(
                title="Generate docstring",
                kind=types.CodeActionKind.RefactorRewrite,
                command=types.Command(
                    title="Generate docstring", command=GENERATE_DOCSTRING, arguments=arguments
                ),
            )
        ]

    @server.command(GENERATE_DOCSTRING)
    async def generate_docstring(ls: StarcoderServer, *args: Any) -> dict[str, Any]:
        return await _generate_docstring(ls, *args)

    @server.command(ACCEPTED)
    def accepted(ls: StarcoderServer, *args: Any) -> None:
        with backend.stats.lock:
            backend.stats.accepted += 1

    @server.feature(STATS)
    def stats(ls: StarcoderServer, *args: Any) -> dict[str, Any]:
        return backend.status()

    return server


async def _report_loading(ls: StarcoderServer) -> None:
    token = f"starcoder-load-{ls.connection}"
    try:
        await ls.work_done_progress.create_async(token)
    except Exception:  # the client does not take progress: nothing to report
        return
    ls.work_done_progress.begin(
        token, types.WorkDoneProgressBegin(title="starcoder-lsp", message="loading", percentage=0)
    )
    while not ls.backend.ready.is_set():
        done, total, what = ls.backend.progress
        ls.work_done_progress.report(
            token, types.WorkDoneProgressReport(message=what, percentage=int(100 * done / total))
        )
        await asyncio.sleep(0.5)
    message = "ready" if ls.backend.error is None else f"failed: {ls.backend.error}"
    ls.work_done_progress.end(token, types.WorkDoneProgressEnd(message=message))
    if ls.backend.error is not None:
        ls.show_error(f"the model could not be loaded: {ls.backend.error}")


def _document(ls: StarcoderServer, uri: Any) -> TextDocument:
    if not isinstance(uri, str):
        raise JsonRpcInvalidParams(f"expected a document URI, not {uri!r}")
    document = ls.workspace.text_documents.get(uri)
    if document is None:
        raise JsonRpcInvalidParams(f"unknown document {uri}: open it first (didOpen)")
    return document


def _is_python(document: TextDocument) -> bool:
    return document.language_id == "python" or document.uri.endswith((".py", ".pyi"))


def _offset(document: TextDocument, position: types.Position) -> int:
    """The character offset of `position`, or a clear error when it is not in the document."""
    lines = document.lines
    where = f"position {position.line}:{position.character}"
    if position.line < 0 or position.character < 0:
        raise JsonRpcInvalidParams(f"{where} is negative")
    if position.line > len(lines) or (position.line == len(lines) and position.character > 0):
        raise JsonRpcInvalidParams(f"{where} is past the end of {document.uri} "
                                   f"({len(lines)} lines)")  # fmt: skip
    if position.line < len(lines):
        line = lines[position.line].rstrip("\r\n")
        width = document.position_codec.client_num_units(line)
        if position.character > width:
            raise JsonRpcInvalidParams(f"{where} is past the end of its line "
                                       f"({width} units)")  # fmt: skip
    return document.offset_at_position(position)


def _position(document: TextDocument, offset: int) -> types.Position:
    """The client's position of a character offset (the inverse of `_offset`)."""
    before = document.source[:offset]
    line = before.count("\n")
    server = types.Position(line=line, character=offset - (before.rfind("\n") + 1))
    return document.position_codec.position_to_client_units(document.lines, server)


async def _suggest(
    ls: StarcoderServer, uri: str, position: types.Position
) -> tuple[str, types.Range] | None:
    """The suggestion at `position` and the range it replaces; None when there is none."""
    document = _document(ls, uri)
    offset = _offset(document, position)
    backend = ls.backend
    backend.stats.count_request()
    if not ls.settings.enabled or backend.completer is None:
        return None
    started = time.perf_counter()
    text = document.source
    filename = uri.rsplit("/", 1)[-1]
    pending = backend.completer.start((ls.connection, uri), text, offset, ls.settings, filename)
    pending.future.add_done_callback(lambda done: _count_stopped(backend.stats, done))
    suggestion = await _outcome(pending)
    backend.stats.record(time.perf_counter() - started, bool(suggestion.text),
                         suggestion.typed_through)  # fmt: skip
    if not suggestion.text:
        return None
    end = _position(document, offset + suggestion.replace_suffix_chars)
    return suggestion.text, types.Range(start=position, end=end)


async def _outcome(pending: Pending) -> Suggestion:
    """The pending suggestion; when the request is cancelled, the generation stops too (and
    its result still arrives, for the counts)."""
    try:
        return await asyncio.shield(asyncio.wrap_future(pending.future))
    except asyncio.CancelledError:
        pending.cancel()
        raise


def _count_stopped(stats: Stats, done: Future) -> None:
    if done.exception() is None and done.result().result is not None:
        stats.count_stopped(done.result().result.finish_reason)


def _docstring_arguments(args: tuple[Any, ...]) -> tuple[str, types.Position]:
    """Accepts (uri, position) or a single [uri, position] list, as clients send either."""
    if len(args) == 1 and isinstance(args[0], list | tuple):
        args = tuple(args[0])
    if len(args) != 2:
        raise JsonRpcInvalidParams(f"{GENERATE_DOCSTRING} takes [uri, position], got {args!r}")
    uri, where = args
    try:
        line, character = (where["line"], where["character"]) if isinstance(where, dict) else (
            where.line, where.character
        )  # fmt: skip
        return uri, types.Position(line=int(line), character=int(character))
    except (AttributeError, KeyError, TypeError, ValueError):
        raise JsonRpcInvalidParams(f"not a position: {where!r}") from None


async def _generate_docstring(ls: StarcoderServer, *args: Any) -> dict[str, Any]:
    uri, position = _docstring_arguments(args)
    document = _document(ls, uri)
    _offset(document, position)
    backend = ls.backend
    if backend.completer is None:
        raise JsonRpcInvalidRequest(f"the model is not ready ({backend.progress[2]})")
    target = docstring.find_target(document.source, position.line)
    if target is None:
        raise JsonRpcInvalidParams(
            f"no function or class without a docstring at line {position.line + 1}"
        )
    version = document.version
    pending = backend.completer.docstring((ls.connection, uri), document.source, target,
                                          ls.settings)  # fmt: skip
    suggestion = await _outcome(pending)
    if not suggestion.text:
        return {"applied": False, "docstring": "", "reason": "the model wrote no docstring"}
    if document.version != version:
        # The user typed meanwhile: the line numbers may be stale; their text wins.
        return {"applied": False, "docstring": suggestion.text,
                "reason": "the document changed while the docstring was written"}  # fmt: skip
    lines = document.source.split("\n")
    if target.body_line < len(lines):
        at, new_text = types.Position(line=target.body_line, character=0), suggestion.text
    else:  # the header is the last line, with no newline after it
        at = _position(document, len(document.source))
        new_text = "\n" + suggestion.text.rstrip("\n")
    edit = types.TextEdit(range=types.Range(start=at, end=at), new_text=new_text)
    response = await ls.workspace_apply_edit_async(
        types.ApplyWorkspaceEditParams(
            edit=types.WorkspaceEdit(changes={uri: [edit]}), label=f"Docstring for {target.name}"
        )
    )
    with backend.stats.lock:
        backend.stats.docstrings += 1
    applied = bool(getattr(response, "applied", False))
    result: dict[str, Any] = {"applied": applied, "docstring": suggestion.text}
    if not applied:
        result["reason"] = getattr(response, "failure_reason", None) or "the client refused it"
    return result
