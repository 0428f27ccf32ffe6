"""The ``ollama`` provider against a loopback server speaking Ollama's documented API."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mongars_llm.provisioning import ProgressEvent, provision

from .conftest import free_port, write_manifest

pytestmark = pytest.mark.network

DIGEST = "sha256:" + "ab" * 32


class FakeOllama:
    """``GET /api/tags`` lists pulled models; ``POST /api/pull`` streams NDJSON progress."""

    def __init__(self) -> None:
        self.models: dict[str, dict] = {}
        self.pulls: list[dict] = []
        self.fail_with: str | None = None
        #: a pull answers one progress line of this many bytes (a hostile or broken daemon)
        self.endless_line: int | None = None
        #: bytes of that line written before the client hung up
        self.sent = 0
        #: called with the model name when a pull succeeds (to fill a store on disk)
        self.on_pull: Callable[[str], None] | None = None
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args: object) -> None:
                pass

            def _json(self, payload: object, status: int = 200) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/api/tags":
                    self._json({"models": list(outer.models.values())})
                else:
                    self._json({"error": "not found"}, 404)

            def do_POST(self) -> None:
                if self.path != "/api/pull":
                    self._json({"error": "not found"}, 404)
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.pulls.append(body)
                name = body["model"]
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.end_headers()

                def line(payload: dict) -> None:
                    self.wfile.write(json.dumps(payload).encode() + b"\n")
                    self.wfile.flush()

                line({"status": "pulling manifest"})
                if outer.endless_line is not None:
                    chunk = b"x" * (1 << 20)
                    try:
                        self.wfile.write(b'{"status": "')
                        while outer.sent < outer.endless_line:
                            self.wfile.write(chunk)
                            outer.sent += len(chunk)
                    except OSError:  # the client hung up
                        return
                    line({"status": "success"})
                    return
                if outer.fail_with:
                    line({"error": outer.fail_with})
                    return
                for completed in (0, 500, 1000):
                    line(
                        {
                            "status": f"pulling {DIGEST[7:19]}",
                            "digest": DIGEST,
                            "total": 1000,
                            "completed": completed,
                        }
                    )
                line({"status": "verifying sha256 digest"})
                line({"status": "writing manifest"})
                if outer.on_pull is not None:
                    outer.on_pull(name)
                outer.models[name] = {
                    "name": name,
                    "model": name,
                    "size": 1000,
                    "digest": DIGEST[7:],
                    "modified_at": "2024-01-01T00:00:00Z",
                }
                line({"status": "success"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeOllama:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(autouse=True)
def _empty_ollama_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Never read the machine's own store (``~/.ollama/models``)."""
    store = tmp_path / "ollama-store"
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    return store


@pytest.fixture
def ollama() -> Iterator[FakeOllama]:
    with FakeOllama() as server:
        yield server


def _settings(settings, host: str):
    return settings.model_copy(update={"ollama_host": host})


def test_pull_then_exists_with_progress(ollama: FakeOllama, settings, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, {"chat": {"name": "tinyllama", "provider": "ollama"}})
    events: list[ProgressEvent] = []
    report = provision(
        manifest=manifest,
        profile="t",
        settings=_settings(settings, ollama.url),
        progress=events.append,
    )
    entry = report["chat"]
    assert entry.action == "installed", entry.error
    assert entry.model == "tinyllama:latest" and entry.revision == DIGEST[7:]
    assert entry.bytes == 1000 and entry.path is None
    assert ollama.pulls == [
        {"model": "tinyllama:latest", "name": "tinyllama:latest", "stream": True}
    ]
    downloads = [e for e in events if e.stage == "download" and e.total is not None]
    assert [(e.completed, e.total) for e in downloads] == [(0, 1000), (500, 1000), (1000, 1000)]

    from mongars_llm.provisioning import clear_cache

    clear_cache()
    again = provision(manifest=manifest, profile="t", settings=_settings(settings, ollama.url))
    assert again["chat"].action == "exists" and again["chat"].revision == DIGEST[7:]
    assert len(ollama.pulls) == 1


def test_an_error_line_is_a_failed_entry(ollama: FakeOllama, settings, tmp_path: Path) -> None:
    ollama.fail_with = "pull model manifest: file does not exist"
    manifest = write_manifest(tmp_path, {"chat": {"name": "nope:7b", "provider": "ollama"}})
    entry = provision(manifest=manifest, profile="t", settings=_settings(settings, ollama.url))[
        "chat"
    ]
    assert entry.action == "failed"
    assert "nope:7b" in entry.error and "file does not exist" in entry.error


def test_a_closed_port_is_a_clear_failed_entry(settings, tmp_path: Path) -> None:
    host = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    manifest = write_manifest(tmp_path, {"chat": {"name": "tinyllama", "provider": "ollama"}})
    entry = provision(manifest=manifest, profile="t", settings=_settings(settings, host))["chat"]
    assert entry.action == "failed"
    assert host in entry.error and "ollama serve" in entry.error and "OLLAMA_HOST" in entry.error


def test_auto_download_false_and_pinned_digest(
    ollama: FakeOllama, settings, tmp_path: Path
) -> None:
    manifest = write_manifest(
        tmp_path,
        {
            "lazy": {"name": "tinyllama", "provider": "ollama", "auto_download": False},
            "pinned": {"name": "other", "provider": "ollama", "revision": "deadbeef"},
        },
    )
    report = provision(manifest=manifest, profile="t", settings=_settings(settings, ollama.url))
    assert report["lazy"].action == "skipped"
    assert report["pinned"].action == "failed" and "deadbeef" in report["pinned"].error
    assert [p["model"] for p in ollama.pulls] == ["other:latest"]
