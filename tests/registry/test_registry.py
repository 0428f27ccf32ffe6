"""Adapter registry: immutable versions, pointers, statuses, concurrent writers."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mongars_llm.errors import RegistryError
from mongars_llm.registry import AdapterCompatibility, AdapterRegistry

COMPAT = {
    "base_model": "org/base",
    "base_model_revision": "abc123",
    "peft_version": "0.0",
    "r": 8,
    "lora_alpha": 16,
    "target_modules": ["q_proj", "v_proj"],
    "modules_to_save": [],
}


def _adapter(root: Path, name: str, payload: bytes = b"weights") -> Path:
    folder = root / "runs" / name / "adapter"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(payload + name.encode())
    (folder / "adapter_config.json").write_text("{}")
    return folder


def test_register_auto_increments_and_latest_points_to_newest(tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path / "reg")
    assert registry.latest() is None and registry.list() == []
    first = registry.register(
        _adapter(tmp_path / "reg", "a"),
        name="support",
        run_name="a",
        compatibility=COMPAT,
        metrics={"eval_loss": 1.5},
        dataset={"rows": 10},
    )
    second = registry.register(
        _adapter(tmp_path / "reg", "b"), name="support", compatibility=COMPAT
    )
    assert (first.version, second.version) == ("1", "2")
    assert registry.latest().version == "2"
    assert registry.get(1).metrics == {"eval_loss": 1.5}
    # stored relative to the registry when inside it, resolvable to the real folder
    assert first.path == "runs/a/adapter"
    assert registry.adapter_path("1") == (tmp_path / "reg/runs/a/adapter").resolve()
    assert set(first.sha256) == {"adapter_model.safetensors", "adapter_config.json"}
    registry.verify("1")
    manifest = json.loads((tmp_path / "reg" / "manifest.json").read_text())
    assert manifest["latest"] == "2" and manifest["revision"] == 2
    assert [e["version"] for e in manifest["entries"]] == ["1", "2"]


def test_outside_path_is_absolute_and_tampering_is_detected(tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path / "reg")
    adapter = _adapter(tmp_path / "elsewhere", "x")
    entry = registry.register(adapter, name="x", compatibility=COMPAT)
    assert Path(entry.path).is_absolute()
    (adapter / "adapter_model.safetensors").write_bytes(b"changed")
    with pytest.raises(RegistryError, match="changed after registration"):
        registry.verify(entry)


def test_versions_are_immutable_and_unknown_versions_are_listed(tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path)
    registry.register(_adapter(tmp_path, "a"), name="a", compatibility=COMPAT, version="v1")
    with pytest.raises(RegistryError, match="already exists"):
        registry.register(_adapter(tmp_path, "b"), name="b", compatibility=COMPAT, version="v1")
    assert [e.name for e in registry.list()] == ["a"]
    with pytest.raises(RegistryError, match="known versions: v1"):
        registry.get("v9")
    # a numeric auto version follows explicit non-numeric ones
    assert registry.register(_adapter(tmp_path, "c"), name="c", compatibility=COMPAT).version == "1"


def test_promote_and_retire_move_pointers(tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path)
    for name in "abc":
        registry.register(_adapter(tmp_path, name), name=name, compatibility=COMPAT)
    registry.promote("1")
    registry.promote("2")
    assert registry.get("1").status == "candidate"  # only one promoted at a time
    assert registry.promoted().version == "2"
    registry.retire("3")
    assert registry.latest().version == "2"
    registry.retire("2")
    assert registry.latest().version == "1" and registry.promoted() is None
    assert [e.version for e in registry.list(status="retired")] == ["2", "3"]
    assert registry.latest(name="c") is None and registry.latest(name="a").version == "1"


def test_compatibility_decides_hot_swap() -> None:
    a = AdapterCompatibility(**COMPAT)
    assert a.can_hot_swap(AdapterCompatibility(**{**COMPAT, "lora_alpha": 32}))
    assert not a.can_hot_swap(AdapterCompatibility(**{**COMPAT, "r": 16}))
    assert not a.can_hot_swap(AdapterCompatibility(**{**COMPAT, "base_model_revision": "def"}))


def test_corrupt_manifest_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(RegistryError, match="corrupt"):
        AdapterRegistry(tmp_path).list()


def _tamper(registry_dir: Path, version: str, sha256: dict[str, str]) -> None:
    """Rewrite one entry's checksum map by hand, as a hostile or careless editor would."""
    path = registry_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    for entry in manifest["entries"]:
        if entry["version"] == version:
            entry["sha256"] = sha256
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("key", ["../../secret.txt", "ABSOLUTE", "./../secret.txt", "a\\..\\b"])
def test_checksum_keys_outside_the_adapter_folder_are_never_read(tmp_path: Path, key: str) -> None:
    registry = AdapterRegistry(tmp_path / "reg")
    entry = registry.register(_adapter(tmp_path / "reg", "a"), name="a", compatibility=COMPAT)
    secret = tmp_path / "reg" / "runs" / "secret.txt"
    secret.write_text("not an adapter file")
    key = str(secret) if key == "ABSOLUTE" else key
    digest = hashlib.sha256(secret.read_bytes()).hexdigest()
    # the recorded digest is right: only a check of the key itself can refuse it
    _tamper(tmp_path / "reg", "1", {**entry.sha256, key: digest})

    with pytest.raises(RegistryError) as info:
        registry.verify("1")
    message = str(info.value)
    assert repr(key) in message and "not a relative path inside the adapter folder" in message
    assert str(tmp_path / "reg" / "manifest.json") in message
    assert digest not in message


