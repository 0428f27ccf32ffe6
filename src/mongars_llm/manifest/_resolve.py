"""Resolved roles: a manifest entry merged with the global bounds of ``settings.model``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .models import Manifest, RoleEntry

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["ResolvedRole", "resolve_role"]


@dataclass(frozen=True)
class ResolvedRole:
    """One role of one profile, ready to use.

    ``parameters`` holds the role's sampling defaults with ``None`` values
    dropped, ``num_predict`` folded into ``max_new_tokens``, and
    ``max_new_tokens`` defaulting to and clamped by
    ``settings.model.max_new_tokens``. ``embedding`` holds the embedding options
    with ``max_length`` defaulting to and clamped by
    ``settings.model.max_input_tokens``.
    """

    profile: str
    role: str
    entry: RoleEntry
    parameters: dict[str, Any]
    embedding: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The model: Hub repo id, local path or Ollama tag."""
        return self.entry.name

    @property
    def provider(self) -> str:
        return self.entry.provider

    @property
    def max_new_tokens(self) -> int:
        return int(self.parameters["max_new_tokens"])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view (used by ``ModelManager.describe()``)."""
        entry = self.entry
        return {
            "profile": self.profile,
            "role": self.role,
            "name": entry.name,
            "provider": entry.provider,
            "revision": entry.revision,
            "auto_download": entry.auto_download,
            "trust_remote_code": entry.trust_remote_code,
            "description": entry.description,
            "parameters": _copy(self.parameters),
            "embedding": _copy(self.embedding),
            "adapters": [adapter.model_dump(mode="json") for adapter in entry.adapters],
        }


def _copy(value: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
        for k, v in value.items()
    }


def resolve_parameters(entry: RoleEntry, settings: Settings) -> dict[str, Any]:
    """The role's sampling parameters within the bounds of ``settings.model``."""
    params = entry.parameters
    limit = settings.model.max_new_tokens
    wanted = params.effective_max_new_tokens
    out: dict[str, Any] = {}
    for key, value in params.model_dump(exclude={"options", "num_predict"}).items():
        if key == "max_new_tokens":
            out[key] = limit if wanted is None else min(wanted, limit)
        elif value is not None:
            out[key] = value
    if params.options:
        out["options"] = dict(params.options)
    return out


def resolve_embedding(entry: RoleEntry, settings: Settings) -> dict[str, Any]:
    """The role's embedding options within the bounds of ``settings.model``."""
    limit = settings.model.max_input_tokens
    options = entry.embedding.model_dump()
    wanted = options.get("max_length")
    options["max_length"] = limit if wanted is None else min(wanted, limit)
    return {k: v for k, v in options.items() if v is not None}


def resolve_role(
    manifest: Manifest, role: str, *, profile: str, settings: Settings
) -> ResolvedRole:
    """Resolve ``role`` of ``profile`` (both must exist; see ``ModelManager.role``)."""
    entry = manifest.profiles[profile].models[role]
    return ResolvedRole(
        profile=profile,
        role=role,
        entry=entry,
        parameters=resolve_parameters(entry, settings),
        embedding=resolve_embedding(entry, settings),
    )
