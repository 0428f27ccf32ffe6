"""Per-role LoRA adapters, provisioned with their model.

An adapter is a registry entry (``name`` [+ ``version``]) or a ``source``:

* a local directory (used in place, never copied) or a local archive;
* ``hf://org/repo[@revision]``: a Hub repository holding a peft adapter;
* an ``http(s)://`` URL to a ``.tar.gz``/``.tgz``/``.tar``/``.zip`` archive.

Archives and Hub adapters are installed atomically under
``<models_dir>/adapters/<name>/<sha256-or-commit>``; archives are checked
before anything is extracted: absolute paths, ``..`` components, links and
special files are rejected. ``sha256`` is the digest of the archive for an
archive, and for a directory the :func:`tree_sha256` of its files.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
import tarfile
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO, TYPE_CHECKING, Any, Literal

from .._fs import atomic_write_json, file_lock, sha256_file
from ..errors import ProvisionError, ProvisionLockTimeout
from ._report import AdapterRecord
from ._staging import replace_dir

if TYPE_CHECKING:
    from ..manifest.models import AdapterSpec
    from ._base import ProvisionRequest

__all__ = ["plan_adapters", "provision_adapters", "safe_extract", "tree_sha256"]

MARKER_NAME = ".mongars-complete.json"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
_HEX = "0123456789abcdef"
ADAPTER_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "tokenizer.model", "README.md"]


def tree_sha256(root: str | Path) -> str:
    """One digest for a directory: sha256 over ``"<path>  <file sha256>\\n"`` lines, sorted.

    Files named ``.mongars-complete.json`` are left out, so an installed copy and
    its source have the same digest.
    """
    root = Path(root)
    digests = {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MARKER_NAME
    }
    return _digest_of_map(digests)


def _digest_of_map(digests: dict[str, str]) -> str:
    lines = "".join(f"{path}  {digest}\n" for path, digest in sorted(digests.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def _folder_name(spec: AdapterSpec) -> str:
    """The adapter's name, checked to be one plain folder name (never ``..`` or a path)."""
    from ..registry import ADAPTER_NAME_PATTERN, is_safe_adapter_name

    if not is_safe_adapter_name(spec.name):
        raise ProvisionError(
            f"adapter name {spec.name!r} cannot name its install folder: use letters, digits, "
            f"'.', '_' or '-', starting with a letter or digit ({ADAPTER_NAME_PATTERN}); "
            "rename the adapter in the manifest"
        )
    return spec.name


def _is_archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


# ---------------------------------------------------------------- entry points
def provision_adapters(request: ProvisionRequest) -> list[AdapterRecord]:
    """Provision every adapter of the role; the first failure raises ProvisionError."""
    records = []
    for spec in request.entry.adapters:
        try:
            records.append(_provision_one(spec, request))
        except ProvisionError as err:
            raise ProvisionError(f"adapter {spec.name!r}: {err}") from err
    return records


def plan_adapters(request: ProvisionRequest) -> list[dict[str, Any]]:
    """What a real run would do with each adapter (reads nothing remote, writes nothing)."""
    plans = []
    for spec in request.entry.adapters:
        source = spec.source or f"registry:{request.settings.llm_adapter_registry_path}"
        installed: bool | None = None
        if spec.source and spec.sha256 and _is_archive(spec.source):
            installed = (_adapter_root(request, spec) / spec.sha256.lower() / MARKER_NAME).exists()
        elif spec.source and not spec.source.startswith(("hf://", "http://", "https://")):
            installed = request.resolve_path(spec.source).exists()
        plans.append({"name": spec.name, "source": source, "installed": installed})
    return plans


def _provision_one(spec: AdapterSpec, request: ProvisionRequest) -> AdapterRecord:
    if not spec.source:
        return _registry_adapter(spec, request)
    source = spec.source
    if source.startswith("hf://"):
        return _locked(spec, request, lambda: _hf_adapter(spec, request))
    if source.startswith(("http://", "https://")):
        return _locked(spec, request, lambda: _url_adapter(spec, request))
    path = request.resolve_path(source)
    if path.is_dir():
        return _dir_adapter(spec, path)
    if path.is_file() and _is_archive(path.name):
        return _locked(spec, request, lambda: _local_archive_adapter(spec, request, path))
    if path.exists():
        raise ProvisionError(
            f"{path} is neither an adapter directory nor an archive ({', '.join(ARCHIVE_SUFFIXES)})"
        )
    raise ProvisionError(
        f"source {path} does not exist (relative paths resolve against the manifest folder "
        f"{request.base_dir})"
    )


