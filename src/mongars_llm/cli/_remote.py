"""The commands' side of a running ``mongars-llm serve``: find it, then talk to it.

As the ``ollama`` CLI talks to its daemon, ``chat``, ``embed`` and ``ps`` use a
``mongars-llm serve`` that answers at ``MONGARS_HOST`` (default
``http://127.0.0.1:8000``, where ``serve`` listens by default) instead of
loading the model again (seconds, not tens of seconds). The probe is one
``GET /api/version`` with a short connect timeout, and only a server that says
it is mongars-llm (``"server": "mongars-llm"``) and is ready counts; anything
else, and ``--local``, means loading in-process as before. Flags that only an
in-process load can honour (``--model``, ``--manifest``, ``--profile``,
``--device``, ``--quantize-4bit``, ``--registry-path``, an adapter folder, and
the per-command ones each command lists) also mean in-process.

Secrets: no credential is sent unless the server asks for one (a 401); then
``MONGARS_API_KEY`` is sent, if set, to that server only. A later command
(``rerank``) uses the same :func:`connect` and :meth:`Server.post`.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import MongarsError

__all__ = [
    "DEFAULT_HOST",
    "LOCAL_ONLY_FLAGS",
    "RemoteError",
    "Server",
    "connect",
    "host_url",
]

#: where ``mongars-llm serve`` listens by default
DEFAULT_HOST = "http://127.0.0.1:8000"
#: how long the probe waits for a connection (nothing listening answers at once)
PROBE_CONNECT_S = 0.3
PROBE_READ_S = 2.0
#: runtime flags only an in-process load can honour (``args`` attribute -> flag)
LOCAL_ONLY_FLAGS = {
    "model": "--model",
    "manifest": "--manifest",
    "profile": "--profile",
    "device": "--device",
    "quantize_4bit": "--quantize-4bit",
    "registry_path": "--registry-path",
}


class RemoteError(MongarsError):
    """The running server refused or failed a request (its message, one line)."""

    code = "server_error"


def host_url(value: str | None = None) -> str:
    """``MONGARS_HOST`` as a base URL: ``host``, ``host:port``, ``:port`` or a URL
    (as ``OLLAMA_HOST`` is read); default :data:`DEFAULT_HOST`."""
    from urllib.parse import urlsplit

    text = (value if value is not None else os.environ.get("MONGARS_HOST", "")).strip()
    if not text:
        return DEFAULT_HOST
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    host = parts.hostname or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"  # a server listening everywhere is reached locally
    if ":" in host:
        host = f"[{host}]"
    port = parts.port or (443 if parts.scheme == "https" else 8000)
    return f"{parts.scheme}://{host}:{port}"


@dataclass
class Server:
    """A ready ``mongars-llm serve`` at :attr:`url`."""

    url: str
    version: str
    #: the ``Authorization`` header once the server asked for one
    headers: dict[str, str] = field(default_factory=dict)

    def describe(self, name: str) -> str:
        return f"{name} via mongars-llm serve at {self.url}"

    def get(self, path: str) -> Any:
        return self._json("GET", path, None)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self._json("POST", path, body)

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The NDJSON lines of a streamed answer (an ``error`` line is raised)."""
        import httpx

        for attempt in range(2):
            with (
                httpx.Client(base_url=self.url, timeout=None) as client,
                client.stream("POST", path, json=body, headers=self.headers) as response,
            ):
                if response.status_code == 401 and attempt == 0 and self._authorize():
                    continue
                if response.status_code >= 400:
                    response.read()
                    raise _error(response)
                for line in response.iter_lines():
                    if not line.strip():
                        continue
                    part = json.loads(line)
                    if "error" in part:
                        raise RemoteError(f"the server failed: {part['error']}")
                    yield part
                return

    def _json(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        import httpx

        with httpx.Client(base_url=self.url, timeout=None) as client:
            response = client.request(method, path, json=body, headers=self.headers)
            if response.status_code == 401 and self._authorize():
                response = client.request(method, path, json=body, headers=self.headers)
        if response.status_code >= 400:
            raise _error(response)
        return response.json()

    def _authorize(self) -> bool:
        """The server asked for a key: send ``MONGARS_API_KEY`` from now on, if set."""
        key = os.environ.get("MONGARS_API_KEY", "").strip()
        if not key or self.headers:
            return False
        self.headers = {"Authorization": f"Bearer {key}"}
        return True


def _error(response: Any) -> RemoteError:
    try:
        error = response.json().get("error")
    except ValueError:
        error = None
    if isinstance(error, dict):
        error = error.get("message")
    message = str(error or response.text or response.reason_phrase).strip()
    if response.status_code == 401:
        message += " (set MONGARS_API_KEY to the server's key, or use --local)"
    return RemoteError(
        f"the server at {response.url.scheme}://{response.url.netloc.decode()} "
        f"answered {response.status_code}: {message}"
    )


def connect(
    args: argparse.Namespace | None = None, *, local_flags: dict[str, str] | None = None
) -> Server | None:
    """The running server to use, or ``None`` to load in-process: ``--local``, a flag
    only a local load honours (``local_flags`` adds the command's own), or no ready
    mongars-llm server at ``MONGARS_HOST``."""
    if args is not None:
        if getattr(args, "local", False):
            return None
        for name in {**LOCAL_ONLY_FLAGS, **(local_flags or {})}:
            if getattr(args, name, None) not in (None, False):
                return None
        adapter = getattr(args, "adapter", None)
        if adapter and ("/" in adapter or os.sep in adapter or os.path.isdir(adapter)):
            return None  # an adapter folder: loaded in-process
    return probe(host_url())


def probe(url: str) -> Server | None:
    """A ready mongars-llm server at ``url``, or ``None`` (nothing there, another
    program, or still loading), found within a fraction of a second."""
    import httpx

    timeout = httpx.Timeout(PROBE_READ_S, connect=PROBE_CONNECT_S)
    try:
        with httpx.Client(base_url=url, timeout=timeout) as client:
            version = client.get("/api/version")
            if version.status_code != 200 or version.json().get("server") != "mongars-llm":
                return None
            ready = client.get("/readyz")
            if ready.status_code != 200:
                return None
            return Server(url=url, version=str(version.json().get("version", "")))
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
