"""What a provisioning run reports: one :class:`ProvisionEntry` per role.

Actions (DESIGN §2): ``installed`` (fetched and verified now), ``exists``
(already installed), ``skipped`` (missing but ``auto_download: false``),
``failed`` (``error`` says why). A dry run reports ``planned`` for a role it
would download, with the :class:`ProvisionPlan` (files, bytes, free disk).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "ACTIONS",
    "Action",
    "AdapterRecord",
    "PlannedFile",
    "ProgressEvent",
    "ProvisionEntry",
    "ProvisionPlan",
    "ProvisionReport",
]

Action = Literal["installed", "exists", "skipped", "failed", "planned"]
ACTIONS: tuple[str, ...] = ("installed", "exists", "skipped", "failed", "planned")


@dataclass(frozen=True)
class PlannedFile:
    path: str
    bytes: int | None


@dataclass(frozen=True)
class ProvisionPlan:
    """What a dry run would do for one role (nothing is written to find out)."""

    files: tuple[PlannedFile, ...] = ()
    bytes: int = 0
    free_bytes: int | None = None
    enough_disk: bool = True
    target: str | None = None
    adapters: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class AdapterRecord:
    """An adapter provisioned with its role: where it is and its digest."""

    name: str
    path: str
    sha256: str | None = None
    version: str | None = None
    source: str | None = None
    use: str = "all"


@dataclass(frozen=True)
class ProvisionEntry:
    """The outcome for one role; ``path`` is what the runtime loads."""

    role: str
    model: str
    provider: str
    action: Action
    path: str | None = None
    revision: str | None = None
    bytes: int | None = None
    seconds: float = 0.0
    error: str | None = None
    profile: str | None = None
    verified: str | None = None
    adapters: tuple[AdapterRecord, ...] = ()
    plan: ProvisionPlan | None = None

    @property
    def ok(self) -> bool:
        return self.action != "failed"

    def replace(self, **changes: Any) -> ProvisionEntry:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["adapters"] = [asdict(a) for a in self.adapters]
        if self.plan is None:
            data.pop("plan")
        else:
            data["plan"]["files"] = [asdict(f) for f in self.plan.files]
            data["plan"]["adapters"] = list(self.plan.adapters)
        return data


@dataclass(frozen=True)
class ProvisionReport:
    """One entry per requested role, in the order they were asked for."""

    entries: tuple[ProvisionEntry, ...] = ()
    profile: str | None = None
    dry_run: bool = False
    lock_file: str | None = None

    @property
    def ok(self) -> bool:
        """True when no role failed."""
        return all(entry.ok for entry in self.entries)

    @property
    def failed(self) -> list[ProvisionEntry]:
        return [entry for entry in self.entries if not entry.ok]

    def __iter__(self) -> Iterator[ProvisionEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, role: str | int) -> ProvisionEntry:
        """An entry by position or by role name."""
        if isinstance(role, int):
            return self.entries[role]
        for entry in self.entries:
            if entry.role == role:
                return entry
        raise KeyError(f"no entry for role {role!r}; roles: {[e.role for e in self.entries]}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "ok": self.ok,
            "dry_run": self.dry_run,
            "lock_file": self.lock_file,
            "entries": [entry.to_dict() for entry in self.entries],
        }

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)


@dataclass(frozen=True)
class ProgressEvent:
    """A progress update passed to ``provision(progress=...)``.

    ``stage`` is ``resolve``, ``download``, ``verify``, ``install`` or ``done``;
    ``completed``/``total`` are bytes when known.
    """

    role: str
    provider: str
    model: str
    stage: str
    completed: int | None = None
    total: int | None = None
    detail: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def path_str(path: Path | str | None) -> str | None:
    return None if path is None else str(path)
