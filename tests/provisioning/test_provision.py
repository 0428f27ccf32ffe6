"""provision() itself: roles, the local provider, isolation, logging, plugins, the CLI."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mongars_llm.cli import main
from mongars_llm.errors import ConfigError, UnknownRoleError
from mongars_llm.manager import ModelManager
from mongars_llm.provisioning import (
    FetchResult,
    Provider,
    Resolution,
    available_providers,
    provision,
    register_provider,
    unregister_provider,
)

from .conftest import write_manifest


@pytest.fixture
def local_manifest(tmp_path: Path, tiny_model_dir: Path) -> Path:
    cfg = tmp_path / "cfg"
    (cfg / "weights").mkdir(parents=True)
    (cfg / "weights" / "tiny").symlink_to(tiny_model_dir, target_is_directory=True)
    return write_manifest(
        cfg,
        {
            "general": {"name": "weights/tiny", "provider": "local"},
            "broken": {"name": "weights/missing", "provider": "local"},
        },
    )


def test_unknown_role_lists_known_ones_before_anything_runs(local_manifest: Path, settings) -> None:
    with pytest.raises(UnknownRoleError) as info:
        provision(["general", "nope"], manifest=local_manifest, profile="t", settings=settings)
    assert "nope" in str(info.value) and "broken, general" in str(info.value)
    assert not (local_manifest.parent / "mongars.lock.json").exists()


def test_local_paths_resolve_against_the_manifest_folder(
    local_manifest: Path, settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    report = provision(manifest=local_manifest, profile="t", settings=settings)
    general, broken = report["general"], report["broken"]
    assert general.action == "exists"
    assert Path(general.path) == (local_manifest.parent / "weights" / "tiny").resolve()
    assert "config.json" in general.verified
    # one role failing does not stop the others, and says where it looked
    assert (
        broken.action == "failed"
        and str(local_manifest.parent / "weights" / "missing") in broken.error
    )
    assert not report.ok and [e.role for e in report.failed] == ["broken"]
    # local models are never copied (only the lock-file guard lives in the models dir)
    assert [p.name for p in settings.resolved_models_dir.iterdir()] == [".locks"]


def test_a_directory_without_config_is_rejected(settings, tmp_path: Path) -> None:
    (tmp_path / "cfg" / "empty").mkdir(parents=True)
    manifest = write_manifest(tmp_path / "cfg", {"general": {"name": "empty", "provider": "local"}})
    entry = provision(manifest=manifest, profile="t", settings=settings)["general"]
    assert entry.action == "failed" and "config.json" in entry.error


def test_provisioning_a_managers_roles_logs_structured_events(
    local_manifest: Path, settings, caplog: pytest.LogCaptureFixture
) -> None:
    manager = ModelManager(local_manifest, settings=settings, profile="t")
    with caplog.at_level(logging.INFO, logger="mongars_llm.provision"):
        report = provision(["general"], manager=manager)
    assert [e.role for e in report] == ["general"] and report.ok
    (record,) = [r for r in caplog.records if r.name == "mongars_llm.provision"]
    assert record.event == "provision"
    assert {k: record.fields[k] for k in ("role", "action", "provider", "model")} == {
        "role": "general",
        "action": "exists",
        "provider": "local",
        "model": "weights/tiny",
    }
    assert isinstance(record.fields["seconds"], float)
    payload = json.loads(report.to_json())
    assert payload["ok"] is True and payload["entries"][0]["action"] == "exists"


def test_a_manager_and_other_choices_at_once_are_a_config_error(
    local_manifest: Path, settings
) -> None:
    """A manager fixes its profile: another one beside it is refused, never switched to."""
    document = json.loads(local_manifest.read_text())
    document["profiles"]["u"] = {"models": {"general": "org/not-this-one"}}
    local_manifest.write_text(json.dumps(document))
    manager = ModelManager(local_manifest, settings=settings, profile="t")
    other = write_manifest(local_manifest.parent / "other", {"general": "org/other"})
    for kwargs, named in (
        ({"profile": "u"}, "profile='u' (the manager's profile is 't')"),
        ({"settings": settings.model_copy()}, "settings="),
        ({"manifest": other}, f"manifest= (the manager's manifest is {local_manifest})"),
    ):
        with pytest.raises(ConfigError) as info:
            provision(["general"], manager=manager, **kwargs)
        assert named in str(info.value) and "pass either manager=" in str(info.value)
        assert isinstance(info.value, ValueError)
    # the same choices as the manager's are no conflict
    same = provision(["general"], manager=manager, profile="t", settings=settings)
    assert same.profile == "t" and same["general"].action == "exists"


class EchoProvider(Provider):
    """A plugin that 'downloads' a model by writing a file: resolve → fetch → verify."""

    name = "echo"

    def resolve(self, request):  # type: ignore[no-untyped-def]
        path = request.settings.resolved_models_dir / "echo" / request.model
        return Resolution(model=request.model, path=path, installed=path.exists(), revision="v1")

    def fetch(self, request, resolution):  # type: ignore[no-untyped-def]
        resolution.path.parent.mkdir(parents=True, exist_ok=True)
        resolution.path.write_text("weights")
        return FetchResult(bytes=7)


def test_plugin_providers_register_by_name(settings, tmp_path: Path) -> None:
    register_provider("echo", EchoProvider)
    try:
        assert {"echo", "huggingface", "local", "ollama"} <= set(available_providers())
        manifest = write_manifest(tmp_path / "cfg", {"general": {"name": "m1", "provider": "echo"}})
        first = provision(manifest=manifest, profile="t", settings=settings)["general"]
        assert (first.action, first.bytes, first.revision) == ("installed", 7, "v1")
        assert (
            provision(manifest=manifest, profile="t", settings=settings)["general"].action
            == "exists"
        )
    finally:
        unregister_provider("echo")


# ---------------------------------------------------------------- CLI
def test_cli_json_is_one_document_with_exit_codes(
    local_manifest: Path,
    settings,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MONGARS_MODELS_DIR", str(settings.resolved_models_dir))
    args = ["provision", "--manifest", str(local_manifest), "--profile", "t", "--json"]

    assert main([*args, "--roles", "general"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["entries"][0]["action"] == "exists"

    assert main(args) == 1  # the broken role failed
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and {e["role"]: e["action"] for e in doc["entries"]} == {
        "general": "exists",
        "broken": "failed",
    }

    assert main([*args, "--roles", "ghost"]) == 2
    doc = json.loads(capsys.readouterr().out)
    assert doc["error_type"] == "UnknownRoleError" and "ghost" in doc["error"]


def test_cli_human_table_and_usage_errors(
    local_manifest: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["provision", "--manifest", str(local_manifest), "--profile", "t"]
    assert main([*args, "--roles", "general"]) == 0
    out = capsys.readouterr().out
    assert "ROLE" in out and "general" in out and "exists" in out
    assert main([*args, "--roles", "ghost"]) == 2
    assert "known roles: broken, general" in capsys.readouterr().err
    assert main([*args, "--locked", "--lock-file", str(local_manifest.parent / "none.json")]) == 2


def test_cli_subprocess_stdout_is_only_json(local_manifest: Path, tmp_path: Path) -> None:
    env = {**os.environ, "MONGARS_MODELS_DIR": str(tmp_path / "models")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mongars_llm",
            "--log-level",
            "INFO",
            "provision",
            "--manifest",
            str(local_manifest),
            "--profile",
            "t",
            "--json",
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr  # the broken role cannot be planned
    doc = json.loads(proc.stdout)  # the whole stdout is one JSON document
    assert doc["dry_run"] is True
    assert "provision role=" in proc.stderr  # logs go to stderr
