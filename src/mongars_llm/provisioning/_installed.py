"""What provisioning installed under the models dir: list it, remove it.

Every install is one folder with a completion marker, under
``settings.resolved_models_dir``::

    huggingface/<org>--<name>/<commit>/      Hub snapshots (refs/<branch> -> commit)
    gguf/<stem>-<12 hex>/                    conversions of local .gguf files
    ollama/<name>/<sha256>/                  conversions of Ollama models
    adapters/<name>/<sha256-or-commit>/      adapter archives and Hub adapters

A folder without its marker (an interrupted download) is not an install. The
directories and files that ``local`` roles name are used where they are: they
are never listed here and never removed.

Removal (``mongars-llm models rm``) holds the same per-model file lock as
provisioning, so it never deletes under a running download; it renames the
folder to a hidden ``.old-*`` name (atomic: readers see the install or
nothing; see :mod:`._staging`) and deletes that afterwards. A later
``provision`` installs it again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._fs import file_lock
from ..errors import ConfigError, ProvisionError, ProvisionLockTimeout
from ..logging import log_event
from ._base import ProvisionRequest, get_provider
from ._staging import aside_path

if TYPE_CHECKING:
    from ..manager import ModelManager
    from ..settings import Settings

__all__ = [
    "InstalledModel",
    "find_installed",
    "installed_models",
    "remove_installed",
    "remove_models",
]

logger = logging.getLogger("mongars_llm.provision")

MARKER_NAME = ".mongars-complete.json"
#: the built-in providers whose installs live under the models dir
_FILE_PROVIDERS = ("huggingface", "local", "ollama")
#: the folders of the models dir that hold installs, one per kind
KIND_FOLDERS = ("huggingface", "gguf", "ollama", "adapters")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class InstalledModel:
    """One install under the models dir.

    ``provider`` is the provider that installed it (``huggingface``, ``local``
    for a converted ``.gguf`` file, ``ollama``) or ``adapter``; ``model`` the
    name a manifest uses for it (Hub repo id, Ollama ``name:tag``, the GGUF
    file's path, the adapter's name); ``roles`` the roles of the active profile
    that use it; ``bytes`` its size on disk.
    """

    provider: str
    model: str
    revision: str | None
    path: Path
    bytes: int
    lock: str  # the provisioning lock: <models_dir>/.locks/<lock>.lock
    installed_at: str | None = None
    source: str | None = None  # the GGUF file it was converted from
    roles: tuple[str, ...] = field(default=())

    @property
    def name(self) -> str:
        """A short name for listings: ``model``, or the file name of a converted GGUF
        (its full path is ``source``)."""
        if self.provider == "local" and self.source and self.model == self.source:
            return Path(self.source).name
        return self.model

    @property
    def label(self) -> str:
        """``name@revision`` with the revision shortened to 12 characters."""
        return f"{self.name}@{self.revision[:12]}" if self.revision else self.name

    def to_dict(self) -> dict[str, Any]:
        from .._fs import human_bytes

        return {
            "model": self.model,
            "name": self.name,
            "provider": self.provider,
            "revision": self.revision,
            "roles": list(self.roles),
            "path": str(self.path),
            "bytes": self.bytes,
            "size": human_bytes(self.bytes),
            "installed_at": self.installed_at,
            "source": self.source,
        }


# ------------------------------------------------------------------ listing
def installed_models(
    settings: Settings | None = None, *, manager: ModelManager | None = None
) -> list[InstalledModel]:
    """Every complete install under the models dir, sorted by provider and model.

    With ``manager``, each install carries the roles of its active profile that
    use it (found from the disk alone, no network call).
    """
    settings = _settings(settings, manager)
    root = settings.resolved_models_dir
    found = [*_gguf_installs(root)]
    for kind in _NESTED_KINDS:
        found += _nested_installs(root, kind)
    if manager is not None:
        found = _with_roles(found, manager)
    return sorted(found, key=lambda m: (m.provider == "adapter", m.provider, m.model, m.path))


def _settings(settings: Settings | None, manager: ModelManager | None) -> Settings:
    if manager is not None:
        return manager.settings
    if settings is not None:
        return settings
    from ..settings import get_settings

    return get_settings()


def _children(folder: Path) -> Iterator[Path]:
    """Visible sub-folders (hidden ones are staging, trash or locks)."""
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return
    for child in entries:
        if not child.name.startswith(".") and child.is_dir() and not child.is_symlink():
            yield child


def _json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (links are not followed)."""
    total = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                continue
    return total


def _marker(folder: Path) -> dict[str, Any] | None:
    return _json(folder / MARKER_NAME)


def _repo_id(folder_name: str) -> str:
    return folder_name.replace("--", "/", 1)


def _gguf_marker(folder: Path) -> dict[str, Any] | None:
    from ._gguf import read_marker

    return read_marker(folder)


@dataclass(frozen=True)
class _Kind:
    """One kind folder of the models dir: ``<kind>/<model folder>/<install>/``."""

    folder: str
    provider: str
    install_name: re.Pattern[str] | None  # what an install folder is named, if fixed
    read_marker: Callable[[Path], dict[str, Any] | None]
    model_key: str  # the marker key naming the model, else the model folder says it
    folder_model: Callable[[str], str] = str  # model folder name -> model name


