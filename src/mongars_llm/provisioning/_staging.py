"""Work in progress under the models dir: staging folders, swaps, and what a killed run left.

An install is written into a hidden folder beside its final place and renamed
into place when complete (:func:`replace_dir`), so a reader sees the old install
or the new one, never half of one. The hidden names say what they hold and, in
``gguf/``, whose they are::

    .tmp-<owner>-<8 hex>          a download, extraction or conversion being written
    .old-<owner>-<8 hex>          an install swapped out or removed (deleted right after)
    .download-<8 hex><suffix>     an adapter archive being downloaded

Each model's work is guarded by its provisioning lock, ``.locks/<kind>/<owner>.lock``:

    huggingface/<org>--<name>/.tmp-*     owner: the repo folder
    adapters/<name>/.tmp-*               owner: the adapter folder
    ollama/<name>/.tmp-*                 owner: the model folder
    gguf/.tmp-<folder>-*                 owner: the conversion folder named in the entry

A run killed half-way leaves its work behind. :func:`clear_work` removes a
model's leftovers when a provider starts on that model (it holds the lock), and
:func:`remove_stale_work` sweeps the whole models dir before each provisioning
run, removing what is older than the lock timeout and whose lock is free.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

from .._fs import file_lock
from ..errors import ProvisionLockTimeout
from ..logging import log_event

__all__ = [
    "WORK_KINDS",
    "WORK_PREFIXES",
    "aside_path",
    "clear_work",
    "remove_stale_work",
    "replace_dir",
    "staging_path",
]

logger = logging.getLogger("mongars_llm.provision")

TMP, OLD, DOWNLOAD = ".tmp-", ".old-", ".download-"
#: names of what a run writes before moving it into place (or after moving it aside)
WORK_PREFIXES = (TMP, OLD, DOWNLOAD)
#: kind folder -> whether each model has its own folder there (else side by side)
WORK_KINDS = {"huggingface": True, "adapters": True, "ollama": True, "gguf": False}


def staging_path(parent: Path, owner: str) -> Path:
    """A fresh hidden name in ``parent`` to write ``owner``'s next install into."""
    return parent / f"{TMP}{owner}-{uuid.uuid4().hex[:8]}"


def aside_path(final: Path) -> Path:
    """A fresh hidden name beside ``final`` to move it to before it is deleted."""
    return final.with_name(f"{OLD}{final.name}-{uuid.uuid4().hex[:8]}")


def replace_dir(staging: Path, final: Path) -> None:
    """Rename ``staging`` to ``final``; an existing ``final`` is swapped out first.

    Each rename is atomic; if the second one fails the old install is put back.
    """
    aside = None
    if final.exists():
        aside = aside_path(final)
        os.rename(final, aside)
    try:
        os.rename(staging, final)
    except BaseException:
        if aside is not None:
            os.rename(aside, final)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def owner_of(name: str) -> str | None:
    """The owner a work entry's name carries (``.tmp-<owner>-<8 hex>``), if any."""
    for prefix in (TMP, OLD):
        if name.startswith(prefix):
            owner, _, _suffix = name[len(prefix) :].rpartition("-")
            return owner or None
    return None


def clear_work(parent: Path, *, owner: str | None = None) -> list[Path]:
    """Remove every work entry in ``parent`` (only ``owner``'s when given).

    Call it holding the lock that guards that work: nothing else can be
    writing there, so age does not matter. Returns what was removed.
    """
    try:
        entries = [c for c in parent.iterdir() if c.name.startswith(WORK_PREFIXES)]
    except OSError:
        return []
    if owner is not None:
        entries = [c for c in entries if owner_of(c.name) == owner]
    return [child for child in entries if _remove(child)]


def remove_stale_work(models_dir: Path, *, max_age: float) -> list[Path]:
    """Delete the work that killed runs left in the models dir.

    A work entry goes when it was last modified more than ``max_age`` seconds
    ago (the provisioning lock timeout) and the lock guarding it can be taken at
    once, so no live run is using it. Returns what was removed.
    """
    removed: list[Path] = []
    now = time.time()
    for kind, nested in WORK_KINDS.items():
        for owner, entries in _work_by_owner(models_dir / kind, nested=nested).items():
            ages = {}
            for child in entries:
                with contextlib.suppress(OSError):
                    ages[child] = now - child.lstat().st_mtime
            stale = [child for child, age in ages.items() if age > max_age]
            if not stale:
                continue
            lock = models_dir / ".locks" / kind / f"{owner}.lock"
            try:
                with file_lock(lock, timeout=0, what=f"{kind}/{owner}"):
                    for child in stale:
                        if _remove(child):
                            removed.append(child)
                            log_event(
                                logger,
                                "provision_cleanup",
                                logging.INFO,
                                path=str(child),
                                age_seconds=round(ages[child]),
                            )
            except (ProvisionLockTimeout, OSError):
                continue  # a live run holds it: its work is not stale
    return removed


def _work_by_owner(kind_dir: Path, *, nested: bool) -> dict[str, list[Path]]:
    """The work entries of one kind folder, grouped by the owner whose lock guards them."""
    found: dict[str, list[Path]] = {}
    try:
        children = list(kind_dir.iterdir())
    except OSError:
        return found
    if not nested:
        for child in children:
            owner = owner_of(child.name)
            if owner is not None and child.name.startswith(WORK_PREFIXES):
                found.setdefault(owner, []).append(child)
        return found
    for folder in children:
        if folder.is_dir() and not folder.is_symlink():
            try:
                work = [c for c in folder.iterdir() if c.name.startswith(WORK_PREFIXES)]
            except OSError:
                continue
            if work:
                found[folder.name] = work
    return found


def _remove(path: Path) -> bool:
    """Delete a file or a folder (never following a link); whether it is gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return not os.path.lexists(path)