def _locked(spec: AdapterSpec, request: ProvisionRequest, fn: Any) -> AdapterRecord:
    locks = request.settings.resolved_models_dir / ".locks" / "adapters"
    lock = locks / f"{_folder_name(spec)}.lock"
    try:
        with file_lock(
            lock,
            timeout=request.settings.provision_lock_timeout,
            what=f"adapter {spec.name!r}",
            error=ProvisionLockTimeout,
        ):
            result: AdapterRecord = fn()
            return result
    except ProvisionLockTimeout as err:
        raise ProvisionError(str(err)) from err


def _adapter_root(request: ProvisionRequest, spec: AdapterSpec) -> Path:
    adapters = request.settings.resolved_models_dir / "adapters"
    root = adapters / _folder_name(spec)
    if root.resolve().parent != adapters.resolve():  # e.g. a planted link
        raise ProvisionError(f"{root} resolves outside {adapters}; remove it and retry")
    return root


def _record(
    spec: AdapterSpec,
    path: Path,
    sha256: str | None,
    version: str | None,
    *,
    registered_use: str | None = None,
) -> AdapterRecord:
    """What provisioning installed; ``use`` is the manifest's, else the registry
    entry's (an embedding adapter stays out of chat), else ``all``."""
    return AdapterRecord(
        name=spec.name,
        path=str(path),
        sha256=sha256,
        version=version,
        source=spec.source,
        use=spec.use or registered_use or "all",
    )


def _check_peft_dir(path: Path) -> None:
    config = path / "adapter_config.json"
    try:
        json.loads(config.read_text())
    except FileNotFoundError as err:
        raise ProvisionError(
            f"{path} has no adapter_config.json: not a peft adapter directory"
        ) from err
    except (OSError, ValueError) as err:
        raise ProvisionError(f"{config} is not valid JSON ({err})") from err


def _adapter_dir_in(root: Path) -> Path:
    """The folder holding adapter_config.json: ``root`` or its only sub-folder."""
    if (root / "adapter_config.json").is_file():
        return root
    children = [c for c in root.iterdir() if c.name != MARKER_NAME]
    if len(children) == 1 and children[0].is_dir():
        return children[0]
    return root


# ---------------------------------------------------------------- kinds
def _registry_adapter(spec: AdapterSpec, request: ProvisionRequest) -> AdapterRecord:
    """Look a name (+version) up in the adapter registry (the one place that knows it)."""
    from ..errors import RegistryError
    from ..registry import AdapterRegistry

    registry = AdapterRegistry(request.settings.llm_adapter_registry_path)
    try:
        if spec.version:
            entry = registry.get(spec.version)
            if entry.name != spec.name:
                raise ProvisionError(
                    f"registry version {spec.version} of {registry.path} is adapter "
                    f"{entry.name!r}, not {spec.name!r}"
                )
        else:
            # only a promoted version goes live unless the manifest pins one: a fresh
            # candidate must never change a role's answers by itself
            promoted = registry.promoted()
            if promoted is not None and promoted.name == spec.name:
                entry = promoted
            else:
                versions = [e.version for e in registry.list() if e.name == spec.name]
                if versions:
                    raise ProvisionError(
                        f"adapter {spec.name!r} has versions {', '.join(versions)} in the "
                        f"registry {registry.path} but none is promoted; promote one "
                        f"(mongars-llm adapters promote {versions[-1]}) or pin its 'version' "
                        "in the manifest"
                    )
                known = sorted({e.name for e in registry.list()})
                raise ProvisionError(
                    f"no adapter named {spec.name!r} in the registry {registry.path} (known: "
                    f"{', '.join(known) or 'none'}); train and register it, set "
                    "MONGARS_LLM_ADAPTER_REGISTRY_PATH, or give the adapter a 'source'"
                )
        registry.verify(entry)
        path = registry.adapter_path(entry)
    except RegistryError as err:
        raise ProvisionError(str(err)) from err
    _check_peft_dir(path)
    digest = _digest_of_map(dict(entry.sha256)) if entry.sha256 else tree_sha256(path)
    _check_digest(spec, digest, what=f"registry adapter {path}")
    return _record(spec, path, digest, entry.version, registered_use=entry.use)


