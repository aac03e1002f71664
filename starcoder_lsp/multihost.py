"""Serving from several hosts at once: JAX's multi-controller runtime, one leader.

Every process runs the same program over one mesh made of all the hosts' devices (a TPU pod
slice, or processes on one machine in the tests). A compiled step runs only when every
process calls it with the same inputs in the same order, so exactly one process, the
leader (process 0), accepts LSP connections and schedules; before each runner call it
sends the call's host inputs to the followers over a plain TCP side channel, and each
follower makes the same call on its own handle of the cache. The side channel carries small
numpy arrays (token ids, positions, sampling settings), a few hundred bytes a step: JAX's
own broadcast would be a compiled collective per call.

A follower that dies would leave the leader waiting inside a collective forever, so the
leader watches its followers' sockets and ends the whole process with an error when one
closes; a follower ends when the leader does.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from starcoder_lsp.errors import StarcoderError
from starcoder_lsp.runner import Runner
from starcoder_lsp.steps import to_host

log = logging.getLogger(__name__)

# Exit status of a leader whose follower went away (and of a follower whose leader did).
EXIT_PEER_LOST = 3
_HEADER = struct.Struct("!I")


class MultihostError(StarcoderError):
    """The processes of a multi-host server cannot start or have lost each other."""


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """jax.distributed.initialize, with CPU collectives where the devices are CPUs (the
    tests, and hosts without accelerators). Arguments left None are read by JAX from the
    environment, as on TPU VMs."""
    # Collectives between CPU devices of several processes go through gloo; GPUs and TPUs
    # have their own, and this setting does not touch them.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    except (RuntimeError, ValueError) as e:
        raise MultihostError(f"cannot join the processes at {coordinator}: {e}") from None


# --- the side channel -------------------------------------------------------------------------


def _send(sock: socket.socket, message: Any) -> None:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER.pack(len(body)) + body)


def _receive(sock: socket.socket) -> Any:
    header = _read_exactly(sock, _HEADER.size)
    (length,) = _HEADER.unpack(header)
    return pickle.loads(_read_exactly(sock, length))  # noqa: S301 (our own leader's calls)


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(left)
        if not chunk:
            raise ConnectionError("the other process closed the side channel")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


# --- the leader --------------------------------------------------------------------------------


class LeaderRunner:
    """The leader's runner: each call goes to every follower before it runs here. It has the
    Runner's interface, so the Engine drives it as it drives a Runner."""

    def __init__(
        self, runner: Runner, followers: Sequence[socket.socket], on_lost: Callable[[], None]
    ) -> None:
        self._runner = runner
        self._followers = list(followers)
        self._lock = threading.Lock()
        self.broadcast_seconds = 0.0
        self.calls = 0
        for follower in self._followers:
            threading.Thread(
                target=self._watch, args=(follower, on_lost), name="follower-watch", daemon=True
            ).start()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def _call(self, name: str, args: tuple) -> None:
        start = time.perf_counter()
        message = (name, tuple(_host_args(args)))
        with self._lock:
            for follower in self._followers:
                try:
                    _send(follower, message)
                except OSError as e:
                    raise MultihostError(f"a follower is gone ({e})") from None
        self.broadcast_seconds += time.perf_counter() - start
        self.calls += 1

    def warmup(self, progress: Any = None) -> jax.Array:
        self._call("warmup", ())
        return self._runner.warmup(progress)

    def new_cache(self) -> jax.Array:
        self._call("new_cache", ())
        return self._runner.new_cache()

    def prefill(self, cache: jax.Array, *args: Any) -> Any:
        self._call("prefill", args)
        return self._runner.prefill(cache, *args)

    def decode(self, cache: jax.Array, *args: Any) -> Any:
        self._call("decode", args)
        return self._runner.decode(cache, *args)

    def decode_steps(self, cache: jax.Array, *args: Any) -> Any:
        self._call("decode_steps", args)
        return self._runner.decode_steps(cache, *args)

    def verify(self, cache: jax.Array, *args: Any) -> Any:
        self._call("verify", args)
        return self._runner.verify(cache, *args)

    def sample(self, logits: jax.Array, *args: Any) -> np.ndarray:
        self._call("sample", args)
        return self._runner.sample(logits, *args)

    def close(self) -> None:
        with self._lock:
            for follower in self._followers:
                try:
                    _send(follower, ("close", ()))
                    follower.close()
                except OSError:
                    pass
            self._followers = []

    def _watch(self, follower: socket.socket, on_lost: Callable[[], None]) -> None:
        """A follower sends nothing: the socket reading EOF means it is gone."""
        try:
            while follower.recv(1):
                pass
        except OSError:
            pass
        if self._followers:  # not closed by us
            log.info("%s", self.report())
            on_lost()

    def report(self) -> str:
        each = self.broadcast_seconds / self.calls * 1e6 if self.calls else 0.0
        return f"side channel: {self.calls} calls sent, {each:.0f} µs each on average"


