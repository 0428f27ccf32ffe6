"""``mongars.lock.json``: the exact commit each role was provisioned at.

A real run records, per profile and role, the provider, the model and the
resolved revision (a Hub commit, an Ollama digest) plus adapter digests.
``provision(locked=True)`` provisions exactly those revisions::

    {"version": 1, "profiles": {"default": {"general": {
        "provider": "huggingface", "model": "org/name", "revision": "<40 hex>",
        "adapters": [{"name": "...", "sha256": "..."}]}}}}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._fs import atomic_write_json, file_lock
from .._version import __version__
from ..errors import ConfigError
from ._report import ProvisionEntry

__all__ = ["LOCK_FILE_NAME", "LockedRole", "lock_record", "read_lock", "update_lock"]

LOCK_FILE_NAME = "mongars.lock.json"
LOCK_VERSION = 1


@dataclass(frozen=True)
class LockedRole:
    provider: str
    model: str
    revision: str | None
    adapters: tuple[dict[str, Any], ...] = ()


def read_lock(path: Path) -> dict[str, dict[str, LockedRole]]:
    """``{profile: {role: LockedRole}}``; a missing file is an empty lock."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"cannot read the lock file {path}: {err}; fix it or delete it and provision again"
        ) from err
    if not isinstance(raw, dict) or not isinstance(raw.get("profiles"), dict):
        raise ConfigError(f"{path} is not a mongars lock file (no 'profiles' object)")
    out: dict[str, dict[str, LockedRole]] = {}
    for profile, roles in raw["profiles"].items():
        if not isinstance(roles, dict):
            raise ConfigError(f"{path}: profiles.{profile} must be an object")
        out[profile] = {}
        for role, item in roles.items():
            if not isinstance(item, dict) or not {"provider", "model"} <= set(item):
                raise ConfigError(
                    f"{path}: profiles.{profile}.{role} needs 'provider', 'model' and 'revision'"
                )
            out[profile][role] = LockedRole(
                provider=str(item["provider"]),
                model=str(item["model"]),
                revision=item.get("revision"),
                adapters=tuple(item.get("adapters") or ()),
            )
    return out


def lock_record(entry: ProvisionEntry, manifest_name: str) -> dict[str, Any]:
    """What the lock file stores for one successful entry."""
    return {
        "provider": entry.provider,
        "model": manifest_name,
        "revision": entry.revision,
        "adapters": [
            {"name": a.name, "version": a.version, "sha256": a.sha256} for a in entry.adapters
        ],
    }


def update_lock(
    path: Path,
    profile: str,
    records: dict[str, dict[str, Any]],
    *,
    guard: Path | None = None,
    timeout: float = 60.0,
) -> None:
    """Record ``{role: lock_record(...)}`` for ``profile``; other roles are kept.

    ``guard`` is the inter-process lock serialising writers (default: a hidden
    file next to ``path``).
    """
    if not records:
        return
    guard = guard or path.with_name(f".{path.name}.lock")
    with file_lock(guard, timeout=timeout, what=str(path)):
        try:
            raw = json.loads(path.read_text())
            if not isinstance(raw, dict) or not isinstance(raw.get("profiles"), dict):
                raw = {}
        except (OSError, ValueError):
            raw = {}
        profiles = raw.get("profiles", {})
        roles = dict(profiles.get(profile) or {})
        roles.update(records)
        profiles[profile] = dict(sorted(roles.items()))
        atomic_write_json(
            path,
            {
                "version": LOCK_VERSION,
                "generated_by": f"mongars-llm {__version__}",
                "profiles": dict(sorted(profiles.items())),
            },
        )
