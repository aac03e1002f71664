"""Load: N editors typing at once against one `starcoder-lsp serve --tcp` process.

    python benchmarks/load_bench.py --model models/tiny_starcoder_py --clients 1,4,16
    python benchmarks/load_bench.py --model models/tiny_starcoder_py --scenarios fairness,churn

Each client is pygls' LanguageClient on its own TCP connection. It opens a Python
standard-library file (a different one per client) with a stretch removed, then types the
stretch back one character at a time (didChange, incremental) and, every --request-every
keystrokes, asks for an inline completion and waits for it before typing on: a closed loop,
so the latency is keystroke-to-suggestion and the throughput is what the server sustains.

Scenarios (--scenarios, run one after another against the same server process):

- load: 1, then 4, then 16 typing clients (--clients); one row each.
- fairness: one typing client alone, then the same while a second client floods the queue
  (--flood requests in flight at all times, long completions, each on its own file) and a
  third types into a --big-mb document (20 MB by default); the typist's latency with them
  against alone is what the server's fairness is worth (issue 21 asks for at most 3×).
- churn: --churn-rounds rounds of --churn-clients clients that connect, type, and
  disconnect; the server's resident memory (RSS) before the first and after each round.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from lsprotocol import types
from pygls.lsp.client import LanguageClient

# Large, plain Python modules: each client types into a different one.
FILES = (
    "argparse.py",
    "typing.py",
    "inspect.py",
    "pathlib.py",
    "tarfile.py",
    "ast.py",
    "subprocess.py",
    "dataclasses.py",
    "configparser.py",
    "logging/__init__.py",
    "shutil.py",
    "ssl.py",
    "difflib.py",
    "pydoc.py",
    "threading.py",
    "pickle.py",
    "enum.py",
    "textwrap.py",
)


STDLIB = Path(sysconfig.get_paths()["stdlib"])


@dataclass
class Run:
    clients: int
    latencies: list[float] = field(default_factory=list)
    shown: int = 0
    errors: int = 0
    seconds: float = 0.0

    def percentiles(self) -> tuple[float, float, float]:
        ms = np.array(self.latencies) * 1000
        return float(np.median(ms)), float(np.percentile(ms, 95)), float(ms.max())

    def row(self) -> str:
        ms = np.array(self.latencies) * 1000
        n = len(self.latencies)
        return (
            f"| {self.clients:>7} | {n:>8} | {np.median(ms):>8.0f} |"
            f" {np.percentile(ms, 95):>8.0f} | {ms.max():>8.0f} | {n / self.seconds:>13.2f} |"
            f" {self.shown / max(n, 1):>6.0%} |"
            f" {self.errors:>6} |"
        )


def stretch(path: Path, context_chars: int, keys: int) -> tuple[str, str, str]:
    """(before, typed, after): the typed stretch starts at a line start after the context."""
    text = path.read_text()
    start = text.index("\n", min(context_chars, len(text) - keys - 1)) + 1
    return text[:start], text[start : start + keys], text[start + keys :]


def position(text: str) -> types.Position:
    """LSP position (UTF-16 units) of the end of `text`."""
    line = text.count("\n")
    last = text[text.rfind("\n") + 1 :]
    return types.Position(line=line, character=len(last.encode("utf-16-le")) // 2)


def request(uri: str, at: types.Position) -> types.InlineCompletionParams:
    return types.InlineCompletionParams(
        text_document=types.TextDocumentIdentifier(uri=uri),
        position=at,
        context=types.InlineCompletionContext(
            trigger_kind=types.InlineCompletionTriggerKind.Automatic
        ),
    )


async def start_client(port: int, options: dict) -> LanguageClient:
    client = LanguageClient("load-bench", "1")
    await client.start_tcp("127.0.0.1", port)
    await client.initialize_async(
        types.InitializeParams(
            capabilities=types.ClientCapabilities(), initialization_options=options
        )
    )
    client.initialized(types.InitializedParams())
    return client


def open_document(client: LanguageClient, uri: str, text: str) -> None:
    client.text_document_did_open(
        types.DidOpenTextDocumentParams(
            types.TextDocumentItem(uri=uri, language_id="python", version=1, text=text)
        )
    )


async def type_stretch(
    client: LanguageClient,
    uri: str,
    before: str,
    typed: str,
    request_every: int,
    run: Run,
    name: str,
    line_of: Callable[[str], types.Position] | None = None,
) -> None:
    """Type `typed` after `before` one character at a time, asking for a completion every
    `request_every` keystrokes and waiting for it; latencies go to `run`."""
    where = line_of or position
    text = before
    for version, char in enumerate(typed, start=2):
        at = where(text)
        client.text_document_did_change(
            types.DidChangeTextDocumentParams(
                text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
                content_changes=[
                    types.TextDocumentContentChangePartial(
                        range=types.Range(start=at, end=at), text=char
                    )
                ],
            )
        )
        text += char
        if (version - 1) % request_every:
            continue
        started = time.perf_counter()
        try:
            answer = await client.text_document_inline_completion_async(request(uri, where(text)))
        except Exception as e:  # counted, and typing goes on as in an editor
            print(f"{name}: {e}", file=sys.stderr)
            run.errors += 1
            continue
        run.latencies.append(time.perf_counter() - started)
        run.shown += bool(answer and answer.items)


async def client_session(
    port: int, index: int, args: argparse.Namespace, run: Run, cold: Run | None = None
) -> None:
    """Open a file and type into it; with `cold`, first ask for a completion where typing
    starts, timed apart: the first prompt of a file is prefilled whole, every keystroke after
    it only extends it."""
    options = {"maxNewTokens": args.max_new_tokens, "multiline": "auto"}
    client = await start_client(port, options)
    name = FILES[index % len(FILES)]
    before, typed, after = stretch(STDLIB / name, args.context_chars, args.keys)
    if getattr(args, "after_chars", None) is not None:  # churn: short files, quick prompts
        after = after[: args.after_chars]
        before = before[before.index("\n", max(0, len(before) - args.context_chars)) + 1 :]
    uri = f"file:///load/{index}/{name}"
    open_document(client, uri, before + after)
    if cold is not None:
        started = time.perf_counter()
        await client.text_document_inline_completion_async(request(uri, position(before)))
        cold.latencies.append(time.perf_counter() - started)
    await type_stretch(client, uri, before, typed, args.request_every, run, f"client {index}")
    await client.shutdown_async(None)
    client.exit(None)
    await disconnect(client)


async def disconnect(client: LanguageClient) -> None:
    """pygls' stop() waits for the reader, which waits for the socket: close it first."""
    client.protocol.writer.close()
    await client.stop()


