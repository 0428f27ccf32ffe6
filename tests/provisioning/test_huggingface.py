"""The ``huggingface`` provider against a real olah Hub mirror on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mongars_llm.errors import ConfigError
from mongars_llm.provisioning import (
    ProgressEvent,
    provision,
    read_lock,
    register_provider,
    unregister_provider,
)
from mongars_llm.provisioning.huggingface import MARKER_NAME, HuggingFaceProvider

from .conftest import Olah, model_files, write_manifest

pytestmark = pytest.mark.network


def _files(path: str | Path) -> set[str]:
    root = Path(path)
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_installed_then_exists_and_files_match(
    hub_env: Olah, settings, tmp_path: Path, tiny_model_dir: Path
) -> None:
    _first, second = hub_env.commits["org/tiny"]
    manifest = write_manifest(tmp_path / "cfg", {"general": "org/tiny"})

    report = provision(manifest=manifest, profile="t", settings=settings, show_progress=False)
    entry = report["general"]
    assert report.ok and entry.action == "installed", entry.error
    assert entry.revision == second  # main resolved to its commit
    expected_dir = settings.resolved_models_dir / "huggingface" / "org--tiny" / second
    assert Path(entry.path) == expected_dir
    assert (expected_dir / "model.safetensors").read_bytes() == (
        tiny_model_dir / "model.safetensors"
    ).read_bytes()
    assert json.loads((expected_dir / "config.json").read_text())["hidden_size"] == 32
    assert entry.bytes == sum(p.stat().st_size for p in tiny_model_dir.iterdir()) + len(
        b'{"second": true}\n'
    )
    assert "checksums" in (entry.verified or "")
    assert (expected_dir / MARKER_NAME).is_file()
    assert not (expected_dir / ".cache").exists()

    again = provision(manifest=manifest, profile="t", settings=settings, show_progress=False)
    assert again["general"].action == "exists"
    assert again["general"].path == entry.path and again["general"].revision == second

    # the lock file next to the manifest records the resolved commit
    lock = read_lock(manifest.parent / "mongars.lock.json")
    assert lock["t"]["general"].revision == second


def test_exists_survives_a_new_process_cache(hub_env: Olah, settings, tmp_path: Path) -> None:
    from mongars_llm.provisioning import clear_cache

    manifest = write_manifest(tmp_path / "cfg", {"general": "org/tiny"})
    assert provision(manifest=manifest, profile="t", settings=settings).ok
    clear_cache()  # as if a new process started: the disk is checked, not the cache
    assert (
        provision(manifest=manifest, profile="t", settings=settings)["general"].action == "exists"
    )


def test_force_reverifies_and_repairs_a_corrupt_install(
    hub_env: Olah, settings, tmp_path: Path, tiny_model_dir: Path
) -> None:
    manifest = write_manifest(tmp_path / "cfg", {"general": "org/tiny"})
    path = Path(provision(manifest=manifest, profile="t", settings=settings)["general"].path)

    intact = provision(manifest=manifest, profile="t", settings=settings, force=True)["general"]
    assert intact.action == "exists" and "checksums" in (intact.verified or "")

    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    # without force the cached report answers (no re-verification)
    assert (
        provision(manifest=manifest, profile="t", settings=settings)["general"].action == "exists"
    )
    repaired = provision(manifest=manifest, profile="t", settings=settings, force=True)["general"]
    assert repaired.action == "installed", repaired.error
    assert weights.read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()


def test_pinned_revision_is_honoured(hub_env: Olah, settings, tmp_path: Path) -> None:
    first, second = hub_env.commits["org/tiny"]
    manifest = write_manifest(
        tmp_path / "cfg",
        {
            "by_commit": {"name": "org/tiny", "revision": first},
            "by_tag": {"name": "org/tiny", "revision": "v1"},
            "latest": "org/tiny",
        },
    )
    report = provision(manifest=manifest, profile="t", settings=settings)
    assert report.ok, [e.error for e in report]
    assert report["by_commit"].revision == first
    assert report["by_tag"].revision == first
    assert report["latest"].revision == second
    assert "extra.json" not in _files(report["by_commit"].path)
    assert "extra.json" in _files(report["latest"].path)
    assert report["by_commit"].path != report["latest"].path


def test_missing_repo_fails_clearly_and_does_not_stop_other_roles(
    hub_env: Olah, settings, tmp_path: Path
) -> None:
    manifest = write_manifest(
        tmp_path / "cfg", {"ghost": "org/does-not-exist", "general": "org/tiny"}
    )
    report = provision(manifest=manifest, profile="t", settings=settings)
    assert not report.ok
    ghost = report["ghost"]
    assert ghost.action == "failed" and ghost.path is None
    assert "org/does-not-exist" in ghost.error and "not found" in ghost.error
    assert report["general"].action == "installed"
    # only successful roles reach the lock file
    lock = read_lock(manifest.parent / "mongars.lock.json")
    assert set(lock["t"]) == {"general"}


def test_unknown_revision_fails_clearly(hub_env: Olah, settings, tmp_path: Path) -> None:
    manifest = write_manifest(
        tmp_path / "cfg", {"general": {"name": "org/tiny", "revision": "no-such-branch"}}
    )
    entry = provision(manifest=manifest, profile="t", settings=settings)["general"]
    assert entry.action == "failed"
    assert "no-such-branch" in entry.error


def test_offline_mode_uses_the_installed_commit(
    hub_env: Olah, settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mongars_llm.provisioning import clear_cache

    manifest = write_manifest(tmp_path / "cfg", {"general": "org/tiny", "other": "org/absent"})
    installed = provision(manifest=manifest, profile="t", settings=settings, roles=["general"])
    clear_cache()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing may be contacted
    report = provision(manifest=manifest, profile="t", settings=settings)
    assert report["general"].action == "exists"
    assert report["general"].path == installed["general"].path
    assert report["other"].action == "failed" and "HF_HUB_OFFLINE" in report["other"].error


def test_dry_run_lists_files_and_bytes_and_writes_nothing(
    hub_env: Olah, settings, tmp_path: Path, tiny_model_dir: Path
) -> None:
    manifest = write_manifest(tmp_path / "cfg", {"general": {"name": "org/tiny", "revision": "v1"}})
    report = provision(manifest=manifest, profile="t", settings=settings, dry_run=True)
    entry = report["general"]
    assert report.dry_run and entry.action == "planned", entry.error
    sizes = {f.path: f.bytes for f in entry.plan.files}
    assert sizes == {p.name: p.stat().st_size for p in tiny_model_dir.iterdir()}
    assert entry.plan.bytes == entry.bytes == sum(sizes.values())
    assert entry.plan.enough_disk and entry.plan.free_bytes > 0
    assert not settings.resolved_models_dir.exists()
    assert sorted(p.name for p in manifest.parent.iterdir()) == ["llm_models.json"]

    provision(manifest=manifest, profile="t", settings=settings)
    after = provision(manifest=manifest, profile="t", settings=settings, dry_run=True)["general"]
    assert after.action == "exists" and after.plan.files == ()


def test_lock_file_round_trip_reproduces_the_commit(
    olah_server: Olah,
    monkeypatch: pytest.MonkeyPatch,
    settings,
    tmp_path: Path,
    tiny_model_dir: Path,
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", olah_server.url)
    (c1,) = olah_server.add_repo("org/lockme", [model_files(tiny_model_dir)])
    manifest = write_manifest(tmp_path / "cfg", {"general": "org/lockme"})
    assert provision(manifest=manifest, profile="t", settings=settings)["general"].revision == c1

    # main moves on upstream
    (c2,) = olah_server.add_repo("org/lockme", [{"README.md": b"# moved\n"}])
    fresh = settings.model_copy(update={"models_dir": tmp_path / "other-models"})
    locked = provision(manifest=manifest, profile="t", settings=fresh, locked=True)["general"]
    assert locked.action == "installed" and locked.revision == c1
    assert "README.md" not in _files(locked.path)
    # the lock file is not rewritten by a locked run; an unlocked run follows main
    assert read_lock(manifest.parent / "mongars.lock.json")["t"]["general"].revision == c1
    assert provision(manifest=manifest, profile="t", settings=fresh)["general"].revision == c2
    assert read_lock(manifest.parent / "mongars.lock.json")["t"]["general"].revision == c2


def test_locked_run_needs_every_role_in_the_lock(hub_env: Olah, settings, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "cfg", {"general": "org/tiny", "second": "org/tiny"})
    provision(["general"], manifest=manifest, profile="t", settings=settings)
    with pytest.raises(ConfigError, match="second"):
        provision(manifest=manifest, profile="t", settings=settings, locked=True)
    with pytest.raises(ConfigError, match="does not exist"):
        provision(
            manifest=manifest,
            profile="t",
            settings=settings,
            locked=True,
            lock_path=tmp_path / "none.lock.json",
        )


class _OneAtATime(HuggingFaceProvider):
    def __init__(self) -> None:
        super().__init__(max_workers=1)


@pytest.mark.slow  # the Hub client retries the dead server for ~20 s before giving up
def test_server_dying_mid_download_leaves_nothing_installed(
    olah_factory,
    monkeypatch: pytest.MonkeyPatch,
    settings,
    tmp_path: Path,
    tiny_model_dir: Path,
) -> None:
    server: Olah = olah_factory()
    server.add_repo("org/fragile", [model_files(tiny_model_dir)])
    server.start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    register_provider("hf-one-at-a-time", _OneAtATime)
    try:
        manifest = write_manifest(
            tmp_path / "cfg", {"general": {"name": "org/fragile", "provider": "hf-one-at-a-time"}}
        )
        # One file at a time, in the server's (alphabetical) order: kill olah once all but
        # the last file are in the staging folder. (Killing earlier only makes the Hub
        # client's retries of every remaining file take longer.)
        sizes = [p.stat().st_size for p in sorted(tiny_model_dir.iterdir())]
        threshold = sum(sizes[:-1])
        killed: list[ProgressEvent] = []

        def kill_before_the_last_file(event: ProgressEvent) -> None:
            if event.stage == "download" and (event.completed or 0) >= threshold and not killed:
                killed.append(event)
                server.stop()

        entry = provision(
            manifest=manifest, profile="t", settings=settings, progress=kill_before_the_last_file
        )["general"]
        assert killed, "the download never started"
        assert entry.action == "failed" and "org/fragile" in entry.error
        repo_dir = settings.resolved_models_dir / "huggingface" / "org--fragile"
        leftovers = [p.name for p in repo_dir.iterdir()] if repo_dir.exists() else []
        assert leftovers == [] or leftovers == ["refs"], leftovers

        # later runs never call the broken download present
        again = provision(manifest=manifest, profile="t", settings=settings)["general"]
        assert again.action == "failed"
        server.start()
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        final = provision(manifest=manifest, profile="t", settings=settings)["general"]
        assert final.action == "installed", final.error
    finally:
        unregister_provider("hf-one-at-a-time")


def test_pickle_only_repository_is_refused(
    hub_env: Olah, settings, tmp_path: Path, tiny_model_dir: Path
) -> None:
    hub_env.add_repo(
        "org/pickled",
        [{"config.json": tiny_model_dir / "config.json", "pytorch_model.bin": b"not a pickle"}],
    )
    manifest = write_manifest(tmp_path / "cfg", {"general": "org/pickled"})
    entry = provision(manifest=manifest, profile="t", settings=settings)["general"]
    assert entry.action == "failed" and "pickled" in entry.error
    assert not (settings.resolved_models_dir / "huggingface" / "org--pickled").exists()


def test_auto_download_false_skips_a_missing_model(hub_env: Olah, settings, tmp_path: Path) -> None:
    manifest = write_manifest(
        tmp_path / "cfg", {"general": {"name": "org/tiny", "auto_download": False}}
    )
    entry = provision(manifest=manifest, profile="t", settings=settings)["general"]
    assert entry.action == "skipped" and "auto_download" in entry.error
    assert not (settings.resolved_models_dir / "huggingface").exists()
