"""Dataset files read as ``(line, raw)`` rows: JSON lines files, streamed, and Hub splits.

A dataset path is checked at once (it exists, it is a regular file: a FIFO or
a device would block or never end); its lines are read as they are consumed,
split on newlines only, and a line longer than the limit
(``MONGARS_DATASET_MAX_LINE_BYTES``) comes through as a :class:`LineTooLong`
row, its text never held. The rows are parsed and checked later, one by one
(:mod:`._data`, :mod:`._pairs`).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DatasetError

__all__ = ["LineTooLong", "hub_rows", "open_jsonl", "read_jsonl_rows"]


def read_jsonl_rows(
    path: str | Path, *, max_line_bytes: int | None = None, flag: str = "--dataset-path"
) -> Iterator[tuple[int, Any]]:
    """``(line_number, text)`` for every line of a JSONL file, streamed (parsed later, per line).

    The file is opened and checked (exists, a regular file) at once; lines are
    read as they are consumed, split on newlines only (see :func:`_jsonl_lines`).
    """
    return open_jsonl(Path(path), max_line_bytes, flag=flag)


def hub_rows(dataset: Iterable[Mapping[str, Any]]) -> list[tuple[int, Any]]:
    """``(row_number, record)`` for the rows of a Hugging Face dataset split."""
    return [(index, dict(row)) for index, row in enumerate(dataset, start=1)]


def open_jsonl(
    path: Path, max_line_bytes: int | None = None, *, flag: str = "--dataset-path"
) -> Iterator[tuple[int, str | LineTooLong]]:
    """Check ``path`` is a readable regular file now; stream its lines lazily."""
    limit = _max_line_bytes() if max_line_bytes is None else max_line_bytes
    os.close(_open_regular(path, flag))  # fail here, before any work, not at the first row
    return _jsonl_lines(path, flag, limit)


def _open_regular(path: Path, flag: str) -> int:
    """A read-only descriptor of ``path``, refused unless it is a regular file."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer before it can be refused
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError as err:
        raise DatasetError(
            f"dataset file {path} does not exist; pass {flag} with a JSONL file"
        ) from err
    except OSError as err:
        raise DatasetError(
            f"cannot read the dataset file {path}: {err.strerror or err}; pass {flag} with a "
            "readable JSONL file"
        ) from err
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise DatasetError(
            f"dataset path {path} is {_file_kind(mode)}, not a regular file; pass {flag} "
            "with a JSONL file"
        )
    return fd


def _jsonl_lines(path: Path, flag: str, limit: int) -> Iterator[tuple[int, str | LineTooLong]]:
    r"""``(line_number, text)`` pairs, split on ``\n`` only (``\r\n`` tolerated).

    Unicode line separators (U+2028, U+2029, U+0085) are ordinary characters
    inside JSON strings, so ``str.splitlines`` would cut valid records apart. At
    most ``limit`` bytes of a line are held in memory; a longer line is read
    through and reported as a :class:`LineTooLong` row.
    """
    with os.fdopen(_open_regular(path, flag), "rb") as handle:
        number = 0
        while True:
            data = handle.readline(limit + 1)
            if not data:
                return
            number += 1
            if len(data) > limit and not data.endswith(b"\n"):
                while data and not data.endswith(b"\n"):  # skip the rest of the line
                    data = handle.readline(1 << 20)
                yield number, LineTooLong(limit)
                continue
            data = data[:-1] if data.endswith(b"\n") else data
            data = data[:-1] if data.endswith(b"\r") else data
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DatasetError(
                    f"dataset file {path} is not UTF-8 text (line {number}, byte {err.start + 1}): "
                    f"{err.reason}; convert it to UTF-8"
                ) from err
            if number == 1 and text.startswith("\ufeff"):
                text = text[1:]  # a UTF-8 byte order mark
            yield number, text


@dataclass(frozen=True)
class LineTooLong:
    """Stands in for a line longer than the limit (its text is never held)."""

    limit: int


def _max_line_bytes() -> int:
    from ..settings import get_settings

    return get_settings().dataset_max_line_bytes


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"
