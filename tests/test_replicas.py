"""More users than one host serves: independent replicas behind a TCP load balancer.

Two `starcoder-lsp serve --tcp --health-port 0` replicas on a random checkpoint, behind
Debian's HAProxy on loopback with the configuration of the README's "Replicas behind a load
balancer" (mode tcp, leastconn, `option httpchk GET /health`). Clients through the balancer are
spread over both and all served. Then the replica the editors are on is killed: the Neovim
plugin (on 0.7.2 and 0.11.4) and the VS Code extension (in a real VS Code, driven as
tests/test_vscode_real.py drives it) say "reconnecting", reconnect through the balancer to the
other replica once it takes them, and show suggestions again: their documents and settings
(the token among them, without which the replica would refuse them) went again.

./setup.sh installs HAProxy (Debian's `haproxy`) with the editors' packages."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from lsp_wire import WireClient
from nvim_headless import VERSIONS
from test_nvim_plugin import CURSOR, PROGRAM, STATUS, Editor, running_editor, wait_for
from test_vscode_real import CODE_SERVER, E2E, NODE, SPDLOG
from test_vscode_real import PROGRAM as VSCODE_PROGRAM
from test_vscode_real import SETTINGS as VSCODE_SETTINGS

SERVER = [sys.executable, "-m", "starcoder_lsp", "serve", "--log-level", "INFO"]
TOKEN = "replica-token"  # replicas that listen off loopback need one; the editors must resend it
SPREAD_CLIENTS = 4

README = Path(__file__).resolve().parent.parent / "README.md"


def haproxy_config(admin: Path, port: int, replicas: list[Replica]) -> str:
    """The README's HAProxy example (under "Replicas behind a load balancer"), run as it is but
    for the addresses: loopback, the ports chosen here, and health checks every 300 ms (the
    README's: every 2 s) so that the test need not wait for them."""
    example = re.search(r"```\n(defaults\n.*?)```", README.read_text(), re.S)
    assert example, "README.md has no HAProxy example"
    config = example.group(1)
    for old, new in (
        ("    bind :2087\n", f"    bind 127.0.0.1:{port}\n"),
        (
            "    default-server check port 2088 inter 2s fall 2 rise 1\n",
            "    default-server inter 300ms fall 1 rise 1\n",
        ),
    ):
        assert old in config, f"the README's example has changed: {old!r} is not in it"
        config = config.replace(old, new)
    config = re.sub(r"    server gpu.*\n", "", config)
    servers = "".join(
        f"    server {r.name} 127.0.0.1:{r.port} check port {r.health_port}\n" for r in replicas
    )
    return f"global\n    stats socket {admin} level admin\n\n{config}{servers}"


@dataclass
class Replica:
    name: str
    process: subprocess.Popen
    port: int
    health_url: str
    log: Path

    @property
    def health_port(self) -> int:
        return int(self.health_url.rsplit(":", 1)[1].split("/")[0])

    def health(self) -> int:
        """The status of GET /health, 0 if it does not answer."""
        connection = http.client.HTTPConnection("127.0.0.1", self.health_port, timeout=2)
        try:
            connection.request("GET", "/health")
            return connection.getresponse().status
        except OSError:
            return 0
        finally:
            connection.close()

    def stats(self) -> dict[str, Any]:
        """starcoder/stats, asked directly (not through the balancer): the totals are the
        replica's, the rest this connection's own."""

        async def ask() -> dict[str, Any]:
            client = await WireClient.tcp(self.port)
            try:
                assert "result" in await client.initialize({"token": TOKEN})
                return (await client.request("starcoder/stats"))["result"]
            finally:
                await client.close()

        return asyncio.run(ask())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_replica(name: str, model: Path, directory: Path) -> Replica:
    log = directory / f"{name}.log"
    process = subprocess.Popen(
        [
            *SERVER,
            "--tcp",
            "--port",
            "0",
            "--health-port",
            "0",
            "--model",
            str(model),
        ],
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
        env={**os.environ, "STARCODER_LSP_TOKEN": TOKEN},
    )
    assert process.stdout is not None
    health, listening = process.stdout.readline(), process.stdout.readline()
    if "health check on" not in health or "listening on" not in listening:
        process.kill()
        raise AssertionError(f"{name} did not start: {health!r} {listening!r}\n{log.read_text()}")
    port = int(listening.split()[3].rsplit(":", 1)[1])
    return Replica(name, process, port, health.split()[-1], log)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Balancer:
    """HAProxy in front of the replicas, with its admin socket to take one out and back."""

    def __init__(self, replicas: list[Replica], directory: Path) -> None:
        # Debian puts it in /usr/sbin, on root's PATH only.
        haproxy = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
        if haproxy is None:
            pytest.fail("HAProxy is not installed: ./setup.sh installs Debian's haproxy")
        self.admin_socket = directory / "haproxy.sock"
        self.port = free_port()
        config = directory / "haproxy.cfg"
        config.write_text(haproxy_config(self.admin_socket, self.port, replicas))
        self.log = directory / "haproxy.log"
        self.process = subprocess.Popen(
            [haproxy, "-f", str(config), "-db"],
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
        )
        wait_for("HAProxy's admin socket", self.admin_socket.exists, 10)

    def admin(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.admin_socket))
            s.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def states(self) -> dict[str, str]:
        """Each replica's state as HAProxy sees it: UP, DOWN, MAINT, ..."""
        rows = csv.DictReader(io.StringIO(self.admin("show stat").lstrip("# ")))
        return {
            row["svname"]: row["status"]
            for row in rows
            if row["pxname"] == "replicas" and row["svname"] != "BACKEND"
        }

    def set_state(self, replica: Replica, state: str) -> None:
        """`ready`, or `maint`: no new connections (those it has stay)."""
        assert self.admin(f"set server replicas/{replica.name} state {state}").strip() == ""

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@dataclass
class Cluster:
    replicas: list[Replica]
    balancer: Balancer


