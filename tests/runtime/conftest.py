"""Shared fixtures of the runtime tests: one tiny model and one runtime per session."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mongars_llm.settings import Settings


def runtime_settings(**model: Any) -> Settings:
    # float32 unless a test asks otherwise: exactness checks (packing, parity, batching) must
    # not depend on whether this CPU has native bf16 (where dtype="auto" picks bf16)
    values = {
        "quantize_4bit": False,
        "max_new_tokens": 48,
        "batch_wait_ms": 20.0,
        "dtype": "float32",
        **model,
    }
    return Settings(model=values, _env_file=None)  # type: ignore[call-arg]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight Llama checkpoint with a real BPE tokenizer and ChatML template."""
    from mongars_llm.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", seed=0)


@pytest.fixture(scope="session")
def settings() -> Settings:
    return runtime_settings()


@pytest.fixture(scope="session")
def runtime(tiny_model_dir: Path, settings: Settings) -> Iterator[Any]:
    """A private runtime on the tiny model, without adapters (never mutate it in tests)."""
    from mongars_llm.runtime import UnifiedLLMRuntime

    rt = UnifiedLLMRuntime.from_pretrained(tiny_model_dir, settings=settings)
    yield rt
    rt.close()


@pytest.fixture(scope="session")
def lora_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two random (non-zero) LoRA adapters for the tiny model, saved in peft format."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for seed, name, modules in (
        (1, "chat", ["q_proj", "v_proj"]),
        (2, "retrieval", ["q_proj", "k_proj", "v_proj", "up_proj"]),
    ):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        config = LoraConfig(r=4, lora_alpha=16, target_modules=modules, init_lora_weights=False)
        model = get_peft_model(base, config)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if "lora_" in pname:
                    param.mul_(4.0)
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


class EventRecorder(logging.Handler):
    """Collects structured log events (``record.event`` / ``record.fields``)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.events: list[tuple[str, dict[str, Any]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "event", None)
        if event:
            self.events.append((event, dict(getattr(record, "fields", {}))))

    def named(self, name: str) -> list[dict[str, Any]]:
        return [fields for event, fields in self.events if event == name]


@pytest.fixture
def events() -> Iterator[EventRecorder]:
    logger = logging.getLogger("mongars_llm.runtime")
    recorder = EventRecorder()
    previous = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(recorder)
    yield recorder
    logger.removeHandler(recorder)
    logger.setLevel(previous)
