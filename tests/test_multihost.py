"""A server over two processes: JAX's multi-controller runtime on this machine, a loopback
coordinator, 4 CPU devices in each process and one 2x4 mesh across both."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from lsp_wire import WireClient

SERVE = [sys.executable, "-m", "starcoder_lsp", "serve", "--compilation-cache", "off"]
BEFORE = "import os\n\n\ndef walk(root):\n    for path in os.listdir(root):\n"
TYPED = "        if path.endswith('.py'):"
URI = "file:///work/walk.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(model: Path, log: Path, devices: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.Popen(
        [*SERVE, "--model", str(model), "--mesh", "2x4", *extra],
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
        env=env,
    )


def _port(process: subprocess.Popen, log: Path) -> int:
    line = process.stdout.readline()
    if "listening on" not in line:
        process.kill()
        raise AssertionError(f"the server did not start: {line!r}\n{log.read_text()}")
    return int(line.split()[3].rsplit(":", 1)[1])


async def _replay(port: int) -> list[str]:
    """Type a stretch one character at a time, asking for a suggestion at each keystroke."""
    client = await WireClient.tcp(port)
    reply = await client.initialize({"multiline": "never", "maxNewTokens": 6})
    assert "result" in reply, reply
    await client.wait_ready(300)
    await client.open(URI, BEFORE)
    suggestions = []
    for n in range(1, len(TYPED) + 1):
        text = BEFORE + TYPED[:n]
        await client.notify(
            "textDocument/didChange",
            {"textDocument": {"uri": URI, "version": n + 1}, "contentChanges": [{"text": text}]},
        )
        lines = text.split("\n")
        answer = await client.inline(URI, len(lines) - 1, len(lines[-1]), timeout=120)
        assert "result" in answer, answer
        items = answer["result"]["items"]
        suggestions.append(items[0]["insertText"] if items else "")
    await client.close()
    return suggestions


async def test_two_processes_suggest_what_one_does_and_stop_when_one_dies(
    tiny_mqa_dir: Path, tmp_path: Path
) -> None:
    single = _start(tiny_mqa_dir, tmp_path / "single.log", 8, "--tcp", "--port", "0")
    try:
        expected = await _replay(_port(single, tmp_path / "single.log"))
    finally:
        single.terminate()
        single.wait(30)
    assert any(expected), "the model suggested nothing: the comparison would mean little"

    coordinator = f"127.0.0.1:{_free_port()}"
    join = ["--coordinator", coordinator, "--num-processes", "2"]
    leader = _start(
        tiny_mqa_dir, tmp_path / "leader.log", 4, "--tcp", "--port", "0", *join, "--process-id", "0"
    )
    follower = _start(tiny_mqa_dir, tmp_path / "follower.log", 4, *join, "--process-id", "1")
    try:
        port = _port(leader, tmp_path / "leader.log")
        try:
            assert await _replay(port) == expected
        except BaseException:
            for name in ("leader.log", "follower.log"):  # what each process did, to see why
                print(f"--- {name}\n{(tmp_path / name).read_text()[-4000:]}", file=sys.stderr)
            raise

        # A follower that dies: the leader answers with errors, then ends, within seconds.
        client = await WireClient.tcp(port)
        await client.initialize({})
        await client.open(URI, BEFORE)
        follower.kill()
        follower.wait(30)
        started = time.monotonic()
        answer = await client.inline(URI, 5, 0, timeout=30)
        assert "error" in answer or answer["result"]["items"] == [], answer
        assert leader.wait(30) != 0
        assert time.monotonic() - started < 15
        log = (tmp_path / "leader.log").read_text()
        assert "a follower process is gone" in log
        # The side channel's cost per call, for the README.
        print(next(line for line in log.splitlines() if "side channel" in line), file=sys.stderr)
    finally:
        for process in (leader, follower):
            if process.poll() is None:
                process.kill()


def test_a_follower_waits_for_the_leader_to_open_its_side_channel() -> None:
    """The leader opens the side channel once its model is loaded, which may be after the
    follower has loaded its own: the follower keeps trying rather than exit (and leave the
    leader waiting for it)."""
    import threading

    from starcoder_lsp import multihost

    port = _free_port()
    status: list[int] = []
    follower = threading.Thread(
        target=lambda: status.append(multihost.follow(None, ("127.0.0.1", port), 30))
    )
    follower.start()
    time.sleep(1.0)  # the follower's first tries are refused
    with socket.create_server(("127.0.0.1", port)) as listener:
        listener.settimeout(10)  # a follower that gave up never comes: fail, not hang
        connection, _ = listener.accept()
        with connection:
            multihost._send(connection, ("close", []))
            follower.join(30)
    assert status == [0]
