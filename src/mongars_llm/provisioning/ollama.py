"""The ``ollama`` provider: a model pulled by the Ollama daemon at ``OLLAMA_HOST``.

``GET /api/tags`` says whether the model is there (its ``digest`` is recorded as
the revision); ``POST /api/pull`` with ``stream: true`` pulls it, answering one
JSON object per line (``status``, and ``digest``/``total``/``completed`` while
layers download); a line with ``error`` is a failure. The weights live in the
daemon's store, so ``path`` is ``None``.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from ..errors import ProvisionError
from ._base import FetchResult, Provider, ProvisionRequest, Resolution
from ._report import ProvisionPlan

__all__ = ["OllamaProvider"]


class OllamaProvider(Provider):
    """Check and pull models through the Ollama REST API (httpx)."""

    name: ClassVar[str] = "ollama"
    writes_files: ClassVar[bool] = False
    #: seconds to connect / between two progress lines of a pull
    connect_timeout: ClassVar[float] = 5.0
    read_timeout: ClassVar[float] = 600.0

    def cache_key(self, request: ProvisionRequest) -> tuple[Any, ...]:
        return (request.settings.ollama_host,)

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

        try:
            with self._client(request) as client:
                response = client.get("/api/tags")
                response.raise_for_status()
                payload = response.json()
        except httpx.TransportError as err:
            raise self._unreachable(request, err) from err
        except httpx.HTTPStatusError as err:
            raise ProvisionError(
                f"Ollama at {request.settings.ollama_host} answered {err.response.status_code} to "
                "GET /api/tags; is OLLAMA_HOST an Ollama daemon?"
            ) from err
        except ValueError as err:
            raise ProvisionError(
                f"Ollama at {request.settings.ollama_host} sent invalid JSON for /api/tags"
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

    def resolve(self, request: ProvisionRequest) -> Resolution:
        name = self.model_name(request.model)
        item = self._tags(request).get(name)
        resolution = Resolution(model=name, details={"host": request.settings.ollama_host})
        if item is not None:
            digest = item.get("digest")
            self._check_digest(request, name, digest)
            resolution.installed = True
            resolution.revision = digest
            resolution.bytes = item.get("size")
            resolution.verified = "listed by /api/tags"
        return resolution

    def _check_digest(self, request: ProvisionRequest, name: str, digest: Any) -> None:
        wanted = request.wanted_revision
        if wanted and not (isinstance(digest, str) and digest.startswith(wanted)):
            raise ProvisionError(
                f"ollama model {name} has digest {digest}, but {wanted} is pinned (manifest "
                "revision or lock file); Ollama cannot pull a given digest: pull the matching "
                "tag or update the pin"
            )

    def fetch(self, request: ProvisionRequest, resolution: Resolution) -> FetchResult:
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
                    body = response.read().decode(errors="replace")
                    raise ProvisionError(
                        f"ollama pull {name} failed: HTTP {response.status_code}: "
                        f"{_error_text(body)}"
                    )
                for line in response.iter_lines():
                    if not line.strip():
                        continue
                    try:
                        event = json.loads(line)
                    except ValueError as err:
                        raise ProvisionError(
                            f"ollama pull {name}: invalid progress line {line[:200]!r}"
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
        item = self._tags(request).get(resolution.model)
        if item is None:
            raise ProvisionError(
                f"ollama reported success pulling {resolution.model}, but /api/tags does not list it"
            )
        self._check_digest(request, resolution.model, item.get("digest"))
        resolution.revision = item.get("digest")
        if item.get("size"):
            fetched.bytes = int(item["size"])
        return "pull succeeded; listed by /api/tags"

    def verify_installed(self, request: ProvisionRequest, resolution: Resolution) -> str:
        return "listed by /api/tags"

    def plan(self, request: ProvisionRequest, resolution: Resolution) -> ProvisionPlan:
        return ProvisionPlan(target=f"ollama://{request.settings.ollama_host}/{resolution.model}")


def _error_text(body: str) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body[:300]
    return str(data.get("error", data)) if isinstance(data, dict) else body[:300]
