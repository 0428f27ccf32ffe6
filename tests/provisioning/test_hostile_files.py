"""Hostile or broken GGUF files, Ollama stores and Ollama daemons (issue 19).

Each failure is a ``failed`` entry whose message names the file (or the daemon)
and the fix, never a raw Python error, and nothing hangs or reads without bound.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import threading
from pathlib import Path

import pytest

from mongars_llm.errors import ProvisionError
from mongars_llm.provisioning import ProvisionEntry, provision
from mongars_llm.provisioning._gguf import read_gguf_header
from mongars_llm.settings import Settings

from .conftest import free_port, write_manifest
from .test_ollama import FakeOllama


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "ollama-models"
    monkeypatch.setenv("OLLAMA_MODELS", str(folder))
    return folder


def _no_daemon(settings: Settings) -> Settings:
    return settings.model_copy(update={"ollama_host": f"http://127.0.0.1:{free_port()}"})


def _provision_one(settings: Settings, tmp_path: Path, entry: dict[str, str]) -> ProvisionEntry:
    manifest = write_manifest(tmp_path / "cfg", {"chat": entry})
    return provision(manifest=manifest, profile="t", settings=settings)["chat"]


def _ollama_manifest(store: Path, model: str, tag: str = "latest") -> Path:
    path = store / "manifests" / "registry.ollama.ai" / "library" / model / tag
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------ GGUF headers
def _gguf_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def _gguf_with_nested_arrays(path: Path, depth: int) -> Path:
    """A GGUF header whose one metadata value is an array of arrays ``depth`` deep."""
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _gguf_string("odd.key") + struct.pack("<I", 9)
    data += struct.pack("<IQ", 9, 1) * depth + struct.pack("<IQ", 4, 0)
    path.write_bytes(data)
    return path


def test_a_gguf_with_arrays_nested_without_end_names_the_file(
    settings: Settings, tmp_path: Path
) -> None:
    bomb = _gguf_with_nested_arrays(tmp_path / "nested.gguf", sys.getrecursionlimit() * 2)
    with pytest.raises(ProvisionError, match="nested") as err:
        read_gguf_header(bomb)
    assert str(bomb) in str(err.value) and "download it again" in str(err.value)

    entry = _provision_one(settings, tmp_path, {"name": str(bomb), "provider": "local"})
    assert entry.action == "failed"
    assert str(bomb) in entry.error and "download it again" in entry.error
    assert "recursion" not in entry.error


def test_a_gguf_with_a_few_nested_arrays_still_reads(tmp_path: Path) -> None:
    path = _gguf_with_nested_arrays(tmp_path / "ok.gguf", 3)
    with pytest.raises(ProvisionError, match=r"general\.architecture"):  # read to the end
        read_gguf_header(path)


def test_a_path_too_long_for_the_file_system_says_to_shorten_it(
    settings: Settings, tmp_path: Path
) -> None:
    name = str(tmp_path / ("m" * 300 + ".gguf"))
    entry = _provision_one(settings, tmp_path, {"name": name, "provider": "local"})
    assert entry.action == "failed"
    assert name in entry.error and "too long" in entry.error
    assert "shorten" in entry.error and "'chat'" in entry.error


# ------------------------------------------------------------------ Ollama's store
@pytest.mark.parametrize(
    ("name", "part"),
    [("m" * 300, "model"), ("ns" * 60 + "/tiny", "namespace"), ("tiny:" + "t" * 81, "tag")],
)
def test_an_ollama_name_longer_than_ollama_allows_is_named(
    store: Path, settings: Settings, tmp_path: Path, name: str, part: str
) -> None:
    entry = _provision_one(_no_daemon(settings), tmp_path, {"name": name, "provider": "ollama"})
    assert entry.action == "failed"
    assert "File name too long" not in entry.error
    assert f"{part} part" in entry.error and "at most 80" in entry.error
    assert "fix the name" in entry.error


def test_an_ollama_name_on_a_long_host_still_gets_a_lock(
    store: Path, settings: Settings, tmp_path: Path
) -> None:
    """A long but valid name (registry host, namespace, model, tag): the lock file and
    the model's folder stay within the file system's name limit."""
    name = "h" * 200 + ".example/" + "n" * 80 + "/" + "m" * 80 + ":" + "t" * 80
    entry = _provision_one(_no_daemon(settings), tmp_path, {"name": name, "provider": "ollama"})
    assert entry.action == "failed"
    assert "File name too long" not in entry.error
    assert "is not in Ollama's store" in entry.error  # got past the lock, then found nothing


def test_an_ollama_manifest_linked_outside_the_store_is_refused_as_a_read(
    store: Path, settings: Settings, tmp_path: Path
) -> None:
    outside = tmp_path / "elsewhere.json"
    outside.write_text("{}")
    _ollama_manifest(store, "evil").symlink_to(outside)
    entry = _provision_one(_no_daemon(settings), tmp_path, {"name": "evil", "provider": "ollama"})
    assert entry.action == "failed"
    assert "refusing to read" in entry.error and "write" not in entry.error
    assert str(outside) in entry.error and "ollama pull evil:latest" in entry.error


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_an_ollama_manifest_that_is_a_fifo_fails_at_once(
    store: Path, settings: Settings, tmp_path: Path
) -> None:
    fifo = _ollama_manifest(store, "piped")
    os.mkfifo(fifo)
    results: list[ProvisionEntry] = []
    worker = threading.Thread(
        target=lambda: results.append(
            _provision_one(_no_daemon(settings), tmp_path, {"name": "piped", "provider": "ollama"})
        ),
        daemon=True,
    )
    worker.start()
    worker.join(60)  # milliseconds when fixed; forever (opening the pipe) when not
    if worker.is_alive():
        with open(fifo, "w"):  # let the blocked reader go before failing
            pass
        worker.join(60)
        pytest.fail("provisioning blocked on an Ollama manifest that is a named pipe")
    (entry,) = results
    assert entry.action == "failed"
    assert str(fifo) in entry.error and "not a regular file" in entry.error
    assert "ollama pull piped:latest" in entry.error


@pytest.mark.parametrize(
    "content",
    ["[" * 200_000, '{"layers": ' + "[" * 200_000, "x" * (2 << 20)],
    ids=["nested", "nested-layers", "huge"],
)
def test_a_hostile_ollama_manifest_is_a_clear_error(
    store: Path, settings: Settings, tmp_path: Path, content: str
) -> None:
    manifest = _ollama_manifest(store, "odd")
    manifest.write_text(content)
    entry = _provision_one(_no_daemon(settings), tmp_path, {"name": "odd", "provider": "ollama"})
    assert entry.action == "failed"
    assert str(manifest) in entry.error and "ollama pull odd:latest" in entry.error
    assert "recursion" not in entry.error


def test_an_ollama_blob_that_is_not_a_file_is_named(
    store: Path, settings: Settings, tmp_path: Path
) -> None:
    digest = "ab" * 32
    _ollama_manifest(store, "odd").write_text(
        json.dumps(
            {
                "layers": [
                    {
                        "mediaType": "application/vnd.ollama.image.model",
                        "digest": f"sha256:{digest}",
                    }
                ]
            }
        )
    )
    blob = store / "blobs" / f"sha256-{digest}"
    blob.mkdir(parents=True)
    entry = _provision_one(_no_daemon(settings), tmp_path, {"name": "odd", "provider": "ollama"})
    assert entry.action == "failed"
    assert str(blob) in entry.error and "not a regular file" in entry.error
    assert "ollama pull odd:latest" in entry.error


# ------------------------------------------------------------------ Ollama's daemon
@pytest.mark.network
def test_an_endless_progress_line_from_the_daemon_is_cut_short(
    store: Path, settings: Settings, tmp_path: Path
) -> None:
    with FakeOllama() as daemon:
        daemon.endless_line = 256 << 20
        settings = settings.model_copy(update={"ollama_host": daemon.url})
        entry = _provision_one(settings, tmp_path, {"name": "tiny", "provider": "ollama"})
    assert entry.action == "failed"
    assert daemon.url in entry.error and "progress line" in entry.error
    assert "OLLAMA_HOST" in entry.error
    # the client hung up after about its limit (1 MiB) plus the sockets' buffers
    assert daemon.sent < daemon.endless_line // 4


@pytest.mark.network
def test_a_huge_model_list_from_the_daemon_is_refused(
    store: Path, settings: Settings, tmp_path: Path
) -> None:
    with FakeOllama() as daemon:
        padding = "p" * 1024
        daemon.models = {
            f"m{i}:latest": {"name": f"m{i}:latest", "pad": padding} for i in range(40_000)
        }
        settings = settings.model_copy(update={"ollama_host": daemon.url})
        entry = _provision_one(settings, tmp_path, {"name": "tiny", "provider": "ollama"})
    assert entry.action == "failed"
    assert daemon.url in entry.error and "/api/tags" in entry.error and "MiB" in entry.error


def test_the_progress_line_limit_leaves_room_for_ordinary_lines() -> None:
    from mongars_llm.provisioning.ollama import OllamaProvider

    ordinary = json.dumps(
        {"status": "pulling " + "ab" * 6, "digest": "sha256:" + "ab" * 32, "total": 1 << 40}
    )
    assert OllamaProvider.max_line_bytes >= 1000 * len(ordinary)
