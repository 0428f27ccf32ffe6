"""Provisioning against hostile input and crashed runs (issue 10: items 7, 10, 11, 12).

Every write stays under the models folder; archives extract to a bounded size;
work left by a killed run is cleaned; ``auto_download: false`` never touches the
network.
"""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mongars_llm.errors import ConfigError, ProvisionError
from mongars_llm.provisioning import clear_cache, provision
from mongars_llm.provisioning._adapter_sources import safe_extract
from mongars_llm.settings import Settings

from .conftest import Olah, write_manifest

ADAPTER_FILES = {
    "adapter_config.json": json.dumps({"peft_type": "LORA", "r": 4}).encode(),
    "adapter_model.safetensors": b"\x00" * 64,
}


def _files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")} if root.exists() else set()


# ------------------------------------------------------------------ item 7
@pytest.mark.parametrize("revision", ["../../../../escaped", "/tmp/mongars-escaped", "a/../../b"])
def test_a_path_like_revision_is_refused_before_anything_runs(
    settings: Settings, tmp_path: Path, revision: str
) -> None:
    manifest = write_manifest(
        tmp_path / "cfg", {"general": {"name": "org/tiny", "revision": revision}}
    )
    with pytest.raises(ConfigError) as info:
        provision(manifest=manifest, profile="t", settings=settings)
    assert "profiles.t.models.general.revision" in str(info.value)
    assert "invalid revision" in str(info.value)
    assert not settings.resolved_models_dir.exists()


@pytest.mark.network
def test_a_path_like_revision_in_the_lock_file_writes_nothing_outside(
    hub_env: Olah, settings: Settings, tmp_path: Path
) -> None:
    """The lock file is an input too: ``--locked`` with a hostile revision fails cleanly."""
    manifest = write_manifest(tmp_path / "cfg", {"general": "org/tiny"})
    (manifest.parent / "mongars.lock.json").write_text(
        json.dumps(
            {
                "version": 1,
                "profiles": {
                    "t": {
                        "general": {
                            "provider": "huggingface",
                            "model": "org/tiny",
                            "revision": "../../../../../escaped",
                        }
                    }
                },
            }
        )
    )
    before = _files_under(tmp_path)
    entry = provision(manifest=manifest, profile="t", settings=settings, locked=True)["general"]
    assert entry.action == "failed"
    assert "invalid revision" in entry.error and "'..'" in entry.error
    new = {p for p in _files_under(tmp_path) - before if p.split("/")[0] != "models"}
    assert new == set(), new


