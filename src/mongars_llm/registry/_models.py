"""Wire models of the adapter registry manifest (``<registry>/manifest.json``)."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ADAPTER_NAME_PATTERN",
    "MANIFEST_SCHEMA_VERSION",
    "AdapterCompatibility",
    "RegistryEntry",
    "RegistryManifest",
    "Status",
    "is_safe_adapter_name",
]

MANIFEST_SCHEMA_VERSION = 1

Status = Literal["candidate", "promoted", "retired"]
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
#: adapter names that may name a folder: no separators, no ``.``/``..``, no leading dot
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$"


def is_safe_adapter_name(name: str) -> bool:
    """``name`` matches :data:`ADAPTER_NAME_PATTERN`, so it can name a folder as it is."""
    return re.fullmatch(ADAPTER_NAME_PATTERN, name) is not None


def _utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class AdapterCompatibility(_Model):
    """What a serving replica compares to decide between a hot swap and a reload.

    Two adapters with equal ``base_model``/``base_model_revision`` can share the
    loaded base weights; equal ``r``, ``target_modules`` and ``modules_to_save``
    as well means the LoRA tensors have the same shapes, so the new weights can
    be copied into the already-injected layers without rebuilding the model.
    """

    base_model: str
    base_model_revision: str | None = None
    peft_version: str | None = None
    r: int | None = None
    lora_alpha: float | None = None
    target_modules: list[str] = Field(default_factory=list)
    modules_to_save: list[str] = Field(default_factory=list)

    def same_base(self, other: AdapterCompatibility) -> bool:
        """Both adapters were trained on the same base weights (id and commit)."""
        return (self.base_model, self.base_model_revision) == (
            other.base_model,
            other.base_model_revision,
        )

    def can_hot_swap(self, other: AdapterCompatibility) -> bool:
        """``other`` can replace ``self`` in place: same base and same tensor layout."""
        return (
            self.same_base(other)
            and self.r == other.r
            and sorted(self.target_modules) == sorted(other.target_modules)
            and sorted(self.modules_to_save) == sorted(other.modules_to_save)
        )


class RegistryEntry(_Model):
    """One immutable adapter version; only ``status`` ever changes after registration.

    ``path`` is the adapter directory (peft format). It is stored relative to the
    registry directory when the adapter lies inside it (POSIX separators), else
    absolute; :meth:`resolve_path` turns it into an absolute path.
    ``sha256`` maps file paths relative to ``path`` to their digests.
    """

    version: str = Field(pattern=VERSION_PATTERN)
    name: str = Field(min_length=1)
    run_name: str | None = None
    path: str
    run_dir: str | None = None
    status: Status = "candidate"
    created_at: str = Field(default_factory=_utcnow)
    compatibility: AdapterCompatibility
    metrics: dict[str, Any] = Field(default_factory=dict)
    dataset: dict[str, Any] = Field(default_factory=dict)
    sha256: dict[str, str] = Field(default_factory=dict)
    #: which calls the adapter is for: ``embed`` for an embedding adapter (load it with
    #: ``use="embed"`` so chat never sees it), ``rerank`` for a rerank adapter (rerank
    #: calls only), ``all`` for a chat LoRA
    use: Literal["all", "generate", "embed", "rerank"] = "all"
    #: the training objective (``sft``, ``contrastive``, ``simcse``); ``None`` when unknown
    objective: str | None = None
    #: how an embedding adapter embeds (pooling, bidirectional, max_length, instruction)
    embedding: dict[str, Any] | None = None

    @property
    def base_model(self) -> str:
        return self.compatibility.base_model

    def resolve_path(self, registry_dir: str | Path) -> Path:
        """The absolute adapter directory of this entry."""
        path = Path(self.path)
        return path if path.is_absolute() else (Path(registry_dir) / path).resolve()

    def resolve_run_dir(self, registry_dir: str | Path) -> Path | None:
        if self.run_dir is None:
            return None
        path = Path(self.run_dir)
        return path if path.is_absolute() else (Path(registry_dir) / path).resolve()


class RegistryManifest(_Model):
    """The whole ``manifest.json``: entries in registration order plus pointers.

    ``revision`` increases by one on every write, so a reader (a serving
    replica) can poll it cheaply and reload only when it moved.
    """

    schema_version: int = MANIFEST_SCHEMA_VERSION
    revision: int = 0
    updated_at: str | None = None
    latest: str | None = None
    promoted: str | None = None
    entries: list[RegistryEntry] = Field(default_factory=list)