@pytest.fixture(scope="module")
def cluster(tiny_mqa_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    directory = tmp_path_factory.mktemp("replicas")
    replicas: list[Replica] = []
    balancer = None
    try:
        for name in ("r1", "r2"):
            replicas.append(start_replica(name, tiny_mqa_dir, directory))
        # The health checks say 503 while a replica loads and compiles, then 200.
        for replica in replicas:
            assert replica.health() in (503, 200)
        balancer = Balancer(replicas, directory)
        # Until its first check fails, HAProxy counts a server up: ask the replicas too.
        wait_for(
            "both replicas ready, and up behind the balancer",
            lambda: (
                all(replica.health() == 200 for replica in replicas)
                and balancer.states() == {"r1": "UP", "r2": "UP"}
            ),
            timeout=240,
        )
        yield Cluster(replicas, balancer)
    finally:
        if balancer is not None:
            balancer.stop()
        for replica in replicas:
            replica.stop()


async def type_until_served(client: WireClient, name: str) -> int:
    """Opens a document and types into it until the replica suggests something; returns how
    many inline completion requests that took."""
    uri = f"file:///spread/{name}.py"
    text = PROGRAM
    await client.open(uri, text)
    for count, key in enumerate("rxyzqwvk", start=1):
        text += key
        line = text.split("\n")[CURSOR[0]]
        change = {
            "textDocument": {"uri": uri, "version": count + 1},
            "contentChanges": [{"text": text}],
        }
        await client.notify("textDocument/didChange", change)
        reply = await client.inline(uri, CURSOR[0], len(line))
        items = reply["result"]["items"] if isinstance(reply["result"], dict) else reply["result"]
        if items and items[0]["insertText"]:
            return count
    raise AssertionError(f"no suggestion for {name}")


def test_clients_are_spread_over_both_replicas_and_all_served(cluster: Cluster) -> None:
    before = {r.name: r.stats()["totals"]["requests"] for r in cluster.replicas}

    async def spread() -> list[int]:
        # All connected first: leastconn gives each new one to the replica with fewer.
        clients = [await WireClient.tcp(cluster.balancer.port) for _ in range(SPREAD_CLIENTS)]
        try:
            for client in clients:
                reply = await client.initialize({"token": TOKEN, "multiline": "always"})
                assert "result" in reply, reply
            return await asyncio.gather(
                *(type_until_served(c, f"client{i}") for i, c in enumerate(clients))
            )
        finally:
            for client in clients:
                await client.close()

    requests = asyncio.run(spread())
    served = {r.name: r.stats()["totals"]["requests"] - before[r.name] for r in cluster.replicas}
    assert sum(served.values()) == sum(requests), (served, requests)
    assert all(count > 0 for count in served.values()), f"one replica served nobody: {served}"


@pytest.fixture(scope="module")
def vsix(vscode_vsix: Path) -> Path:
    """The packaged extension, and the real VS Code test_vscode_real.py runs it in."""
    for path, what in ((NODE, "Node 24"), (CODE_SERVER, "code-server"), (SPDLOG, "its log writer")):
        if not path.exists():
            pytest.fail(f"{what} is not installed ({path}): ./setup.sh installs it")
    return vscode_vsix


class VSCode:
    """A real VS Code with the extension set to reach the balancer, driven through
    editors/vscode/e2e/drive.mjs's "reconnect" flow, which marks its progress in a folder."""

    def __init__(self, vsix: Path, port: int, directory: Path) -> None:
        chromium = shutil.which("chromium")
        if chromium is None:
            pytest.fail("Chromium is not installed: ./setup.sh installs Debian's")
        self.directory = directory
        workspace, self.user_data = directory / "workspace", directory / "user-data"
        self.markers = directory / "markers"
        for folder in (workspace, self.user_data / "User", self.markers):
            folder.mkdir(parents=True)
        (workspace / "greeting.py").write_text(VSCODE_PROGRAM)
        settings = {
            **VSCODE_SETTINGS,
            "starcoder.remote.host": "127.0.0.1",
            "starcoder.remote.port": port,
            "starcoder.remote.token": TOKEN,
        }
        (self.user_data / "User" / "settings.json").write_text(json.dumps(settings, indent=2))
        self.screenshots = Path(
            os.environ.get("STARCODER_TEST_SCREENSHOTS") or directory / "screenshots"
        )
        self.screenshots.mkdir(parents=True, exist_ok=True)
        self.results_file = directory / "results.json"
        config = {
            "flow": "reconnect",
            "markers": str(self.markers),
            "codeServer": str(CODE_SERVER),
            "vsix": str(vsix),
            "userDataDir": str(self.user_data),
            "extensionsDir": str(directory / "extensions"),
            "workspace": str(workspace),
            "screenshots": str(self.screenshots),
            "results": str(self.results_file),
            "chromium": chromium,
        }
        (directory / "config.json").write_text(json.dumps(config))
        self.output = (directory / "driver.log").open("w+")
        self.process = subprocess.Popen(
            [str(NODE), str(E2E / "drive.mjs"), str(directory / "config.json")],
            stdout=self.output,
            stderr=subprocess.STDOUT,
        )

    def failure(self) -> str:
        self.output.seek(0)
        results = self.results_file.read_text() if self.results_file.exists() else "{}"
        return f"{self.output.read()}\nresults: {results}\nscreenshots: {self.screenshots}"

    def wait_mark(self, name: str, timeout: float) -> None:
        def marked() -> bool:
            if (self.markers / name).exists():
                return True
            assert self.process.poll() is None, f"the VS Code driver ended:\n{self.failure()}"
            return False

        wait_for(f"VS Code: {name}", marked, timeout)

    def finish(self, timeout: float) -> dict[str, Any]:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
        assert self.process.returncode == 0, self.failure()
        return json.loads(self.results_file.read_text())

    def output_channel(self) -> list[str]:
        pattern = "logs/*/exthost*/starcoder-lsp.starcoder-lsp/StarCoder.log"
        return [
            line for path in self.user_data.glob(pattern) for line in path.read_text().splitlines()
        ]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        # code-server (the driver ends it, unless the driver itself was killed)
        with contextlib.suppress(OSError, ValueError):
            os.killpg(int((self.user_data / "code-server.pid").read_text()), signal.SIGTERM)
        self.output.close()


def status_is(editor: Editor, status: str) -> Callable[[], bool]:
    return lambda: editor.lua(STATUS) == status


def test_editors_reconnect_through_the_balancer_when_their_replica_dies(
    cluster: Cluster, vsix: Path, tmp_path: Path
) -> None:
    first, second = cluster.replicas
    balancer = cluster.balancer
    # Every editor connects to the first replica: the second takes no new connection for now.
    balancer.set_state(second, "maint")
    options = {"host": "127.0.0.1", "port": balancer.port, "token": TOKEN}
    with contextlib.ExitStack() as stack:
        vscode = VSCode(vsix, balancer.port, tmp_path / "vscode")  # the slowest to start: first
        stack.callback(vscode.close)
        editors: dict[str, Editor] = {}
        for version in VERSIONS:
            workspace = tmp_path / version
            workspace.mkdir()
            editors[version] = stack.enter_context(running_editor(workspace, options, version))
        client_ids = {}
        for version, editor in editors.items():
            wait_for(f"{version}: the status ready", status_is(editor, "ready"), 10)
            editor.open("remote.py", PROGRAM)
            editor.insert_at(*CURSOR)
            editor.type_until_suggestion("rxyzq")
            client_ids[version] = editor.lua("return require('starcoder.client').get().id")
        vscode.wait_mark("suggested", 180)
        served_before = second.stats()["totals"]["requests"]

        first.process.send_signal(signal.SIGKILL)
        first.process.wait(10)
        # Nothing to reconnect to yet: each editor says so, and keeps trying.
        for version, editor in editors.items():
            wait_for(f"{version}: reconnecting", status_is(editor, "reconnecting"), 10)
        vscode.wait_mark("reconnecting", 30)
        time.sleep(1)  # a few more tries, closed by the balancer
        assert all(editor.lua(STATUS) == "reconnecting" for editor in editors.values())

        balancer.set_state(second, "ready")
        for version, editor in editors.items():
            wait_for(f"{version}: ready again", status_is(editor, "ready"), 30)
            new_id = editor.lua("return require('starcoder.client').get().id")
            assert new_id != client_ids[version]
            # The buffer was attached again: its text went to the new replica (didOpen).
            assert editor.lua("return require('starcoder.client').for_buffer(0) ~= nil")
            editor.type_until_suggestion("abcdefgh")
            messages = editor.nvim.command_output("messages")
            assert "quit with exit code" not in messages, messages
            assert "Could not connect" not in messages, messages
            assert "rror" not in messages, messages

        results = vscode.finish(120)
        where = f"(screenshots: {vscode.screenshots})"
        assert results["reconnecting"] == "StarCoder: reconnecting", where
        assert results["reconnected"] == "StarCoder: ready", where
        assert results["after"]["ghost"], where
        assert results["restarted"]["ghost"], where  # and after "Restart the server"
        assert not [n for n in results["notifications"] if "rror" in n or "couldn't" in n], results
        # What the output channel says: the drop, and no error.
        output = vscode.output_channel()
        assert any("ended; reconnecting" in line for line in output), output
        assert not any("[error]" in line for line in output), output
        # The suggestions after the drop came from the second replica.
        assert second.stats()["totals"]["requests"] > served_before
