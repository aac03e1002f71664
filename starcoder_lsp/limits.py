"""What one connection may cost the server: the limits, their defaults and their flags.

One server serves many editors, some of them careless or hostile. Each limit is a field of
`Limits`, and `starcoder-lsp serve` has a flag for each (`--max-message-size` for
`max_message_size`), derived from the fields, so a limit cannot exist without its flag or its
help text. The defaults let an editor work normally and keep one connection from holding up
the others; 0 turns a limit off.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

_SIZE = re.compile(r"(\d+)([KMG]?)", re.IGNORECASE)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


def size(text: str) -> int:
    """ "64M" → 67108864; K, M and G are powers of 1024."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 512K, 64M or 1000")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0: no limit)")
    return value


def count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (0: no limit)")
    return int(text)


def limit(default: Any, parse: Any, metavar: str, help: str) -> Any:
    return field(default=default, metadata={"parse": parse, "metavar": metavar, "help": help})


@dataclass(frozen=True)
class Limits:
    # The transport: what a connection may send, and how long it may keep a socket idle.
    max_message_size: int = limit(
        64 * 2**20,
        size,
        "BYTES",
        "largest JSON-RPC message a client may send; a larger one is answered with an error "
        "and its connection closed (default: 64M)",
    )
    handshake_timeout: float = limit(
        10.0,
        seconds,
        "SECONDS",
        "time a new TCP connection has for the TLS handshake and a successful initialize "
        "(default: 10)",
    )
    idle_timeout: float = limit(
        3600.0,
        seconds,
        "SECONDS",
        "an initialized TCP connection that sends nothing for this long is closed "
        "(default: 3600; 0: never)",
    )
    max_connections: int = limit(
        128, count, "N", "TCP connections served at once; more are closed at once (default: 128)"
    )
    max_auth_failures: int = limit(
        10,
        count,
        "N",
        "wrong tokens an address may send per minute; after that its connections are closed "
        "before they are read (default: 10)",
    )
    # The documents and requests of one connection.
    max_document_size: int = limit(
        32 * 2**20,
        size,
        "CHARS",
        "largest document kept, in characters; requests for a larger one get an error "
        "that says so (default: 32M)",
    )
    max_in_flight_per_connection: int = limit(
        8,
        count,
        "N",
        "completion requests of one connection being served at once; past that, nothing "
        "more is read from it until one is answered (default: 8)",
    )
    max_queued_per_connection: int = limit(
        4,
        count,
        "N",
        "completion requests of one connection waiting for the model; a newer one "
        "supersedes the oldest (default: 4)",
    )
    max_rows_per_connection: int = limit(
        2,
        count,
        "N",
        "cache slots one connection decodes in at once; the others wait their turn, "
        "connections taking turns (default: 2)",
    )
    prefill_chunk: int = limit(
        64,
        count,
        "TOKENS",
        "prompt tokens prefilled at a time while other requests run, so that a long prompt "
        "does not stall their suggestions (default: 64)",
    )
    apply_edit_timeout: float = limit(
        30.0,
        seconds,
        "SECONDS",
        "how long generateDocstring waits for the editor to answer workspace/applyEdit "
        "(default: 30)",
    )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Limits:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def flag(name: str) -> str:
    """max_message_size → --max-message-size."""
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """A flag for each limit, as the field documents it."""
    group = parser.add_argument_group("limits (per connection unless said otherwise)")
    for f in fields(Limits):
        assert f.default is not MISSING
        group.add_argument(
            flag(f.name),
            type=f.metadata["parse"],
            default=f.default,
            metavar=f.metadata["metavar"],
            help=f.metadata["help"],
        )