def _dir_adapter(spec: AdapterSpec, path: Path) -> AdapterRecord:
    _check_peft_dir(path)
    digest = tree_sha256(path)
    _check_digest(spec, digest, what=f"directory {path} (tree_sha256)")
    return _record(spec, path, digest, spec.version)


def _check_digest(spec: AdapterSpec, actual: str, *, what: str) -> None:
    if spec.sha256 and spec.sha256.lower() != actual:
        raise ProvisionError(
            f"sha256 mismatch for {what}: expected {spec.sha256.lower()}, got {actual}; the "
            "files changed or the manifest's sha256 is wrong"
        )


def _local_archive_adapter(
    spec: AdapterSpec, request: ProvisionRequest, archive: Path
) -> AdapterRecord:
    digest = sha256_file(archive)
    _check_digest(spec, digest, what=f"archive {archive}")
    return _install_archive(spec, request, archive, digest)


def _url_adapter(spec: AdapterSpec, request: ProvisionRequest) -> AdapterRecord:
    import httpx

    assert spec.source is not None and spec.sha256 is not None
    expected = spec.sha256.lower()
    final = _adapter_root(request, spec) / expected
    if (final / MARKER_NAME).is_file() and not request.force:
        return _record(spec, _adapter_dir_in(final), expected, spec.version)
    root = _adapter_root(request, spec)
    root.mkdir(parents=True, exist_ok=True)
    suffix = next(
        s for s in (*ARCHIVE_SUFFIXES, "") if spec.source.lower().split("?")[0].endswith(s)
    )
    download = root / f".download-{uuid.uuid4().hex[:8]}{suffix or '.tar.gz'}"
    digest = hashlib.sha256()
    try:
        with (
            httpx.Client(follow_redirects=True, timeout=httpx.Timeout(600, connect=10)) as client,
            client.stream("GET", spec.source) as response,
        ):
            if response.status_code >= 400:
                raise ProvisionError(f"GET {spec.source} answered HTTP {response.status_code}")
            with open(download, "wb") as handle:
                for chunk in response.iter_bytes(1 << 20):
                    digest.update(chunk)
                    handle.write(chunk)
        actual = digest.hexdigest()
        if actual != expected:
            raise ProvisionError(
                f"sha256 mismatch for {spec.source}: expected {expected}, got {actual}; nothing "
                "was installed"
            )
        return _install_archive(spec, request, download, actual)
    except httpx.HTTPError as err:
        raise ProvisionError(f"cannot download {spec.source}: {type(err).__name__}: {err}") from err
    finally:
        download.unlink(missing_ok=True)


