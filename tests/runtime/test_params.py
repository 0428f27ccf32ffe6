"""Sampling parameters: one spelling (``SamplingParams``), one typed ``**kwargs``
(``SamplingKwargs``), one set of bounds shared with the manifest."""

from __future__ import annotations

import inspect
import typing
from typing import Any

import pytest

from mongars_llm.errors import InvalidInputError, ManifestError
from mongars_llm.manifest import parse_manifest
from mongars_llm.runtime import UnifiedLLMRuntime
from mongars_llm.runtime._params import SAMPLING_NAMES, SamplingKwargs, SamplingParams


def test_sampling_kwargs_are_the_fields_of_sampling_params() -> None:
    assert tuple(SamplingKwargs.__annotations__) == SAMPLING_NAMES
    assert SamplingKwargs.__required_keys__ == frozenset()  # every one may be left out
    assert typing.get_type_hints(SamplingKwargs) == typing.get_type_hints(SamplingParams)


def test_the_generation_calls_take_the_sampling_kwargs() -> None:
    generate = inspect.signature(UnifiedLLMRuntime.generate).parameters
    assert [n for n in generate if n in SAMPLING_NAMES] == list(SAMPLING_NAMES)
    for name in ("generate_batch", "stream", "agenerate", "astream"):
        parameters = inspect.signature(getattr(UnifiedLLMRuntime, name)).parameters
        assert "role" in parameters, name
        assert str(parameters["kwargs"].annotation) == "Unpack[SamplingKwargs]", name


def test_as_kwargs_round_trips_the_given_values() -> None:
    params = SamplingParams(temperature=0.5, stop="\n", adapter=(), seed=-1)
    kwargs = params.as_kwargs()
    assert kwargs == {"temperature": 0.5, "stop": ("\n",), "adapter": (), "seed": -1}
    assert SamplingParams.from_kwargs(kwargs) == params
    assert SamplingParams().as_kwargs() == {}


def _runtime_accepts(name: str, value: Any) -> bool:
    try:
        SamplingParams(**{name: value})
    except InvalidInputError:
        return False
    return True


def _manifest_accepts(name: str, value: Any) -> bool:
    role = {"name": "org/model", "parameters": {name: value}}
    try:
        parse_manifest({"profiles": {"default": {"models": {"general": role}}}})
    except ManifestError:
        return False
    return True


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("seed", 0),
        ("seed", 2**32),  # the manifest stopped at 2**32 - 1
        ("seed", -1),  # ... and at 0
        ("seed", 2**64 - 1),
        ("seed", 2**64),
        ("seed", -(2**63)),
        ("seed", -(2**63) - 1),
        ("temperature", 0),
        ("temperature", 1e-5),
        ("temperature", 1e-300),  # the manifest took it; sampling with it overflows
        ("temperature", 2.0),
        ("temperature", 3.5),
        ("temperature", -0.1),
        ("top_p", 1.0),
        ("top_p", 0),
        ("top_k", 0),
        ("top_k", -1),
        ("max_new_tokens", 0),
        ("repetition_penalty", 0),
    ],
)
def test_the_manifest_accepts_the_values_the_runtime_accepts(name: str, value: Any) -> None:
    assert _manifest_accepts(name, value) == _runtime_accepts(name, value)
