"""The ``ollama`` provider: a model from Ollama's store, converted for the runtime.

Ollama keeps models on disk under ``OLLAMA_MODELS`` (else ``~/.ollama/models``)::

    manifests/<registry>/<namespace>/<name>/<tag>   JSON: layers with mediaType and digest
    blobs/sha256-<hex>                              the layer of mediaType
                                                    application/vnd.ollama.image.model
                                                    is the GGUF file

``smollm2:135m`` is ``registry.ollama.ai/library/smollm2/135m``; a missing tag
means ``latest``. Reading the store needs no daemon. The GGUF blob's digest is
verified, then it is converted once (see :mod:`._gguf`) into::

    <models_dir>/ollama/<name>/<sha256 of the GGUF>/

which is the role's ``path``; ``revision`` is that sha256.

When the model is not in the store, the daemon at ``OLLAMA_HOST`` pulls it
(``POST /api/pull`` with ``stream: true``, one JSON object per line: ``status``,
and ``digest``/``total``/``completed`` while layers download; a line with
``error`` is a failure), and the store is read again. A model the daemon lists
(``GET /api/tags``) but whose store this process cannot see (a daemon on another
machine) stays daemon-side: ``path`` is ``None`` and ``revision`` the daemon's
digest, and the runtime cannot load it.

What comes from the store or the daemon is read with bounds: a manifest must be
a regular file of at most :attr:`OllamaProvider.max_manifest_bytes` (a named
pipe is refused without a blocking open), a progress line at most
:attr:`~OllamaProvider.max_line_bytes`, the model list at most
:attr:`~OllamaProvider.max_tags_bytes`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from .._fs import ensure_within, sha256_file
from ..errors import ProvisionError
from . import _gguf
from ._base import FetchResult, Provider, ProvisionRequest, Resolution, _safe_name
from ._report import ProvisionPlan
from ._staging import replace_dir

__all__ = ["MODEL_MEDIA_TYPE", "OllamaProvider", "ollama_store"]

MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
DEFAULT_REGISTRY = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
#: Ollama's own limits on each part of a name (its types/model/name.go); a registry
#: host is held to what a DNS name and a file name allow
_PART_LIMITS = (("registry host", 253), ("namespace", 80), ("model", 80), ("tag", 80))


def ollama_store() -> Path:
    """Ollama's model store: ``OLLAMA_MODELS``, else ``~/.ollama/models``."""
    return Path(os.environ.get("OLLAMA_MODELS") or "~/.ollama/models").expanduser()