@pytest.mark.network
def test_a_planted_link_cannot_send_a_download_outside_the_models_folder(
    hub_env: Olah, settings: Settings, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    repo_dir = settings.resolved_models_dir / "huggingface" / "org--tiny"
    repo_dir.parent.mkdir(parents=True)
    repo_dir.symlink_to(outside, target_is_directory=True)
    manifest = write_manifest(tmp_path / "cfg", {"general": "org/tiny"})

    entry = provision(manifest=manifest, profile="t", settings=settings)["general"]
    assert entry.action == "failed"
    assert "outside" in entry.error and str(settings.resolved_models_dir.resolve()) in entry.error
    assert list(outside.iterdir()) == []


# ------------------------------------------------------------------ item 10
def _adapter_role(tiny_model_dir: Path, source: str) -> dict[str, object]:
    return {
        "general": {
            "name": str(tiny_model_dir),
            "provider": "local",
            "adapters": [{"name": "support", "source": source}],
        }
    }


def test_a_zip_written_by_plain_writestr_is_installed(
    settings: Settings, tmp_path: Path, tiny_model_dir: Path
) -> None:
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    with zipfile.ZipFile(cfg / "support.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("support/", b"")  # a directory entry, as zip tools write them
        for name, data in ADAPTER_FILES.items():
            zf.writestr(f"support/{name}", data)  # external_attr: permissions, no file type
    manifest = write_manifest(cfg, _adapter_role(tiny_model_dir, "support.zip"))

    entry = provision(manifest=manifest, profile="t", settings=settings)["general"]
    assert entry.action == "exists", entry.error
    (adapter,) = entry.adapters
    assert (Path(adapter.path) / "adapter_config.json").read_bytes() == ADAPTER_FILES[
        "adapter_config.json"
    ]


def _bomb_zip(size: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in ADAPTER_FILES.items():
            zf.writestr(name, data)
        zf.writestr("padding.bin", b"\x00" * size)
    return buf.getvalue()


def _bomb_tar(size: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in {**ADAPTER_FILES, "padding.bin": b"\x00" * size}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_an_archive_that_extracts_past_the_limit_is_refused(
    tmp_path: Path, tiny_model_dir: Path, suffix: str
) -> None:
    settings = Settings(
        models_dir=tmp_path / "models",
        cache_dir=tmp_path / "cache",
        llm_adapter_registry_path=tmp_path / "registry",
        adapter_archive_max_bytes=1_000_000,
    )
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    data = _bomb_zip(5_000_000) if suffix == ".zip" else _bomb_tar(5_000_000)
    assert len(data) < 50_000  # a small download ...
    (cfg / f"bomb{suffix}").write_bytes(data)
    manifest = write_manifest(cfg, _adapter_role(tiny_model_dir, f"bomb{suffix}"))

    entry = provision(manifest=manifest, profile="t", settings=settings)["general"]
    assert entry.action == "failed"  # ... that would have written 5 MB
    assert "1000000 bytes" in entry.error
    assert "MONGARS_ADAPTER_ARCHIVE_MAX_BYTES" in entry.error
    written = settings.resolved_models_dir / "adapters"
    assert [p for p in written.rglob("*") if p.is_file()] == []


def _lying_zip(real_size: int, declared: int) -> bytes:
    """A zip whose headers declare ``declared`` bytes for a member of ``real_size``."""
    data = bytearray(_bomb_zip(real_size))
    real = struct.pack("<I", real_size)
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        start = 0
        while (start := data.find(signature, start)) >= 0:
            field = start + offset
            if data[field : field + 4] == real:
                data[field : field + 4] = struct.pack("<I", declared)
            start += 4
    return bytes(data)


def test_a_zip_that_lies_about_its_sizes_extracts_no_more_than_the_limit(tmp_path: Path) -> None:
    archive = tmp_path / "liar.zip"
    archive.write_bytes(_lying_zip(5_000_000, declared=10))
    with zipfile.ZipFile(archive) as zf:  # the headers pass the declared-size check
        assert sum(i.file_size for i in zf.infolist()) < 1_000
    dest = tmp_path / "out"
    with pytest.raises(ProvisionError) as info:
        safe_extract(archive, dest, max_bytes=1_000_000)
    assert "liar.zip" in str(info.value)
    assert sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()) <= 1_000_000


def test_the_archive_limit_has_a_documented_default() -> None:
    assert Settings().adapter_archive_max_bytes == 8 * 1024**3
    docs = Path(__file__).resolve().parents[2] / "docs"
    assert "MONGARS_ADAPTER_ARCHIVE_MAX_BYTES" in (docs / "settings.md").read_text()
    assert "MONGARS_ADAPTER_ARCHIVE_MAX_BYTES" in (docs / "provisioning.md").read_text()


# ------------------------------------------------------------------ item 11
def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


@pytest.fixture
def lock_holder(settings: Settings) -> Iterator[list[Path]]:
    """Another process holding the locks of ``huggingface/org--busy`` and
    ``gguf/busy-0123456789ab`` (live runs)."""
    locks = settings.resolved_models_dir / ".locks"
    held = [locks / "huggingface" / "org--busy.lock", locks / "gguf" / "busy-0123456789ab.lock"]
    for lock in held:
        lock.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from filelock import FileLock; "
            "held = [FileLock(p) for p in sys.argv[1:]]; [l.acquire() for l in held]; "
            "print('held', flush=True); time.sleep(120)",
            *map(str, held),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        yield held
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_work_left_by_a_killed_run_is_cleaned_by_the_next_run(
    settings: Settings, tmp_path: Path, tiny_model_dir: Path, lock_holder: list[Path]
) -> None:
    models = settings.resolved_models_dir
    stale_staging = models / "huggingface" / "org--tiny" / ".tmp-0123456789ab-deadbeef"
    (stale_staging / ".cache" / "hub").mkdir(parents=True)
    (stale_staging / "model.safetensors").write_bytes(b"\x00" * 1000)
    stale_aside = models / "huggingface" / "org--tiny" / ".old-0123456789ab-cafebabe"
    stale_aside.mkdir()
    stale_download = models / "adapters" / "support" / ".download-1234abcd.tar.gz"
    stale_download.parent.mkdir(parents=True)
    stale_download.write_bytes(b"partial")
    stale_adapter_staging = models / "adapters" / "support" / ".tmp-1234abcd"
    stale_adapter_staging.mkdir()
    young = models / "huggingface" / "org--tiny" / ".tmp-0123456789ab-young000"
    young.mkdir()
    busy = models / "huggingface" / "org--busy" / ".tmp-0123456789ab-busy0000"
    busy.mkdir(parents=True)
    installed = models / "huggingface" / "org--tiny" / ("a" * 40)
    installed.mkdir()
    # GGUF conversions sit side by side in gguf/: the name says whose lock guards them
    stale_conversion = models / "gguf" / ".tmp-tiny-0123456789ab-deadbeef"
    (stale_conversion / "part").mkdir(parents=True)
    stale_swap = models / "gguf" / ".old-tiny-0123456789ab-cafebabe"
    stale_swap.mkdir()
    busy_conversion = models / "gguf" / ".tmp-busy-0123456789ab-busy0000"
    busy_conversion.mkdir()
    converted = models / "gguf" / "tiny-0123456789ab"
    converted.mkdir()
    stale_ollama = models / "ollama" / "tiny_135m" / f".tmp-{'b' * 64}-deadbeef"
    stale_ollama.mkdir(parents=True)
    timeout = settings.provision_lock_timeout
    for path in (
        stale_staging,
        stale_aside,
        stale_download,
        stale_adapter_staging,
        busy,
        stale_conversion,
        stale_swap,
        busy_conversion,
        stale_ollama,
    ):
        _age(path, timeout + 60)
    _age(installed, timeout * 10)
    _age(converted, timeout * 10)

    manifest = write_manifest(
        tmp_path / "cfg", {"general": {"name": str(tiny_model_dir), "provider": "local"}}
    )
    assert provision(manifest=manifest, profile="t", settings=settings).ok

    for gone in (
        stale_staging,
        stale_aside,
        stale_download,
        stale_adapter_staging,
        stale_conversion,
        stale_swap,
        stale_ollama,
    ):
        assert not os.path.lexists(gone), gone
    assert young.is_dir()  # younger than the lock timeout: maybe a live run
    assert busy.is_dir() and busy_conversion.is_dir()  # their locks are held by live runs
    assert installed.is_dir() and converted.is_dir()  # never work in progress

    dry = provision(manifest=manifest, profile="t", settings=settings, dry_run=True)
    assert dry.ok and young.is_dir()


# ------------------------------------------------------------------ item 12
class ConnectionCounter:
    """A TCP port on 127.0.0.1 that counts connections and closes each at once."""

    def __init__(self) -> None:
        self.count = 0
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.count += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._sock.close()


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[ConnectionCounter]:
    """``HF_ENDPOINT`` pointing at a :class:`ConnectionCounter` (never offline mode)."""
    counter = ConnectionCounter()
    monkeypatch.setenv("HF_ENDPOINT", counter.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    try:
        yield counter
    finally:
        counter.close()


def test_auto_download_false_reports_a_missing_model_skipped_without_any_network_call(
    no_hub: ConnectionCounter, settings: Settings, tmp_path: Path
) -> None:
    manifest = write_manifest(
        tmp_path / "cfg",
        {
            "general": {"name": "org/never-installed", "auto_download": False},
            "pinned": {"name": "org/never-installed", "auto_download": False, "revision": "v1"},
        },
    )
    report = provision(manifest=manifest, profile="t", settings=settings)
    for entry in report:
        assert entry.action == "skipped", entry.error
        assert "auto_download is false" in entry.error
    assert report.ok
    dry = provision(manifest=manifest, profile="t", settings=settings, dry_run=True)
    assert [e.action for e in dry] == ["skipped", "skipped"]
    assert no_hub.count == 0


@pytest.mark.network
def test_auto_download_false_finds_an_installed_model_without_any_network_call(
    hub_env: Olah,
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first, second = hub_env.commits["org/tiny"]
    online = write_manifest(tmp_path / "online", {"general": "org/tiny"})
    installed = provision(manifest=online, profile="t", settings=settings)["general"]
    assert installed.action == "installed", installed.error
    clear_cache()

    counter = ConnectionCounter()
    try:
        monkeypatch.setenv("HF_ENDPOINT", counter.url)
        manifest = write_manifest(
            tmp_path / "cfg",
            {
                "general": {"name": "org/tiny", "auto_download": False},
                "by_commit": {"name": "org/tiny", "auto_download": False, "revision": second},
                "old": {"name": "org/tiny", "auto_download": False, "revision": first},
            },
        )
        report = provision(manifest=manifest, profile="t", settings=settings)
        assert report["general"].action == "exists", report["general"].error
        assert report["general"].path == installed.path
        assert report["by_commit"].action == "exists"
        assert report["old"].action == "skipped"
        forced = provision(manifest=manifest, profile="t", settings=settings, force=True)
        assert forced["general"].action == "exists", forced["general"].error
        assert "recorded at install time" in (forced["general"].verified or "")
        assert counter.count == 0
    finally:
        counter.close()
