"""The provider plugin interface and the registry of providers by name.

A provider turns a role's manifest entry into files (or a daemon-side model)
through a template method, :meth:`Provider.provision`::

    resolve ─┬─ installed and not force ──────────────────────────► exists
             ├─ installed and force ── verify_installed ─ ok ──────► exists
             ├─ missing and auto_download false ───────────────────► skipped
             └─ fetch ─► verify ─► install ────────────────────────► installed

A role with ``auto_download: false`` is resolved by ``resolve_local`` instead of
``resolve``: from what is on disk, with no network call.

Each step is a small overridable hook; most providers implement ``resolve``,
``fetch`` and ``verify`` only. A failure anywhere raises; the orchestrator
turns it into a ``failed`` entry for that role alone. A file-system error that a
hook lets through (a path too long, a permission, a full disk) is re-raised as a
:class:`~mongars_llm.errors.ProvisionError` naming the role, the file and the fix.

Providers are found by name: built-ins, :func:`register_provider` from code, and
the ``mongars_llm.providers`` entry point group of installed distributions.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import ConfigError, MongarsError, ProvisionError
from ._report import ProgressEvent, ProvisionEntry, ProvisionPlan

if TYPE_CHECKING:
    from ..manifest.models import RoleEntry
    from ..settings import Settings

__all__ = [
    "ENTRY_POINT_GROUP",
    "FetchResult",
    "Provider",
    "ProvisionRequest",
    "Resolution",
    "available_providers",
    "get_provider",
    "register_provider",
]

ENTRY_POINT_GROUP = "mongars_llm.providers"


@dataclass(frozen=True)
class ProvisionRequest:
    """Everything a provider needs to provision one role.

    ``locked_revision`` is the commit (or digest) recorded in the lock file when
    provisioning with ``locked=True``; it wins over the manifest's ``revision``.
    ``keep_gguf``: a GGUF source (local ``.gguf`` file, Ollama blob) is the entry's
    ``path`` as is, not converted (for the llama.cpp engine).
    """

    role: str
    profile: str
    entry: RoleEntry
    settings: Settings
    base_dir: Path
    force: bool = False
    dry_run: bool = False
    locked_revision: str | None = None
    progress: Callable[[ProgressEvent], None] | None = None
    show_progress: bool = True
    keep_gguf: bool = False

    @property
    def model(self) -> str:
        return self.entry.name

    @property
    def wanted_revision(self) -> str | None:
        return self.locked_revision or self.entry.revision

    def resolve_path(self, value: str | Path) -> Path:
        """A manifest path, absolute; relative ones resolve against the manifest's folder."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.base_dir / path).resolve()

    def report(self, stage: str, **fields: Any) -> None:
        if self.progress is not None:
            self.progress(
                ProgressEvent(
                    role=self.role,
                    provider=self.entry.provider,
                    model=self.model,
                    stage=stage,
                    **fields,
                )
            )


@dataclass
class Resolution:
    """Where a role's model lives and whether it is already there.

    ``path`` is the final location (``None`` for daemon-side models); ``revision``
    the resolved commit or digest; ``details`` is free for the provider's hooks.
    """

    model: str
    revision: str | None = None
    path: Path | None = None
    installed: bool = False
    bytes: int | None = None
    verified: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class FetchResult:
    """What ``fetch`` produced: a staging folder (moved into place by ``install``)."""

    staging: Path | None = None
    bytes: int | None = None
    details: dict[str, Any] = field(default_factory=dict)