class _Device(tuple):
    """A device array sent as its host value (a PRNG key): rebuilt as a device array."""


def _host_args(args: tuple) -> list:
    """Arguments as the followers can rebuild them: device arrays (the keys) as numpy."""
    out = []
    for arg in args:
        if isinstance(arg, jax.Array):
            out.append(_Device((to_host(arg),)))
        elif isinstance(arg, range):
            out.append(list(arg))
        else:
            out.append(arg)
    return out


def _rebuild(args: Sequence) -> list:
    return [jax.numpy.asarray(a[0]) if isinstance(a, _Device) else a for a in args]


def accept_followers(port: int, count: int, timeout: float = 600) -> list[socket.socket]:
    """The leader's end: wait for `count` followers to connect to the side channel."""
    listener = socket.create_server(("0.0.0.0", port))
    listener.settimeout(timeout)
    followers = []
    try:
        while len(followers) < count:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                raise MultihostError(
                    f"{len(followers)} of {count} followers connected within {timeout:.0f} s"
                ) from None
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            followers.append(conn)
    finally:
        listener.close()
    return followers


# --- a follower ------------------------------------------------------------------------------


def _connect(leader: tuple[str, int], timeout: float) -> socket.socket:
    """The side channel, tried until the leader opens it: it does so once its own model is
    loaded, which may take longer than this process's (a follower that gave up at once left
    the leader waiting for it)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection(leader, timeout=timeout)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise MultihostError(
                    f"the leader's side channel at {leader[0]}:{leader[1]} did not open "
                    f"within {timeout:.0f} s"
                ) from None
            time.sleep(0.2)


def follow(runner: Runner, leader: tuple[str, int], timeout: float = 600) -> int:
    """Run the leader's calls on this process until the leader closes; the exit status."""
    sock = _connect(leader, timeout)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    cache, logits = None, None
    log.info("following the leader at %s:%d", *leader)
    while True:
        try:
            name, args = _receive(sock)
        except (ConnectionError, OSError):
            log.error("the leader is gone")
            return EXIT_PEER_LOST
        args = _rebuild(args)
        if name == "close":
            return 0
        if name == "warmup":
            cache = runner.warmup()
        elif name == "new_cache":
            cache = runner.new_cache()
        elif name == "prefill":
            logits, cache, _ = runner.prefill(cache, *args)
        elif name == "decode":
            logits, cache = runner.decode(cache, *args)
        elif name == "decode_steps":
            _, cache = runner.decode_steps(cache, *args)
        elif name == "verify":
            _, _, cache = runner.verify(cache, *args)
        elif name == "sample":
            runner.sample(logits, *args)
        else:
            raise MultihostError(f"the leader asked for {name!r}, which followers do not know")


# --- the processes of a server -----------------------------------------------------------------


def side_channel(coordinator: str, port: int | None) -> tuple[str, int]:
    """Where followers reach the leader: the coordinator's host, on `port` (default: the
    coordinator's port + 1)."""
    host, _, coordinator_port = coordinator.rpartition(":")
    if not host or not coordinator_port.isdigit():
        raise MultihostError(f"--coordinator {coordinator!r} is not HOST:PORT")
    return host, port if port is not None else int(coordinator_port) + 1


def leader_runner(port: int, on_lost: Callable[[str], None]) -> Callable[[Runner], Runner]:
    """How the leader wraps its runner, once every follower has connected."""

    def wrap(runner: Runner) -> Runner:
        followers = accept_followers(port, jax.process_count() - 1)
        log.info("%d followers joined", len(followers))
        return LeaderRunner(runner, followers, lambda: on_lost("a follower process is gone"))

    return wrap


def abort_soon(reason: str, seconds: float = 2.0) -> None:
    """End this process with EXIT_PEER_LOST after `seconds`: a collective waiting for a lost
    process never returns, so there is nothing to wait for but the replies to flush."""
    log.error("%s: stopping in %.0f s", reason, seconds)
    timer = threading.Timer(seconds, lambda: os._exit(EXIT_PEER_LOST))
    timer.daemon = True
    timer.start()
