"""Shared output helpers for CLI commands: one JSON document, or a readable table."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["examples", "print_json", "print_table"]


def examples(*lines: str, note: str | None = None) -> dict[str, Any]:
    """``add_parser`` keywords for an ``examples:`` epilog kept as written in ``--help``."""
    import argparse

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
    cells = [[("" if value is None else str(value)) for value in row] for row in rows]
    widths = [len(header) for header in headers]
    for row in cells:
        for index, value in enumerate(row):
            widths[index] = max(widths[index], len(value))
    line = "  ".join(header.upper().ljust(widths[i]) for i, header in enumerate(headers))
    print(line.rstrip())
    for row in cells:
        print("  ".join(value.ljust(widths[i]) for i, value in enumerate(row)).rstrip())
