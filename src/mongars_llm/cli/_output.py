"""Shared helpers of the CLI commands: one JSON document, a readable table, text safe for a
terminal, and the ``--help`` pieces every command has (examples, a group of subcommands)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from ..errors import ConfigError

__all__ = ["command_group", "examples", "print_json", "print_table", "terminal_safe", "valid_text"]

#: C0 controls but tab and newline, DEL, and C1 controls: a terminal acts on them
#: (ESC [ 2 J clears the screen, OSC 52 writes the clipboard) instead of showing them
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
#: lone UTF-16 surrogates: bytes that were not UTF-8, as Python decodes stdin
_SURROGATE = re.compile("[\ud800-\udfff]")


def terminal_safe(text: str, stream: TextIO | None = None) -> str:
    """``text`` as written to ``stream`` (stdout by default): when it is a terminal,
    control characters other than newline and tab are shown escaped (``\\x1b``), so
    neither a model's reply nor an input can drive the terminal."""
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if not (isatty and isatty()):
        return text
    return _CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def valid_text(text: str, where: str) -> str:
    """``text``, or a :class:`ConfigError` (exit 2) when it holds bytes that were not
    UTF-8 (Python reads them from stdin as lone surrogates)."""
    found = _SURROGATE.search(text)
    if found is None:
        return text
    code = ord(found.group())
    what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
    raise ConfigError(
        f"{where} is not UTF-8 text ({what} at character {found.start()}); convert it "
        "first, e.g. `iconv -f latin1 -t utf-8`"
    )


def command_group(
    subparsers: argparse._SubParsersAction, name: str, **parser_options: Any
) -> argparse._SubParsersAction:
    """Add ``mongars-llm <name> COMMAND``: its subcommands' ``add_parser``. Given no
    command, it prints its help on stderr and exits 2 (a usage error)."""
    parser = subparsers.add_parser(name, **parser_options)
    parser.set_defaults(handler=lambda _args: (parser.print_help(sys.stderr), 2)[1])
    return parser.add_subparsers(dest=f"{name}_command", metavar="COMMAND")


def examples(*lines: str, note: str | None = None) -> dict[str, Any]:
    """``add_parser`` keywords for an ``examples:`` epilog kept as written in ``--help``."""
    text = "examples:\n" + "\n".join(f"  {line}" for line in lines)
    if note:
        text += "\n\n" + note
    return {"epilog": text, "formatter_class": argparse.RawDescriptionHelpFormatter}


def print_json(payload: Any) -> None:
    """Print exactly one JSON document on stdout."""
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
    sys.stdout.flush()


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain aligned table (no colours, safe to pipe)."""
    cells = [[terminal_safe("" if value is None else str(value)) for value in row] for row in rows]
    widths = [len(header) for header in headers]
    for row in cells:
        for index, value in enumerate(row):
            widths[index] = max(widths[index], len(value))
    line = "  ".join(header.upper().ljust(widths[i]) for i, header in enumerate(headers))
    print(line.rstrip())
    for row in cells:
        print("  ".join(value.ljust(widths[i]) for i, value in enumerate(row)).rstrip())
