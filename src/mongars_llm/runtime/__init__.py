"""The unified runtime: one copy of the weights for chat and LLM2Vec embeddings.

>>> from mongars_llm.runtime import UnifiedLLMRuntime      # doctest: +SKIP
>>> rt = UnifiedLLMRuntime.from_pretrained("path/to/checkpoint")
>>> rt.generate([{"role": "user", "content": "Hi"}], temperature=0).text
>>> rt.embed([["Retrieve passages", "what is LoRA?"]]).shape

Importing this package is cheap: torch and transformers load with the model.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..errors import LLMRuntimeError
from ._types import AsyncGenerationStream, Generation, GenerationStream, Usage

POOLING_MODES = ("mean", "weighted_mean", "eos_token", "last_token", "bos_token")

_LAZY = {
    "UnifiedLLMRuntime": "mongars_llm.runtime._runtime",
    "QuantizationFallbackWarning": "mongars_llm.runtime._loading",
    "cpu_supports_bf16": "mongars_llm.runtime._loading",
}

__all__ = [
    "POOLING_MODES",
    "AsyncGenerationStream",
    "Generation",
    "GenerationStream",
    "LLMRuntimeError",
    "QuantizationFallbackWarning",
    "UnifiedLLMRuntime",
    "Usage",
    "cpu_supports_bf16",
]

if TYPE_CHECKING:
    from ._loading import QuantizationFallbackWarning, cpu_supports_bf16
    from ._runtime import UnifiedLLMRuntime


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mongars_llm.runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
