"""The adapter registry: a directory with one ``manifest.json`` listing adapter versions.

Writers take an inter-process file lock, read the manifest, change it and
replace it atomically, so concurrent ``register`` calls from several processes
never lose an entry and a reader never sees a half-written file. Readers take
no lock at all.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from pydantic import ValidationError

from .._fs import atomic_write_json, file_lock, sha256_file
from ..errors import RegistryError
from ..logging import log_event
from ._models import (
    ADAPTER_NAME_PATTERN,
    AdapterCompatibility,
    RegistryEntry,
    RegistryManifest,
    Status,
    is_safe_adapter_name,
)

__all__ = ["MANIFEST_NAME", "AdapterRegistry", "digest_tree"]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
#: the files of an adapter folder that loaders read: each must have a recorded digest
LOADED_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
LOCK_NAME = ".manifest.json.lock"


def digest_tree(root: str | Path) -> dict[str, str]:
    """sha256 of every file under ``root`` keyed by its POSIX path relative to ``root``."""
    root = Path(root)
    if root.is_file():
        return {root.name: sha256_file(root)}
    return {
        path.relative_to(root).as_posix(): sha256_file(path)
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


class AdapterRegistry:
    """Read and update the adapter registry at ``path`` (a directory).

    >>> registry = AdapterRegistry("models/encoders")
    >>> entry = registry.latest()          # newest non-retired version, or None
    >>> registry.get("3").resolve_path(registry.path)
    """

    def __init__(self, path: str | Path, *, lock_timeout: float = 120.0) -> None:
        self.path = Path(path)
        self.lock_timeout = lock_timeout

    def __repr__(self) -> str:
        return f"AdapterRegistry({str(self.path)!r})"

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_NAME

    # ----------------------------------------------------------------- readers
    def read(self) -> RegistryManifest:
        """The current manifest (an empty one when the registry does not exist yet)."""
        try:
            raw = self.manifest_path.read_bytes()
        except FileNotFoundError:
            return RegistryManifest()
        except OSError as err:
            raise RegistryError(
                f"cannot read the adapter registry {self.manifest_path}: {err}"
            ) from err
        try:
            return RegistryManifest.model_validate(json.loads(raw))
        except (ValueError, ValidationError) as err:
            raise RegistryError(
                f"the adapter registry {self.manifest_path} is corrupt ({err}); restore it from "
                "a backup or move it away to start a new registry"
            ) from err

    def revision(self) -> int:
        """A counter bumped by every write; poll it to notice new versions cheaply."""
        return self.read().revision

    def list(self, *, status: Status | None = None, name: str | None = None) -> list[RegistryEntry]:
        """Entries in registration order, optionally filtered by status and name."""
        return [
            entry
            for entry in self.read().entries
            if (status is None or entry.status == status) and (name is None or entry.name == name)
        ]

    def get(self, version: str | int) -> RegistryEntry:
        """The entry with ``version``; :class:`RegistryError` listing the known ones if absent."""
        manifest = self.read()
        return self._find(manifest, str(version))

    def latest(self, *, name: str | None = None) -> RegistryEntry | None:
        """The newest non-retired entry (of adapter ``name`` when given), or ``None``."""
        manifest = self.read()
        if name is None:
            return self._pointer(manifest, "latest")
        for entry in reversed(manifest.entries):
            if entry.name == name and entry.status != "retired":
                return entry
        return None

    def promoted(self) -> RegistryEntry | None:
        """The entry marked ``promoted`` (at most one), or ``None``."""
        return self._pointer(self.read(), "promoted")

    def adapter_path(self, entry: RegistryEntry | str | int) -> Path:
        """Absolute adapter directory of ``entry`` (an entry or a version)."""
        if not isinstance(entry, RegistryEntry):
            entry = self.get(entry)
        return entry.resolve_path(self.path)

    def verify(self, entry: RegistryEntry | str | int) -> Path:
        """Check the adapter files against the digests recorded at registration; return
        the adapter directory, ready to load.

        Every checksum key must name a file inside the adapter folder; a relative
        ``path`` must stay inside the registry folder; and the files a loader reads
        (:data:`LOADED_FILES`) must all be covered by a digest, so a hand-edited
        manifest cannot drop the check of the weights it swapped.
        """
        if not isinstance(entry, RegistryEntry):
            entry = self.get(entry)
        where = f"{self.manifest_path}: adapter version {entry.version}"
        root = entry.resolve_path(self.path)
        if not Path(entry.path).is_absolute() and not root.is_relative_to(self.path.resolve()):
            raise RegistryError(
                f"{where}: path {entry.path!r} leads outside the registry folder {self.path}; "
                "a relative adapter path must stay inside it (the manifest was edited or "
                "damaged: restore it, or register the adapter again)"
            )
        # every key is checked before any file is read: none may point outside the folder
        files = {rel: self._file_in(root, rel, entry.version) for rel in entry.sha256}
        unchecked = [
            name
            for name in LOADED_FILES
            if name not in entry.sha256 and (root / name).is_file() and root.is_dir()
        ]
        if unchecked:
            raise RegistryError(
                f"{where}: {', '.join(unchecked)} in {root} has no recorded digest, so it "
                "cannot be checked before it loads; register the adapter again (the digests "
                "are computed at registration)"
            )
        for rel, expected in entry.sha256.items():
            file = files[rel]
            if not file.is_file():
                raise RegistryError(f"adapter version {entry.version}: {file} is missing")
            actual = sha256_file(file)
            if actual != expected:
                raise RegistryError(
                    f"adapter version {entry.version}: {file} has sha256 {actual}, the registry "
                    f"recorded {expected}; the file changed after registration"
                )
        return root

    # ----------------------------------------------------------------- writers
    def register(
        self,
        adapter_dir: str | Path,
        *,
        name: str,
        compatibility: AdapterCompatibility | Mapping[str, Any],
        version: str | int | None = None,
        run_name: str | None = None,
        run_dir: str | Path | None = None,
        metrics: Mapping[str, Any] | None = None,
        dataset: Mapping[str, Any] | None = None,
        sha256: Mapping[str, str] | None = None,
        status: Status = "candidate",
        use: str = "all",
        objective: str | None = None,
        embedding: Mapping[str, Any] | None = None,
    ) -> RegistryEntry:
        """Add a new immutable version for the adapter in ``adapter_dir``.

        ``use`` says which calls the adapter is for (``"embed"`` for an embedding
        adapter, recorded with its ``objective`` and ``embedding`` settings).

        ``version`` defaults to one more than the highest numeric version. An
        existing version is never overwritten (:class:`RegistryError`). The new
        entry becomes ``latest`` unless it is registered as ``retired``.
        """
        adapter_dir = Path(adapter_dir)
        if not adapter_dir.exists():
            raise RegistryError(f"cannot register {adapter_dir}: it does not exist")
        digests = dict(sha256) if sha256 is not None else digest_tree(adapter_dir)
        if not is_safe_adapter_name(name):
            raise RegistryError(
                f"cannot register {adapter_dir}: adapter name {name!r} must match "
                f"{ADAPTER_NAME_PATTERN} (letters, digits, '.', '_', '-'; it may name a folder)"
            )
        for rel in digests:
            _check_checksum_key(rel, where=f"cannot register {adapter_dir}")
        if not isinstance(compatibility, AdapterCompatibility):
            compatibility = AdapterCompatibility.model_validate(dict(compatibility))

        def change(manifest: RegistryManifest) -> tuple[RegistryManifest, RegistryEntry]:
            known = {entry.version for entry in manifest.entries}
            if version is None:
                numbers = [int(v) for v in known if v.isdigit()]
                new_version = str(max(numbers, default=0) + 1)
            else:
                new_version = str(version)
                if new_version in known:
                    raise RegistryError(
                        f"adapter version {new_version!r} already exists in {self.manifest_path}; "
                        "versions are immutable: register under a new version (or omit it to "
                        "auto-increment)"
                    )
            try:
                entry = RegistryEntry(
                    version=new_version,
                    name=name,
                    run_name=run_name,
                    path=self._store_path(adapter_dir),
                    run_dir=self._store_path(Path(run_dir)) if run_dir is not None else None,
                    status=status,
                    compatibility=compatibility,
                    metrics=dict(metrics or {}),
                    dataset=dict(dataset or {}),
                    sha256=digests,
                    use=use,
                    objective=objective,
                    embedding=dict(embedding) if embedding is not None else None,
                )
            except ValidationError as err:
                raise RegistryError(f"invalid registry entry: {err}") from err
            entries = [*manifest.entries, entry]
            updates: dict[str, Any] = {"entries": entries}
            if status != "retired":
                updates["latest"] = entry.version
            if status == "promoted":
                entries[:] = [_demoted(e, manifest.promoted) for e in entries]
                updates["promoted"] = entry.version
            return manifest.model_copy(update=updates), entry

        entry = self._update(change)
        log_event(
            logger,
            "adapter_registered",
            registry=str(self.path),
            version=entry.version,
            name=entry.name,
            status=entry.status,
        )
        return entry

    def promote(self, version: str | int) -> RegistryEntry:
        """Mark ``version`` as the promoted one; a previously promoted entry becomes a candidate."""
        return self._set_status(str(version), "promoted")

    def retire(self, version: str | int) -> RegistryEntry:
        """Mark ``version`` retired; ``latest``/``promoted`` move off it."""
        return self._set_status(str(version), "retired")

    # ----------------------------------------------------------------- internals
    def _set_status(self, version: str, status: Status) -> RegistryEntry:
        if not self.manifest_path.is_file():  # never create a registry just to fail in it
            raise RegistryError(
                f"no adapter registry at {self.path} ({self.manifest_path} does not exist); "
                "pass --registry-path or set MONGARS_LLM_ADAPTER_REGISTRY_PATH to the registry "
                "folder"
            )

        def change(manifest: RegistryManifest) -> tuple[RegistryManifest, RegistryEntry]:
            self._find(manifest, version)
            self._pointer(manifest, "latest")  # a dangling pointer is an error, not a crash
            self._pointer(manifest, "promoted")
            entries = list(manifest.entries)
            updates: dict[str, Any] = {}
            if status == "promoted":
                entries = [_demoted(e, manifest.promoted) for e in entries]
                updates["promoted"] = version
            entries = [
                e.model_copy(update={"status": status}) if e.version == version else e
                for e in entries
            ]
            updates["entries"] = entries
            if status == "retired":
                if manifest.promoted == version:
                    updates["promoted"] = None
                alive = [e.version for e in entries if e.status != "retired"]
                updates["latest"] = alive[-1] if alive else None
            elif manifest.latest is None or _index(entries, version) > _index(
                entries, manifest.latest
            ):
                updates["latest"] = version  # an un-retired newest entry is latest again
            new = manifest.model_copy(update=updates)
            return new, self._find(new, version)

        entry = self._update(change)
        log_event(logger, "adapter_status", registry=str(self.path), version=version, status=status)
        return entry

    def _update(
        self, change: Callable[[RegistryManifest], tuple[RegistryManifest, RegistryEntry]]
    ) -> RegistryEntry:
        with self._locked():
            manifest, entry = change(self.read())
            manifest = manifest.model_copy(
                update={
                    "revision": manifest.revision + 1,
                    "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                }
            )
            try:
                atomic_write_json(self.manifest_path, manifest.model_dump(mode="json"))
            except OSError as err:
                raise RegistryError(f"cannot write {self.manifest_path}: {err}") from err
        return entry

    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RegistryError(f"cannot create the adapter registry {self.path}: {err}") from err
        with file_lock(
            self.path / LOCK_NAME,
            timeout=self.lock_timeout,
            what=f"the adapter registry {self.path}",
            error=RegistryError,
        ):
            yield

    def _store_path(self, path: Path) -> str:
        absolute = path.resolve()
        root = self.path.resolve()
        try:
            return absolute.relative_to(root).as_posix()
        except ValueError:
            return str(absolute)

    def _pointer(self, manifest: RegistryManifest, field: str) -> RegistryEntry | None:
        """The entry ``manifest.<field>`` (``latest``/``promoted``) names, or ``None``."""
        version = getattr(manifest, field)
        if version is None:
            return None
        try:
            return self._find(manifest, version)
        except RegistryError:
            known = ", ".join(e.version for e in manifest.entries) or "none"
            raise RegistryError(
                f"{self.manifest_path}: {field!r} names version {version!r}, which is not among "
                f"its entries (known: {known}); the file was edited or damaged: set {field!r} to "
                "a known version (or null), or restore the file from a backup"
            ) from None

    def _file_in(self, root: Path, key: str, version: str) -> Path:
        """The file a checksum key names, proven to lie inside the adapter folder ``root``."""
        where = f"{self.manifest_path}: adapter version {version}"
        _check_checksum_key(key, where=where)
        file = root / key
        if not file.resolve().is_relative_to(root.resolve()):
            raise RegistryError(
                f"{where}: checksum key {key!r} resolves outside the adapter folder {root} "
                "(a link?); adapter files must be regular files inside it"
            )
        return file

    def _find(self, manifest: RegistryManifest, version: str) -> RegistryEntry:
        for entry in manifest.entries:
            if entry.version == version:
                return entry
        known = ", ".join(e.version for e in manifest.entries) or "(none)"
        raise RegistryError(
            f"adapter version {version!r} is not in the registry {self.path}; known versions: "
            f"{known}"
        )


def _check_checksum_key(key: str, *, where: str) -> None:
    """A checksum key is a relative POSIX path inside the adapter folder: no ``..``, no root."""
    parts = key.split("/")
    if (
        not key
        or "\\" in key
        or "\0" in key
        or PurePosixPath(key).is_absolute()
        or PureWindowsPath(key).drive
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise RegistryError(
            f"{where}: checksum key {key!r} is not a relative path inside the adapter folder "
            "(no '..', no absolute path); the registry manifest was tampered with or damaged: "
            "restore it from a backup or register the adapter again"
        )


def _demoted(entry: RegistryEntry, promoted: str | None) -> RegistryEntry:
    if promoted is not None and entry.version == promoted and entry.status == "promoted":
        return entry.model_copy(update={"status": "candidate"})
    return entry


def _index(entries: list[RegistryEntry], version: str) -> int:
    return next(i for i, e in enumerate(entries) if e.version == version)


def default_registry_path() -> Path:
    """The registry directory from settings (``MONGARS_LLM_ADAPTER_REGISTRY_PATH``)."""
    from ..settings import get_settings

    return Path(os.fspath(get_settings().llm_adapter_registry_path))
