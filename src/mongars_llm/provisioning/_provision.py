"""``provision()``: make sure the weights of a profile's roles are on disk.

Per role: the report cache (process lifetime) answers first; otherwise one
single-flight execution per role key runs the provider under an inter-process
file lock (per model, with ``settings.provision_lock_timeout``). Any failure is
that role's ``failed`` entry; the other roles still run.

Before a real run, :func:`~._staging.remove_stale_work` deletes what a killed
run left behind (staging folders, partial downloads) once it is older than the
lock timeout and its lock is free.

Layering: provisioning sits above :mod:`mongars_llm.manager` and imports it; a
:class:`~mongars_llm.manager.ModelManager` says which roles a profile has,
:func:`provision` puts them on disk. The manager never imports this package
(but for its deprecated shims).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._fs import file_lock, human_bytes
from ..errors import ConfigError, ProvisionError, ProvisionLockTimeout
from ..logging import log_event
from ..manager import ModelManager
from ._adapter_sources import plan_adapters, provision_adapters
from ._base import Provider, ProvisionRequest, get_provider
from ._lockfile import LOCK_FILE_NAME, LockedRole, lock_record, read_lock, update_lock
from ._report import ProgressEvent, ProvisionEntry, ProvisionReport
from ._singleflight import SingleFlight
from ._staging import remove_stale_work

if TYPE_CHECKING:
    from ..manifest.models import Manifest, RoleEntry
    from ..settings import Settings

__all__ = ["aprovision", "clear_cache", "provision"]

logger = logging.getLogger("mongars_llm.provision")

_flights: SingleFlight[ProvisionEntry] = SingleFlight()
_cache: dict[tuple[Any, ...], ProvisionEntry] = {}
_cache_lock = threading.Lock()


def clear_cache() -> None:
    """Forget every cached report (the next call checks the disk/daemon again)."""
    with _cache_lock:
        _cache.clear()


def provision(
    roles: str | Iterable[str] | None = None,
    *,
    force: bool = False,
    profile: str | None = None,
    manager: ModelManager | None = None,
    settings: Settings | None = None,
    manifest: Manifest | str | Path | None = None,
    dry_run: bool = False,
    locked: bool = False,
    lock_path: str | Path | None = None,
    progress: Callable[[ProgressEvent], None] | None = None,
    show_progress: bool = True,
    keep_gguf: bool = False,
) -> ProvisionReport:
    """Provision ``roles`` (default: every role of the active profile).

    ``force`` bypasses the report cache and re-verifies installed files
    (re-downloading what fails). ``dry_run`` reports what would be downloaded
    and whether it fits on disk, writing nothing. After a real run the resolved
    revisions are recorded in ``mongars.lock.json`` (next to the manifest, or
    ``lock_path``); ``locked=True`` provisions exactly those revisions.
    ``progress`` receives :class:`ProgressEvent` updates; ``show_progress=False``
    hides the Hub's progress bars. Unknown roles raise
    :class:`~mongars_llm.errors.UnknownRoleError` before anything runs.

    ``keep_gguf=True`` keeps a GGUF source as the primary artifact: a role naming a
    ``.gguf`` file, or an Ollama model in the store, gets the GGUF file itself as its
    ``path`` (checked: the file's sha256 is its ``revision``, an Ollama blob must match
    its manifest's digest) and nothing is converted; the llama.cpp engine runs it.
    The default converts it once into a transformers folder (the torch engine,
    training and export need one).
    """
    manager = _manager(manager, settings=settings, profile=profile, manifest=manifest)
    names = [roles] if isinstance(roles, str) else (None if roles is None else list(roles))
    resolved = manager.roles(names)
    settings = manager.settings
    if not dry_run:
        remove_stale_work(settings.resolved_models_dir, max_age=settings.provision_lock_timeout)
    profile_name = manager.profile_name
    base_dir = Path(manager.manifest.base_dir)
    lock_file = _lock_file(manager, lock_path)
    pins: dict[str, LockedRole] = {}
    if locked:
        pins = _read_pins(lock_file, profile_name, resolved)

    entries = [
        _provision_role(
            role,
            settings=settings,
            base_dir=base_dir,
            force=force,
            dry_run=dry_run,
            pin=pins.get(role.role),
            progress=progress,
            show_progress=show_progress,
            keep_gguf=keep_gguf,
        )
        for role in resolved
    ]
    wrote_lock = None
    if lock_file is not None and not dry_run and not locked:
        records = {
            entry.role: lock_record(entry, role.entry.name)
            for entry, role in zip(entries, resolved, strict=False)
            if entry.action in ("installed", "exists")
        }
        if records:
            guard = settings.resolved_models_dir / ".locks" / f"lockfile-{_digest(lock_file)}.lock"
            update_lock(
                lock_file,
                profile_name,
                records,
                guard=guard,
                timeout=settings.provision_lock_timeout,
            )
            wrote_lock = str(lock_file)
    return ProvisionReport(
        entries=tuple(entries),
        profile=profile_name,
        dry_run=dry_run,
        lock_file=wrote_lock or (str(lock_file) if locked and lock_file else None),
    )


async def aprovision(roles: str | Iterable[str] | None = None, **kwargs: Any) -> ProvisionReport:
    """:func:`provision` in a worker thread; concurrent callers share downloads with
    threads calling :func:`provision` (one single-flight map)."""
    return await asyncio.to_thread(provision, roles, **kwargs)


# ---------------------------------------------------------------- helpers
def _manager(
    manager: ModelManager | None,
    *,
    settings: Settings | None,
    profile: str | None,
    manifest: Manifest | str | Path | None,
) -> ModelManager:
    """``manager``, or one built from the other arguments; both at once is an error."""
    if manager is None:
        return ModelManager(manifest, settings=settings, profile=profile)
    conflicts = []
    if profile is not None and profile != manager.profile_name:
        conflicts.append(f"profile={profile!r} (the manager's profile is {manager.profile_name!r})")
    if settings is not None and settings is not manager.settings:
        conflicts.append("settings= (the manager has its own settings)")
    if manifest is not None and manifest is not manager.manifest:
        conflicts.append(f"manifest= (the manager's manifest is {manager.manifest_source})")
    if conflicts:
        raise ConfigError(
            f"provision() got manager= and {', '.join(conflicts)}: a manager fixes its "
            "manifest, settings and profile; pass either manager= or profile=/settings=/"
            "manifest=, e.g. provision(roles, profile=..., manifest=manager.manifest, "
            "settings=manager.settings) for another profile of the same manifest"
        )
    return manager


def _lock_file(manager: ModelManager, lock_path: str | Path | None) -> Path | None:
    if lock_path is not None:
        return Path(lock_path).expanduser().absolute()
    source = getattr(manager.manifest, "source", None)
    if source is None or not Path(source).is_file():  # built-in or in-memory manifest
        return None
    return Path(source).absolute().parent / LOCK_FILE_NAME


def _digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(str(path).encode()).hexdigest()[:16]


def _read_pins(lock_file: Path | None, profile: str, resolved: list[Any]) -> dict[str, LockedRole]:
    if lock_file is None:
        raise ConfigError(
            "locked provisioning needs a lock file: the built-in manifest has no folder, so "
            "pass lock_path (CLI: --lock-file) or use a manifest file"
        )
    if not lock_file.is_file():
        raise ConfigError(
            f"lock file {lock_file} does not exist; run `mongars-llm provision` without "
            "--locked once to record the revisions"
        )
    pins = read_lock(lock_file).get(profile, {})
    missing = [r.role for r in resolved if r.role not in pins]
    if missing:
        raise ConfigError(
            f"{lock_file} records no revision for role(s) {', '.join(missing)} of profile "
            f"{profile!r}; run `mongars-llm provision` without --locked to record them"
        )
    for r in resolved:
        pin = pins[r.role]
        if (pin.provider, pin.model) != (r.entry.provider, r.entry.name):
            raise ConfigError(
                f"{lock_file} is out of date for role {r.role!r}: the manifest says "
                f"{r.entry.provider}:{r.entry.name}, the lock file {pin.provider}:{pin.model}; "
                "provision without --locked to update it"
            )
    return pins


def _cache_key(provider: Provider, request: ProvisionRequest) -> tuple[Any, ...]:
    return (
        request.entry.provider,
        str(request.settings.resolved_models_dir),
        str(request.base_dir),
        request.profile,
        request.role,
        request.entry.model_dump_json(),
        request.locked_revision,
        request.keep_gguf,
        *provider.cache_key(request),
    )


def _still_there(entry: ProvisionEntry) -> bool:
    if entry.path is not None and not Path(entry.path).exists():
        return False
    return all(Path(a.path).exists() for a in entry.adapters)


def _provision_role(
    role: Any,
    *,
    settings: Settings,
    base_dir: Path,
    force: bool,
    dry_run: bool,
    pin: LockedRole | None,
    progress: Callable[[ProgressEvent], None] | None,
    show_progress: bool,
    keep_gguf: bool = False,
) -> ProvisionEntry:
    entry = role.entry
    started = time.monotonic()
    try:
        provider = get_provider(entry.provider)
    except ConfigError as err:
        failed = _failed(role.role, entry, role.profile, err)
        _log(failed)
        return failed
    request = ProvisionRequest(
        role=role.role,
        profile=role.profile,
        entry=entry,
        settings=settings,
        base_dir=base_dir,
        force=force,
        dry_run=dry_run,
        locked_revision=pin.revision if pin else None,
        progress=progress,
        show_progress=show_progress,
        keep_gguf=keep_gguf,
    )
    key = _cache_key(provider, request)
    if not force and not dry_run:
        with _cache_lock:
            cached = _cache.get(key)
        if cached is not None and _still_there(cached):
            hit = cached.replace(action="exists", seconds=round(time.monotonic() - started, 6))
            _log(hit, cached=True)
            return hit

    def work() -> ProvisionEntry:
        result = _run(provider, request, pin)
        if result.ok and not dry_run and result.action in ("installed", "exists"):
            with _cache_lock:
                _cache[key] = result
        _log(result)
        return result

    result, _shared = _flights.do((*key, force, dry_run), work)
    return result


def _run(provider: Provider, request: ProvisionRequest, pin: LockedRole | None) -> ProvisionEntry:
    started = time.monotonic()
    entry = request.entry
    try:
        lock_name = None if request.dry_run else provider.lock_name(request)
        if lock_name is None:
            result = _provider_run(provider, request, pin)
        else:
            lock = request.settings.resolved_models_dir / ".locks" / f"{lock_name}.lock"
            with file_lock(
                lock,
                timeout=request.settings.provision_lock_timeout,
                what=f"{entry.provider} model {entry.name!r} (role {request.role!r})",
                error=ProvisionLockTimeout,
            ):
                result = _provider_run(provider, request, pin)
    except Exception as err:
        result = _failed(request.role, entry, request.profile, err)
    result = result.replace(seconds=round(time.monotonic() - started, 3))
    request.report("done", detail=result.action)
    return result


def _failed(role: str, entry: RoleEntry, profile: str | None, err: Exception) -> ProvisionEntry:
    """The ``failed`` entry of a role; ``err`` says why."""
    return ProvisionEntry(
        role=role,
        model=entry.name,
        provider=entry.provider,
        action="failed",
        error=str(err) or type(err).__name__,
        profile=profile,
    )


def _provider_run(
    provider: Provider, request: ProvisionRequest, pin: LockedRole | None
) -> ProvisionEntry:
    result = provider.provision(request)
    if request.dry_run:
        if result.plan is not None and request.entry.adapters:
            from dataclasses import replace

            result = result.replace(
                plan=replace(result.plan, adapters=tuple(plan_adapters(request)))
            )
        if result.plan is not None and not result.plan.enough_disk:
            return result.replace(
                action="failed",
                error=(
                    f"not enough free disk for {request.model}: needs "
                    f"{human_bytes(result.plan.bytes)}, {human_bytes(result.plan.free_bytes)} "
                    f"free under {request.settings.resolved_models_dir}; free space or set "
                    "MONGARS_MODELS_DIR"
                ),
            )
        return result
    if result.action in ("installed", "exists") and request.entry.adapters:
        adapters = provision_adapters(request)
        if pin is not None:
            _check_pinned_adapters(adapters, pin)
        result = result.replace(adapters=tuple(adapters))
    return result


def _check_pinned_adapters(adapters: list[Any], pin: LockedRole) -> None:
    locked = {a.get("name"): a.get("sha256") for a in pin.adapters if isinstance(a, dict)}
    for adapter in adapters:
        want = locked.get(adapter.name)
        if want and adapter.sha256 != want:
            raise ProvisionError(
                f"adapter {adapter.name!r} has sha256 {adapter.sha256}, the lock file recorded "
                f"{want}; provision without --locked to accept the new adapter"
            )


def _log(entry: ProvisionEntry, *, cached: bool = False) -> None:
    fields: dict[str, Any] = {
        "role": entry.role,
        "action": entry.action,
        "provider": entry.provider,
        "model": entry.model,
        "seconds": entry.seconds,
        "profile": entry.profile,
        "revision": entry.revision,
    }
    if cached:
        fields["cached"] = True
    if entry.error:
        fields["error"] = entry.error
    log_event(
        logger, "provision", logging.WARNING if entry.action == "failed" else logging.INFO, **fields
    )