class Provider(ABC):
    """Base class of providers; subclasses set :attr:`name` and the hooks."""

    name: ClassVar[str] = ""
    #: whether fetching writes under the models dir (then a per-model file lock is held)
    writes_files: ClassVar[bool] = True

    # ------------------------------------------------------------------ hooks
    def lock_name(self, request: ProvisionRequest) -> str | None:
        """A file-system-safe name for the inter-process lock; ``None`` for no lock."""
        if not self.writes_files:
            return None
        return f"{self.name}/{_safe_name(request.model)}"

    def cache_key(self, request: ProvisionRequest) -> tuple[Any, ...]:
        """Extra parts of the per-process report cache key (e.g. an endpoint)."""
        return ()

    @abstractmethod
    def resolve(self, request: ProvisionRequest) -> Resolution:
        """Find the exact version wanted and whether it is installed (no download)."""

    def resolve_local(self, request: ProvisionRequest) -> Resolution:
        """``resolve`` without any network call, for roles with ``auto_download: false``.

        Providers whose ``resolve`` asks a remote server override it; the default
        calls ``resolve``.
        """
        return self.resolve(request)

    @abstractmethod
    def fetch(self, request: ProvisionRequest, resolution: Resolution) -> FetchResult:
        """Download the model (into a staging folder for file-based providers)."""

    def verify(
        self, request: ProvisionRequest, resolution: Resolution, fetched: FetchResult
    ) -> str | None:
        """Check what ``fetch`` produced; raise on a problem. Returns what was verified."""
        return None

    def install(
        self, request: ProvisionRequest, resolution: Resolution, fetched: FetchResult
    ) -> Path | None:
        """Move the verified download into place (atomically) and return the final path."""
        return resolution.path

    def discard(self, request: ProvisionRequest, fetched: FetchResult) -> None:
        """Remove what a failed fetch left behind."""
        return None

    def verify_installed(self, request: ProvisionRequest, resolution: Resolution) -> str | None:
        """Re-verify an existing install (``force=True``); raise if it is broken."""
        return resolution.verified

    def plan(self, request: ProvisionRequest, resolution: Resolution) -> ProvisionPlan:
        """What a real run would download (dry run; must write nothing)."""
        return ProvisionPlan(target=_str(resolution.path))

    # --------------------------------------------------------- template method
    def provision(self, request: ProvisionRequest) -> ProvisionEntry:
        """resolve → (exists | skipped | fetch → verify → install); raises on failure."""
        with _file_errors_explained(request):
            return self._provision(request)

    def _provision(self, request: ProvisionRequest) -> ProvisionEntry:
        request.report("resolve")
        offline = not request.entry.auto_download  # never download, nor ask a server
        resolution = self.resolve_local(request) if offline else self.resolve(request)
        base = ProvisionEntry(
            role=request.role,
            model=resolution.model,
            provider=request.entry.provider,
            action="exists",
            path=_str(resolution.path),
            revision=resolution.revision,
            bytes=resolution.bytes,
            profile=request.profile,
            verified=resolution.verified,
        )
        if request.dry_run:
            if resolution.installed:
                return base.replace(plan=ProvisionPlan(target=_str(resolution.path)))
            if not request.entry.auto_download:
                return base.replace(action="skipped", error=_skipped_reason(request))
            plan = self.plan(request, resolution)
            return base.replace(action="planned", bytes=plan.bytes, plan=plan)

        if resolution.installed:
            if not request.force:
                return base
            try:
                request.report("verify")
                verified = self.verify_installed(request, resolution)
                return base.replace(verified=verified)
            except Exception as err:  # a broken install is fetched again below
                if offline:
                    raise
                resolution.details["reverify_error"] = str(err)
                resolution.installed = False
        elif offline:
            return base.replace(action="skipped", error=_skipped_reason(request))

        request.report("download")
        fetched = self.fetch(request, resolution)
        try:
            request.report("verify")
            verified = self.verify(request, resolution, fetched)
            request.report("install")
            path = self.install(request, resolution, fetched)
        except BaseException:
            self.discard(request, fetched)
            raise
        return base.replace(
            action="installed",
            path=_str(path),
            revision=resolution.revision,
            bytes=fetched.bytes if fetched.bytes is not None else resolution.bytes,
            verified=verified,
        )


def _skipped_reason(request: ProvisionRequest) -> str:
    return (
        f"{request.model!r} is not installed and auto_download is false for role "
        f"{request.role!r}; set auto_download: true or install it yourself"
    )


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


#: longest file name made from a model name: with a suffix (``.lock``, ``.tmp-…-<8 hex>``)
#: it stays under the 255 bytes file systems allow
_MAX_NAME_BYTES = 200


def _safe_name(model: str) -> str:
    """A file name for ``model``; a long one is cut and ends with a hash of the whole."""
    safe = "".join(c if c.isalnum() or c in "._-" else "--" if c == "/" else "_" for c in model)
    encoded = safe.encode()
    if len(encoded) <= _MAX_NAME_BYTES:
        return safe
    digest = hashlib.sha256(model.encode()).hexdigest()[:16]
    head = encoded[: _MAX_NAME_BYTES - len(digest) - 1].decode(errors="ignore")
    return f"{head}-{digest}"


