"""``mongars-llm ps``: what a running ``mongars-llm serve`` holds in memory, like ``ollama ps``.

One row per role on the shared weights (which stay loaded while the server
runs) and per loaded LoRA adapter, with the engine, the size of the weights and
when an idle adapter unloads (``keep_alive``). Names are roles and registered
adapter names, never checkpoint paths. The server is the one at
``MONGARS_HOST`` (:mod:`._remote`); without one, nothing is resident.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from typing import Any

from ._output import print_json, print_table
from ._remote import connect, host_url

__all__ = ["register"]

EXIT_OK = 0

EPILOG = """examples:
  mongars-llm ps                         what the server at MONGARS_HOST holds
  MONGARS_HOST=:9000 mongars-llm ps      a server on another port
  mongars-llm ps --json                  its /api/ps answer

Adapters unload after MONGARS_SERVER_KEEP_ALIVE_S seconds idle (300 by default) and load
again on their next request; the base weights stay loaded while the server runs."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ps",
        help="show what a running `mongars-llm serve` holds: roles, adapters, until when",
        description="Show the roles and adapters a running `mongars-llm serve` (at "
        "MONGARS_HOST, default http://127.0.0.1:8000) holds in memory, and when idle "
        "adapters unload.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print the server's /api/ps answer")
    parser.set_defaults(handler=_run)


def _size(value: Any) -> str:
    size = float(value or 0)
    if size <= 0:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def _until(value: Any, now: dt.datetime) -> str:
    """``expires_at`` as Ollama's ``ps`` shows it: 'Forever', or 'N minutes from now'."""
    if not value:
        return "while the server runs"
    try:
        when = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return str(value)
    seconds = max(0, int((when - now).total_seconds()))
    if seconds < 90:
        return f"{seconds} seconds from now"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} minutes from now"
    return f"{round(seconds / 3600)} hours from now"


def _run(args: argparse.Namespace) -> int:
    server = connect()
    if server is None:
        if args.json:
            print_json({"server": None, "models": []})
        else:
            print(
                f"no mongars-llm server answers at {host_url()} (MONGARS_HOST): nothing is "
                "resident; `mongars-llm serve` keeps a model loaded, chat and embed then use it",
                file=sys.stderr,
            )
        return EXIT_OK
    answer = server.get("/api/ps")
    models = answer.get("models", [])
    if args.json:
        print_json({"server": server.url, **answer})
        return EXIT_OK
    now = dt.datetime.now(dt.UTC)
    rows = [
        [
            m.get("name"),
            m.get("role"),
            m.get("adapter") or "-",
            m.get("engine") or "-",
            _size(m.get("size")),
            _until(m.get("expires_at"), now),
        ]
        for m in models
    ]
    print(f"mongars-llm serve at {server.url} (version {server.version})")
    print_table(["NAME", "ROLE", "ADAPTER", "ENGINE", "SIZE", "UNTIL"], rows)
    return EXIT_OK
