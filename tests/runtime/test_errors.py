"""Runtime errors: one class per failure, a stable ``code``, validation at the call."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path
from typing import Any, TypeVar

import pytest

import mongars_llm
from mongars_llm.errors import (
    AdapterNotFoundError,
    InvalidInputError,
    LLMRuntimeError,
    MongarsError,
    RuntimeClosedError,
)
from mongars_llm.runtime import GenerationStream, UnifiedLLMRuntime
from mongars_llm.runtime._batching import MicroBatcher, Pending
from mongars_llm.runtime._params import SAMPLING_NAMES

from .conftest import runtime_settings


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": 1e-300}, "temperature"),  # overflowed the logits inside torch
        ({"temperature": float("nan")}, "temperature"),
        ({"seed": 2**64}, "seed"),  # torch.manual_seed refused it as generation_failed
        ({"seed": -(2**63) - 1}, "seed"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 1.5}, "top_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"max_new_tokens": True}, "max_new_tokens"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_bad_sampling_values_fail_at_the_call_naming_the_argument(
    runtime: Any, kwargs: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidInputError) as info:
        runtime.generate("hi", **kwargs)
    error = info.value
    assert isinstance(error, ValueError) and error.code == "invalid_input"
    assert error.param == param and param in str(error)
    with pytest.raises(InvalidInputError, match=param):  # the **kwargs calls too
        runtime.stream("hi", **kwargs)


async def test_agenerate_validates_like_generate(runtime: Any) -> None:
    with pytest.raises(InvalidInputError, match="temperature=1e-300 is too small"):
        await runtime.agenerate("hi", temperature=1e-300)


def test_the_sampler_bounds_themselves_still_generate(runtime: Any) -> None:
    for seed in (2**64 - 1, -(2**63)):
        reply = runtime.generate("hi", temperature=0.7, seed=seed, max_new_tokens=2)
        assert reply.usage.completion_tokens >= 1
    assert runtime.generate("hi", temperature=1e-5, max_new_tokens=2).text is not None


def test_each_failure_has_its_class_and_builtin(runtime: Any) -> None:
    with pytest.raises(AdapterNotFoundError) as info:
        runtime.generate("hi", adapter="missing")
    assert isinstance(info.value, LookupError) and info.value.code == "adapter_not_found"
    assert "'missing' is not loaded" in str(info.value)  # not LookupError's repr()
    with pytest.raises(ValueError, match="prompt is empty"):
        runtime.generate("   ")
    with pytest.raises(InvalidInputError, match="non-empty list") as bad:
        runtime.generate_batch([])
    assert bad.value.param == "prompts"


def test_unknown_keyword_is_a_type_error(runtime: Any) -> None:
    with pytest.raises(TypeError, match="temprature"):
        runtime.stream("hi", temprature=0)
    with pytest.raises(TypeError, match="temprature"):
        runtime.generate_batch(["hi"], temprature=0)


def test_sampling_names_are_the_generate_keywords() -> None:
    signature = inspect.signature(UnifiedLLMRuntime.generate)
    keywords = [p.name for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY]
    assert keywords == ["role", *SAMPLING_NAMES]


def test_closed_runtime_raises_runtime_closed_error(tiny_model_dir: Path) -> None:
    rt = UnifiedLLMRuntime.from_pretrained(tiny_model_dir, settings=runtime_settings())
    rt.close()
    rt.close()  # idempotent
    assert rt.closed
    for call in (
        lambda: rt.generate("hi"),
        lambda: rt.stream("hi"),
        lambda: rt.generate_batch(["hi"]),
        lambda: rt.load_adapter("x", tiny_model_dir),
    ):
        with pytest.raises(RuntimeClosedError) as info:
            call()
        assert info.value.code == "closed" and isinstance(info.value, LLMRuntimeError)


def test_shared_replaces_a_closed_runtime(tiny_model_dir: Path) -> None:
    settings = runtime_settings()
    settings.unified_model_dir = tiny_model_dir
    UnifiedLLMRuntime.reset_shared()
    try:
        first = UnifiedLLMRuntime.shared(settings)
        first.close()
        second = UnifiedLLMRuntime.shared(settings)
        assert second is not first and not second.closed
        assert second.generate("hi", temperature=0, max_new_tokens=2).usage.completion_tokens
    finally:
        UnifiedLLMRuntime.reset_shared()


def test_stream_result_before_the_end_is_a_clear_error() -> None:
    stream = GenerationStream()
    with pytest.raises(InvalidInputError, match="not finished yet"):
        _ = stream.result


# ----------------------------------------------------------------- the batcher
class _Item(Pending):
    pass


def test_a_closed_batcher_refuses_work_with_runtime_closed_error() -> None:
    batcher: MicroBatcher[_Item] = MicroBatcher(
        "test", lambda items: [i.future.set_result(1) for i in items], max_size=4, wait_s=0
    )
    assert batcher.submit(_Item()).result(5) == 1
    batcher.close()
    with pytest.raises(RuntimeClosedError, match="test batcher is closed"):
        batcher.submit(_Item())


def test_a_failing_or_forgetful_handler_gives_runtime_errors() -> None:
    def broken(items: list[_Item]) -> None:
        raise KeyError("boom")

    batcher: MicroBatcher[_Item] = MicroBatcher("test", broken, max_size=1, wait_s=0)
    with pytest.raises(LLMRuntimeError, match="test batch failed") as info:
        batcher.submit(_Item()).result(5)
    assert isinstance(info.value.__cause__, KeyError)
    batcher.close()
    forgetful: MicroBatcher[_Item] = MicroBatcher("test", lambda items: None, max_size=1, wait_s=0)
    with pytest.raises(LLMRuntimeError, match="did not answer"):
        forgetful.submit(_Item()).result(5)
    forgetful.close()


# -------------------------------------------------------------------- exports
def test_error_classes_are_exported_and_keep_their_codes() -> None:
    expected = {
        "ModelLoadError": "load_failed",
        "InvalidInputError": "invalid_input",
        "InputTooLongError": "input_too_long",
        "AdapterNotFoundError": "adapter_not_found",
        "UnsupportedError": "unsupported",
        "GenerationError": "generation_failed",
        "EmbeddingError": "embedding_failed",
        "RuntimeClosedError": "closed",
    }
    for name, code in expected.items():
        cls = getattr(mongars_llm, name)
        assert name in mongars_llm.__all__ and issubclass(cls, LLMRuntimeError)
        assert cls("x").code == code and code in LLMRuntimeError.CODES
        assert issubclass(cls, MongarsError)


def test_importing_the_runtime_is_cheap() -> None:
    """Torch and transformers load with the first model; the manifest and provisioning
    with the first role (their imports sit in functions: tests/test_layering.py reads
    them all)."""
    code = (
        "import sys, mongars_llm.runtime, mongars_llm.runtime._runtime; "
        "print(sorted(m for m in sys.modules if m.startswith(('mongars_llm.manager', "
        "'mongars_llm.provisioning', 'torch', 'transformers'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]", out.stdout


E = TypeVar("E", bound=BaseException)


def _subclasses(cls: type[E]) -> list[type[E]]:
    found: list[type[E]] = []
    pending = [cls]
    while pending:
        kind = pending.pop()
        found.append(kind)
        pending.extend(kind.__subclasses__())
    return found


def test_every_error_class_says_its_http_status() -> None:
    classes = [c for c in _subclasses(MongarsError) if c.__module__ == "mongars_llm.errors"]
    assert len(classes) >= 20  # the whole tree of errors.py
    for cls in classes:
        assert type(cls.http_status) is int and 400 <= cls.http_status < 600, cls
    expected = {
        "InvalidInputError": 400,
        "InputTooLongError": 413,
        "AdapterNotFoundError": 404,
        "UnsupportedError": 400,
        "ModelLoadError": 503,
        "UnknownRoleError": 404,
        "GenerationError": 500,
        "RuntimeClosedError": 500,
        "ConfigError": 500,
    }
    assert {name: getattr(mongars_llm, name).http_status for name in expected} == expected


def test_each_runtime_code_names_one_class() -> None:
    runtime_classes = _subclasses(LLMRuntimeError)
    codes = [cls.default_code for cls in runtime_classes]
    assert len(codes) == len(set(codes)) and set(codes) <= set(LLMRuntimeError.CODES)
    for cls in runtime_classes:
        assert LLMRuntimeError.for_code(cls.default_code) is cls
    assert LLMRuntimeError.for_code("no_such_code") is LLMRuntimeError
