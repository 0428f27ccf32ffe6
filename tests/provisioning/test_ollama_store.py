"""Ollama models read from Ollama's store on disk, their GGUF blob verified and converted."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from mongars_llm.provisioning import clear_cache, provision

from .conftest import free_port, write_manifest
from .gguf_support import layout_ollama_store, write_tiny_gguf
from .test_ollama import FakeOllama

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from mongars_llm.testing import build_tiny_model

    root = tmp_path_factory.mktemp("ollama-gguf")
    checkpoint = build_tiny_model(root / "qwen2", architecture="qwen2", seed=3)
    return checkpoint, write_tiny_gguf(checkpoint, root / "tiny.gguf")


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "ollama-models"
    monkeypatch.setenv("OLLAMA_MODELS", str(folder))
    return folder


def _no_daemon(settings):
    return settings.model_copy(update={"ollama_host": f"http://127.0.0.1:{free_port()}"})


def test_a_stored_model_is_converted_without_a_daemon(
    tiny, store: Path, settings, tmp_path: Path
) -> None:
    checkpoint, gguf_file = tiny
    digest = layout_ollama_store(store, gguf_file, "tiny", "135m")
    manifest = write_manifest(tmp_path, {"chat": {"name": "tiny:135m", "provider": "ollama"}})
    settings = _no_daemon(settings)
    entry = provision(manifest=manifest, profile="t", settings=settings)["chat"]
    assert entry.action == "installed", entry.error
    assert entry.model == "tiny:135m" and entry.revision == digest
    folder = Path(entry.path)
    assert folder == settings.resolved_models_dir / "ollama" / "tiny_135m" / digest

    import torch
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 2, 3, 40, 50]])
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(folder)(ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(checkpoint)(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)

    clear_cache()
    again = provision(manifest=manifest, profile="t", settings=settings)["chat"]
    assert (again.action, again.path, again.revision) == ("exists", entry.path, digest)


def test_a_blob_whose_digest_is_wrong_is_refused(
    tiny, store: Path, settings, tmp_path: Path
) -> None:
    _, gguf_file = tiny
    wrong = hashlib.sha256(b"something else").hexdigest()
    layout_ollama_store(store, gguf_file, "tiny", digest=wrong)
    manifest = write_manifest(tmp_path, {"chat": {"name": "tiny", "provider": "ollama"}})
    entry = provision(manifest=manifest, profile="t", settings=_no_daemon(settings))["chat"]
    assert entry.action == "failed"
    assert wrong in entry.error and "refusing" in entry.error
    assert not any((settings.resolved_models_dir / "ollama").rglob("config.json"))


def test_a_missing_model_with_no_daemon_names_the_store_and_the_host(
    store: Path, settings, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path, {"chat": {"name": "smollm2:135m", "provider": "ollama"}})
    settings = _no_daemon(settings)
    entry = provision(manifest=manifest, profile="t", settings=settings)["chat"]
    assert entry.action == "failed"
    assert str(store) in entry.error and "OLLAMA_MODELS" in entry.error
    assert settings.ollama_host in entry.error and "ollama serve" in entry.error


def test_a_missing_model_is_pulled_by_the_daemon_then_converted(
    tiny, store: Path, settings, tmp_path: Path
) -> None:
    _, gguf_file = tiny
    digests: list[str] = []
    with FakeOllama() as daemon:
        daemon.on_pull = lambda name: digests.append(
            layout_ollama_store(store, gguf_file, name.split(":")[0], name.split(":")[1])
        )
        manifest = write_manifest(tmp_path, {"chat": {"name": "tiny", "provider": "ollama"}})
        settings = settings.model_copy(update={"ollama_host": daemon.url})
        entry = provision(manifest=manifest, profile="t", settings=settings)["chat"]
        assert entry.action == "installed", entry.error
        assert [p["model"] for p in daemon.pulls] == ["tiny:latest"]
        assert entry.revision == digests[0] and Path(entry.path, "config.json").is_file()

        clear_cache()
        again = provision(manifest=manifest, profile="t", settings=settings)["chat"]
        assert again.action == "exists" and len(daemon.pulls) == 1


def test_the_runtime_loads_an_ollama_role(tiny, store: Path, settings, tmp_path: Path) -> None:
    from mongars_llm.runtime import UnifiedLLMRuntime

    _, gguf_file = tiny
    layout_ollama_store(store, gguf_file, "tiny")
    manifest = write_manifest(tmp_path, {"general": {"name": "tiny", "provider": "ollama"}})
    settings = _no_daemon(settings).model_copy(
        update={"llm_models_path": manifest, "llm_models_profile": "t"}
    )
    UnifiedLLMRuntime.reset_shared()
    try:
        reply = UnifiedLLMRuntime.shared(settings).generate("hi", max_new_tokens=2, temperature=0)
        assert reply.usage.completion_tokens >= 1
    finally:
        UnifiedLLMRuntime.reset_shared()


def test_a_daemon_side_only_model_is_a_clear_runtime_error(
    store: Path, settings, tmp_path: Path
) -> None:
    from mongars_llm.errors import LLMRuntimeError
    from mongars_llm.runtime import UnifiedLLMRuntime

    with FakeOllama() as daemon:  # pulls, but this machine's store stays empty
        manifest = write_manifest(tmp_path, {"general": {"name": "tiny", "provider": "ollama"}})
        settings = settings.model_copy(
            update={
                "ollama_host": daemon.url,
                "llm_models_path": manifest,
                "llm_models_profile": "t",
            }
        )
        UnifiedLLMRuntime.reset_shared()
        with pytest.raises(LLMRuntimeError, match="OLLAMA_MODELS") as err:
            UnifiedLLMRuntime.shared(settings)
        assert err.value.code == "load_failed" and str(store) in str(err.value)


def test_keep_gguf_loads_the_blob_itself_once_its_digest_matches(
    tiny, store: Path, settings, tmp_path: Path
) -> None:
    """``keep_gguf=True``: the store's blob is the entry's path (nothing converted), once
    its sha256 matches the manifest; a blob that does not is refused."""
    _, gguf_file = tiny
    digest = layout_ollama_store(store, gguf_file, "tiny", "135m")
    manifest = write_manifest(tmp_path, {"chat": {"name": "tiny:135m", "provider": "ollama"}})
    settings = _no_daemon(settings)
    entry = provision(manifest=manifest, profile="t", settings=settings, keep_gguf=True)["chat"]
    assert entry.action == "exists", entry.error
    assert entry.path == str(store / "blobs" / f"sha256-{digest}") and entry.revision == digest
    assert "not converted" in (entry.verified or "")
    assert not (settings.resolved_models_dir / "ollama").exists()

    blob = Path(entry.path)
    blob.write_bytes(blob.read_bytes() + b"tampered")
    clear_cache()
    refused = provision(manifest=manifest, profile="t", settings=settings, keep_gguf=True)["chat"]
    assert refused.action == "failed" and "refusing" in (refused.error or ""), refused.error


def test_keep_gguf_keeps_a_pulled_model_as_its_blob(
    tiny, store: Path, settings, tmp_path: Path
) -> None:
    _, gguf_file = tiny
    digests: list[str] = []
    with FakeOllama() as daemon:
        daemon.on_pull = lambda name: digests.append(
            layout_ollama_store(store, gguf_file, name.split(":")[0], name.split(":")[1])
        )
        manifest = write_manifest(tmp_path, {"chat": {"name": "tiny", "provider": "ollama"}})
        settings = settings.model_copy(update={"ollama_host": daemon.url})
        entry = provision(manifest=manifest, profile="t", settings=settings, keep_gguf=True)["chat"]
        assert entry.action == "installed", entry.error
        assert [p["model"] for p in daemon.pulls] == ["tiny:latest"]
        assert entry.path == str(store / "blobs" / f"sha256-{digests[0]}")
        assert entry.revision == digests[0] and "not converted" in (entry.verified or "")
        assert not (settings.resolved_models_dir / "ollama").exists()
