"""The language server: one pygls LanguageServer per connection over one shared Backend.

Every feature is a module-level handler, registered for each connection by `build_server`
from the FEATURES and COMMANDS tables. Handlers are thin: they turn LSP positions into offsets
(positions.py), ask the Completer, and turn its Suggestion back into LSP items. The model
loads in the background (backend.py); until it is ready, completion requests get an empty
list and the client sees `$/progress`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Generator
from concurrent.futures import Future
from typing import Any

from lsprotocol import types
from pygls.exceptions import JsonRpcException, JsonRpcInvalidParams, JsonRpcInvalidRequest
from pygls.lsp.server import LanguageServer
from pygls.protocol import LanguageServerProtocol
from pygls.protocol.language_server import lsp_method
from pygls.workspace import TextDocument

from starcoder_lsp import __version__, docstring
from starcoder_lsp import settings as settings_schema
from starcoder_lsp.backend import Backend, Stats
from starcoder_lsp.client_log import ClientLogHandler
from starcoder_lsp.completer import Pending, Suggestion
from starcoder_lsp.positions import offset_at, position_at

log = logging.getLogger(__name__)

ACCEPTED = "starcoder.accepted"
GENERATE_DOCSTRING = "starcoder.generateDocstring"
STATS = "starcoder/stats"
# Keys read at initialize only, not settings: they change what the server advertises.
INIT_ONLY_KEYS = {"token", "completionFallback"}


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
            log.warning(
                "connection %d: %r before a token-checked initialize; closing",
                server.connection,
                method,
            )
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
        # Set by the stdio transport: the log goes to the client once it has initialized.
        self.client_log: ClientLogHandler | None = None

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


# --- handlers --------------------------------------------------------------------------------


def initialize(ls: StarcoderServer, params: types.InitializeParams) -> None:
    """Check the token, take the settings, add the completion fallback if asked."""
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


def initialized(ls: StarcoderServer, params: types.InitializedParams) -> None:
    """Report the model's loading as `$/progress`, or say why it failed; a spawned server's
    log goes to the client from now on."""
    if ls.client_log is not None:
        ls.client_log.connect(asyncio.get_running_loop())
    if not ls.backend.ready.is_set():
        asyncio.ensure_future(_report_loading(ls))
    elif ls.backend.error is not None:
        ls.show_error(f"the model could not be loaded: {ls.backend.error}")


def did_change_configuration(
    ls: StarcoderServer, params: types.DidChangeConfigurationParams
) -> None:
    ls.apply_settings(params.settings)


def did_close(ls: StarcoderServer, params: types.DidCloseTextDocumentParams) -> None:
    """Forget the document's last suggestion."""
    if ls.backend.completer is not None:
        ls.backend.completer.forget((ls.connection, params.text_document.uri))


async def inline_completion(
    ls: StarcoderServer, params: types.InlineCompletionParams
) -> types.InlineCompletionList:
    """The suggestion at the cursor, as one inline completion item (or none)."""
    found = await _suggest(ls, params.text_document.uri, params.position)
    if found is None:
        return types.InlineCompletionList(items=[])
    text, replaced = found
    item = types.InlineCompletionItem(
        insert_text=text, range=replaced, command=_accepted(params.text_document.uri)
    )
    return types.InlineCompletionList(items=[item])


async def completion(ls: StarcoderServer, params: types.CompletionParams) -> types.CompletionList:
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
        command=_accepted(params.text_document.uri),
    )
    return types.CompletionList(is_incomplete=True, items=[item])


def code_action(ls: StarcoderServer, params: types.CodeActionParams) -> list[types.CodeAction]:
    """ "Generate docstring" on a Python definition that has none."""
    document = _document(ls, params.text_document.uri)
    if not _is_python(document):
        return []
    position = params.range.start
    if docstring.find_target(document.source, position.line) is None:
        return []
    arguments = [document.uri, {"line": position.line, "character": position.character}]
    command = types.Command(
        title="Generate docstring", command=GENERATE_DOCSTRING, arguments=arguments
    )
    kind = types.CodeActionKind.RefactorRewrite
    return [types.CodeAction(title="Generate docstring", kind=kind, command=command)]


