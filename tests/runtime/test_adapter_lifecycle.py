"""Adapters swapped under load: a call keeps the adapters it chose, and an adapter that
does not fit the model is refused from its config and header, before peft allocates."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mongars_llm.errors import LLMRuntimeError

from .conftest import runtime_settings

PROMPT = [{"role": "user", "content": "Paris is the capital of"}]
GREEDY = {"temperature": 0, "max_new_tokens": 12}


@pytest.fixture
def swapping(tiny_model_dir: Path, lora_dirs: dict[str, Path]) -> Iterator[Any]:
    """A runtime of its own with ``v1`` live (use=all) and ``v2`` loaded for explicit use."""
    from mongars_llm.runtime import UnifiedLLMRuntime

    rt = UnifiedLLMRuntime.from_pretrained(
        tiny_model_dir,
        settings=runtime_settings(),
        adapters=[("v1", lora_dirs["chat"], "all"), ("v2", lora_dirs["retrieval"], "explicit")],
    )
    yield rt
    rt.close()


def test_a_queued_call_keeps_the_adapter_it_chose_while_a_promotion_retires_it(
    swapping: Any,
) -> None:
    rt = swapping
    v1_reply = rt.generate(PROMPT, **GREEDY).text
    v2_reply = rt.generate(PROMPT, adapter="v2", **GREEDY).text
    base_reply = rt.generate(PROMPT, adapter=[], **GREEDY).text
    assert len({v1_reply, v2_reply, base_reply}) == 3

    promoted = threading.Event()

    def promote_v2_and_retire_v1() -> None:
        rt.set_adapter_uses({"v2": "all", "v1": "explicit"})  # one step: never both live
        rt.unload_adapter("v1")
        promoted.set()

    # hold every call after it chose its adapters (as a long batch in flight would)
    with rt._adapters.gate.exclusive():
        queued = rt.stream(PROMPT, **GREEDY)  # no adapter named: the live v1, chosen now
        worker = threading.Thread(target=promote_v2_and_retire_v1, daemon=True)
        worker.start()
        # the promotion does not wait for queued calls (it would wait for this gate)
        assert promoted.wait(120), "retiring v1 waited for the calls that chose it"
        assert rt.adapter_names == ["v2"]  # new calls no longer see v1 at once
    assert "".join(queued) == v1_reply and queued.result.text == v1_reply
    assert rt.generate(PROMPT, **GREEDY).text == v2_reply  # new calls get the new live version
    with pytest.raises(LLMRuntimeError) as info:
        rt.generate(PROMPT, adapter="v1", **GREEDY)
    assert info.value.code == "adapter_not_found"
    # once the last call that chose v1 finished, its LoRA layers are freed
    deadline = time.monotonic() + 120
    while "v1" in rt._adapters.peft_model.peft_config:
        assert time.monotonic() < deadline, "v1's layers were never freed"
        time.sleep(0.02)
    assert rt.generate(PROMPT, adapter=[], **GREEDY).text == base_reply


def test_set_adapter_uses_is_checked(swapping: Any) -> None:
    with pytest.raises(LLMRuntimeError) as info:
        swapping.set_adapter_uses({"v2": "all", "nope": "explicit"})
    assert info.value.code == "adapter_not_found" and "v1, v2" in str(info.value)
    with pytest.raises(LLMRuntimeError) as info:
        swapping.set_adapter_uses({"v2": "sometimes"})
    assert info.value.code == "invalid_input"
    assert swapping.adapter_use("v2") == "explicit"  # nothing changed


def _copy(source: Path, target: Path, **config: Any) -> Path:
    shutil.copytree(source, target)
    file = target / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **config}))
    return target


def _refused(rt: Any, path: Path) -> str:
    with pytest.raises(LLMRuntimeError) as info:
        rt.load_adapter("bad", path)
    assert info.value.code == "load_failed"
    assert "bad" not in rt.adapter_names
    return str(info.value)


def test_adapters_that_do_not_fit_are_refused_before_anything_is_allocated(
    swapping: Any, lora_dirs: dict[str, Path], tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    rt = swapping
    before = rt.generate(PROMPT, **GREEDY).text
    # a hand-edited rank: refused from the config, not after gigabytes of zeros
    message = _refused(rt, _copy(lora_dirs["chat"], tmp_path / "rank", r=5000))
    assert "rank r=5000 for module" in message and "adapter_config.json" in message
    # a target module the model does not have
    message = _refused(
        rt, _copy(lora_dirs["chat"], tmp_path / "target", target_modules=["q_proj", "wq"])
    )
    assert "'wq' does not exist" in message and "v_proj" in message
    # weights whose shapes do not fit the model (another base model's)
    shapes = _copy(lora_dirs["chat"], tmp_path / "shapes")
    tensors = load_file(shapes / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    tensors[key] = torch.zeros(4, 32)
    save_file(tensors, shapes / "adapter_model.safetensors")
    message = _refused(rt, shapes)
    assert key in message and "[4, 32]" in message and "64->64" in message
    # a truncated weights file
    truncated = _copy(lora_dirs["chat"], tmp_path / "truncated")
    (truncated / "adapter_model.safetensors").write_bytes(b"\xff" * 12)
    assert "not a safetensors file" in _refused(rt, truncated)
    # nothing of that reached the loaded adapters
    assert rt.adapter_names == ["v1", "v2"]
    assert rt.generate(PROMPT, **GREEDY).text == before


def test_no_call_joins_the_gate_while_adapters_change() -> None:
    from mongars_llm.runtime._adapter_stack import ModeGate

    switched: list[Any] = []
    gate = ModeGate(switched.append)
    with gate.hold(("v1",)):
        pass  # the gate's mode is now ("v1",)
    entered = threading.Event()

    def call_of_the_current_mode() -> None:
        with gate.hold(("v1",)):
            entered.set()

    with gate.exclusive():  # an adapter is being injected or deleted
        worker = threading.Thread(target=call_of_the_current_mode, daemon=True)
        worker.start()
        # before the fix the call joined at once and ran on half-changed LoRA layers
        assert not entered.wait(1.0), "a call ran while the adapters were changing"
    assert entered.wait(60)
    worker.join(60)
    assert switched == [("v1",), ("v1",)]  # switched again after the change
