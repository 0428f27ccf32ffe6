"""Adapter names that build an install folder cannot leave ``<models_dir>/adapters``."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from mongars_llm.provisioning import provision

from .conftest import write_manifest

ADAPTER_FILES = {
    "adapter_config.json": json.dumps({"peft_type": "LORA", "r": 4}).encode(),
    "adapter_model.safetensors": b"\x00" * 64,
}


def _archive(path: Path) -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in ADAPTER_FILES.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return hashlib.sha256(buf.getvalue()).hexdigest()


@pytest.mark.parametrize("name", ["..", ".", "../escape", "a/b", ".hidden", "new\nline"])
def test_an_adapter_name_that_is_not_one_plain_folder_name_is_refused(
    name: str, settings, tmp_path: Path, tiny_model_dir: Path
) -> None:
    digest = _archive(tmp_path / "cfg" / "lora.tar.gz")
    role = {
        "name": str(tiny_model_dir),
        "provider": "local",
        "adapters": [{"name": name, "source": "lora.tar.gz", "sha256": digest}],
    }
    manifest = write_manifest(tmp_path / "cfg", {"general": role})
    entry = provision(manifest=manifest, profile="t", settings=settings)["general"]
    assert entry.action == "failed"
    assert "cannot name its install folder" in entry.error and "rename the adapter" in entry.error
    # nothing was written next to (or above) the adapters folder: no `<models_dir>/<digest>`
    models_dir = settings.resolved_models_dir
    assert not (models_dir / digest).exists()
    assert not list(models_dir.rglob(digest))


def test_a_plain_name_still_installs_under_adapters(
    settings, tmp_path: Path, tiny_model_dir: Path
) -> None:
    digest = _archive(tmp_path / "cfg" / "lora.tar.gz")
    role = {
        "name": str(tiny_model_dir),
        "provider": "local",
        "adapters": [{"name": "style.v2_x-1", "source": "lora.tar.gz", "sha256": digest}],
    }
    manifest = write_manifest(tmp_path / "cfg", {"general": role})
    entry = provision(manifest=manifest, profile="t", settings=settings)["general"]
    assert entry.ok, entry.error
    expected = settings.resolved_models_dir / "adapters" / "style.v2_x-1" / digest
    assert Path(entry.adapters[0].path) == expected
