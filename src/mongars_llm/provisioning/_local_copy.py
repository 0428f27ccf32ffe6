"""Find the copy of a Hub model that ``provision`` installed, without any network.

``UnifiedLLMRuntime.from_pretrained("org/name")`` and ``bundle build --base-model
org/name`` call :func:`provisioned_copy` first, so weights provisioned once are
loaded from ``<models_dir>/huggingface/<org>--<name>/<commit>/`` instead of being
downloaded again into the Hugging Face cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .huggingface import _COMMIT, MARKER_NAME, _read_marker, _read_ref

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["ProvisionedCopy", "provisioned_copy"]


@dataclass(frozen=True)
class ProvisionedCopy:
    """A complete, verified install of ``repo_id`` at ``revision`` (a commit)."""

    repo_id: str
    revision: str
    path: Path


def provisioned_copy(
    repo_id: str,
    *,
    revision: str | None = None,
    settings: Settings | None = None,
    trust_remote_code: bool = False,
) -> ProvisionedCopy | None:
    """The provisioned folder of Hub repo ``repo_id``, or ``None`` when there is none.

    ``revision`` is a commit, or a branch/tag that ``provision`` resolved (its
    ``refs/<name>`` file). With no revision, ``main`` is used when it was
    provisioned, else the most recently installed commit. Only folders with the
    completion marker count (an interrupted download never does). With
    ``trust_remote_code`` a copy whose ``config.json`` needs remote code but
    holds no ``*.py`` file (provisioned without it) is not used.
    """
    if "/" not in repo_id or Path(repo_id).expanduser().exists():
        return None
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    if settings is None:
        from ..settings import get_settings

        settings = get_settings()
    repo_dir = settings.resolved_models_dir / "huggingface" / repo_id.replace("/", "--")
    if not repo_dir.is_dir():
        return None
    commit: str | None
    if revision:
        commit = revision if _COMMIT.match(revision) else _read_ref(repo_dir, revision)
    else:
        commit = _read_ref(repo_dir, "main") or _newest_install(repo_dir)
    if commit is None:
        return None
    path = repo_dir / commit
    marker = _read_marker(path)
    if marker is None or marker.get("repo_id") not in (None, repo_id):
        return None
    if trust_remote_code and _needs_missing_code(path):
        return None
    return ProvisionedCopy(repo_id=repo_id, revision=commit, path=path)


def _newest_install(repo_dir: Path) -> str | None:
    installs = [
        child
        for child in repo_dir.iterdir()
        if _COMMIT.match(child.name) and (child / MARKER_NAME).is_file()
    ]
    if not installs:
        return None
    return max(installs, key=lambda child: (child / MARKER_NAME).stat().st_mtime).name


def _needs_missing_code(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True
    return bool(config.get("auto_map")) and not any(path.glob("*.py"))
