"""LoRA training on a tiny real model: it learns, it is reproducible, it resumes exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mongars_llm.errors import BundleError, ConfigError
from mongars_llm.registry import AdapterRegistry
from mongars_llm.training import build_bundle

pytestmark = pytest.mark.train


@pytest.fixture
def common(bundle_args, tiny_base: Path, colours_file: Path, tmp_path: Path) -> dict:
    """The knobs every run of this module shares; runs and registry under ``tmp_path``."""
    return bundle_args(tiny_base, colours_file, tmp_path, batch_size=8, eval_fraction=0.2)


def _adapter_tensors(adapter_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def test_training_lowers_eval_loss_and_leaves_the_base_untouched(
    common: dict, tiny_base: Path, tmp_path: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_file = tiny_base / "model.safetensors"
    base_bytes = base_file.read_bytes()
    result = build_bundle(
        **common,
        run_name="learn",
        max_steps=100,
        learning_rate=5e-3,
        target_modules=["all-linear"],
        lora_dropout=0.0,
    )
    metrics = result.metrics
    assert metrics["steps"] == 100 and metrics["eval_examples"] == 6
    assert metrics["eval_loss"] <= 0.8 * metrics["eval_loss_initial"], metrics
    assert metrics["eval_perplexity"] == pytest.approx(2.718281828 ** metrics["eval_loss"])

    # the base checkpoint and the base weights inside the trained model are bit-identical
    assert base_file.read_bytes() == base_bytes
    fresh = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32)
    trained = result.model
    trained_base = {
        name.replace("base_model.model.", "", 1).replace(".base_layer", ""): param
        for name, param in trained.named_parameters()
        if "lora_" not in name
    }
    for name, param in fresh.named_parameters():
        assert torch.equal(param, trained_base[name]), name
    assert all(not p.requires_grad for n, p in trained.named_parameters() if "lora_" not in n)

    # reloading the saved adapter reproduces the trained model's logits
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])
    trained.eval()
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(fresh, str(result.adapter_dir)).eval()
        assert torch.equal(reloaded(input_ids=ids).logits, expected)
        with reloaded.disable_adapter():  # and the adapter really changes the model
            assert not torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-3)

    # outputs per DESIGN §4
    run = result.run_dir
    for name in (
        "adapter/adapter_config.json",
        "tokenizer/tokenizer.json",
        "wrapper/config.json",
        "wrapper/mongars_wrapper.py",
        "dataset_summary.json",
        "run_metadata.json",
        "train_log.jsonl",
    ):
        assert (run / name).is_file(), name
    meta = json.loads((run / "run_metadata.json").read_text())
    assert meta["run_name"] == "learn" and meta["seed"] == 42
    assert meta["config"]["max_steps"] == 100 and meta["config"]["learning_rate"] == 5e-3
    assert meta["precision"] == {"device": "cpu", "precision": "fp32", "qlora": False}
    assert meta["base_model"]["id"] == str(tiny_base)
    assert meta["versions"]["peft"] and meta["versions"]["transformers"]
    assert meta["metrics"]["eval_loss"] == metrics["eval_loss"]
    from mongars_llm._fs import sha256_file

    assert meta["sha256"]["adapter"]["adapter_model.safetensors"] == sha256_file(
        run / "adapter/adapter_model.safetensors"
    )
    assert len(run.joinpath("train_log.jsonl").read_text().splitlines()) == 100

    # registered, with compatibility fields and metrics
    entry = AdapterRegistry(tmp_path / "registry").latest()
    assert entry is not None and entry.version == result.registry_entry.version == "1"
    assert entry.resolve_path(tmp_path / "registry") == result.adapter_dir
    assert entry.compatibility.r == 8 and entry.compatibility.lora_alpha == 16
    assert any(m.endswith("q_proj") for m in entry.compatibility.target_modules)
    assert entry.metrics["eval_loss"] == metrics["eval_loss"]
    assert entry.dataset["rows"] == 30
    AdapterRegistry(tmp_path / "registry").verify(entry)

    # a finished bundle is never overwritten
    with pytest.raises(BundleError, match="already holds a finished bundle"):
        build_bundle(**common, run_name="learn", max_steps=1)


def test_same_seed_same_losses_and_adapter_bit_for_bit(common: dict) -> None:
    import torch

    runs = [
        build_bundle(
            **common,
            run_name=f"seeded-{i}",
            max_steps=12,
            grad_accum=2,
            lora_dropout=0.1,
            learning_rate=1e-3,
            seed=7,
            register_adapter=False,
        )
        for i in range(2)
    ]
    assert [h["loss"] for h in runs[0].history] == [h["loss"] for h in runs[1].history]
    a, b = (_adapter_tensors(r.adapter_dir) for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = build_bundle(
        **common,
        run_name="other-seed",
        max_steps=12,
        grad_accum=2,
        lora_dropout=0.1,
        learning_rate=1e-3,
        seed=8,
        register_adapter=False,
    )
    assert [h["loss"] for h in other.history] != [h["loss"] for h in runs[0].history]


def test_resume_at_half_ends_where_a_straight_run_ends(common: dict, tmp_path: Path) -> None:
    knobs = {
        **common,
        "max_steps": 16,
        "save_steps": 8,
        "grad_accum": 2,
        "lora_dropout": 0.1,  # exercises the RNG restore
        "learning_rate": 2e-3,
        "lr_scheduler": "cosine",
        "warmup_steps": 2,
        "register_adapter": False,
    }
    straight = build_bundle(**knobs, run_name="straight")
    # a run interrupted after step 8: only the mid-run checkpoint of the straight run survives
    resumed_dir = tmp_path / "runs" / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        straight.run_dir / "checkpoints" / "step-00000008",
        resumed_dir / "checkpoints" / "step-00000008",
    )
    resumed = build_bundle(**knobs, run_name="resumed", resume=True)
    assert json.loads((resumed_dir / "run_metadata.json").read_text())["resumed_from"].endswith(
        "step-00000008"
    )
    assert [h["step"] for h in resumed.history] == list(range(1, 17))
    tail_a = [h["loss"] for h in straight.history[8:]]
    tail_b = [h["loss"] for h in resumed.history[8:]]
    assert tail_a == pytest.approx(tail_b, abs=1e-5)
    assert resumed.metrics["eval_loss"] == pytest.approx(straight.metrics["eval_loss"], abs=1e-5)
    a, b = _adapter_tensors(straight.adapter_dir), _adapter_tensors(resumed.adapter_dir)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5

    # a checkpoint from a different run setup is refused, not silently mixed in
    with pytest.raises(BundleError, match="changed since it was written"):
        build_bundle(
            **{**knobs, "batch_size": 4},
            run_name="mismatch",
            resume=straight.run_dir / "checkpoints" / "step-00000008",
        )


def test_qlora_off_cuda_is_refused_before_anything_loads(
    tmp_path: Path, colours_file: Path, monkeypatch
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the refusal is for CPU-only machines")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the base model does not exist: any attempt to load weights or the tokenizer would fail
    # with a different error, so the CUDA refusal proves nothing was loaded first
    with pytest.raises(ConfigError, match=r"QLoRA .* needs a CUDA GPU"):
        build_bundle(
            dataset_path=colours_file,
            base_model="nobody/not-downloaded-model",
            qlora=True,
            output_dir=tmp_path / "runs",
            run_name="q",
        )
    assert not (tmp_path / "runs" / "q").exists()


@pytest.mark.gpu
def test_qlora_trains_on_cuda_and_the_adapter_serves_on_the_nf4_base(
    common: dict, tiny_base: Path
) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("bitsandbytes")
    from mongars_llm.runtime import UnifiedLLMRuntime
    from mongars_llm.settings import Settings

    result = build_bundle(
        **common,
        run_name="qlora",
        qlora=True,
        max_steps=40,
        learning_rate=5e-3,
        target_modules=["all-linear"],
        lora_dropout=0.0,
    )
    metrics = result.metrics
    assert metrics["steps"] == 40
    assert metrics["eval_loss"] < metrics["eval_loss_initial"], metrics
    assert result.adapter_dir is not None
    settings = Settings(model={"quantize_4bit": True}, _env_file=None)  # type: ignore[call-arg]
    with UnifiedLLMRuntime.from_pretrained(
        tiny_base, settings=settings, device="cuda:0", adapters={"qlora": result.adapter_dir}
    ) as rt:
        assert rt.quantization == "nf4" and rt.device == "cuda:0"
        reply = rt.generate("red", adapter="qlora", temperature=0, max_new_tokens=4)
        assert reply.usage.completion_tokens >= 1
        assert rt.embed(["red", "blue"], adapter="qlora").shape == (2, rt.hidden_size)
