"""Load: N editors typing at once against one `starcoder-lsp serve --tcp` process.

    python benchmarks/load_bench.py --model models/tiny_starcoder_py --clients 1,4,16

Each client is pygls' LanguageClient on its own TCP connection. It opens a Python
standard-library file (a different one per client) with a stretch removed, then types the
stretch back one character at a time (didChange, incremental) and, every --request-every
keystrokes, asks for an inline completion and waits for it before typing on: a closed loop,
so the latency is keystroke-to-suggestion and the throughput is what the server sustains.
All client counts run against the same server process, one after another, and print one table.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import sysconfig
import time
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


@dataclass
class Run:
    clients: int
    latencies: list[float] = field(default_factory=list)
    shown: int = 0
    errors: int = 0
    seconds: float = 0.0

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


def request(uri: str, text: str) -> types.InlineCompletionParams:
    return types.InlineCompletionParams(
        text_document=types.TextDocumentIdentifier(uri=uri),
        position=position(text),
        context=types.InlineCompletionContext(
            trigger_kind=types.InlineCompletionTriggerKind.Automatic
        ),
    )


async def client_session(port: int, index: int, args: argparse.Namespace, run: Run) -> None:
    client = LanguageClient("load-bench", "1")
    await client.start_tcp("127.0.0.1", port)
    options = {"maxNewTokens": args.max_new_tokens, "multiline": "auto"}
    await client.initialize_async(
        types.InitializeParams(
            capabilities=types.ClientCapabilities(), initialization_options=options
        )
    )
    client.initialized(types.InitializedParams())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    before, typed, after = stretch(
        stdlib / FILES[index % len(FILES)], args.context_chars, args.keys
    )
    uri = f"file:///load/{index}/{FILES[index % len(FILES)]}"
    client.text_document_did_open(
        types.DidOpenTextDocumentParams(
            types.TextDocumentItem(uri=uri, language_id="python", version=1, text=before + after)
        )
    )
    text = before
    for version, char in enumerate(typed, start=2):
        at = position(text)
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
        if (version - 1) % args.request_every:
            continue
        started = time.perf_counter()
        try:
            answer = await client.text_document_inline_completion_async(request(uri, text))
        except Exception as e:  # counted, and typing goes on as in an editor
            print(f"client {index}: {e}", file=sys.stderr)
            run.errors += 1
            continue
        run.latencies.append(time.perf_counter() - started)
        run.shown += bool(answer and answer.items)
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
    await wait_ready(port, timeout=1800)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
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
    args = parser.parse_args()
    args.clients = [int(n) for n in args.clients.split(",")]

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
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = server.stdout.readline()
        port = int(line.split()[3].rsplit(":", 1)[1])
        runs = asyncio.run(measure(port, args))
    finally:
        server.terminate()
        server.wait()

    print(
        f"\nmodel {args.model}; {args.keys} keys per client, a request every "
        f"{args.request_every}; {args.max_new_tokens} new tokens at most; "
        f"{args.cache_slots} cache slots\n"
    )
    print("| clients | requests | p50 (ms) | p95 (ms) | max (ms) | throughput/s | shown | errors |")
    print(
        "|--------:|---------:|---------:|---------:|---------:|--------------:|------:|-------:|"
    )
    for run in runs:
        print(run.row())


if __name__ == "__main__":
    main()