async def generate_docstring(ls: StarcoderServer, *args: Any) -> dict[str, Any]:
    """Write the docstring of the definition at [uri, position] with workspace/applyEdit."""
    return await _generate_docstring(ls, *args)


def accepted(ls: StarcoderServer, *args: Any) -> None:
    """Count a suggestion the user accepted (the command each item carries)."""
    with ls.backend.stats.lock:
        ls.backend.stats.accepted += 1


def stats(ls: StarcoderServer, *args: Any) -> dict[str, Any]:
    """Whether the model is ready, and the counts and latencies."""
    return ls.backend.status()


# (method, options, handler): what every connection offers.
FEATURES: tuple[tuple[str, Any, Callable[..., Any]], ...] = (
    (types.INITIALIZE, None, initialize),
    (types.INITIALIZED, None, initialized),
    (types.WORKSPACE_DID_CHANGE_CONFIGURATION, None, did_change_configuration),
    (types.TEXT_DOCUMENT_DID_CLOSE, None, did_close),
    (types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions(), inline_completion),
    (
        types.TEXT_DOCUMENT_CODE_ACTION,
        types.CodeActionOptions(code_action_kinds=[types.CodeActionKind.RefactorRewrite]),
        code_action,
    ),
    (STATS, None, stats),
)
COMMANDS: tuple[tuple[str, Callable[..., Any]], ...] = (
    (GENERATE_DOCSTRING, generate_docstring),
    (ACCEPTED, accepted),
)


def build_server(backend: Backend, token: str | None = None) -> StarcoderServer:
    """A server for one connection, with every feature of FEATURES and COMMANDS."""
    server = StarcoderServer(backend, token)
    for method, options, handler in FEATURES:
        server.feature(method, options)(handler)
    for name, handler in COMMANDS:
        server.command(name)(handler)
    return server


# --- the core behind the handlers ------------------------------------------------------------


def _accepted(uri: str) -> types.Command:
    return types.Command(title="accepted", command=ACCEPTED, arguments=[uri])


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


async def _suggest(
    ls: StarcoderServer, uri: str, position: types.Position
) -> tuple[str, types.Range] | None:
    """The suggestion at `position` and the range it replaces; None when there is none."""
    document = _document(ls, uri)
    offset = offset_at(document, position)
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
    backend.stats.record(
        time.perf_counter() - started, bool(suggestion.text), suggestion.typed_through
    )
    if not suggestion.text:
        return None
    end = position_at(document, offset + suggestion.replace_suffix_chars)
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
        line, character = (
            (where["line"], where["character"])
            if isinstance(where, dict)
            else (where.line, where.character)
        )
        return uri, types.Position(line=int(line), character=int(character))
    except (AttributeError, KeyError, TypeError, ValueError):
        raise JsonRpcInvalidParams(f"not a position: {where!r}") from None


async def _generate_docstring(ls: StarcoderServer, *args: Any) -> dict[str, Any]:
    uri, position = _docstring_arguments(args)
    document = _document(ls, uri)
    offset_at(document, position)
    backend = ls.backend
    if backend.completer is None:
        raise JsonRpcInvalidRequest(f"the model is not ready ({backend.progress[2]})")
    target = docstring.find_target(document.source, position.line)
    if target is None:
        raise JsonRpcInvalidParams(
            f"no function or class without a docstring at line {position.line + 1}"
        )
    version = document.version
    pending = backend.completer.docstring(
        (ls.connection, uri), document.source, target, ls.settings
    )
    suggestion = await _outcome(pending)
    if not suggestion.text:
        return {"applied": False, "docstring": "", "reason": "the model wrote no docstring"}
    if document.version != version:
        # The user typed meanwhile: the line numbers may be stale; their text wins.
        return {
            "applied": False,
            "docstring": suggestion.text,
            "reason": "the document changed while the docstring was written",
        }
    lines = document.source.split("\n")
    if target.body_line < len(lines):
        at, new_text = types.Position(line=target.body_line, character=0), suggestion.text
    else:  # the header is the last line, with no newline after it
        at = position_at(document, len(document.source))
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
