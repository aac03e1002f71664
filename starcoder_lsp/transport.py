"""Transports: stdio for one editor, TCP (optionally TLS) for many at once.

pygls' own `start_tcp` serves one connection and stops the server when it closes; here each
TCP connection gets its own LanguageServer (documents, settings) over the shared Backend,
and a connection ending ends only itself.

The messages are framed here, not by pygls' reader loop, which buffers whatever length a
header declares (10^12 bytes: until memory runs out), matches `Content-Length` only with that
exact capitalisation, reads a connection's pipelined messages without letting the others in
between, and never times out. Here (each limit a flag, limits.py):

- a message larger than --max-message-size is answered with an error, unread, and its
  connection closed;
- a TCP connection has --handshake-timeout seconds for TLS and a successful initialize, then
  may be idle --idle-timeout seconds;
- each message read gives the other connections a turn; a client that does not read its
  replies is not read from either (its unsent replies stay bounded) until it times out, nor
  one with more than --max-in-flight-per-connection completions being served;
- at most --max-connections connections at once, and an address that sent more than
  --max-auth-failures wrong tokens in a minute is turned away before anything is read.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import ssl
import sys
import threading
import time
from pathlib import Path
from typing import BinaryIO, Protocol

from pygls.exceptions import JsonRpcException, JsonRpcInvalidRequest, JsonRpcParseError
from pygls.io_ import StdoutWriter

from starcoder_lsp import client_log
from starcoder_lsp.errors import StarcoderError
from starcoder_lsp.limits import Limits
from starcoder_lsp.server import Backend, StarcoderServer, build_server

log = logging.getLogger(__name__)

# A header line longer than this is no LSP header.
MAX_HEADER_LINE = 1024


class Reader(Protocol):
    async def readline(self) -> bytes: ...

    async def readexactly(self, n: int) -> bytes: ...


class FramingError(Exception):
    """The byte stream is not LSP's framing; the connection cannot go on."""

    def __init__(self, error: JsonRpcException) -> None:
        super().__init__(error.message)
        self.error = error


async def read_message(reader: Reader, max_size: int) -> bytes | None:
    """The next message body; None at the end of the stream. Headers are matched without
    regard to case, as HTTP's are; only Content-Length matters."""
    length: int | None = None
    while True:
        try:
            line = await reader.readline()
        except (ValueError, asyncio.LimitOverrunError):  # a line past the reader's limit
            raise FramingError(JsonRpcParseError("a header line is too long")) from None
        if not line:
            return None
        if len(line) > MAX_HEADER_LINE:
            raise FramingError(JsonRpcParseError("a header line is too long"))
        if not line.strip():
            if length is not None:
                break
            continue  # blank lines between messages are harmless
        name, colon, value = line.partition(b":")
        if not colon:
            raise FramingError(JsonRpcParseError(f"not a header: {line[:60]!r}"))
        if name.strip().lower() == b"content-length":
            try:
                length = int(value.strip())
            except ValueError:
                length = -1
            if length < 0:
                raise FramingError(JsonRpcParseError(f"a bad Content-Length: {value[:30]!r}"))
    if max_size and length > max_size:
        raise FramingError(
            JsonRpcInvalidRequest(
                f"a message of {length:,} bytes is larger than this server takes "
                f"({max_size:,}, --max-message-size)"
            )
        )
    return await reader.readexactly(length)


