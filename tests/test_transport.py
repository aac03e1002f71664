"""The transport and the token, end to end over TCP, as a careless or hostile client meets
them: message sizes, timeouts, connection limits, the token's checks. These servers have no
model (a path that does not exist): what is tested here happens before any model runs."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from lsp_servers import SERVE, Server, connect, start_tcp_server, stop
from lsp_wire import WireClient

from starcoder_lsp.server import tokens_match

TOKEN = "a7c3e1f09b2d4e6f8a1c3e5f7b9d0f2a"


@pytest.fixture
def no_model(tmp_path: Path) -> Path:
    return tmp_path / "no-such-model"


def serve(no_model: Path, tmp_path: Path, *flags: str, token: str | None = None) -> Server:
    env = {**os.environ}
    env.pop("STARCODER_LSP_TOKEN", None)
    if token is not None:
        (tmp_path / "token").write_text(token + "\n")
        flags = (*flags, "--token-file", str(tmp_path / "token"))
    return start_tcp_server(no_model, tmp_path / "server.log", *flags, env=env)


@pytest.fixture
def small_limits(no_model: Path, tmp_path: Path, certificate) -> Iterator[Server]:
    cert, key = certificate
    server = serve(
        no_model,
        tmp_path,
        "--max-message-size",
        "64K",
        "--handshake-timeout",
        "1",
        "--idle-timeout",
        "2",
        "--max-connections",
        "3",
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
    )
    yield server
    stop(server)


def tls_client(certificate) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certificate[0]))


async def test_a_message_over_the_size_limit_is_refused_unread(small_limits, certificate):
    tls = tls_client(certificate)
    client = await connect(small_limits, tls=tls)
    client.writer.write(b"Content-Length: 1000000000000\r\n\r\n" + b"{" * 1000)
    reply = await client.read()
    assert reply["id"] is None and reply["error"]["code"] == -32600
    assert "--max-message-size" in reply["error"]["message"]
    assert await client.closed()
    # A message just under the limit is fine.
    other = await connect(small_limits, tls=tls)
    options = {"settings": {"starcoder": {"padding": "x" * 60_000}}}
    await other.notify("workspace/didChangeConfiguration", options)
    assert "result" in await other.request("starcoder/stats")
    await other.close()


async def test_connections_that_stay_quiet_are_closed(small_limits, certificate):
    tls = tls_client(certificate)
    # Nothing at all: not even the TLS handshake.
    plain = await WireClient.tcp(small_limits.port)
    assert await plain.closed(timeout=10)
    # The TLS handshake, then nothing: no initialize within --handshake-timeout.
    handshaken = await WireClient.tcp(small_limits.port, tls=tls)
    assert await handshaken.closed(timeout=10)
    # Initialized, then quiet for --idle-timeout; one that keeps talking stays.
    quiet = await connect(small_limits, tls=tls)
    talking = await connect(small_limits, tls=tls)
    for _ in range(8):
        assert "result" in await talking.request("starcoder/stats")
        await asyncio.sleep(0.5)
    assert await quiet.closed(timeout=10)
    assert "result" in await talking.request("starcoder/stats")
    await talking.close()


async def test_connections_past_the_limit_are_closed_at_once(small_limits, certificate):
    tls = tls_client(certificate)
    clients = [await connect(small_limits, tls=tls) for _ in range(3)]
    extra = await WireClient.tcp(small_limits.port, tls=tls)
    with pytest.raises((ConnectionError, ssl.SSLError, asyncio.IncompleteReadError)):
        await extra.initialize()
    await clients.pop().close()
    await asyncio.sleep(0.5)
    clients.append(await connect(small_limits, tls=tls))
    for client in clients:
        await client.close()


async def test_a_client_that_does_not_read_its_replies_is_not_read_from(small_limits, certificate):
    """Its replies would pile up in the server's memory: the server stops reading from it
    and, once it has not read for --idle-timeout, closes it; the others are served."""
    tls = tls_client(certificate)
    flooder = await connect(small_limits, tls=tls)
    request = b'{"jsonrpc": "2.0", "id": 1, "method": "starcoder/stats"}'
    count = 100_000  # 7.5 MB of requests, 50 MB of replies
    flooder.writer.write((b"Content-Length: %d\r\n\r\n" % len(request) + request) * count)
    other = await connect(small_limits, tls=tls)
    assert "result" in await other.request("starcoder/stats", timeout=10)
    await other.close()
    async with asyncio.timeout(60):  # reading nothing: the server's replies fill the sockets
        while "replies were not read" not in small_limits.log_text():
            await asyncio.sleep(0.2)
    replies = 0
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError, ssl.SSLError)):
        while True:
            await asyncio.wait_for(flooder.read(), 10)
            replies += 1
    # Not every reply arrives: the server closes a socket it has not read to the end, which
    # resets it, and a reset drops what the client had not read yet (all of it, on a slow day).
    assert replies < count


# --- the token -------------------------------------------------------------------------------


@pytest.fixture
def token_server(no_model: Path, tmp_path: Path) -> Iterator[Server]:
    """A token from --token-file, and everything logged (DEBUG)."""
    server = serve(no_model, tmp_path, "--log-level", "DEBUG", token=TOKEN)
    yield server
    stop(server)


async def test_anything_before_a_token_checked_initialize_closes_the_connection(token_server):
    for first in (
        b"{not json",
        b'{"jsonrpc": "2.0", "id": 1, "method": "starcoder/stats"}',
        b'{"jsonrpc": "2.0", "method": "initialized", "params": {}}',
        b"[1, 2, 3]",
    ):
        client = await WireClient.tcp(token_server.port)
        await client.send_body(first)
        assert await client.closed(), first
        assert not client.notifications  # not even an error message


async def test_one_guess_per_connection(token_server):
    client = await WireClient.tcp(token_server.port)
    guesses = []
    for n, guess in enumerate(["guess-1", "guess-2", TOKEN, "guess-4"], start=1):
        params = {"capabilities": {}, "initializationOptions": {"token": guess}}
        guesses.append({"jsonrpc": "2.0", "id": n, "method": "initialize", "params": params})
    for guess in guesses:  # all in the socket before the server reads the first
        await client.send(guess)
    replies = []
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        while True:
            replies.append(await client.read())
    assert [r["id"] for r in replies] == [1]
    assert "wrong or missing token" in replies[0]["error"]["message"]


async def test_the_token_is_never_logged_and_the_right_one_works(token_server):
    for wrong in (None, "wrong", TOKEN[:-1], TOKEN + "x", 12345, ["a"]):
        client = await WireClient.tcp(token_server.port)
        reply = await client.initialize({} if wrong is None else {"token": wrong})
        assert "token" in reply["error"]["message"]
        assert await client.closed()
    client = await connect(token_server, {"token": TOKEN})
    await client.open("file:///t.py", "x = 1\n")
    assert "result" in await client.inline("file:///t.py", 1, 0)
    await client.request("shutdown")
    await client.close()
    log = token_server.log_text()
    assert "DEBUG" in log and "initialize" in log  # it did log the messages...
    assert TOKEN not in log and TOKEN[:-1] not in log  # ... but never the token


async def test_wrong_tokens_from_one_address_are_limited(no_model, tmp_path):
    server = serve(no_model, tmp_path, "--max-auth-failures", "2", token=TOKEN)
    try:
        for _ in range(2):
            client = await WireClient.tcp(server.port)
            assert "error" in await client.initialize({"token": "guess"})
            assert await client.closed()
        # Even the right token is turned away now, unread, for a minute.
        client = await WireClient.tcp(server.port)
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await client.initialize({"token": TOKEN})
        assert "too many wrong tokens" in server.log_text()
    finally:
        stop(server)


async def test_stats_on_a_shared_server_tell_a_client_only_its_own_counts(token_server):
    first = await connect(token_server, {"token": TOKEN})
    second = await connect(token_server, {"token": TOKEN})
    await first.open("file:///mine.py", "x = 1\n")
    for _ in range(3):
        await first.inline("file:///mine.py", 1, 0)
    theirs = (await second.request("starcoder/stats"))["result"]
    assert theirs["requests"] == 0 and theirs["totals"]["requests"] == 3
    assert "connections" not in theirs
    assert (await first.request("starcoder/stats"))["result"]["requests"] == 3
    for client in (first, second):
        await client.close()


def test_tokens_are_compared_whole_whatever_their_type():
    assert tokens_match(TOKEN, TOKEN)
    for other in (TOKEN[:-1], TOKEN + "0", "", None, 42, ["a"], "é" + TOKEN[1:], "\udc80"):
        assert not tokens_match(other, TOKEN)


def test_the_token_is_not_taken_from_the_command_line(no_model, tmp_path):
    done = subprocess.run(
        [*SERVE, "--tcp", "--token", TOKEN, "--model", str(no_model)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "process list" in done.stderr and "--token-file" in done.stderr
    (tmp_path / "empty").write_text("\n")
    done = subprocess.run(
        [*SERVE, "--tcp", "--token-file", str(tmp_path / "empty"), "--model", str(no_model)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "is empty" in done.stderr
