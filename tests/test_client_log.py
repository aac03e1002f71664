"""The log of a spawned server goes to its editor as window/logMessage, each record with its
level, not to stderr (which editors show as errors, line by line)."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
from pathlib import Path

from lsp_wire import WireClient
from lsprotocol import types

from starcoder_lsp.client_log import ClientLogHandler, to_client

SERVE = [sys.executable, "-m", "starcoder_lsp", "serve", "--stdio"]
ERROR, WARNING, INFO, DEBUG = (
    int(t)
    for t in (
        types.MessageType.Error,
        types.MessageType.Warning,
        types.MessageType.Info,
        types.MessageType.Debug,
    )
)


class FakeClient:
    def __init__(self) -> None:
        self.messages: list[types.LogMessageParams] = []
        self.threads: set[int] = set()

    def window_log_message(self, params: types.LogMessageParams) -> None:
        self.threads.add(threading.get_ident())
        self.messages.append(params)


class Collect(logging.Handler):
    def __init__(self, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def record(name: str, level: int, message: str) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, None, None)


async def test_records_wait_for_the_client_then_go_to_it_with_their_levels() -> None:
    client, stderr = FakeClient(), Collect()
    handler = ClientLogHandler(client, [stderr])
    handler.handle(record("starcoder_lsp.engine", logging.INFO, "key/value cache: 8 slots"))
    handler.handle(record("jax._src.xla_bridge", logging.WARNING, "no GPU"))
    assert client.messages == [] and stderr.records == []  # before `initialized`: kept

    handler.connect(asyncio.get_running_loop())
    from_a_thread = threading.Thread(
        target=handler.handle, args=(record("starcoder_lsp.backend", logging.ERROR, "failed"),)
    )
    from_a_thread.start()
    from_a_thread.join()
    handler.handle(record("starcoder_lsp.server", logging.DEBUG, "details"))
    await asyncio.sleep(0.05)  # the thread's record is sent on the loop
    assert [(int(m.type), m.message) for m in client.messages] == [
        (INFO, "starcoder_lsp.engine: key/value cache: 8 slots"),
        (WARNING, "jax._src.xla_bridge: no GPU"),
        (ERROR, "starcoder_lsp.backend: failed"),
        (DEBUG, "starcoder_lsp.server: details"),
    ]
    assert client.threads == {threading.get_ident()}  # sent from the loop's thread only
    # pygls logs each message it sends: those stay on stderr, or each would send another.
    handler.handle(record("pygls.protocol.json_rpc", logging.INFO, "Sending data: {}"))
    assert len(client.messages) == 4 and [r.name for r in stderr.records] == [
        "pygls.protocol.json_rpc"
    ]


def test_records_never_sent_go_to_stderr_when_the_connection_ends() -> None:
    stderr = Collect(logging.WARNING)
    root = logging.getLogger()
    root.addHandler(stderr)
    try:
        with to_client(FakeClient()):
            assert stderr not in root.handlers
            logging.getLogger("starcoder_lsp.test").warning("the client never initialized")
            logging.getLogger("starcoder_lsp.test").info("below the handler's level")
        assert stderr in root.handlers
        assert [r.getMessage() for r in stderr.records] == ["the client never initialized"]
    finally:
        root.removeHandler(stderr)


async def test_a_spawned_server_logs_to_its_client_once_each(
    tiny_mqa_dir: Path, tmp_path: Path
) -> None:
    stderr = tmp_path / "stderr.txt"
    with stderr.open("w") as errors:
        process = await asyncio.create_subprocess_exec(
            *SERVE,
            "--model",
            str(tiny_mqa_dir),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            limit=2**24,
        )
        try:
            client = WireClient(process.stdout, process.stdin)
            reply = await client.initialize({"someUnknownKnob": 1})
            assert "result" in reply, reply
            stats = await client.wait_ready()
            assert stats["ready"], stats
            await client.request("shutdown")
            await client.notify("exit")
            await asyncio.wait_for(process.wait(), 30)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    logged = [
        (m["params"]["type"], m["params"]["message"])
        for m in client.notifications
        if m["method"] == "window/logMessage"
    ]
    cache_lines = [(kind, text) for kind, text in logged if "key/value cache" in text]
    assert len(cache_lines) == 1 and cache_lines[0][0] == INFO, logged
    unknown = "starcoder_lsp.server: connection 1: unknown setting 'someUnknownKnob' ignored"
    assert (WARNING, unknown) in logged, logged
    written = stderr.read_text()
    assert "key/value cache" not in written and " INFO " not in written, written