async def serve_connection(
    server: StarcoderServer,
    reader: Reader,
    writer: asyncio.StreamWriter | None,
    limits: Limits,
    timeouts: bool,
) -> None:
    """Read and handle messages until the stream ends, the connection is closed, or (with
    `timeouts`) it stays quiet too long."""
    protocol = server.protocol
    deadline = time.monotonic() + limits.handshake_timeout
    stop = server._stop_event
    while stop is None or not stop.is_set():
        wait = None
        if timeouts and not protocol.initialized and limits.handshake_timeout:
            wait = max(0.0, deadline - time.monotonic())
        elif timeouts and limits.idle_timeout:
            wait = limits.idle_timeout
        try:
            body = await asyncio.wait_for(read_message(reader, limits.max_message_size), wait)
        except asyncio.TimeoutError:
            state = "initialized" if protocol.initialized else "not initialized"
            log.info("connection %d: idle for %g s (%s)", server.connection, wait, state)
            return
        except FramingError as e:
            log.warning("connection %d: %s; closing it", server.connection, e)
            if not protocol.refused:
                protocol.send_error(None, e.error)
            return
        if body is None:
            return
        try:
            protocol.receive(body)
        except SystemExit:
            raise
        except Exception:  # a fault of ours: logged, and the connection goes on
            log.exception("connection %d: handling a message failed", server.connection)
        if writer is not None:
            # Returns at once unless the client leaves its replies unread (the transport is
            # past its high-water mark, TLS included): then nothing more is read from it
            # until it reads, so its replies cannot pile up in the server's memory.
            await asyncio.wait_for(writer.drain(), limits.idle_timeout or None)
        await asyncio.sleep(0)  # the other connections' turn (and the new request's)
        # A client that keeps more completions in flight than an editor does is not read
        # from until one is answered: each answer it draws costs the server's time.
        while 0 < limits.max_in_flight_per_connection <= server.in_flight:
            server.answered.clear()
            await asyncio.wait_for(server.answered.wait(), limits.idle_timeout or None)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def tls_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise StarcoderError("TLS needs both --tls-cert and --tls-key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise StarcoderError(f"cannot use {cert} / {key} for TLS: {e}") from None
    return context


def _stdin_stream(stdin: BinaryIO) -> asyncio.StreamReader:
    """stdin as an asyncio stream, fed by a daemon thread (a blocking read never holds up
    the event loop, nor the process's exit)."""
    loop = asyncio.get_running_loop()
    stream = asyncio.StreamReader()

    def pump() -> None:
        while chunk := stdin.read1(2**16):
            loop.call_soon_threadsafe(stream.feed_data, chunk)
        loop.call_soon_threadsafe(stream.feed_eof)

    threading.Thread(target=pump, name="starcoder-stdin", daemon=True).start()
    return stream


def serve_stdio(backend: Backend, limits: Limits | None = None) -> None:
    """One editor on stdin/stdout: a local server, no timeouts (the editor owns the process);
    the log goes to the editor (client_log.py)."""
    limits = limits or Limits()
    server = build_server(backend, limits=limits, local=True)
    server._stop_event = threading.Event()
    server.protocol.set_writer(StdoutWriter(sys.stdout.buffer))

    async def serve() -> None:
        reader = _stdin_stream(sys.stdin.buffer)
        await serve_connection(server, reader, None, limits, timeouts=False)

    try:
        with client_log.to_client(server) as handler:
            server.client_log = handler
            asyncio.run(serve())
    except BrokenPipeError:
        log.error("the editor closed the connection")
    except SystemExit:  # `exit`: pygls ends the process this way
        pass


def check_exposure(host: str, token: str | None) -> None:
    if not is_loopback(host) and not token:
        raise StarcoderError(
            f"binding to {host} exposes the model to the network: set a token in "
            "STARCODER_LSP_TOKEN or --token-file, which clients send as "
            "initializationOptions.token"
        )


def serve_tcp(
    backend: Backend,
    host: str,
    port: int,
    token: str | None,
    tls: ssl.SSLContext | None = None,
    ready: threading.Event | None = None,
    limits: Limits | None = None,
) -> None:
    check_exposure(host, token)
    limits = limits or Limits()
    try:
        asyncio.run(_serve(backend, host, port, token, tls, ready, limits))
    except OSError as e:  # the port is taken, the address is not ours, ...
        raise StarcoderError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    except KeyboardInterrupt:
        log.info("interrupted")


class _Gate:
    """Who may connect: at most max_connections at once, and no address that sent more than
    max_auth_failures wrong tokens in the last minute."""

    WINDOW = 60.0

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.open = 0
        self._failures: dict[str, collections.deque[float]] = {}

    def refusal(self, host: str) -> str | None:
        if self.limits.max_connections and self.open >= self.limits.max_connections:
            return f"{self.open} connections are open (--max-connections)"
        if self.limits.max_auth_failures and self._recent(host) >= self.limits.max_auth_failures:
            return "too many wrong tokens from this address in the last minute"
        return None

    def failed(self, host: str) -> None:
        self._failures.setdefault(host, collections.deque()).append(time.monotonic())

    def _recent(self, host: str) -> int:
        times = self._failures.get(host)
        if times is None:
            return 0
        while times and times[0] < time.monotonic() - self.WINDOW:
            times.popleft()
        if not times:
            del self._failures[host]
        return len(times)


async def _serve(
    backend: Backend,
    host: str,
    port: int,
    token: str | None,
    tls: ssl.SSLContext | None,
    ready: threading.Event | None,
    limits: Limits,
) -> None:
    gate = _Gate(limits)
    # One user, who may see every connection's counts: loopback without a token.
    local = is_loopback(host) and token is None

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        refusal = gate.refusal(peer[0])
        if refusal is not None:
            log.warning("connection from %s refused: %s", peer[0], refusal)
            writer.transport.abort()
            return
        gate.open += 1
        server = build_server(backend, token, limits, local)
        log.info("connection %d from %s", server.connection, peer[0])
        stop = threading.Event()

        def close() -> None:
            stop.set()
            writer.close()

        server._stop_event = stop
        server.close_connection = close
        server.auth_failed = lambda: gate.failed(peer[0])
        server.protocol.set_writer(writer)
        try:
            await serve_connection(server, reader, writer, limits, timeouts=True)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError) as e:
            log.info("connection %d lost: %s", server.connection, e)
        except asyncio.TimeoutError:  # waiting on a client that reads nothing, or
            # one whose requests in flight kept it from being read, past --idle-timeout
            log.info(
                "connection %d: stalled (its replies were not read); closing it", server.connection
            )
        finally:
            gate.open -= 1
            close()
            server.disconnected()
            log.info("connection %d from %s closed", server.connection, peer[0])

    handshake = limits.handshake_timeout or None
    listener = await asyncio.start_server(
        connection, host, port, ssl=tls, ssl_handshake_timeout=handshake if tls else None
    )
    addresses = ", ".join(_address(s.getsockname()) for s in listener.sockets)
    log.info("serving LSP on %s%s", addresses, " with TLS" if tls else "")
    # Scripts and tests wait for this line to know the port (with --port 0, the one chosen).
    print(f"starcoder-lsp listening on {addresses}{' (TLS)' if tls else ''}", flush=True)
    if ready is not None:
        ready.set()
    async with listener:
        await listener.serve_forever()


def _address(sockname: tuple) -> str:
    host, port = sockname[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
