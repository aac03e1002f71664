"""A raw LSP client for tests that need the bytes on the wire: malformed messages, replies as
plain JSON. It answers the server's own requests (applyEdit, progress) like an editor."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import ssl
from typing import Any

HEADER = b"Content-Length: %d\r\n\r\n"


class WireClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.notifications: list[dict[str, Any]] = []
        self.server_requests: list[dict[str, Any]] = []
        self.answer_server_requests = True  # False: an editor that never answers them
        self._replies: dict[Any, dict[str, Any]] = {}  # read while waiting for another
        self._ids = itertools.count(1)

    @classmethod
    async def tcp(cls, port: int, tls: ssl.SSLContext | None = None) -> WireClient:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=tls, limit=2**24, server_hostname="localhost" if tls else None
        )
        return cls(reader, writer)

    async def send_body(self, body: bytes) -> None:
        self.writer.write(HEADER % len(body) + body)
        await self.writer.drain()

    async def send(self, message: dict[str, Any]) -> None:
        await self.send_body(json.dumps({"jsonrpc": "2.0", **message}).encode())

    async def notify(self, method: str, params: Any = None) -> None:
        await self.send({"method": method, "params": params})

    async def request(self, method: str, params: Any = None, timeout: float = 60) -> dict:
        """The server's reply (with `result` or `error`) to a new request."""
        number = next(self._ids)
        await self.send({"id": number, "method": method, "params": params})
        return await self.reply(number, timeout)

    async def reply(self, number: int, timeout: float = 60) -> dict:
        """The reply to request `number`, in whatever order the replies come."""
        async with asyncio.timeout(timeout):
            while number not in self._replies:
                message = await self.read()
                if "id" in message and "method" not in message:
                    self._replies[message["id"]] = message
            return self._replies.pop(number)

    async def read(self) -> dict[str, Any]:
        """The next message; server requests are answered, notifications kept."""
        length = 0
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("the server closed the connection")
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
            elif line == b"\r\n":
                break
        message = json.loads(await self.reader.readexactly(length))
        if "method" in message and "id" in message:
            self.server_requests.append(message)
            if not self.answer_server_requests:
                return message
            result: Any = {"applied": True} if message["method"] == "workspace/applyEdit" else None
            await self.send({"id": message["id"], "result": result})
        elif "method" in message:
            self.notifications.append(message)
        return message

    async def initialize(
        self, options: dict[str, Any] | None = None, encodings: list[str] | None = None
    ) -> dict:
        general = {"positionEncodings": encodings} if encodings else {}
        reply = await self.request(
            "initialize",
            {
                "processId": None,
                "rootUri": None,
                "initializationOptions": options or {},
                "capabilities": {
                    "general": general,
                    "window": {"workDoneProgress": True},
                    "workspace": {"applyEdit": True},
                },
            },
        )
        if "result" in reply:
            await self.notify("initialized", {})
        return reply

    async def open(self, uri: str, text: str, version: int = 1) -> None:
        await self.notify(
            "textDocument/didOpen",
            {
                "textDocument": {
                    "uri": uri,
                    "languageId": "python",
                    "version": version,
                    "text": text,
                }
            },
        )

    async def inline(self, uri: str, line: int, character: int, timeout: float = 60) -> dict:
        return await self.request(
            "textDocument/inlineCompletion",
            {
                "textDocument": {"uri": uri},
                "position": {"line": line, "character": character},
                "context": {"triggerKind": 2},
            },
            timeout,
        )

    def shown_messages(self) -> list[str]:
        """The texts of the window/showMessage notifications read so far."""
        return [
            n["params"]["message"]
            for n in self.notifications
            if n["method"] == "window/showMessage"
        ]

    async def change(self, uri: str, version: int, *changes: dict[str, Any]) -> None:
        """didChange; each change is {"range": ..., "text": ...} or {"text": ...}."""
        await self.notify(
            "textDocument/didChange",
            {"textDocument": {"uri": uri, "version": version}, "contentChanges": list(changes)},
        )

    async def wait_ready(self, timeout: float = 120) -> dict:
        async with asyncio.timeout(timeout):
            while True:
                stats = (await self.request("starcoder/stats"))["result"]
                if stats["ready"] or stats["error"]:
                    return stats
                await asyncio.sleep(0.2)

    async def closed(self, timeout: float = 10) -> bool:
        """Whether the server ends the connection within `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    await self.read()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()