_NESTED_KINDS = (
    _Kind("huggingface", "huggingface", _COMMIT, _marker, "repo_id", _repo_id),
    _Kind("ollama", "ollama", _HEX64, _gguf_marker, "ollama_model"),
    _Kind("adapters", "adapter", None, _marker, "name"),
)


def _nested_installs(root: Path, kind: _Kind) -> Iterator[InstalledModel]:
    for model_dir in _children(root / kind.folder):
        for child in _children(model_dir):
            if kind.install_name is not None and not kind.install_name.match(child.name):
                continue
            marker = kind.read_marker(child)
            if marker is None:
                continue
            model = marker.get(kind.model_key) or kind.folder_model(model_dir.name)
            yield InstalledModel(
                provider=kind.provider,
                model=str(model),
                revision=child.name,
                path=child,
                bytes=tree_bytes(child),
                lock=f"{kind.folder}/{model_dir.name}",
                installed_at=marker.get("installed_at"),
                source=marker.get("source"),
            )


def _gguf_installs(root: Path) -> Iterator[InstalledModel]:
    """Conversions of local ``.gguf`` files sit side by side: ``gguf/<install>/``."""
    for child in _children(root / "gguf"):
        marker = _gguf_marker(child)
        if marker is None:
            continue
        yield InstalledModel(
            provider="local",
            model=str(marker.get("source")),
            revision=marker.get("sha256"),
            path=child,
            bytes=tree_bytes(child),
            lock=f"gguf/{child.name}",
            installed_at=marker.get("installed_at"),
            source=marker.get("source"),
        )


# ------------------------------------------------------------------ roles
def _role_paths(manager: ModelManager) -> dict[str, tuple[Any, Path | None]]:
    """Per role of the active profile: its entry and where its install is (disk only)."""
    out: dict[str, tuple[Any, Path | None]] = {}
    base_dir = Path(manager.manifest.base_dir)
    for role, entry in manager.profile.models.items():
        path = None
        if entry.provider in _FILE_PROVIDERS:
            request = ProvisionRequest(
                role=role,
                profile=manager.profile_name,
                entry=entry,
                settings=manager.settings,
                base_dir=base_dir,
            )
            provider = get_provider(entry.provider)
            try:  # resolve_local never calls the Hub nor the Ollama daemon
                path = provider.resolve_local(request).path
            except Exception:  # an unverifiable local folder, a missing package...
                path = _local_source(provider, request)
        out[role] = (entry, path)
    return out


def _local_source(provider: Any, request: ProvisionRequest) -> Path | None:
    """The folder or file a ``local`` role names (used in place), if it is not a GGUF."""
    from .local import LocalProvider

    if not isinstance(provider, LocalProvider) or request.model.lower().endswith(".gguf"):
        return None
    try:
        return provider.source(request)
    except Exception:
        return None


def _with_roles(found: list[InstalledModel], manager: ModelManager) -> list[InstalledModel]:
    roles = _role_paths(manager)
    by_path: dict[Path, list[str]] = {}
    adapters: dict[str, list[str]] = {}
    for role, (entry, path) in roles.items():
        if path is not None:
            by_path.setdefault(_real(path), []).append(role)
        for spec in entry.adapters:
            adapters.setdefault(spec.name, []).append(role)
    out = []
    for model in found:
        if model.provider == "adapter":
            users = adapters.get(model.model, [])
        else:
            users = by_path.get(_real(model.path), [])
        out.append(replace(model, roles=tuple(users)) if users else model)
    return out


def _real(path: Path) -> Path:
    try:
        return path.resolve()
    except OSError:
        return path.absolute()


def _within(root: Path, path: Path) -> bool:
    root, path = _real(root), _real(path)
    return path == root or root in path.parents


# ------------------------------------------------------------------ finding
def find_installed(target: str, *, manager: ModelManager) -> list[InstalledModel]:
    """The installs ``target`` names, for ``models rm``; raises when there are none.

    ``target`` is, in this order: a role of the manager's active profile (the
    install it uses), an installed model name (every installed revision of it;
    ``name@<revision prefix>`` for one), or a folder under the models dir (an
    install, or a model's folder holding several). A ``.gguf`` file's path
    names its conversion. Anything outside the models dir is refused with a
    :class:`~mongars_llm.errors.ConfigError`; no match is a
    :class:`~mongars_llm.errors.ProvisionError`.
    """
    settings = manager.settings
    root = settings.resolved_models_dir
    found = installed_models(manager=manager)
    if target in manager.profile.models:
        return _for_role(target, manager, found, root)

    name, _, revision = target.partition("@")
    matches = [m for m in found if _same_model(m, name)]
    if revision:
        matches = [m for m in matches if (m.revision or "").startswith(revision.lower())]
    if matches:
        return matches

    path = Path(target).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    if path.is_file() and path.suffix.lower() == ".gguf":
        converted = [m for m in found if m.source and _real(Path(m.source)) == _real(path)]
        if converted:
            return converted
    if path.exists() or os.path.lexists(path):
        if not _within(root, path):
            raise ConfigError(
                f"refusing to remove {path}: it is outside the models dir {root}; "
                "`mongars-llm models rm` deletes only what provisioning installed there "
                "(MONGARS_MODELS_DIR)"
            )
        if _real(path) == _real(root) or _real(path) in {_real(root / k) for k in KIND_FOLDERS}:
            raise ConfigError(
                f"refusing to remove {path}: name one model (a role, a model name or its "
                "folder), not the whole models dir or one of its kind folders"
            )
        inside = [m for m in found if _within(path, m.path)]
        if inside:
            return inside
    raise ProvisionError(
        f"nothing installed matches {target!r}: it is not a role of profile "
        f"{manager.profile_name!r} ({', '.join(manager.role_names)}), nor an installed model "
        f"or a folder of one under {root}; see `mongars-llm models list --installed`"
    )