class OllamaProvider(Provider):
    """Check and pull models through the Ollama REST API (httpx)."""

    name: ClassVar[str] = "ollama"
    writes_files: ClassVar[bool] = True  # the conversion of a stored model
    #: seconds to connect / between two progress lines of a pull
    connect_timeout: ClassVar[float] = 5.0
    read_timeout: ClassVar[float] = 600.0
    #: longest line of a pull's progress stream (Ollama's are about 200 bytes)
    max_line_bytes: ClassVar[int] = 1 << 20
    #: largest ``GET /api/tags`` answer (about 400 bytes a model)
    max_tags_bytes: ClassVar[int] = 16 << 20
    #: largest manifest in the store (Ollama's are about 1 KB)
    max_manifest_bytes: ClassVar[int] = 1 << 20

    def cache_key(self, request: ProvisionRequest) -> tuple[Any, ...]:
        return (request.settings.ollama_host, str(ollama_store()))

    def lock_name(self, request: ProvisionRequest) -> str | None:
        name_parts(request.model)  # a bad name fails before any file is made for it
        return f"ollama/{_safe_name(self.model_name(request.model))}"

    # ------------------------------------------------------------ the store on disk
    @staticmethod
    def manifest_path(name: str, store: Path | None = None) -> Path:
        """Where Ollama's store keeps the manifest of ``name`` (``model[:tag]``)."""
        parts = name_parts(name)
        store = store or ollama_store()
        return ensure_within(
            store / "manifests",
            store.joinpath("manifests", *parts),
            what="Ollama's manifest",
            action="read",
            error=ProvisionError,
            fix=(
                "remove that link and pull the model again "
                f"(`ollama pull {OllamaProvider.model_name(name)}`)"
            ),
        )

    def _read_manifest(self, manifest: Path, name: str) -> Any:
        """The JSON of a manifest in the store; ``FileNotFoundError`` when there is none.

        The file is opened without blocking (a named pipe would wait for a writer)
        and must be a regular file of at most :attr:`max_manifest_bytes`.
        """
        fix = f"remove it and pull the model again (`ollama pull {name}`)"
        fd = os.open(manifest, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ProvisionError(
                    f"Ollama's manifest {manifest} for {name} is not a regular file; {fix}"
                )
            data = handle.read(self.max_manifest_bytes + 1)
        if len(data) > self.max_manifest_bytes:
            raise ProvisionError(
                f"Ollama's manifest {manifest} for {name} is larger than "
                f"{self.max_manifest_bytes >> 20} MiB, so not a manifest; {fix}"
            )
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as err:
            detail = "nested too deeply" if isinstance(err, RecursionError) else err
            raise ProvisionError(
                f"Ollama's manifest {manifest} for {name} is not valid JSON ({detail}); {fix}"
            ) from err

    def _stored_blob(self, request: ProvisionRequest, name: str) -> tuple[Path, str] | None:
        """The GGUF blob of ``name`` in the store and its sha256, or ``None`` when absent."""
        store = ollama_store()
        manifest = self.manifest_path(name, store)
        try:
            document = self._read_manifest(manifest, name)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise ProvisionError(
                f"Ollama's manifest {manifest} for {name} cannot be read ({err.strerror or err}); "
                f"check its permissions, or pull the model again (`ollama pull {name}`)"
            ) from err
        layers = document.get("layers") if isinstance(document, dict) else None
        digests = [
            layer.get("digest")
            for layer in (layers if isinstance(layers, list) else [])
            if isinstance(layer, dict) and layer.get("mediaType") == MODEL_MEDIA_TYPE
        ]
        if not digests:
            raise ProvisionError(
                f"Ollama's manifest {manifest} for {name} has no layer of mediaType "
                f"{MODEL_MEDIA_TYPE} (no model weights); pull the model again"
            )
        digest = str(digests[0])
        hex_digest = digest.removeprefix("sha256:")
        if not digest.startswith("sha256:") or not _HEX64.match(hex_digest):
            raise ProvisionError(
                f"Ollama's manifest {manifest} names the model layer {digest!r}, not a sha256 "
                "digest"
            )
        blob = store / "blobs" / f"sha256-{hex_digest}"
        if blob.exists() and not blob.is_file():
            raise ProvisionError(
                f"Ollama's store {store} lists {name} but its blob {blob} is not a regular file; "
                f"remove it and pull the model again (`ollama pull {name}`)"
            )
        if not blob.is_file():
            raise ProvisionError(
                f"Ollama's store {store} lists {name} but its blob {blob.name} is missing; pull "
                "the model again (`ollama pull`)"
            )
        return blob, hex_digest

    def target(self, request: ProvisionRequest, name: str, digest: str) -> Path:
        models_dir = request.settings.resolved_models_dir
        return ensure_within(
            models_dir,
            models_dir / "ollama" / _safe_name(name) / digest,
            what="the converted Ollama model folder",
            error=ProvisionError,
        )

    def _from_store(self, request: ProvisionRequest, name: str) -> Resolution | None:
        found = self._stored_blob(request, name)
        if found is None:
            return None
        blob, digest = found
        self._check_digest(request, name, digest)
        if request.keep_gguf:
            return self._kept_blob(name, blob, digest)
        target = self.target(request, name, digest)
        resolution = Resolution(
            model=name,
            revision=digest,
            path=target,
            details={"host": request.settings.ollama_host, "blob": blob, "target": target},
        )
        marker = _gguf.read_marker(target)
        if marker is not None and marker.get("sha256") == digest:
            resolution.installed = True
            resolution.bytes = marker.get("bytes")
            resolution.verified = marker.get("verified")
        return resolution

    @staticmethod
    def _kept_blob(name: str, blob: Path, digest: str) -> Resolution:
        """The store's GGUF blob itself as the role's artifact (``keep_gguf``), once its
        sha256 matches the digest of Ollama's manifest (else refused)."""
        actual = sha256_file(blob)
        if actual != digest:
            raise ProvisionError(
                f"refusing Ollama blob {blob} for {name}: its sha256 is {actual}, the manifest "
                f"says {digest}; pull the model again (`ollama pull {name}`)"
            )
        return Resolution(
            model=name,
            revision=digest,
            path=blob,
            installed=True,
            bytes=blob.stat().st_size,
            verified=f"GGUF blob matches Ollama's manifest (sha256 {digest[:12]}), not converted",
            details={"blob": blob, "kept": True},
        )

    @staticmethod
    def model_name(name: str) -> str:
        """Ollama's canonical name: a missing tag means ``:latest``."""
        last = name.rsplit("/", 1)[-1]
        return name if ":" in last else f"{name}:latest"

    def _client(self, request: ProvisionRequest) -> Any:
        import httpx

        timeout = httpx.Timeout(self.read_timeout, connect=self.connect_timeout)
        return httpx.Client(base_url=request.settings.ollama_host, timeout=timeout)

    def _unreachable(self, request: ProvisionRequest, err: Exception) -> ProvisionError:
        host = request.settings.ollama_host
        return ProvisionError(
            f"the Ollama daemon is not reachable at {host} ({type(err).__name__}: {err}); start "
            "it with `ollama serve`, or set OLLAMA_HOST to where it listens"
        )

    def _tags(self, request: ProvisionRequest) -> dict[str, dict[str, Any]]:
        import httpx

        host = request.settings.ollama_host
        try:
            with self._client(request) as client, client.stream("GET", "/api/tags") as response:
                if response.status_code >= 400:
                    raise ProvisionError(
                        f"Ollama at {host} answered {response.status_code} to GET /api/tags; is "
                        "OLLAMA_HOST an Ollama daemon?"
                    )
                body = _read_bounded(response, self.max_tags_bytes)
                if body is None:
                    raise ProvisionError(
                        f"Ollama at {host} answered GET /api/tags with more than "
                        f"{self.max_tags_bytes >> 20} MiB; is OLLAMA_HOST an Ollama daemon?"
                    )
                payload = json.loads(body)
        except httpx.TransportError as err:
            raise self._unreachable(request, err) from err
        except (ValueError, RecursionError) as err:
            raise ProvisionError(
                f"Ollama at {host} sent invalid JSON for /api/tags; is OLLAMA_HOST an Ollama "
                "daemon?"
            ) from err
        models = payload.get("models") if isinstance(payload, dict) else None
        if not isinstance(models, list):
            raise ProvisionError(
                f"unexpected /api/tags answer from {request.settings.ollama_host}: no 'models' list"
            )
        found: dict[str, dict[str, Any]] = {}
        for item in models:
            if isinstance(item, dict):
                for key in ("name", "model"):
                    if isinstance(item.get(key), str):
                        found[self.model_name(item[key])] = item
        return found

    def resolve_local(self, request: ProvisionRequest) -> Resolution:
        """From the store alone (no daemon): ``auto_download: false`` roles."""
        name = self.model_name(request.model)
        return self._from_store(request, name) or Resolution(model=name)

    def resolve(self, request: ProvisionRequest) -> Resolution:
        name = self.model_name(request.model)
        stored = self._from_store(request, name)
        if stored is not None:
            return stored
        try:
            tags = self._tags(request)
        except ProvisionError as err:
            raise ProvisionError(
                f"ollama model {name} is not in Ollama's store at {ollama_store()} (set "
                f"OLLAMA_MODELS to the store's folder) and it cannot be pulled: {err}"
            ) from err
        item = tags.get(name)
        resolution = Resolution(model=name, details={"host": request.settings.ollama_host})
        if item is not None:
            digest = item.get("digest")
            self._check_digest(request, name, digest)
            resolution.installed = True
            resolution.revision = digest
            resolution.bytes = item.get("size")
            resolution.verified = (
                f"listed by /api/tags; daemon-side only (not in the store at {ollama_store()})"
            )
        return resolution

    def _check_digest(self, request: ProvisionRequest, name: str, digest: Any) -> None:
        wanted = request.wanted_revision
        wanted = wanted.removeprefix("sha256:") if wanted else wanted
        if wanted and not (isinstance(digest, str) and digest.startswith(wanted)):
            raise ProvisionError(
                f"ollama model {name} has digest {digest}, but {wanted} is pinned (manifest "
                "revision or lock file); Ollama cannot pull a given digest: pull the matching "
                "tag or update the pin"
            )

    # ------------------------------------------------------------ fetch: convert or pull
    def fetch(self, request: ProvisionRequest, resolution: Resolution) -> FetchResult:
        if resolution.details.get("blob") is None:
            pulled = self._pull(request, resolution)
            stored = self._from_store(request, resolution.model)
            if stored is None:  # a daemon whose store this process cannot see
                return pulled
            resolution.revision, resolution.path = stored.revision, stored.path
            resolution.details.update(stored.details)
            if stored.installed and stored.details.get("kept"):  # keep_gguf: the blob itself
                resolution.verified = stored.verified
                return FetchResult(bytes=stored.bytes, details={"kept": True})
            if stored.installed:
                return FetchResult(bytes=stored.bytes, details={"converted": True})
        return self._convert(request, resolution)

    def _convert(self, request: ProvisionRequest, resolution: Resolution) -> FetchResult:
        blob: Path = resolution.details["blob"]
        digest = str(resolution.revision)

        def check(actual: str) -> None:
            if actual != digest:
                raise ProvisionError(
                    f"Ollama blob {blob} has sha256 {actual}, but the manifest of "
                    f"{resolution.model} says {digest}: the store is corrupt; refusing it. Pull "
                    "the model again (`ollama rm` then `ollama pull`)"
                )

        conversion = _gguf.stage_conversion(
            blob,
            resolution.details["target"],
            check=check,
            report=request.report,
            extra={"ollama_model": resolution.model},
        )
        return FetchResult(staging=conversion.path, bytes=conversion.bytes)

    def discard(self, request: ProvisionRequest, fetched: FetchResult) -> None:
        if fetched.staging is not None:
            shutil.rmtree(fetched.staging, ignore_errors=True)

    def install(
        self, request: ProvisionRequest, resolution: Resolution, fetched: FetchResult
    ) -> Path | None:
        if fetched.staging is not None:
            assert resolution.path is not None
            replace_dir(fetched.staging, resolution.path)
        return resolution.path

    def _pull(self, request: ProvisionRequest, resolution: Resolution) -> FetchResult:
        import httpx

        name = resolution.model
        status = None
        layers: dict[str, tuple[int, int]] = {}
        try:
            with (
                self._client(request) as client,
                client.stream(
                    "POST", "/api/pull", json={"model": name, "name": name, "stream": True}
                ) as response,
            ):
                if response.status_code >= 400:
                    body = _read_bounded(response, 64 << 10, cut=True) or b""
                    raise ProvisionError(
                        f"ollama pull {name} failed: HTTP {response.status_code}: "
                        f"{_error_text(body.decode(errors='replace'))}"
                    )
                for line in _bounded_lines(response, self.max_line_bytes):
                    if line is None:
                        raise ProvisionError(
                            f"ollama pull {name}: the daemon at {request.settings.ollama_host} "
                            f"sent a progress line longer than {self.max_line_bytes >> 20} MiB; "
                            "is OLLAMA_HOST an Ollama daemon?"
                        )
                    if not line.strip():
                        continue
                    try:
                        event = json.loads(line)
                    except (ValueError, RecursionError) as err:
                        shown = line[:200].decode(errors="replace")
                        raise ProvisionError(
                            f"ollama pull {name}: invalid progress line {shown!r} from "
                            f"{request.settings.ollama_host}; is OLLAMA_HOST an Ollama daemon?"
                        ) from err
                    if not isinstance(event, dict):
                        continue
                    if event.get("error"):
                        raise ProvisionError(f"ollama pull {name} failed: {event['error']}")
                    status = event.get("status", status)
                    digest = event.get("digest")
                    if digest and event.get("total"):
                        layers[digest] = (int(event.get("completed") or 0), int(event["total"]))
                        request.report(
                            "download",
                            completed=sum(c for c, _ in layers.values()),
                            total=sum(t for _, t in layers.values()),
                            detail=str(status),
                        )
        except httpx.TransportError as err:
            raise self._unreachable(request, err) from err
        if status != "success":
            raise ProvisionError(
                f"ollama pull {name} ended without 'success' (last status: {status!r})"
            )
        return FetchResult(bytes=sum(t for _, t in layers.values()) or None)

    def verify(
        self, request: ProvisionRequest, resolution: Resolution, fetched: FetchResult
    ) -> str:
        if fetched.staging is not None:
            return _gguf.verify_converted(fetched.staging)
        if fetched.details.get("kept"):
            return str(resolution.verified)
        if fetched.details.get("converted") and resolution.path is not None:
            return _gguf.verify_converted(resolution.path)
        item = self._tags(request).get(resolution.model)
        if item is None:
            raise ProvisionError(
                f"ollama reported success pulling {resolution.model}, but /api/tags does not list it"
            )
        self._check_digest(request, resolution.model, item.get("digest"))
        resolution.revision = item.get("digest")
        if item.get("size"):
            fetched.bytes = int(item["size"])
        return (
            "pull succeeded; listed by /api/tags; daemon-side only (not in the store at "
            f"{ollama_store()})"
        )

    def verify_installed(self, request: ProvisionRequest, resolution: Resolution) -> str:
        blob = resolution.details.get("blob")
        if blob is None or resolution.path is None:
            return "listed by /api/tags"
        actual = sha256_file(blob)
        if actual != resolution.revision:
            raise ProvisionError(
                f"Ollama blob {blob} has sha256 {actual}, its manifest says {resolution.revision}"
            )
        if resolution.details.get("kept"):
            return f"GGUF blob matches Ollama's manifest (sha256 {actual[:12]}), not converted"
        return _gguf.verify_converted(resolution.path)

    def plan(self, request: ProvisionRequest, resolution: Resolution) -> ProvisionPlan:
        blob = resolution.details.get("blob")
        if blob is None:
            return ProvisionPlan(
                target=f"ollama://{request.settings.ollama_host}/{resolution.model}"
            )
        from .huggingface import disk_plan

        total = _gguf.read_gguf_header(blob).converted_bytes
        return disk_plan(request, total, target=str(resolution.path))


def name_parts(name: str) -> list[str]:
    """``name`` as the folders of its manifest: registry host, namespace, model, tag."""
    full = OllamaProvider.model_name(name)
    path, _, tag = full.rpartition(":")
    parts = path.split("/")
    if len(parts) == 1:
        parts = [DEFAULT_REGISTRY, DEFAULT_NAMESPACE, *parts]
    elif len(parts) == 2:
        parts = [DEFAULT_REGISTRY, *parts]
    parts.append(tag)
    if len(parts) != len(_PART_LIMITS) or not all(_PART.match(p) for p in parts):
        raise ProvisionError(
            f"{name!r} is not an Ollama model name; write name[:tag] or namespace/name[:tag] "
            "(e.g. smollm2:135m): fix the name in the manifest"
        )
    for part, (kind, limit) in zip(parts, _PART_LIMITS, strict=True):
        if len(part) > limit:
            raise ProvisionError(
                f"{name!r} is not an Ollama model name: its {kind} part is {len(part)} "
                f"characters long and Ollama allows at most {limit}; fix the name in the manifest"
            )
    return parts


def _read_bounded(response: Any, limit: int, *, cut: bool = False) -> bytes | None:
    """A streamed body of at most ``limit`` bytes; ``None`` (or its start, ``cut``) if longer."""
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > limit:
            return bytes(body[:limit]) if cut else None
    return bytes(body)


def _bounded_lines(response: Any, limit: int) -> Iterator[bytes | None]:
    """The lines of a streamed body; ``None`` (then nothing) for a line over ``limit`` bytes.

    Unlike ``iter_lines``, a line is never held beyond the limit, however long the
    daemon makes it.
    """
    pending = bytearray()
    for chunk in response.iter_bytes():
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            pending += chunk[start:end]
            if len(pending) > limit:
                yield None
                return
            yield bytes(pending)
            pending.clear()
            start = end + 1
        pending += chunk[start:]
        if len(pending) > limit:
            yield None
            return
    if pending:
        yield bytes(pending)


def _error_text(body: str) -> str:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return body[:300]
    return str(data.get("error", data)) if isinstance(data, dict) else body[:300]