def test_a_checksum_key_that_links_outside_the_adapter_folder_is_refused(tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path / "reg")
    adapter = _adapter(tmp_path / "reg", "a")
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"elsewhere")
    (adapter / "extra.bin").symlink_to(outside)
    with pytest.raises(RegistryError, match="resolves outside the adapter folder"):
        registry.verify(registry.register(adapter, name="a", compatibility=COMPAT))


def test_unsafe_names_and_checksum_keys_are_refused_at_registration(tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path / "reg")
    adapter = _adapter(tmp_path / "reg", "a")
    with pytest.raises(RegistryError, match=r"checksum key '\.\./x'"):
        registry.register(adapter, name="a", compatibility=COMPAT, sha256={"../x": "0" * 64})
    for name in ("..", "a/b", ".hidden", ""):
        with pytest.raises(RegistryError, match="adapter name"):
            registry.register(adapter, name=name, compatibility=COMPAT)
    assert registry.list() == []


def test_importing_the_registry_does_not_import_torch() -> None:
    code = "import sys, mongars_llm.registry; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------- concurrency
def _writer(registry_dir: str, index: int, start: float, count: int) -> None:
    root = Path(registry_dir)
    registry = AdapterRegistry(root)
    while time.time() < start:
        time.sleep(0.001)
    for k in range(count):
        adapter = _adapter(root, f"p{index}-{k}")
        registry.register(adapter, name=f"p{index}-{k}", compatibility=COMPAT)


def _reader(registry_dir: str, stop, queue: mp.Queue) -> None:
    path = Path(registry_dir) / "manifest.json"
    reads, errors, revisions = 0, [], []
    while not stop.is_set():
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            continue
        try:
            revisions.append(json.loads(raw)["revision"])
            reads += 1
        except ValueError as err:  # a half-written file would land here
            errors.append(str(err))
    queue.put((reads, errors, revisions))


def test_eight_processes_register_at_once(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    start = time.time() + 3.0  # spawn start-up on a busy machine
    per_process = 3
    queue, stop = ctx.Queue(), ctx.Event()
    reader = ctx.Process(target=_reader, args=(str(tmp_path), stop, queue))
    reader.start()
    writers = [
        ctx.Process(target=_writer, args=(str(tmp_path), i, start, per_process)) for i in range(8)
    ]
    for proc in writers:
        proc.start()
    for proc in writers:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    stop.set()
    reads, errors, revisions = queue.get(timeout=60)
    reader.join(timeout=30)
    assert errors == [], "a reader saw an invalid manifest"
    assert reads > 0
    assert revisions == sorted(revisions)  # no write ever went backwards

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    entries = manifest["entries"]
    assert len(entries) == 8 * per_process
    assert {e["name"] for e in entries} == {f"p{i}-{k}" for i in range(8) for k in range(3)}
    assert sorted(int(e["version"]) for e in entries) == list(range(1, 8 * per_process + 1))
    assert manifest["revision"] == 8 * per_process
    # latest is the newest registration (the last entry, highest version)
    assert manifest["latest"] == entries[-1]["version"] == str(8 * per_process)


def test_verify_returns_the_folder_it_checked(tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path / "reg")
    entry = registry.register(_adapter(tmp_path / "reg", "a"), name="a", compatibility=COMPAT)
    assert registry.verify(entry) == registry.adapter_path(entry)


def test_a_relative_adapter_path_may_not_leave_the_registry_folder(tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path / "reg")
    registry.register(_adapter(tmp_path / "reg", "a"), name="a", compatibility=COMPAT)
    elsewhere = _adapter(tmp_path / "elsewhere", "b")  # a folder with matching digests
    manifest_file = tmp_path / "reg" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["entries"][0]["path"] = "../elsewhere/runs/b/adapter"
    manifest["entries"][0]["sha256"] = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in elsewhere.iterdir()
    }
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(RegistryError) as info:
        registry.verify("1")
    assert "'../elsewhere/runs/b/adapter' leads outside the registry folder" in str(info.value)


@pytest.mark.parametrize("dropped", ["adapter_model.safetensors", "adapter_config.json"])
def test_the_files_a_loader_reads_must_have_a_digest(tmp_path: Path, dropped: str) -> None:
    registry = AdapterRegistry(tmp_path / "reg")
    entry = registry.register(_adapter(tmp_path / "reg", "a"), name="a", compatibility=COMPAT)
    # a hand edit drops the digest of the file it then swaps: the check must not pass
    _tamper(tmp_path / "reg", "1", {k: v for k, v in entry.sha256.items() if k != dropped})
    (registry.adapter_path("1") / dropped).write_bytes(b"swapped")
    with pytest.raises(RegistryError) as info:
        registry.verify("1")
    assert f"{dropped} in" in str(info.value) and "has no recorded digest" in str(info.value)