def _same_model(model: InstalledModel, name: str) -> bool:
    if model.model == name:
        return True
    if model.provider == "ollama":
        from .ollama import OllamaProvider

        return model.model == OllamaProvider.model_name(name)
    return False


def _for_role(
    role: str, manager: ModelManager, found: list[InstalledModel], root: Path
) -> list[InstalledModel]:
    entry, path = _role_paths(manager)[role]
    where = f"role {role!r} of profile {manager.profile_name!r} ({entry.provider}: {entry.name})"
    if path is not None and not _within(root, path):
        raise ConfigError(
            f"refusing to remove {path}: {where} uses it in place, outside the models dir "
            f"{root}; mongars-llm never deletes a folder it did not install"
        )
    matches = [
        m for m in found if m.provider != "adapter" and path and _real(m.path) == _real(path)
    ]
    if not matches:
        raise ProvisionError(
            f"nothing is installed for {where} in {root}; see `mongars-llm models list --installed`"
        )
    return matches


# ------------------------------------------------------------------ removing
def remove_models(target: str, *, manager: ModelManager) -> list[InstalledModel]:
    """Delete what ``target`` names from the models dir (``mongars-llm models rm``).

    :func:`find_installed` then :func:`remove_installed`: ``target`` is a role
    of the manager's active profile, an installed model name
    (``name@<revision prefix>`` for one revision) or a folder under the models
    dir. A later :func:`~mongars_llm.provision` installs it again. Raises
    :class:`~mongars_llm.errors.ConfigError` for anything outside the models
    dir (a ``local`` role's own folder is never deleted) and
    :class:`~mongars_llm.errors.ProvisionError` when nothing matches.
    """
    return remove_installed(find_installed(target, manager=manager), settings=manager.settings)


def remove_installed(
    models: Iterable[InstalledModel], *, settings: Settings | None = None
) -> list[InstalledModel]:
    """Delete ``models`` (from :func:`installed_models` or :func:`find_installed`).

    Each install is removed under its provisioning lock (waiting at most
    ``settings.provision_lock_timeout`` seconds for a running download, then
    :class:`~mongars_llm.errors.ProvisionLockTimeout`), renamed to a hidden
    trash name and then deleted. The process's cached provisioning reports for
    it no longer count: a cached report is only used while its path exists.
    Returns what was removed (an install already gone is skipped).
    """
    settings = _settings(settings, None)
    root = settings.resolved_models_dir
    removed: list[InstalledModel] = []
    for model in models:
        if not _within(root, model.path) or model.path.is_symlink():
            raise ConfigError(
                f"refusing to remove {model.path}: it is outside the models dir {root}"
            )
        lock = root / ".locks" / f"{model.lock}.lock"
        with file_lock(
            lock,
            timeout=settings.provision_lock_timeout,
            what=f"{model.provider} model {model.model!r}",
            error=ProvisionLockTimeout,
        ):
            if not model.path.is_dir():
                continue
            trash = aside_path(model.path)
            os.rename(model.path, trash)  # atomic: from here on the install is gone
            if model.provider == "huggingface":
                _drop_refs(model.path.parent, model.path.name)
        # the lock is released: deleting many GB must not hold up provisioning; a
        # leftover .old-* folder is swept by a later provisioning run
        shutil.rmtree(trash, ignore_errors=True)
        if _real(model.path.parent) != _real(root / "gguf"):
            with contextlib.suppress(OSError):  # a model folder left empty goes too
                model.path.parent.rmdir()
        removed.append(model)
        log_event(
            logger,
            "provision_remove",
            logging.INFO,
            provider=model.provider,
            model=model.model,
            revision=model.revision,
            path=str(model.path),
            bytes=model.bytes,
        )
    return removed


def _drop_refs(repo_dir: Path, commit: str) -> None:
    """Drop the refs naming ``commit`` (and ``refs/`` once no install is left)."""
    refs = repo_dir / "refs"
    if not refs.is_dir():
        return
    for ref in list(refs.rglob("*")):
        with contextlib.suppress(OSError):
            if ref.is_file() and ref.read_text().strip() == commit:
                ref.unlink()
    if not any(_COMMIT.match(child.name) for child in _children(repo_dir)):
        shutil.rmtree(refs, ignore_errors=True)
