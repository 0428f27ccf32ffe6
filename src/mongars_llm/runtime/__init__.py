"""The unified runtime: one copy of the weights for chat and LLM2Vec embeddings.

>>> from mongars_llm.runtime import UnifiedLLMRuntime      # doctest: +SKIP
>>> rt = UnifiedLLMRuntime.from_pretrained("path/to/checkpoint")
>>> rt.generate([{"role": "user", "content": "Hi"}], temperature=0).text
>>> rt.embed([["Retrieve passages", "what is LoRA?"]]).shape

Importing this package is cheap: torch and transformers load with the model.

Where things live (private modules):

- ``_runtime``: :class:`UnifiedLLMRuntime`, the facade every call goes through;
- ``_loading``: what loads (adapters, provisioned copies, LLM2Vec layouts) and
  how (device, dtype, 4-bit, CPU threads);
- ``_adapters``: the LoRA adapters on the one model and the gate that switches them;
- ``_params`` / ``_generator`` / ``_decoding``: sampling parameters and their
  bounds; the generation path (role defaults, batching, ``llm_generate``); the
  torch side of one batched ``model.generate``;
- ``_embedder`` / ``_embedding`` / ``_llm2vec``: the embedding path; forward-batch
  planning; the LLM2Vec core shared with the exported wrapper;
- ``_batching``: the micro-batcher; ``_types``: results and streams.

Building a runtime from a manifest role, and the process-wide runtime, are the
application layer's (:mod:`mongars_llm._compose`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..errors import LLMRuntimeError
from ._llm2vec import POOLING_MODES, EmbeddingWarning
from ._types import AsyncGenerationStream, Generation, GenerationStream, Usage

_LAZY = {
    "UnifiedLLMRuntime": "mongars_llm.runtime._runtime",
    "QuantizationFallbackWarning": "mongars_llm.runtime._loading",
    "cpu_supports_bf16": "mongars_llm.runtime._loading",
}

__all__ = [
    "POOLING_MODES",
    "AsyncGenerationStream",
    "EmbeddingWarning",
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
