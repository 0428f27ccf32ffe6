"""Small file-system helpers: atomic writes, file locks with clear timeouts."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from .errors import ProvisionLockTimeout

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "ensure_within",
    "file_lock",
    "human_bytes",
    "sha256_file",
]


def ensure_within(
    root: Path,
    path: Path,
    *,
    what: str = "path",
    error: type[Exception] = ValueError,
    action: str = "write",
    fix: str = "",
) -> Path:
    """Return ``path`` after checking that it stays inside ``root`` once resolved.

    Both are resolved (``..`` and symbolic links followed), so neither a crafted
    name nor a planted link can send a write (or a read: ``action``) elsewhere;
    raises ``error`` otherwise, its message ending with ``fix`` when given.
    """
    resolved_root = Path(root).resolve()
    resolved = Path(path).resolve()
    if resolved != resolved_root and resolved_root not in resolved.parents:
        raise error(
            f"refusing to {action} {what} {path}: it resolves to {resolved}, outside "
            f"{resolved_root}" + (f"; {fix}" if fix else "")
        )
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(
        path, (json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n").encode()
    )


@contextlib.contextmanager
def file_lock(
    path: Path,
    *,
    timeout: float,
    what: str,
    error: type[Exception] = ProvisionLockTimeout,
) -> Iterator[None]:
    """Hold an inter-process lock at ``path``; raise a clear error after ``timeout`` s."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=timeout)
    try:
        lock.acquire()
    except Timeout as err:
        raise error(
            f"timed out after {timeout:g}s waiting for the lock on {what} ({path}); another "
            "process is working on it; if none is, delete the lock file and retry."
        ) from err
    try:
        yield
    finally:
        lock.release()


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def human_bytes(value: int | None) -> str:
    """``1234567`` -> ``"1.2 MB"`` (decimal units, as the Hub shows sizes); ``None`` -> ``"-"``."""
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"