_OS_ERROR_FIXES = {
    errno.ENAMETOOLONG: (
        "the path, or one name in it, is longer than the file system allows: shorten the "
        "model's name or path in the manifest"
    ),
    errno.EACCES: (
        "fix the permissions of that path, or set MONGARS_MODELS_DIR to a folder you can write"
    ),
    errno.EPERM: (
        "fix the permissions of that path, or set MONGARS_MODELS_DIR to a folder you can write"
    ),
    errno.EROFS: "the file system is read-only: set MONGARS_MODELS_DIR to a writable folder",
    errno.ENOSPC: "the disk is full: free space, or set MONGARS_MODELS_DIR to a larger disk",
    errno.ELOOP: "a symbolic link in that path loops: fix or remove the link",
}


@contextlib.contextmanager
def _file_errors_explained(request: ProvisionRequest) -> Iterator[None]:
    """Re-raise a bare :class:`OSError` as a :class:`ProvisionError` naming the file and a fix."""
    try:
        yield
    except OSError as err:
        if isinstance(err, MongarsError) or err.errno is None:
            raise
        where = f": {err.filename}" if err.filename is not None else ""
        fix = _OS_ERROR_FIXES.get(err.errno, "check that path, then provision again")
        raise ProvisionError(
            f"{err.strerror or err}{where} (role {request.role!r}, {request.entry.provider} "
            f"model {request.model!r}); {fix}"
        ) from err


# ----------------------------------------------------------------- registry
_BUILTINS: dict[str, str] = {
    "huggingface": "mongars_llm.provisioning.huggingface:HuggingFaceProvider",
    "local": "mongars_llm.provisioning.local:LocalProvider",
    "ollama": "mongars_llm.provisioning.ollama:OllamaProvider",
}
_registry_lock = threading.RLock()
_registered: dict[str, Callable[[], Provider]] = {}
_instances: dict[str, Provider] = {}


def register_provider(name: str, provider: type[Provider] | Callable[[], Provider]) -> None:
    """Register a provider class (or a zero-argument factory) under ``name``.

    The name becomes valid in manifests parsed from now on. Registering an
    existing name replaces it (tests use this to wrap a built-in provider).
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"a provider name must be a non-empty string, not {name!r}")
    if not callable(provider):
        raise ConfigError(f"provider {name!r} must be a Provider subclass or a factory")
    from ..manifest.providers import register_provider_name

    with _registry_lock:
        _registered[name] = provider
        _instances.pop(name, None)
    register_provider_name(name)


def unregister_provider(name: str) -> None:
    """Forget a provider registered with :func:`register_provider`."""
    with _registry_lock:
        _registered.pop(name, None)
        _instances.pop(name, None)


def _load_target(target: str) -> Any:
    import importlib

    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _entry_point_targets() -> dict[str, Any]:
    try:
        return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    except Exception:  # broken metadata of an unrelated distribution
        return {}


def available_providers() -> list[str]:
    """Every provider name that :func:`get_provider` can build."""
    with _registry_lock:
        names = set(_BUILTINS) | set(_registered)
    return sorted(names | set(_entry_point_targets()))


def get_provider(name: str) -> Provider:
    """The (process-wide) provider instance registered under ``name``."""
    with _registry_lock:
        if name in _instances:
            return _instances[name]
        factory: Any = _registered.get(name)
        if factory is None and name in _BUILTINS:
            factory = _load_target(_BUILTINS[name])
        if factory is None:
            ep = _entry_point_targets().get(name)
            if ep is not None:
                try:
                    factory = ep.load()
                except Exception as err:
                    raise ConfigError(
                        f"provider {name!r} (entry point {ep.value}) cannot be imported: {err}"
                    ) from err
        if factory is None:
            raise ConfigError(
                f"unknown provider {name!r}; available providers: "
                f"{', '.join(available_providers())}. Register it with "
                "mongars_llm.provisioning.register_provider() or an entry point in the "
                f"{ENTRY_POINT_GROUP!r} group"
            )
        instance = factory()
        if not isinstance(instance, Provider):
            raise ConfigError(f"provider {name!r} did not build a Provider (got {instance!r})")
        _instances[name] = instance
        return instance