async def wait_ready(port: int, timeout: float) -> dict:
    client = LanguageClient("load-bench", "1")
    await client.start_tcp("127.0.0.1", port)
    await client.initialize_async(types.InitializeParams(capabilities=types.ClientCapabilities()))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = await client.protocol.send_request_async("starcoder/stats", None)
        if stats.ready or stats.error:
            break
        await asyncio.sleep(0.5)
    await disconnect(client)
    if not stats.ready:
        raise SystemExit(f"the server is not ready: {stats.error or stats.loading}")
    return stats


async def measure(port: int, args: argparse.Namespace) -> list[Run]:
    runs = []
    for clients in args.clients:
        run = Run(clients)
        started = time.perf_counter()
        await asyncio.gather(*(client_session(port, i, args, run) for i in range(clients)))
        run.seconds = time.perf_counter() - started
        runs.append(run)
        print(
            f"{clients} clients: {len(run.latencies)} requests in {run.seconds:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    return runs


# --- fairness: a typist beside a flood and a 20 MB document --------------------------------


async def flood(port: int, args: argparse.Namespace, stop: asyncio.Event, counts: dict) -> None:
    """Keep --flood long completions in flight, each on its own file, until `stop`."""
    client = await start_client(port, {"maxNewTokens": args.flood_tokens, "multiline": "always"})
    documents = []
    for n, name in enumerate(FILES):
        text = (STDLIB / name).read_text()
        cut = text.index("\n", len(text) // 2) + 1
        uri = f"file:///flood/{n}/{name}"
        open_document(client, uri, text)
        documents.append((uri, text[:cut]))
    pending: set[asyncio.Future] = set()
    sent = 0
    while not stop.is_set():
        while len(pending) < args.flood:
            uri, before = documents[sent % len(documents)]
            future = asyncio.ensure_future(
                client.text_document_inline_completion_async(request(uri, position(before)))
            )
            pending.add(future)
            sent += 1
        done, pending = await asyncio.wait(pending, timeout=0.5, return_when="FIRST_COMPLETED")
        counts["answered"] = counts.get("answered", 0) + len(done)
    counts["sent"] = sent
    for future in pending:
        future.cancel()
    await disconnect(client)


def big_document(megabytes: float) -> str:
    """Standard-library modules, again and again, to `megabytes` of text."""
    pieces, size = [], 0
    while size < megabytes * 2**20:
        for name in FILES:
            text = (STDLIB / name).read_text()
            pieces.append(text)
            size += len(text)
    return "".join(pieces)[: int(megabytes * 2**20)]


async def hold_big(
    port: int, args: argparse.Namespace, stop: asyncio.Event, opened: asyncio.Event, run: Run
) -> None:
    """Open a --big-mb document and type into its middle, asking for completions, until
    `stop`."""
    client = await start_client(port, {"maxNewTokens": args.max_new_tokens, "multiline": "auto"})
    text = big_document(args.big_mb)
    middle = text.index("\n", len(text) // 2) + 1
    uri = "file:///big/big.py"
    open_document(client, uri, text)
    # Positions in a 20 MB text: its lines are counted once; typing adds to them.
    line = text.count("\n", 0, middle)

    def where(sofar: str) -> types.Position:
        last = sofar.rfind("\n", middle)
        start = middle if last < 0 else last + 1
        chars = len(sofar[start:].encode("utf-16-le")) // 2
        return types.Position(line=line + sofar.count("\n", middle), character=chars)

    opened.set()
    typed = text[middle : middle + 10_000]
    before = text[:middle]
    done = 0
    while not stop.is_set() and done < len(typed) - 40:
        await type_stretch(
            client,
            uri,
            before + typed[:done],
            typed[done : done + 40],
            args.request_every,
            run,
            "big",
            where,
        )
        done += 40
    await disconnect(client)


async def fairness(port: int, args: argparse.Namespace) -> list[tuple[str, Run]]:
    """The typist alone, then beside the flood and the big document, then alone again (the
    machine's speed drifts; the two alone runs bracket it)."""
    rows = []
    for turn, (name, index) in enumerate(
        (("typist alone", 0), ("typist beside both", 1), ("typist alone again", 2))
    ):
        stop, opened = asyncio.Event(), asyncio.Event()
        counts: dict = {}
        big = Run(1)
        others = []
        if turn == 1:
            others = [
                asyncio.ensure_future(flood(port, args, stop, counts)),
                asyncio.ensure_future(hold_big(port, args, stop, opened, big)),
            ]
            await opened.wait()
            await asyncio.sleep(args.settle)  # the flood fills the queue, the document lands
        typist, cold = Run(1), Run(1)
        started = time.perf_counter()
        await client_session(port, index, args, typist, cold)
        typist.seconds = time.perf_counter() - started
        stop.set()
        await asyncio.gather(*others)
        print(
            f"{name}: {len(typist.latencies)} keystroke requests in {typist.seconds:.0f} s "
            f"after a first completion in {cold.latencies[0]:.1f} s; latencies (s): "
            f"{[round(t, 2) for t in typist.latencies]}",
            file=sys.stderr,
            flush=True,
        )
        rows += [(name, typist), (f"{name}: its first completion", cold)]
        if turn == 1:
            print(
                f"  the flood sent {counts.get('sent', 0)}, {counts.get('answered', 0)} "
                f"answered; the big document's latencies (s): "
                f"{[round(t, 2) for t in big.latencies]}",
                file=sys.stderr,
                flush=True,
            )
            rows.append((f"typing in the {args.big_mb:g} MB document", big))
    return rows


# --- churn: resident memory across rounds of clients that come and go -------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def churn(port: int, pid: int, args: argparse.Namespace) -> list[tuple[str, float]]:
    churn_args = argparse.Namespace(
        **{
            **vars(args),
            "keys": args.churn_keys,
            "context_chars": args.churn_chars * 3 // 4,
            "after_chars": args.churn_chars // 4,
        }
    )
    await client_session(port, 0, churn_args, Run(1))  # one client first: lazy allocations
    rows = [("before", rss_mb(pid))]
    for round_ in range(1, args.churn_rounds + 1):
        run = Run(args.churn_clients)
        await asyncio.gather(
            *(client_session(port, i, churn_args, run) for i in range(args.churn_clients))
        )
        await asyncio.sleep(1)
        rows.append((f"after round {round_}", rss_mb(pid)))
        print(f"round {round_}: {len(run.latencies)} requests", file=sys.stderr, flush=True)
    return rows


def print_fairness(rows: list[tuple[str, Run]]) -> None:
    alone = rows[0][1].percentiles()
    print("\n| client | requests | p50 (ms) | p95 (ms) | max (ms) | p50 / alone | p95 / alone |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, run in rows:
        if not run.latencies:
            print(f"| {name} | 0 | | | | | |")
            continue
        p50, p95, top = run.percentiles()
        ratios = (
            "| |"
            if "first" in name or "document" in name
            else (f"| {p50 / alone[0]:.2f}× | {p95 / alone[1]:.2f}× |")
        )
        print(f"| {name} | {len(run.latencies)} | {p50:.0f} | {p95:.0f} | {top:.0f} {ratios}")


def print_churn(rows: list[tuple[str, float]]) -> None:
    first = rows[0][1]
    print("\n| server RSS | MB | vs before |")
    print("|---|---:|---:|")
    for name, mb in rows:
        print(f"| {name} | {mb:.0f} | {mb - first:+.0f} |")


async def run_scenarios(port: int, pid: int, args: argparse.Namespace) -> None:
    await wait_ready(port, timeout=1800)
    results = {}
    for scenario in args.scenarios:
        if scenario == "load":
            results[scenario] = await measure(port, args)
        elif scenario == "fairness":
            results[scenario] = await fairness(port, args)
        elif scenario == "churn":
            results[scenario] = await churn(port, pid, args)
    print(
        f"\nmodel {args.model}; {args.keys} keys per client, a request every "
        f"{args.request_every}; {args.max_new_tokens} new tokens at most; "
        f"{args.cache_slots} cache slots"
    )
    if "load" in results:
        print(
            "\n| clients | requests | p50 (ms) | p95 (ms) | max (ms) | throughput/s | shown |"
            " errors |"
        )
        print(
            "|--------:|---------:|---------:|---------:|---------:|--------------:|------:|"
            "-------:|"
        )
        for run in results["load"]:
            print(run.row())
    if "fairness" in results:
        print(
            f"\nfairness: the flood keeps {args.flood} requests of {args.flood_tokens} tokens "
            f"in flight; the big document is {args.big_mb:g} MB"
        )
        print_fairness(results["fairness"])
    if "churn" in results:
        print(
            f"\nchurn: {args.churn_rounds} rounds of {args.churn_clients} clients, "
            f"{args.churn_keys} keys each in {args.churn_chars}-character files"
        )
        print_churn(results["churn"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument(
        "--scenarios", default="load", help="load, fairness, churn, comma-separated (default: load)"
    )
    parser.add_argument(
        "--clients", default="1,4,16", help="client counts, run one after another (default: 1,4,16)"
    )
    parser.add_argument("--keys", type=int, default=40, help="characters each client types")
    parser.add_argument(
        "--request-every", type=int, default=4, help="keystrokes between completion requests"
    )
    parser.add_argument(
        "--context-chars",
        type=int,
        default=6000,
        help="characters of the file before the typed stretch",
    )
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--cache-slots", type=int, default=8)
    parser.add_argument("--flood", type=int, default=50, help="fairness: requests in flight")
    parser.add_argument("--flood-tokens", type=int, default=256, help="fairness: their length")
    parser.add_argument("--big-mb", type=float, default=20, help="fairness: the big document")
    parser.add_argument(
        "--settle", type=float, default=5, help="fairness: seconds before the typist starts"
    )
    parser.add_argument("--churn-rounds", type=int, default=3)
    parser.add_argument("--churn-clients", type=int, default=50)
    parser.add_argument("--churn-keys", type=int, default=8)
    parser.add_argument(
        "--churn-chars", type=int, default=2000, help="churn: characters of each client's file"
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="an extra argument for `starcoder-lsp serve` (repeat it: --server-arg=--flag ...)",
    )
    args = parser.parse_args()
    args.clients = [int(n) for n in args.clients.split(",")]
    args.scenarios = args.scenarios.split(",")

    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "starcoder_lsp",
            "serve",
            "--tcp",
            "--port",
            "0",
            "--model",
            args.model,
            "--cache-slots",
            str(args.cache_slots),
            "--log-level",
            "WARNING",
            *args.server_arg,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = server.stdout.readline()
        port = int(line.split()[3].rsplit(":", 1)[1])
        asyncio.run(run_scenarios(port, server.pid, args))
    finally:
        server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(30)


if __name__ == "__main__":
    main()
