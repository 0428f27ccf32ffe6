"""Per-role adapters: verified, installed atomically, unsafe archives rejected."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mongars_llm.provisioning import provision, tree_sha256

from .conftest import write_manifest

ADAPTER_FILES = {
    "adapter_config.json": json.dumps({"peft_type": "LORA", "r": 4}).encode(),
    "adapter_model.safetensors": b"\x00" * 64,
}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tar(files: dict[str, bytes], *, extra: list[tarfile.TarInfo] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return buf.getvalue()


def _zip(files: dict[str, bytes], *, symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (0o120777) << 16
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


@pytest.fixture
def static_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None  # type: ignore[method-assign]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


def _role(tiny_model_dir: Path, adapters: list[dict]) -> dict:
    return {"general": {"name": str(tiny_model_dir), "provider": "local", "adapters": adapters}}


def _installed(settings) -> list[str]:
    root = settings.resolved_models_dir / "adapters"
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) if root.exists() else []


def test_remote_archive_is_verified_and_installed_atomically(
    static_server, settings, tmp_path: Path, tiny_model_dir: Path
) -> None:
    url, www = static_server
    archive = _tar({f"lora/{k}": v for k, v in ADAPTER_FILES.items()})
    (www / "lora.tar.gz").write_bytes(archive)
    manifest = write_manifest(
        tmp_path / "cfg",
        _role(
            tiny_model_dir,
            [{"name": "style", "source": f"{url}/lora.tar.gz", "sha256": _sha(archive)}],
        ),
    )
    entry = provision(manifest=manifest, profile="t", settings=settings)["general"]
    assert entry.action == "exists", entry.error  # the local model is used in place
    (adapter,) = entry.adapters
    assert adapter.name == "style" and adapter.sha256 == _sha(archive)
    assert (
        Path(adapter.path)
        == settings.resolved_models_dir / "adapters" / "style" / _sha(archive) / "lora"
    )
    assert (Path(adapter.path) / "adapter_config.json").read_bytes() == ADAPTER_FILES[
        "adapter_config.json"
    ]
    assert not [p for p in _installed(settings) if "/.tmp-" in p or "/.download-" in p]
    assert entry.to_dict()["adapters"][0]["path"] == adapter.path


def test_sha256_mismatch_fails_and_installs_nothing(
    static_server, settings, tmp_path: Path, tiny_model_dir: Path
) -> None:
    url, www = static_server
    (www / "lora.tar.gz").write_bytes(_tar(ADAPTER_FILES))
    manifest = write_manifest(
        tmp_path / "cfg",
        _role(
            tiny_model_dir, [{"name": "style", "source": f"{url}/lora.tar.gz", "sha256": "0" * 64}]
        ),
    )
    entry = provision(manifest=manifest, profile="t", settings=settings)["general"]
    assert entry.action == "failed"
    assert "sha256 mismatch" in entry.error and "style" in entry.error
    assert _installed(settings) in ([], ["style"])


@pytest.mark.parametrize(
    "kind",
    ["dotdot", "absolute", "symlink", "hardlink", "zip-dotdot", "zip-symlink", "fifo"],
)
def test_unsafe_archives_are_rejected(
    kind: str, settings, tmp_path: Path, tiny_model_dir: Path
) -> None:
    bad: bytes
    suffix = ".tar.gz"
    if kind == "dotdot":
        bad = _tar({**ADAPTER_FILES, "../evil.txt": b"pwned"})
    elif kind == "absolute":
        bad = _tar({**ADAPTER_FILES, "/tmp/evil.txt": b"pwned"})
    elif kind in ("symlink", "hardlink"):
        link = tarfile.TarInfo("adapter_model.bin")
        link.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
        link.linkname = "/etc/passwd"
        bad = _tar(ADAPTER_FILES, extra=[link])
    elif kind == "fifo":
        fifo = tarfile.TarInfo("pipe")
        fifo.type = tarfile.FIFOTYPE
        bad = _tar(ADAPTER_FILES, extra=[fifo])
    elif kind == "zip-dotdot":
        bad, suffix = _zip({**ADAPTER_FILES, "../../evil.txt": b"pwned"}), ".zip"
    else:
        bad, suffix = _zip(ADAPTER_FILES, symlink="link"), ".zip"
    archive = tmp_path / "cfg" / f"adapter{suffix}"
    archive.parent.mkdir(parents=True)
    archive.write_bytes(bad)
    manifest = write_manifest(
        tmp_path / "cfg", _role(tiny_model_dir, [{"name": "bad", "source": archive.name}])
    )
    entry = provision(manifest=manifest, profile="t", settings=settings)["general"]
    assert entry.action == "failed", kind
    assert (
        "refusing" in entry.error or "not allowed" in entry.error or "special file" in entry.error
    )
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil.txt").exists()
    assert not [p for p in _installed(settings) if p.count("/") >= 1 and not p.startswith("bad/.")]


def test_local_directory_adapter_is_used_in_place_and_checked(
    settings, tmp_path: Path, tiny_model_dir: Path
) -> None:
    adapter_dir = tmp_path / "cfg" / "adapters" / "mine"
    adapter_dir.mkdir(parents=True)
    for name, data in ADAPTER_FILES.items():
        (adapter_dir / name).write_bytes(data)
    digest = tree_sha256(adapter_dir)
    manifest = write_manifest(
        tmp_path / "cfg",
        _role(tiny_model_dir, [{"name": "mine", "source": "adapters/mine", "sha256": digest}]),
    )
    entry = provision(manifest=manifest, profile="t", settings=settings)["general"]
    assert entry.ok, entry.error
    assert entry.adapters[0].path == str(adapter_dir) and entry.adapters[0].sha256 == digest
    assert _installed(settings) == []  # never copied

    (adapter_dir / "adapter_model.safetensors").write_bytes(b"\x01" * 64)
    changed = provision(manifest=manifest, profile="t", settings=settings, force=True)["general"]
    assert changed.action == "failed" and "sha256 mismatch" in changed.error


def test_registry_adapter_by_name(settings, tmp_path: Path, tiny_model_dir: Path) -> None:
    manifest = write_manifest(tmp_path / "cfg", _role(tiny_model_dir, [{"name": "support-bot"}]))
    missing = provision(manifest=manifest, profile="t", settings=settings)["general"]
    assert missing.action == "failed"
    assert (
        "support-bot" in missing.error and str(settings.llm_adapter_registry_path) in missing.error
    )

    from mongars_llm.registry import AdapterRegistry

    source = tmp_path / "run" / "adapter"
    source.mkdir(parents=True)
    for name, data in ADAPTER_FILES.items():
        (source / name).write_bytes(data)
    registry = AdapterRegistry(settings.llm_adapter_registry_path)
    registered = registry.register(
        source, name="support-bot", compatibility={"base_model": str(tiny_model_dir)}
    )
    # a candidate never goes live by name alone: it must be promoted (or pinned)
    candidate = provision(manifest=manifest, profile="t", settings=settings, force=True)["general"]
    assert candidate.action == "failed"
    assert "none is promoted" in candidate.error
    assert f"adapters promote {registered.version}" in candidate.error
    registry.promote(registered.version)
    found = provision(manifest=manifest, profile="t", settings=settings, force=True)["general"]
    assert found.ok, found.error
    assert found.adapters[0].path == str(registry.adapter_path(registered))
    assert found.adapters[0].version == registered.version


def test_a_registry_embedding_adapter_keeps_its_use(
    settings, tmp_path: Path, tiny_model_dir: Path
) -> None:
    from mongars_llm.registry import AdapterRegistry

    source = tmp_path / "run" / "adapter"
    source.mkdir(parents=True)
    for name, data in ADAPTER_FILES.items():
        (source / name).write_bytes(data)
    registry = AdapterRegistry(settings.llm_adapter_registry_path)
    compatibility = {"base_model": str(tiny_model_dir)}
    embed = registry.register(source, name="retriever", compatibility=compatibility, use="embed")
    chat = registry.register(source, name="support-bot", compatibility=compatibility)
    adapters = [
        {"name": "retriever", "version": embed.version},  # no `use`: the registry's (embed)
        {"name": "support-bot", "version": chat.version},  # a chat LoRA: all
    ]
    manifest = write_manifest(tmp_path / "cfg", _role(tiny_model_dir, adapters))
    found = provision(manifest=manifest, profile="t", settings=settings)["general"]
    assert found.ok, found.error
    assert [a.use for a in found.adapters] == ["embed", "all"]
    adapters[0]["use"] = "all"  # the manifest's own `use` wins
    manifest = write_manifest(tmp_path / "cfg2", _role(tiny_model_dir, adapters))
    found = provision(manifest=manifest, profile="t", settings=settings, force=True)["general"]
    assert [a.use for a in found.adapters] == ["all", "all"]
