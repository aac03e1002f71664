"""The log of a server that an editor spawned (`serve --stdio`) goes to that editor, as
`window/logMessage` with each record's level, instead of to stderr.

Editors show a spawned server's stderr as errors, line by line: VS Code marks every line
`[error]` in the output channel, Neovim writes each to its LSP log at ERROR. Sent as
messages, an INFO line is an info line there too. Records before the client has initialized
wait in a buffer (LSP allows no message before that); whatever is still unsent when the
connection ends goes to stderr. pygls' own records stay on stderr: pygls logs every message
it sends, and sending that as a message would log another one.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from lsprotocol import types

LEVELS = (
    (logging.ERROR, types.MessageType.Error),
    (logging.WARNING, types.MessageType.Warning),
    (logging.INFO, types.MessageType.Info),
)


class LogClient(Protocol):
    """What the handler needs of the server: pygls' LanguageServer has it."""

    def window_log_message(self, params: types.LogMessageParams) -> None: ...


def message_type(level: int) -> types.MessageType:
    for at_least, kind in LEVELS:
        if level >= at_least:
            return kind
    return types.MessageType.Debug


class ClientLogHandler(logging.Handler):
    """Sends records to the client once `connect` has been called, from any thread, on the
    server's event loop; until then keeps them."""

    def __init__(self, server: LogClient, fallback: list[logging.Handler]) -> None:
        super().__init__()
        self.server = server
        self.fallback = fallback  # where records go that the client cannot take
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        self._waiting: list[logging.LogRecord] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "pygls" or record.name.startswith("pygls."):
            self._to_fallback(record)
            return
        with self._guard:
            loop = self._loop
            if loop is None:
                self._waiting.append(record)
                return
        try:
            loop.call_soon_threadsafe(self._send, record)
        except RuntimeError:  # the loop is closed: the connection has ended
            self._to_fallback(record)

    def connect(self, loop: asyncio.AbstractEventLoop) -> None:
        """The client has initialized: send what waited, and every record from now on. Call
        it on `loop`'s thread."""
        with self._guard:
            waiting, self._waiting = self._waiting, []
            self._loop = loop
        for record in waiting:
            self._send(record)

    def close(self) -> None:
        with self._guard:
            waiting, self._waiting = self._waiting, []
            self._loop = None
        for record in waiting:
            self._to_fallback(record)
        super().close()

    def _send(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            params = types.LogMessageParams(type=message_type(record.levelno), message=message)
            self.server.window_log_message(params)
        except Exception:  # the connection is gone: the record is not lost
            self._to_fallback(record)

    def _to_fallback(self, record: logging.LogRecord) -> None:
        for handler in self.fallback:
            if record.levelno >= handler.level:
                handler.handle(record)


@contextmanager
def to_client(server: LogClient) -> Iterator[ClientLogHandler]:
    """While in the block, the root logger's records go to `server`'s client rather than to
    the root logger's handlers (stderr), which get them back afterwards."""
    root = logging.getLogger()
    fallback = list(root.handlers)
    handler = ClientLogHandler(server, fallback)
    for old in fallback:
        root.removeHandler(old)
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        handler.close()
        for old in fallback:
            root.addHandler(old)
