"""Transports: stdio for one editor, TCP (optionally TLS) for many at once.

pygls' own `start_tcp` serves one connection and stops the server when it closes; here each
TCP connection gets its own LanguageServer (documents, settings) over the shared Backend,
and a connection ending ends only itself.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
import threading
from pathlib import Path

from pygls.io_ import run_async

from starcoder_lsp import client_log
from starcoder_lsp.errors import StarcoderError
from starcoder_lsp.server import Backend, StarcoderServer, build_server

log = logging.getLogger(__name__)


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


def serve_stdio(backend: Backend) -> None:
    """One editor, which spawned the server: the log goes to it (client_log.py)."""
    server = build_server(backend)
    with client_log.to_client(server) as handler:
        server.client_log = handler
        server.start_io()


def check_exposure(host: str, token: str | None) -> None:
    if not is_loopback(host) and not token:
        raise StarcoderError(
            f"binding to {host} exposes the model to the network: pass --token "
            "(or set STARCODER_LSP_TOKEN), which clients send as initializationOptions.token"
        )


def serve_tcp(
    backend: Backend,
    host: str,
    port: int,
    token: str | None,
    tls: ssl.SSLContext | None = None,
    ready: threading.Event | None = None,
) -> None:
    check_exposure(host, token)
    try:
        asyncio.run(_serve(backend, host, port, token, tls, ready))
    except OSError as e:  # the port is taken, the address is not ours, ...
        raise StarcoderError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    except KeyboardInterrupt:
        log.info("interrupted")


async def _serve(
    backend: Backend,
    host: str,
    port: int,
    token: str | None,
    tls: ssl.SSLContext | None,
    ready: threading.Event | None,
) -> None:
    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        server = build_server(backend, token)
        log.info("connection %d from %s", server.connection, peer)
        stop = threading.Event()

        def close() -> None:
            stop.set()
            writer.close()

        server._stop_event = stop
        server.close_connection = close
        server.protocol.set_writer(writer)
        try:
            await run_async(
                stop_event=stop,
                reader=reader,
                protocol=server.protocol,
                logger=log,
                error_handler=server.report_server_error,
            )
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError) as e:
            log.info("connection %d lost: %s", server.connection, e)
        finally:
            close()
            _forget_documents(backend, server)
            log.info("connection %d from %s closed", server.connection, peer)

    listener = await asyncio.start_server(connection, host, port, ssl=tls)
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


def _forget_documents(backend: Backend, server: StarcoderServer) -> None:
    """A closed connection's documents no longer need their last suggestions."""
    if backend.completer is None:
        return
    try:
        uris = list(server.workspace.text_documents)
    except RuntimeError:  # never initialized
        return
    for uri in uris:
        backend.completer.forget((server.connection, uri))
