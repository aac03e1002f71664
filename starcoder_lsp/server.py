"""The language server: one pygls LanguageServer per connection over one shared Backend.

Every feature is a module-level handler, registered for each connection by `build_server`
from the FEATURES and COMMANDS tables. Handlers are thin: they find the document
(documents.py), turn LSP positions into offsets (positions.py), ask the Completer, and turn
its Suggestion back into LSP items. The model loads in the background (backend.py); until it
is ready, completion requests get an empty list and the client sees `$/progress`.

`StarcoderProtocol` is where pygls does not do what a shared, possibly remote, server needs;
each override says what pygls does instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import itertools
import json
import logging
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future
from typing import Any

from cattrs import transform_error
from cattrs.errors import ClassValidationError
from lsprotocol import types
from lsprotocol.types import ResponseErrorMessage
from pygls.exceptions import (
    JsonRpcException,
    JsonRpcInternalError,
    JsonRpcInvalidParams,
    JsonRpcInvalidRequest,
    JsonRpcParseError,
    JsonRpcServerNotInitialized,
)
from pygls.lsp.server import LanguageServer
from pygls.protocol import LanguageServerProtocol, default_converter
from pygls.protocol.json_rpc import (
    JsonRPCNotification,
    JsonRPCRequestMessage,
    JsonRPCResponseMessage,
)
from pygls.protocol.language_server import lsp_method

from starcoder_lsp import __version__, docstring, positions
from starcoder_lsp import settings as settings_schema
from starcoder_lsp.backend import Backend, Stats
from starcoder_lsp.client_log import ClientLogHandler
from starcoder_lsp.completer import Pending, Suggestion
from starcoder_lsp.context import CrossFile, Source
from starcoder_lsp.documents import Document, Documents, RequestFailed, display, uri_key
from starcoder_lsp.limits import Limits
from starcoder_lsp.request import RequestError

log = logging.getLogger(__name__)

ACCEPTED = "starcoder.accepted"
GENERATE_DOCSTRING = "starcoder.generateDocstring"
STATS = "starcoder/stats"
CONTEXT = "starcoder/context"  # a client's text for the cross-file context: {uri, text}
# Keys read at initialize only, not settings: they change what the server advertises.
INIT_ONLY_KEYS = {"token", "completionFallback"}


def tokens_match(given: object, expected: str) -> bool:
    """Whether a client's token is the server's, in time that does not depend on where they
    differ (a plain == stops at the first differing byte, which a client can time)."""
    if not isinstance(given, str):
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8"))


class StarcoderProtocol(LanguageServerProtocol):
    """pygls' protocol with what a shared, possibly remote server needs.

    What pygls does instead, override by override:
    - `receive`: pygls parses a body inside its reader loop and answers JSON it cannot parse
      with a showMessage; JSON-RPC asks for a -32700 reply (-32600 for JSON that is not a
      JSON-RPC message), and a token-protected server closes such a connection at once.
    - `handle_message`: before initialize pygls runs requests anyway (they fail with -32603
      on the missing workspace), where LSP asks for -32002; after shutdown it never answers
      requests, where LSP asks for an InvalidRequest error.
    - `structure_message`: a request without `params` does not fit pygls' message type and
      is refused, though JSON-RPC allows it; a request whose params do not fit is only
      logged (with a traceback at ERROR), leaving the client waiting.
    - `_send_handler_result`: every error reply is logged with a full traceback at ERROR,
      a client's mistake (a position past the end) as much as a fault, and the reply to an
      unexpected exception carries the server's traceback to the client.
    - `lsp_initialize`: the token is checked (in constant time) and removed from the params
      before pygls logs them; UTF-8 positions are chosen when the client offers them.
    - didOpen/didChange/didClose: documents live in `StarcoderServer.documents`, not in
      pygls' workspace (see documents.py for why).
    - `lsp_exit` ends only its own connection, not the process.
    """

    _server: StarcoderServer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.initialized = False
        self.refused = False  # a wrong token was sent: nothing more is read

    # pygls caches these with functools.lru_cache on the method, which keys the cache by
    # `self`: the last 128 (connection, method) pairs keep closed connections alive, with
    # their documents (up to --max-document-size each). The answer depends on the method only.
    def get_message_type(self, method: str) -> Any:
        return _message_type(method)

    def get_result_type(self, method: str) -> Any:
        return _result_type(method)

    # -- messages in ------------------------------------------------------------------------

    def receive(self, body: bytes) -> None:
        """Handle one message body from the transport."""
        if self.refused:
            return
        guarded = self._server.token is not None and not self.initialized
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, nested too deep
            self._refuse_unread(guarded, JsonRpcParseError(f"the message is not JSON: {e}"))
            return
        problem = _not_a_message(data)
        if problem is not None:
            reply_to = data.get("id") if isinstance(data, dict) else None
            valid_id = isinstance(reply_to, int | str) and not isinstance(reply_to, bool)
            reply_to = reply_to if valid_id else None
            self._refuse_unread(guarded, JsonRpcInvalidRequest(problem), reply_to)
            return
        if guarded and data.get("method") != types.INITIALIZE:
            self._close(f"{_method(data)} before a token-checked initialize")
            return
        try:
            message = self.structure_message(data)
        except JsonRpcException:
            return  # answered by structure_message when it was a request
        self.handle_message(message)

    def _refuse_unread(
        self, guarded: bool, error: JsonRpcException, msg_id: int | str | None = None
    ) -> None:
        if guarded:
            self._close(f"{error.message[:80]} before a token-checked initialize")
            return
        log.info("connection %d: %s", self._server.connection, error.message[:200])
        self.send_error(msg_id, error)

    def structure_message(self, data: dict[str, Any]) -> Any:
        """`data` as the type of its method (pygls' own, less its traceback at ERROR for a
        client's malformed params); a request whose params do not fit is answered."""
        if "method" in data and "params" not in data:
            data = {**data, "params": None}  # JSON-RPC: params may be omitted
        try:
            if "method" in data:
                fallback = JsonRPCRequestMessage if "id" in data else JsonRPCNotification
                kind = self.get_message_type(data["method"]) or fallback
            elif "error" in data:
                kind = ResponseErrorMessage
            else:
                kind = self._result_types.pop(data["id"], None) or JsonRPCResponseMessage
            return self._converter.structure(data, kind)
        except Exception as e:
            reason = "; ".join(transform_error(e)) if isinstance(e, ClassValidationError) else e
            method = data.get("method", "a response")
            connection = self._server.connection
            log.info("connection %d: %s does not fit its type: %s", connection, method, reason)
            if "id" in data and "method" in data:
                error = JsonRpcInvalidParams(f"{method}: the params do not fit ({reason})")
                self.send_error(data["id"], error)
            raise JsonRpcInvalidParams(str(reason)) from None

    def handle_message(self, message: Any) -> None:
        method = getattr(message, "method", None)
        request = method is not None and hasattr(message, "id")
        if not self.initialized and method not in (types.INITIALIZE, types.EXIT):
            if request:
                not_yet = JsonRpcServerNotInitialized(f"{method}: send initialize first")
                self.send_error(message.id, not_yet)
            return  # LSP: notifications before initialize are dropped
        if self.initialized and method == types.INITIALIZE:
            self.send_error(message.id, JsonRpcInvalidRequest("initialize was already received"))
            return
        if self._shutdown and method != types.EXIT:
            if request:
                message_id = message.id
                self.send_error(message_id, JsonRpcInvalidRequest(f"{method}: shutting down"))
            return
        super().handle_message(message)

    # -- messages out -------------------------------------------------------------------------

    def send_error(self, msg_id: int | str | None, error: JsonRpcException) -> None:
        body = {"code": error.code, "message": error.message}
        self._send_data({"jsonrpc": "2.0", "id": msg_id, "error": body})

    def _send_handler_result(self, future: Future[Any], *, msg_id: Any) -> None:
        if future.cancelled() or future.exception() is None:
            super()._send_handler_result(future, msg_id=msg_id)
            return
        self._request_futures.pop(msg_id, None)
        error = future.exception()
        connection = self._server.connection
        if isinstance(error, JsonRpcException):  # the client's mistake, said in the reply
            log.info("connection %d: request %s: %s", connection, msg_id, error.message)
        elif isinstance(error, RequestError):  # logged with its traceback where it happened
            error = JsonRpcInternalError(str(error))
        else:
            log.error("connection %d: request %s failed", connection, msg_id, exc_info=error)
            error = JsonRpcInternalError(f"{type(error).__name__}: {error}")
        self.send_error(msg_id, error)

    def forget_request(self, msg_id: str) -> None:
        """Stop waiting for the client's answer to our request `msg_id`."""
        self._request_futures.pop(msg_id, None)
        self._result_types.pop(msg_id, None)

    # -- the life cycle --------------------------------------------------------------------------

    @lsp_method(types.INITIALIZE)
    def lsp_initialize(self, params: types.InitializeParams) -> Generator[Any, Any, Any]:
        server = self._server
        options = params.initialization_options
        token = options.pop("token", None) if isinstance(options, dict) else None
        if server.token is not None and not tokens_match(token, server.token):
            self.refused = True
            server.auth_failed()
            # The reply goes out first: the connection closes once it is written.
            asyncio.get_running_loop().call_soon(self._close, "wrong or missing token")
            raise JsonRpcInvalidRequest(
                "starcoder-lsp: wrong or missing token: pass the server's token as "
                "initializationOptions.token"
            )
        general = params.capabilities.general
        if general is not None and general.position_encodings:
            offered = list(general.position_encodings)
            if types.PositionEncodingKind.Utf8 in offered:
                general.position_encodings = [types.PositionEncodingKind.Utf8]
        result = yield from super().lsp_initialize(params)
        encoding = self.workspace.position_encoding  # an enum member, or a string
        encoding = str(getattr(encoding, "value", encoding) or positions.UTF16)
        server.documents = Documents(encoding, server.limits.max_document_size)
        self.initialized = True
        return result

    @lsp_method(types.EXIT)
    def lsp_exit(self, *args: Any) -> Generator[Any, Any, None]:
        close = self._server.close_connection
        if close is None:
            return (yield from super().lsp_exit(*args))
        close()
        return None

    def _close(self, why: str) -> None:
        server = self._server
        log.warning("connection %d: %s; closing it", server.connection, why)
        self.refused = True
        if server.close_connection is not None:
            server.close_connection()

    # -- documents ---------------------------------------------------------------------------

    @lsp_method(types.TEXT_DOCUMENT_DID_OPEN)
    def lsp_text_document__did_open(self, params: Any) -> Generator[Any, Any, None]:
        yield from self._user_handler(types.TEXT_DOCUMENT_DID_OPEN, params)

    @lsp_method(types.TEXT_DOCUMENT_DID_CHANGE)
    def lsp_text_document__did_change(self, params: Any) -> Generator[Any, Any, None]:
        yield from self._user_handler(types.TEXT_DOCUMENT_DID_CHANGE, params)

    @lsp_method(types.TEXT_DOCUMENT_DID_CLOSE)
    def lsp_text_document__did_close(self, params: Any) -> Generator[Any, Any, None]:
        yield from self._user_handler(types.TEXT_DOCUMENT_DID_CLOSE, params)

    def _user_handler(self, method: str, params: Any) -> Generator[Any, Any, None]:
        handler = self.fm.features.get(method)
        if handler is not None:
            yield handler, (params,), None


@functools.cache
def _message_type(method: str) -> Any:
    return types.METHOD_TO_TYPES.get(method, (None,))[0]


@functools.cache
def _result_type(method: str) -> Any:
    return types.METHOD_TO_TYPES.get(method, (None, None))[1]


def _not_a_message(data: Any) -> str | None:
    """Why `data` is not a JSON-RPC 2.0 message, or None."""
    if not isinstance(data, dict):
        return f"a message is a JSON object, not {type(data).__name__}"
    if data.get("jsonrpc") != "2.0":
        return 'not JSON-RPC 2.0: "jsonrpc" must be "2.0"'
    if "id" in data and (not isinstance(data["id"], int | str) or isinstance(data["id"], bool)):
        return "the id must be a number or a string"
    if "method" in data:
        if not isinstance(data["method"], str):
            return "the method must be a string"
        if data.get("params") is not None and not isinstance(data["params"], dict | list):
            return "params must be an object or an array"
        return None
    if "id" in data and ("result" in data) != ("error" in data):
        return None
    return "neither a request, a notification nor a response"


def _method(data: dict[str, Any]) -> str:
    method = data.get("method")
    return repr(method[:60]) if isinstance(method, str) else "a response"


class StarcoderServer(LanguageServer):
    def __init__(
        self,
        backend: Backend,
        token: str | None = None,
        limits: Limits | None = None,
        local: bool = True,
    ) -> None:
        super().__init__(
            "starcoder-lsp",
            __version__,
            protocol_cls=StarcoderProtocol,
            converter_factory=_shared_converter,
        )
        self.backend = backend
        self.token = token
        self.limits = limits or Limits()
        self.local = local  # one user: stats may list every connection
        self.settings = backend.settings
        self.completion_fallback = False
        self.connection = next(_connections)
        self.stats = backend.connect(self.connection)
        self.documents = Documents()  # replaced at initialize, in the negotiated encoding
        self.root = ""  # the workspace's URI (uri_key form, ending in "/"), when one is known
        self.cross_file = CrossFile(self.context_sources)
        self.unknown_reported: set[str] = set()
        # Set by a transport that serves many connections: ends this one only.
        self.close_connection: Callable[[], None] | None = None
        # Set by the stdio transport: the log goes to the client once it has initialized.
        self.client_log: ClientLogHandler | None = None
        # Set by a transport that limits wrong tokens per address.
        self.auth_failed: Callable[[], None] = lambda: None
        # Completion requests being served; the transport reads no more past a limit.
        self.in_flight = 0
        self.answered = asyncio.Event()

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """Count a completion request while it is served."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self.answered.set()

    def apply_settings(self, options: Any) -> None:
        """Take the known settings of `options`, each checked, and together checked against
        the model's context once it is known; on any error nothing is applied."""
        if not isinstance(options, dict):
            return
        options = options.get("starcoder", options)
        if not isinstance(options, dict):
            return
        for key in settings_schema.unknown_keys(options):
            if key not in INIT_ONLY_KEYS and key not in self.unknown_reported:
                self.unknown_reported.add(key)
                log.warning("connection %d: unknown setting %r ignored", self.connection, key[:60])
        try:
            updated = self.settings.updated(options)
            if self.backend.context is not None:
                updated.check_context(self.backend.context)
        except settings_schema.SettingsError as e:
            log.info("connection %d: settings not applied: %s", self.connection, e)
            self.show_error(f"settings not applied: {e}")
            return
        self.settings = updated

    def show_error(self, message: str) -> None:
        self.window_show_message(
            types.ShowMessageParams(types.MessageType.Error, f"starcoder-lsp: {message}")
        )

    def key(self, uri: str) -> tuple[int, str]:
        """The completer's name for this connection's document at `uri`."""
        return (self.connection, uri_key(uri))

    def path(self, uri: str) -> str:
        """A document's path as the cross-file context names it: relative to the workspace
        where it lies within it (as repositories were written in training), else its name."""
        key = uri_key(uri).split("#", 1)[0].split("?", 1)[0]
        if self.root and key.startswith(self.root):
            return key[len(self.root) :]
        return key.rsplit("/", 1)[-1]

    def context_sources(self) -> list[Source]:
        """This connection's open documents, and only its own, for its cross-file context."""
        sources = []
        for key in self.documents:
            try:
                document = self.documents.get(key)
            except (JsonRpcException, RequestFailed):
                continue  # closed meanwhile, or not held in full
            sources.append(Source((self.connection, key), self.path(key), document.text))
        return sources

    def completer_forget(self, uri: str) -> None:
        if self.backend.completer is not None:
            self.backend.completer.forget(self.key(uri))

    def disconnected(self) -> None:
        """The connection closed: stop its requests, forget its documents."""
        if self.backend.completer is not None:
            keys = [(self.connection, key) for key in self.documents]
            stopped = self.backend.completer.drop(self.connection, keys)
            if stopped:
                log.info("connection %d: %d requests stopped", self.connection, stopped)
        self.backend.disconnect(self.connection)


_connections = itertools.count(1)


@functools.cache
def _shared_converter() -> Any:
    """One cattrs converter for every connection: pygls makes one per server, and each
    generates and compiles its (un)structuring functions again, some 1,000 of them, when a
    connection starts."""
    return default_converter()


# --- handlers --------------------------------------------------------------------------------


def initialize(ls: StarcoderServer, params: types.InitializeParams) -> None:
    """Take the settings; add the completion fallback if asked. (The token was checked.)"""
    options = params.initialization_options
    options = options if isinstance(options, dict) else {}
    ls.apply_settings(options)
    ls.root, ls.cross_file.repo = _workspace(params)
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


def did_open(ls: StarcoderServer, params: types.DidOpenTextDocumentParams) -> None:
    """Keep the document (or say why not)."""
    ls.completer_forget(params.text_document.uri)
    _report_unusable(ls, ls.documents.open(params.text_document))
    ls.cross_file.opened(ls.key(params.text_document.uri))


def did_change(ls: StarcoderServer, params: types.DidChangeTextDocumentParams) -> None:
    """Apply the edits; a refused one is reported at once, and by every request after it."""
    _report_unusable(ls, ls.documents.change(params))
    # Not a material change for the cross-file context, even a whole text (some clients send
    # one per keystroke): the block follows another document's edits when the cursor moves
    # to another document, which rebuilds it.
    key = ls.key(params.text_document.uri)
    for change in params.content_changes:
        if isinstance(change, types.TextDocumentContentChangePartial):
            ls.cross_file.edited(key, change.range.start.line)


def did_save(ls: StarcoderServer, params: types.DidSaveTextDocumentParams) -> None:
    """A saved document is a material change for the cross-file context."""
    ls.cross_file.saved(ls.key(params.text_document.uri))


def did_close(ls: StarcoderServer, params: types.DidCloseTextDocumentParams) -> None:
    """Forget the document and its last suggestion."""
    ls.documents.close(params.text_document.uri)
    ls.completer_forget(params.text_document.uri)
    ls.cross_file.closed(ls.key(params.text_document.uri))


def context(ls: StarcoderServer, params: Any) -> None:
    """`starcoder/context` {uri, text}: text the editor offers as cross-file context (a yank,
    a visited file); the server never reads the disk for it. A newer push for the same URI
    replaces the older; a URI with a fragment (`file:///a.py#yank`) names text taken from
    the document without it, which is never quoted in that document's own prompts."""
    uri, text = _field(params, "uri"), _field(params, "text")
    if not isinstance(uri, str) or not isinstance(text, str):
        log.info("connection %d: %s needs a uri and a text (strings)", ls.connection, CONTEXT)
        return
    limit = ls.limits.max_document_size
    if limit and len(text) > limit:
        log.info("connection %d: %s: %s is too large", ls.connection, CONTEXT, display(uri))
        return
    origin = ls.key(uri.split("#", 1)[0])
    ls.cross_file.push(ls.key(uri), ls.path(uri), text, origin)


async def inline_completion(
    ls: StarcoderServer, params: types.InlineCompletionParams
) -> types.InlineCompletionList:
    """The suggestion at the cursor, as one inline completion item (or none)."""
    with ls.serving():
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
    with ls.serving():
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
    document = ls.documents.get(params.text_document.uri)
    if not _is_python(document):
        return []
    position = params.range.start
    first, text = _lines_around(document, position.line)
    if docstring.find_target(text, position.line - first) is None:
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
    ls.stats.count_accepted()


def stats(ls: StarcoderServer, *args: Any) -> dict[str, Any]:
    """Whether the model is ready; this connection's counts and the totals."""
    return {**ls.backend.status(ls.stats, ls.local), "contextBuilds": ls.cross_file.builds}


# (method, options, handler): what every connection offers.
FEATURES: tuple[tuple[str, Any, Callable[..., Any]], ...] = (
    (types.INITIALIZE, None, initialize),
    (types.INITIALIZED, None, initialized),
    (types.WORKSPACE_DID_CHANGE_CONFIGURATION, None, did_change_configuration),
    (types.TEXT_DOCUMENT_DID_OPEN, None, did_open),
    (types.TEXT_DOCUMENT_DID_CHANGE, None, did_change),
    (types.TEXT_DOCUMENT_DID_CLOSE, None, did_close),
    (types.TEXT_DOCUMENT_DID_SAVE, types.SaveOptions(include_text=False), did_save),
    (CONTEXT, None, context),
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


def build_server(
    backend: Backend,
    token: str | None = None,
    limits: Limits | None = None,
    local: bool = True,
) -> StarcoderServer:
    """A server for one connection, with every feature of FEATURES and COMMANDS. `local`:
    the server has one user (stdio, or loopback without a token)."""
    server = StarcoderServer(backend, token, limits, local)
    for method, options, handler in FEATURES:
        server.feature(method, options)(handler)
    for name, handler in COMMANDS:
        server.command(name)(handler)
    return server


# --- the core behind the handlers ------------------------------------------------------------


def _accepted(uri: str) -> types.Command:
    return types.Command(title="accepted", command=ACCEPTED, arguments=[uri])


def _field(params: Any, name: str) -> Any:
    """A field of a custom message's params, which pygls gives as an object or a dict."""
    if isinstance(params, dict):
        return params.get(name)
    return getattr(params, name, None)


def _workspace(params: types.InitializeParams) -> tuple[str, str]:
    """(the workspace's root URI in uri_key form ending in "/", its name) from initialize:
    the first workspace folder, or the root URI; ("", "") without either."""
    folders = params.workspace_folders or []
    root = folders[0].uri if folders else params.root_uri
    if not isinstance(root, str) or not root:
        return "", ""
    root = uri_key(root).rstrip("/") + "/"
    name = folders[0].name if folders else root.rstrip("/").rsplit("/", 1)[-1]
    return root, name


def _report_unusable(ls: StarcoderServer, reason: str | None) -> None:
    """A document the server cannot serve is said at once, not left to look like a model
    with nothing to suggest."""
    if reason is not None:
        log.warning("connection %d: %s", ls.connection, reason)
        ls.show_error(reason)


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


def _is_python(document: Document) -> bool:
    return document.language_id == "python" or document.uri.endswith((".py", ".pyi"))


# Lines around the cursor that docstring.py sees: editors ask for code actions at every cursor
# move, and the definition a docstring is for is rarely further away.
DOCSTRING_LINES = 2000


def _lines_around(document: Document, line: int) -> tuple[int, str]:
    """(the first line's number, the text of up to DOCSTRING_LINES lines either side of
    `line`), with LSP's line ends as "\n": docstring.py counts lines by "\n" alone."""
    starts = document.starts
    first = max(0, line - DOCSTRING_LINES)
    last = min(len(starts), line + DOCSTRING_LINES)
    end = int(starts[last]) if last < len(starts) else len(document.text)
    text = document.text[int(starts[first]) : end]
    return first, positions.LINE_END.sub("\n", text) if "\r" in text else text


async def _suggest(
    ls: StarcoderServer, uri: str, position: types.Position
) -> tuple[str, types.Range] | None:
    """The suggestion at `position` and the range it replaces; None when there is none."""
    document = ls.documents.get(uri)
    offset = document.offset_at(position)
    # The text as it is now: edits that arrive while the model runs replace these objects.
    text, starts = document.text, document.starts
    backend = ls.backend
    ls.stats.count_request()
    if not ls.settings.enabled or backend.completer is None:
        return None
    started = time.perf_counter()
    filename = uri.rsplit("/", 1)[-1]
    try:
        pending = backend.completer.start(
            ls.key(uri),
            text,
            offset,
            ls.settings,
            filename,
            owner=ls.connection,
            context=ls.cross_file,
        )
    except settings_schema.SettingsError as e:  # set before the model's context was known
        raise RequestFailed(f"starcoder-lsp settings: {e}") from None
    pending.future.add_done_callback(lambda done: _count_stopped(ls.stats, done))
    suggestion = await _outcome(pending)
    ls.stats.record(time.perf_counter() - started, bool(suggestion.text), suggestion.typed_through)
    if suggestion.prompt is not None and not suggestion.typed_through:  # the model ran
        chunks = [f"{c.path}:{c.line + 1}" for c in suggestion.context.chunks]
        ls.stats.record_context(len(suggestion.context), chunks)
    _log_timings(ls, suggestion, time.perf_counter() - started)
    if not suggestion.text:
        return None
    end_offset = offset + suggestion.replace_suffix_chars
    end = positions.position_at(text, starts, end_offset, document.encoding)
    return suggestion.text, types.Range(start=position, end=end)


def _log_timings(ls: StarcoderServer, suggestion: Suggestion, seconds: float) -> None:
    """Where a suggestion's time went, at DEBUG: what to look at when one is slow."""
    result = suggestion.result
    if result is None or not log.isEnabledFor(logging.DEBUG):
        return
    log.debug(
        "connection %d: %s after %.3f s: %d prompt tokens (%d reused), queued %.3f s, "
        "prefill %.3f s, %d decode steps in %.3f s",
        ls.connection,
        result.finish_reason,
        seconds,
        result.prompt_tokens,
        result.reused_tokens,
        result.queued_seconds,
        result.prefill_seconds,
        result.decode_steps,
        result.decode_seconds,
    )


async def _outcome(pending: Pending) -> Suggestion:
    """The pending suggestion; when the request is cancelled, the generation stops too (and
    its result still arrives, for the counts)."""
    try:
        return await asyncio.shield(asyncio.wrap_future(pending.future))
    except asyncio.CancelledError:
        pending.cancel()
        raise


def _count_stopped(stats: Stats, done: Future) -> None:
    if done.exception() is not None:
        stats.count_failed()
    elif done.result().result is not None:
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
    document = ls.documents.get(uri)
    document.offset_at(position)
    backend = ls.backend
    if backend.completer is None:
        raise JsonRpcInvalidRequest(f"the model is not ready ({backend.progress[2]})")
    first, text = _lines_around(document, position.line)
    target = docstring.find_target(text, position.line - first)
    if target is None:
        raise JsonRpcInvalidParams(
            f"no function or class without a docstring at line {position.line + 1}"
        )
    version = document.version
    try:
        pending = backend.completer.docstring(
            ls.key(uri), text, target, ls.settings, owner=ls.connection
        )
    except settings_schema.SettingsError as e:
        raise RequestFailed(f"starcoder-lsp settings: {e}") from None
    suggestion = await _outcome(pending)
    if not suggestion.text:
        return {"applied": False, "docstring": "", "reason": "the model wrote no docstring"}
    current = ls.documents.get(uri)
    if current is not document or document.version != version:
        # The user typed meanwhile: the line numbers may be stale; their text wins.
        return {
            "applied": False,
            "docstring": suggestion.text,
            "reason": "the document changed while the docstring was written",
        }
    body_line = first + target.body_line
    if body_line < document.line_count():
        at, new_text = types.Position(line=body_line, character=0), suggestion.text
    else:  # the header is the last line, with no newline after it
        at = document.position_at(len(document.text))
        new_text = "\n" + suggestion.text.rstrip("\n")
    edit = types.TextEdit(range=types.Range(start=at, end=at), new_text=new_text)
    ls.stats.count_docstring()
    label = f"Docstring for {target.name}"
    answer = await _apply_edit(ls, types.WorkspaceEdit(changes={uri: [edit]}), label)
    result: dict[str, Any] = {"applied": answer is True, "docstring": suggestion.text}
    if answer is not True:
        result["reason"] = answer
    return result


async def _apply_edit(ls: StarcoderServer, edit: types.WorkspaceEdit, label: str) -> bool | str:
    """Ask the editor to apply `edit`: True, or why it was not applied. An editor that does
    not answer within --apply-edit-timeout is not waited for any longer."""
    timeout = ls.limits.apply_edit_timeout or None
    msg_id = f"starcoder-apply-edit-{uuid.uuid4()}"
    params = types.ApplyWorkspaceEditParams(edit=edit, label=label)
    sent = ls.protocol.send_request(types.WORKSPACE_APPLY_EDIT, params, msg_id=msg_id)
    try:
        response = await asyncio.wait_for(asyncio.wrap_future(sent), timeout)
    except asyncio.TimeoutError:
        ls.protocol.forget_request(msg_id)
        log.info("connection %d: no answer to workspace/applyEdit", ls.connection)
        return f"the editor did not answer workspace/applyEdit within {timeout:g} s"
    except JsonRpcException as e:
        return f"the editor answered workspace/applyEdit with an error: {e.message}"
    if getattr(response, "applied", False):
        return True
    return getattr(response, "failure_reason", None) or "the editor refused it"