def _install_archive(
    spec: AdapterSpec, request: ProvisionRequest, archive: Path, digest: str
) -> AdapterRecord:
    root = _adapter_root(request, spec)
    final = root / digest
    if (final / MARKER_NAME).is_file() and not request.force:
        return _record(spec, _adapter_dir_in(final), digest, spec.version)
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".tmp-{uuid.uuid4().hex[:8]}"
    try:
        safe_extract(archive, staging, max_bytes=request.settings.adapter_archive_max_bytes)
        _check_peft_dir(_adapter_dir_in(staging))
        atomic_write_json(staging / MARKER_NAME, {"name": spec.name, "sha256": digest})
        replace_dir(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _record(spec, _adapter_dir_in(final), digest, spec.version)


def _hf_adapter(spec: AdapterSpec, request: ProvisionRequest) -> AdapterRecord:
    from huggingface_hub import HfApi, snapshot_download

    from .huggingface import HuggingFaceProvider

    assert spec.source is not None
    repo_id, _, revision = spec.source[len("hf://") :].partition("@")
    hub = HuggingFaceProvider()
    token = request.settings.hf_token.get_secret_value() if request.settings.hf_token else None
    api = HfApi(endpoint=hub.endpoint, token=token)
    try:
        commit = api.repo_info(repo_id, revision=revision or None).sha
    except Exception as err:
        raise ProvisionError(
            f"cannot resolve {spec.source} on {hub.endpoint}: {type(err).__name__}: {err}"
        ) from err
    if not (isinstance(commit, str) and len(commit) == 40 and set(commit) <= set(_HEX)):
        raise ProvisionError(  # the commit names the install folder: never trust it blindly
            f"{hub.endpoint} answered {str(commit)[:80]!r} as the commit of {spec.source}, "
            "not a 40-hex commit hash; check HF_ENDPOINT"
        )
    root = _adapter_root(request, spec)
    final = root / commit
    if (final / MARKER_NAME).is_file() and not request.force:
        return _record(spec, final, tree_sha256(final), spec.version or commit)
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".tmp-{uuid.uuid4().hex[:8]}"
    try:
        try:
            snapshot_download(
                repo_id,
                revision=commit,
                local_dir=staging,
                cache_dir=staging / ".cache" / "hub",
                allow_patterns=ADAPTER_PATTERNS,
                token=token,
                endpoint=hub.endpoint,
            )
            result = api.verify_repo_checksums(repo_id, revision=commit, local_dir=staging)
        except Exception as err:
            raise ProvisionError(
                f"downloading {spec.source} failed: {type(err).__name__}: {err}"
            ) from err
        shutil.rmtree(staging / ".cache", ignore_errors=True)
        present = {p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file()}
        if [m for m in result.mismatches if m["path"] in present]:
            raise ProvisionError(f"{spec.source}: files do not match the Hub's checksums")
        _check_peft_dir(staging)
        digest = tree_sha256(staging)
        _check_digest(spec, digest, what=f"{spec.source} (tree_sha256)")
        atomic_write_json(staging / MARKER_NAME, {"name": spec.name, "revision": commit})
        replace_dir(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _record(spec, final, digest, spec.version or commit)


# ---------------------------------------------------------------- archives
def _check_member_name(name: str, archive: Path) -> PurePosixPath:
    posix = PurePosixPath(name.replace("\\", "/"))
    if (
        not name
        or name.startswith(("/", "\\"))
        or posix.is_absolute()
        or PureWindowsPath(name).drive
        or ".." in posix.parts
    ):
        raise ProvisionError(
            f"archive {archive.name} has an unsafe member path {name!r} (absolute or outside the "
            "archive); refusing to extract it"
        )
    return posix


def _too_big(archive: Path, size: int, limit: int, *, declared: bool) -> ProvisionError:
    how = "declares" if declared else "extracted"
    return ProvisionError(
        f"archive {archive.name} {how} more than {limit} bytes of files ({size} so far); "
        "refusing to extract it (limit MONGARS_ADAPTER_ARCHIVE_MAX_BYTES, "
        "settings.adapter_archive_max_bytes): check the archive, or raise the limit"
    )


class _Budget:
    """Counts the bytes really written, whatever the archive declared (zip bombs lie)."""

    def __init__(self, archive: Path, limit: int) -> None:
        self.archive, self.limit, self.used = archive, limit, 0

    def copy(self, source: Any, target: Path) -> None:
        with open(target, "wb") as handle:
            while chunk := source.read(1 << 20):
                self.used += len(chunk)
                if self.used > self.limit:
                    raise _too_big(self.archive, self.used, self.limit, declared=False)
                handle.write(chunk)


def _archive_limit(max_bytes: int | None) -> int:
    if max_bytes is not None:
        return max_bytes
    from ..settings import get_settings

    return get_settings().adapter_archive_max_bytes


def safe_extract(archive: Path, dest: Path, *, max_bytes: int | None = None) -> list[str]:
    """Extract a .tar[.gz]/.zip into ``dest`` after checking every member.

    Rejects absolute paths, ``..`` components, symbolic and hard links, and
    anything that is not a regular file or directory, before writing a byte.
    At most ``max_bytes`` (default ``settings.adapter_archive_max_bytes``) are
    extracted: the declared sizes are checked first, then the bytes written are
    counted. Returns the extracted file paths.
    """
    limit = _archive_limit(max_bytes)
    dest.mkdir(parents=True, exist_ok=True)
    listing = _zip_members if archive.name.lower().endswith(".zip") else _tar_members
    with listing(archive) as members:
        return _extract(archive, dest, limit, members)


_Kind = Literal["file", "dir", "link", "special"]
#: what reading a damaged (or unsupported: zip's compression types) member raises
_BROKEN_MEMBER = (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError)


@dataclass(frozen=True)
class _Member:
    """One archive member, tar or zip alike: what the checks and the extraction need."""

    name: str
    kind: _Kind
    size: int
    open: Callable[[], IO[bytes]]
    link_target: str = ""


@contextmanager
def _tar_members(archive: Path) -> Iterator[list[_Member]]:
    try:
        tar = tarfile.open(archive, "r:*")  # noqa: SIM115 - closed by the `with` below
    except (tarfile.TarError, OSError) as err:
        raise ProvisionError(f"{archive.name} is not a readable tar archive: {err}") from err

    def member(info: tarfile.TarInfo) -> _Member:
        kind: _Kind = "special"
        if info.issym() or info.islnk():
            kind = "link"
        elif info.isfile() or info.isdir():
            kind = "file" if info.isfile() else "dir"

        def open_member() -> IO[bytes]:
            source = tar.extractfile(info)
            assert source is not None
            return source

        return _Member(info.name, kind, info.size, open_member, f" -> {info.linkname!r}")

    with tar:
        yield [member(info) for info in tar.getmembers()]


@contextmanager
def _zip_members(archive: Path) -> Iterator[list[_Member]]:
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as err:
        raise ProvisionError(f"{archive.name} is not a readable zip archive: {err}") from err

    def member(info: zipfile.ZipInfo) -> _Member:
        # Only a Unix creator stores a file type in the high bits; zipfile.writestr()
        # and many tools store permissions alone (no type bits): a regular member.
        mode = stat.S_IFMT(info.external_attr >> 16) if info.create_system == 3 else 0
        kind: _Kind = "special"
        if mode == stat.S_IFLNK:
            kind = "link"
        elif mode in (0, stat.S_IFREG, stat.S_IFDIR):
            kind = "dir" if info.is_dir() else "file"
        return _Member(info.filename, kind, info.file_size, lambda: zf.open(info))

    with zf:
        yield [member(info) for info in zf.infolist()]


def _extract(archive: Path, dest: Path, limit: int, members: list[_Member]) -> list[str]:
    """Check every member (a safe name, no link, no special file, the declared sizes within
    ``limit``) before writing a byte, then extract, counting the bytes really written."""
    for member in members:
        _check_member_name(member.name, archive)
        if member.kind == "link":
            raise ProvisionError(
                f"archive {archive.name} contains a link {member.name!r}{member.link_target}; "
                "links are not allowed in adapter archives"
            )
        if member.kind == "special":
            raise ProvisionError(
                f"archive {archive.name} contains a special file {member.name!r}; only "
                "regular files and directories are allowed"
            )
    declared = sum(member.size for member in members if member.kind == "file")
    if declared > limit:
        raise _too_big(archive, declared, limit, declared=True)
    budget = _Budget(archive, limit)
    written = []
    for member in members:
        target = _target(dest, _check_member_name(member.name, archive))
        if member.kind == "dir":
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with member.open() as source:
                budget.copy(source, target)
        except _BROKEN_MEMBER as err:
            raise ProvisionError(
                f"archive {archive.name}: cannot extract {member.name!r}: {err}"
            ) from err
        written.append(target.relative_to(dest).as_posix())
    return written


def _target(dest: Path, member: PurePosixPath) -> Path:
    target = (dest / Path(*member.parts)) if member.parts else dest
    resolved_dest = dest.resolve()
    if resolved_dest not in (target.resolve(), *target.resolve().parents):
        raise ProvisionError(f"archive member {member} would land outside {dest}")
    return target


def adapter_names(specs: Iterable[AdapterSpec]) -> list[str]:
    return [spec.name for spec in specs]
