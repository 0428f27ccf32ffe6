"""The ``huggingface`` provider: a Hub repository, pinned to a commit, verified.

Layout under ``settings.resolved_models_dir``::

    huggingface/<org>--<name>/<commit>/          the model (what ``path`` points to)
    huggingface/<org>--<name>/<commit>/.mongars-complete.json   completion marker
    huggingface/<org>--<name>/refs/<revision>    branch/tag -> commit (offline mode)

A download goes to a hidden staging folder next to the final one, is verified
(every expected file present, ``config.json`` parses, each file's checksum
equals the Hub's: sha256 for LFS files, git blob sha1 otherwise, through
``HfApi.verify_repo_checksums``) and only then renamed into place with its
marker. An interrupted or corrupt download therefore never looks installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .._fs import atomic_write_bytes, atomic_write_json, ensure_within
from .._version import __version__
from ..errors import ProvisionError
from ._base import FetchResult, Provider, ProvisionRequest, Resolution
from ._report import PlannedFile, ProvisionPlan
from ._staging import clear_work, replace_dir, staging_path

if TYPE_CHECKING:
    from huggingface_hub import HfApi

__all__ = ["MARKER_NAME", "HuggingFaceProvider", "disk_plan", "free_disk_bytes"]

MARKER_NAME = ".mongars-complete.json"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_TRUE = {"1", "true", "yes", "on"}


class HuggingFaceProvider(Provider):
    """Download a Hub repository with ``huggingface_hub.snapshot_download``.

    Only safe file types are fetched by default (``allow_patterns``): safetensors
    weights, JSON configs, tokenizer files and chat templates. Pickled weights
    (``*.bin``, ``*.pt``...) are fetched only with ``allow_pickle=True``; Python
    files only for roles with ``trust_remote_code: true``. To change the
    defaults, register a configured instance::

        register_provider("huggingface", lambda: HuggingFaceProvider(allow_pickle=True))
    """

    name: ClassVar[str] = "huggingface"
    allow_patterns: ClassVar[tuple[str, ...]] = (
        "*.safetensors",
        "*.json",
        "*.jinja",
        "tokenizer.model",
        "*.tiktoken",
        "merges.txt",
        "vocab.txt",
        "spiece.model",
        "sentencepiece.bpe.model",
        "README.md",
    )
    pickle_patterns: ClassVar[tuple[str, ...]] = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
    remote_code_patterns: ClassVar[tuple[str, ...]] = ("*.py",)

    def __init__(
        self,
        *,
        allow_patterns: tuple[str, ...] | list[str] | None = None,
        allow_pickle: bool = False,
        endpoint: str | None = None,
        max_workers: int = 8,
    ) -> None:
        self._allow_patterns = tuple(allow_patterns or self.allow_patterns)
        self.allow_pickle = allow_pickle
        self._endpoint = endpoint
        self.max_workers = max_workers

    # ------------------------------------------------------------ settings
    @property
    def endpoint(self) -> str:
        """The Hub URL: the constructor's, else ``HF_ENDPOINT`` now, else the hub default."""
        if self._endpoint:
            return self._endpoint.rstrip("/")
        from huggingface_hub import constants

        return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")

    @staticmethod
    def offline() -> bool:
        from huggingface_hub import constants

        env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
        return constants.HF_HUB_OFFLINE or (env or "").strip().lower() in _TRUE

    def patterns(self, request: ProvisionRequest) -> list[str]:
        patterns = list(self._allow_patterns)
        if self.allow_pickle:
            patterns += self.pickle_patterns
        if request.entry.trust_remote_code:
            patterns += self.remote_code_patterns
        return patterns

    def cache_key(self, request: ProvisionRequest) -> tuple[Any, ...]:
        return (self.endpoint,)

    def _token(self, request: ProvisionRequest) -> str | None:
        token = request.settings.hf_token
        return token.get_secret_value() if token is not None else None

    def _api(self, request: ProvisionRequest) -> HfApi:
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, token=self._token(request), library_name="mongars-llm")

    def repo_dir(self, request: ProvisionRequest) -> Path:
        return (
            request.settings.resolved_models_dir / "huggingface" / request.model.replace("/", "--")
        )

    def _checked_target(self, request: ProvisionRequest) -> tuple[str, Path, str]:
        """The repo id, its folder and the wanted revision, all checked (no network)."""
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        from ..manifest.models import REVISION_RULE, revision_problem

        repo_id = request.model
        try:
            validate_repo_id(repo_id)
        except HFValidationError as err:
            raise ProvisionError(
                f"{repo_id!r} is not a Hugging Face repository id ({err}); use 'org/name', or "
                "provider: local for a directory"
            ) from err
        wanted = request.wanted_revision or "main"
        problem = revision_problem(wanted)  # the lock file is an input too
        if problem is not None:
            raise ProvisionError(
                f"invalid revision {wanted!r} for {repo_id}: {problem}; pin {REVISION_RULE}"
            )
        models_dir = request.settings.resolved_models_dir
        repo_dir = ensure_within(
            models_dir, self.repo_dir(request), what="the model folder", error=ProvisionError
        )
        return repo_id, repo_dir, wanted

    def _resolution(
        self, request: ProvisionRequest, repo_dir: Path, commit: str, wanted: str
    ) -> Resolution:
        path = ensure_within(
            request.settings.resolved_models_dir,
            repo_dir / commit,
            what="the model folder",
            error=ProvisionError,
        )
        marker = _read_marker(path)
        return Resolution(
            model=request.model,
            revision=commit,
            path=path,
            installed=marker is not None,
            bytes=marker.get("bytes") if marker else None,
            verified=marker.get("verified") if marker else None,
            details={"repo_dir": repo_dir, "wanted": wanted},
        )

    # ------------------------------------------------------------ resolve
    def resolve_local(self, request: ProvisionRequest) -> Resolution:
        """What is installed for the wanted revision, from the disk alone (no Hub call)."""
        repo_id, repo_dir, wanted = self._checked_target(request)
        commit = wanted if _COMMIT.match(wanted) else _read_ref(repo_dir, wanted)
        if commit is None:
            return Resolution(model=repo_id, details={"repo_dir": repo_dir, "wanted": wanted})
        return self._resolution(request, repo_dir, commit, wanted)

    def resolve(self, request: ProvisionRequest) -> Resolution:
        from huggingface_hub.errors import (
            GatedRepoError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        repo_id, repo_dir, wanted = self._checked_target(request)
        commit: str | None = wanted if _COMMIT.match(wanted) else None
        if commit is None and self.offline():
            commit = _read_ref(repo_dir, wanted)
            if commit is None:
                raise ProvisionError(
                    f"offline mode (HF_HUB_OFFLINE=1): {repo_id}@{wanted} was never installed in "
                    f"{repo_dir.parent}; unset HF_HUB_OFFLINE to download it, or pin a commit"
                )
        elif commit is None:
            try:
                info = self._api(request).repo_info(repo_id, revision=wanted)
                commit = info.sha
            except GatedRepoError as err:
                raise ProvisionError(
                    f"{repo_id} on {self.endpoint} is gated: accept its licence on the Hub and set "
                    "HF_TOKEN (or MONGARS_HF_TOKEN) to a token with access"
                ) from err
            except RepositoryNotFoundError as err:
                if wanted != "main" and self._repo_exists(request):  # some servers answer 404/401
                    raise ProvisionError(
                        f"revision {wanted!r} not found in {repo_id} on {self.endpoint}; pin an "
                        "existing branch, tag or commit"
                    ) from err
                raise ProvisionError(
                    f"repository {repo_id!r} not found on {self.endpoint}; check the model name in "
                    "the manifest (for a private repository set HF_TOKEN)"
                ) from err
            except RevisionNotFoundError as err:
                raise ProvisionError(
                    f"revision {wanted!r} not found in {repo_id} on {self.endpoint}; pin an existing "
                    "branch, tag or commit"
                ) from err
            except Exception as err:  # the Hub cannot be reached: fall back to what is installed
                commit = _read_ref(repo_dir, wanted)
                if commit is None:
                    raise ProvisionError(
                        f"cannot reach the Hub at {self.endpoint} to resolve {repo_id}@{wanted} "
                        f"({type(err).__name__}: {err}); check the connection, HF_ENDPOINT, or "
                        "set HF_HUB_OFFLINE=1 to use installed models only"
                    ) from err
            if not commit:
                raise ProvisionError(f"{self.endpoint} returned no commit for {repo_id}@{wanted}")
            if not _COMMIT.match(commit):  # it names a folder: never trust it blindly
                raise ProvisionError(
                    f"{self.endpoint} answered {commit[:80]!r} as the commit of "
                    f"{repo_id}@{wanted}, not a 40-hex commit hash; check HF_ENDPOINT"
                )
        return self._resolution(request, repo_dir, commit, wanted)

    def _repo_exists(self, request: ProvisionRequest) -> bool:
        try:
            self._api(request).repo_info(request.model, revision="main")
        except Exception:
            return False
        return True

    # ------------------------------------------------------------ listing
    def remote_files(self, request: ProvisionRequest, resolution: Resolution) -> list[Any]:
        """The repository's files at the resolved commit that match the allow patterns."""
        from huggingface_hub.hf_api import RepoFile
        from huggingface_hub.utils import filter_repo_objects

        cached = resolution.details.get("remote_files")
        if cached is not None:
            return list(cached)
        if self.offline():
            raise ProvisionError(
                f"offline mode (HF_HUB_OFFLINE=1): {request.model}@{resolution.revision} is not "
                "installed; unset HF_HUB_OFFLINE to download it"
            )
        try:
            tree = [
                f
                for f in self._api(request).list_repo_tree(
                    request.model, recursive=True, revision=resolution.revision
                )
                if isinstance(f, RepoFile)
            ]
        except Exception as err:
            raise ProvisionError(
                f"cannot list the files of {request.model}@{resolution.revision} on "
                f"{self.endpoint}: {type(err).__name__}: {err}"
            ) from err
        patterns = self.patterns(request)
        by_path = {f.path: f for f in tree}
        wanted = [by_path[p] for p in filter_repo_objects(list(by_path), allow_patterns=patterns)]
        weights = [f for f in wanted if f.path.endswith(".safetensors") or f.path.endswith(".py")]
        if not weights and not self.allow_pickle:
            pickled = list(
                filter_repo_objects(list(by_path), allow_patterns=list(self.pickle_patterns))
            )
            if pickled:
                raise ProvisionError(
                    f"{request.model}@{resolution.revision[:12] if resolution.revision else ''} has "
                    f"only pickled weights ({', '.join(sorted(pickled)[:3])}); mongars-llm does not "
                    "download pickles by default: pick a safetensors repository or register "
                    "HuggingFaceProvider(allow_pickle=True)"
                )
        if "config.json" not in {f.path for f in wanted}:
            raise ProvisionError(
                f"{request.model}@{resolution.revision} has no config.json: not a transformers "
                "model repository"
            )
        resolution.details["remote_files"] = wanted
        return wanted

    # ------------------------------------------------------------ dry run
    def plan(self, request: ProvisionRequest, resolution: Resolution) -> ProvisionPlan:
        files = self.remote_files(request, resolution)
        return disk_plan(
            request,
            sum(int(f.size or 0) for f in files),
            target=str(resolution.path),
            files=tuple(PlannedFile(f.path, f.size) for f in files),
        )

    # ------------------------------------------------------------ fetch
    def fetch(self, request: ProvisionRequest, resolution: Resolution) -> FetchResult:
        from huggingface_hub import snapshot_download

        files = self.remote_files(request, resolution)
        repo_dir: Path = resolution.details["repo_dir"]
        repo_dir.mkdir(parents=True, exist_ok=True)
        clear_work(repo_dir)  # the caller holds this model's file lock
        assert resolution.revision is not None
        staging = staging_path(repo_dir, resolution.revision[:12])
        ensure_within(repo_dir, staging, what="the staging folder", error=ProvisionError)
        staging.mkdir()
        fetched = FetchResult(staging=staging, bytes=sum(int(f.size or 0) for f in files))
        try:
            snapshot_download(
                request.model,
                revision=resolution.revision,
                local_dir=staging,
                cache_dir=staging / ".cache" / "hub",
                allow_patterns=self.patterns(request),
                token=self._token(request),
                endpoint=self.endpoint,
                tqdm_class=_progress_bar_class(request),
                max_workers=self.max_workers,
                library_name="mongars-llm",
                library_version=__version__,
            )
        except BaseException as err:
            self.discard(request, fetched)
            if isinstance(err, Exception):
                raise ProvisionError(
                    f"downloading {request.model}@{resolution.revision[:12]} from {self.endpoint} "
                    f"failed: {type(err).__name__}: {err}"
                ) from err
            raise
        return fetched

    def discard(self, request: ProvisionRequest, fetched: FetchResult) -> None:
        if fetched.staging is not None:
            shutil.rmtree(fetched.staging, ignore_errors=True)

    # ------------------------------------------------------------ verify
    def verify(
        self, request: ProvisionRequest, resolution: Resolution, fetched: FetchResult
    ) -> str:
        assert fetched.staging is not None
        text = self._verify_dir(request, resolution, fetched.staging)
        resolution.details["verified_text"] = text
        return text

    def verify_installed(self, request: ProvisionRequest, resolution: Resolution) -> str:
        assert resolution.path is not None
        if self.offline() or not request.entry.auto_download:  # no Hub call for either
            return _verify_against_marker(resolution.path)
        return self._verify_dir(request, resolution, resolution.path)

    def _verify_dir(self, request: ProvisionRequest, resolution: Resolution, root: Path) -> str:
        files = self.remote_files(request, resolution)
        expected = {f.path for f in files}
        missing = sorted(p for p in expected if not (root / p).is_file())
        if missing:
            raise ProvisionError(
                f"{request.model}@{resolution.revision}: {len(missing)} file(s) missing after the "
                f"download ({', '.join(missing[:3])})"
            )
        _check_config(root / "config.json", request.model)
        api = self._api(request)
        if hasattr(api, "verify_repo_checksums"):
            result = api.verify_repo_checksums(
                request.model, revision=resolution.revision, local_dir=root
            )
            mismatches: list[Any] = [m for m in result.mismatches if m["path"] in expected]
            missing = [p for p in result.missing_paths if p in expected]
            checked = len(expected)
            how = "HfApi.verify_repo_checksums"
        else:  # an older huggingface_hub: the same check from the tree listing
            mismatches, missing = _compare_checksums(files, root), []
            checked, how = len(files), "the Hub's tree listing"
        if mismatches or missing:
            first = mismatches[0] if mismatches else None
            detail = (
                f"{first['path']} has {first['algorithm']} {first['actual']}, the Hub says "
                f"{first['expected']}"
                if first
                else f"missing {', '.join(missing[:3])}"
            )
            raise ProvisionError(
                f"{request.model}@{resolution.revision}: checksum verification failed "
                f"({len(mismatches)} mismatched, {len(missing)} missing; {detail}); the download "
                "is corrupt or the server served other files: retry with force"
            )
        lfs = sum(1 for f in files if f.lfs is not None)
        return (
            f"{checked} files match the Hub's checksums ({lfs} sha256 for LFS files, "
            f"{checked - lfs} git-sha1) via {how}; config.json parses"
        )

    # ------------------------------------------------------------ install
    def install(
        self, request: ProvisionRequest, resolution: Resolution, fetched: FetchResult
    ) -> Path:
        assert fetched.staging is not None and resolution.path is not None
        staging, final = fetched.staging, resolution.path
        shutil.rmtree(staging / ".cache", ignore_errors=True)
        files = self.remote_files(request, resolution)
        atomic_write_json(
            staging / MARKER_NAME,
            {
                "repo_id": request.model,
                "revision": resolution.revision,
                "requested_revision": resolution.details.get("wanted"),
                "endpoint": self.endpoint,
                "bytes": fetched.bytes,
                "verified": resolution.details.get("verified_text"),
                "files": {
                    f.path: {
                        "size": f.size,
                        "sha256": f.lfs.sha256 if f.lfs is not None else None,
                        "git_sha1": f.blob_id,
                    }
                    for f in files
                },
                "installed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "mongars_llm_version": __version__,
            },
        )
        replace_dir(staging, final)
        wanted = resolution.details.get("wanted")
        if wanted and wanted != resolution.revision:
            repo_dir: Path = resolution.details["repo_dir"]
            ref = ensure_within(
                repo_dir / "refs", repo_dir / "refs" / wanted, what="the ref", error=ProvisionError
            )
            atomic_write_bytes(ref, f"{resolution.revision}\n".encode())
        return final


# ---------------------------------------------------------------- helpers
def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((path / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_ref(repo_dir: Path, revision: str) -> str | None:
    refs = repo_dir / "refs"
    try:
        ensure_within(refs, refs / revision, what="the ref", error=ProvisionError)
        value = (repo_dir / "refs" / revision).read_text().strip()
    except OSError:
        return None
    return value if _COMMIT.match(value) else None


def _check_config(path: Path, model: str) -> None:
    try:
        config = json.loads(path.read_text())
    except OSError as err:
        raise ProvisionError(f"{model}: cannot read {path.name}: {err}") from err
    except ValueError as err:
        raise ProvisionError(f"{model}: {path.name} is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ProvisionError(f"{model}: {path.name} is not a JSON object")


def _compare_checksums(files: list[Any], root: Path) -> list[dict[str, str]]:
    from huggingface_hub.utils.sha import git_hash, sha_fileobj

    mismatches = []
    for f in files:
        with open(root / f.path, "rb") as handle:
            if f.lfs is not None:
                algorithm, expected, actual = "sha256", f.lfs.sha256, sha_fileobj(handle).hex()
            else:
                algorithm, expected, actual = "git-sha1", f.blob_id, git_hash(handle.read())
        if actual != expected:
            mismatches.append(
                {"path": f.path, "expected": expected, "actual": actual, "algorithm": algorithm}
            )
    return mismatches


def _verify_against_marker(path: Path) -> str:
    """Offline re-verification: the checksums the Hub gave at install time."""
    from huggingface_hub.utils.sha import git_hash, sha_fileobj

    marker = _read_marker(path)
    if marker is None:
        raise ProvisionError(f"{path} has no readable {MARKER_NAME}; provision it again")
    files = marker.get("files") or {}
    for rel, digests in files.items():
        file = path / rel
        if not file.is_file():
            raise ProvisionError(f"{file} is missing; provision again with force")
        with open(file, "rb") as handle:
            if digests.get("sha256"):
                ok = sha_fileobj(handle).hex() == digests["sha256"]
            else:
                ok = git_hash(handle.read()) == digests.get("git_sha1")
        if not ok:
            raise ProvisionError(f"{file} does not match its recorded checksum")
    _check_config(path / "config.json", str(marker.get("repo_id")))
    return f"{len(files)} files match the checksums recorded at install time (offline)"


def disk_plan(
    request: ProvisionRequest,
    total: int,
    *,
    target: str,
    files: tuple[PlannedFile, ...] = (),
) -> ProvisionPlan:
    """A dry run's plan for writing ``total`` bytes into the models dir: is there room?"""
    free = free_disk_bytes(request.settings.resolved_models_dir)
    return ProvisionPlan(
        files=files,
        bytes=total,
        free_bytes=free,
        enough_disk=free is None or free >= total,
        target=target,
    )


def free_disk_bytes(path: Path) -> int | None:
    """Free bytes on the file system that holds ``path`` (its nearest existing parent)."""
    probe = Path(path).expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def _progress_bar_class(request: ProvisionRequest) -> type:
    """A hub tqdm subclass: shows bars only when asked, forwards byte progress."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    class _ProgressBar(hf_tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._mongars_name = kwargs.get("name")
            self._mongars_done = 0
            if not request.show_progress:
                kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            result = super().update(n)
            if (
                request.progress is not None
                and n
                and self._mongars_name == "huggingface_hub.snapshot_download"
            ):
                self._mongars_done += int(n)
                request.report("download", completed=self._mongars_done, total=self.total or None)
            return result

    return _ProgressBar
