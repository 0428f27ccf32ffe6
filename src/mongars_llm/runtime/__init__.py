"""The unified runtime: one copy of the weights for chat and LLM2Vec embeddings.

>>> from mongars_llm.runtime import UnifiedLLMRuntime      # doctest: +SKIP
>>> rt = UnifiedLLMRuntime.from_pretrained("path/to/checkpoint")
>>> rt.generate([{"role": "user", "content": "Hi"}], temperature=0).text
>>> rt.embed([["Retrieve passages", "what is LoRA?"]]).shape

Importing this package is cheap: torch and transformers load with the model.

Where things live (private modules):

- ``_runtime``: :class:`UnifiedLLMRuntime`, the facade every call goes through;
- ``_engine``: what runs a prepared request: the torch engine (micro-batched
  ``model.generate`` and forward batches) or the llama.cpp engine (``_llamacpp``,
  a GGUF file run as GGUF on the CPU), and :func:`choose_engine`'s rule for ``auto``;
- ``_loading``: what loads (adapters, provisioned copies, LLM2Vec layouts) and
  how (device, dtype, 4-bit, CPU threads);
- ``_adapter_stack``: the LoRA adapters on the one model and the gate that switches them;
- ``_params`` / ``_generator`` / ``_decoding``: sampling parameters and their
  bounds; the generation path (role defaults, batching, ``llm_generate``); the
  torch side of one batched ``model.generate``;
- ``_embedder`` / ``_embed_plan`` / ``_llm2vec``: the embedding path; forward-batch
  planning; the LLM2Vec core shared with the exported wrapper;
- ``_rerank`` / ``_reranker``: the rerank prompt and answer tokens (shared with the
  rerank training objective); the rerank path (validation, shared prompt prefix,
  forward batches that read two logits per document);
- ``_batching``: the micro-batcher; ``_types``: results and streams;
- ``_compose``: a runtime for a manifest role (provisioned first), a role's
  sampling defaults, and the process-wide runtime (``from_role``/``shared``).
  It reaches the manifest (``manager``) and ``provisioning``, both below the
  runtime, only when called (``_loading`` reads provisioned copies the same way).

Other packages (the server, the CLI, training, export) import what they use from
here, never from a private module (``tests/test_layering.py``); names whose module
imports torch load on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..errors import LLMRuntimeError
from ._llm2vec import (
    DEFAULT_POOLING,
    POOLING_MODES,
    EmbeddingConfig,
    EmbeddingInputError,
    EmbeddingWarning,
    EncodedText,
    decoder_of,
    embed_padded,
    encode_inputs,
    normalise,
    normalise_inputs,
    pooling_mode,
    run_decoder,
)
from ._rerank import (
    DEFAULT_RERANK_INSTRUCTION,
    RERANK_SYSTEM_PROMPT,
    answer_token_ids,
    rerank_messages,
)
from ._reranker import RerankResult, RerankResults
from ._types import AsyncGenerationStream, FinishReason, Generation, GenerationStream, Usage

# names other packages use (the server, the CLI, training, export) load with the
# module that defines them: ``_loading`` imports torch
_LAZY = {
    "UnifiedLLMRuntime": "mongars_llm.runtime._runtime",
    "ENGINE_NAMES": "mongars_llm.runtime._engine",
    "EngineChoice": "mongars_llm.runtime._engine",
    "choose_engine": "mongars_llm.runtime._engine",
    "QuantizationFallbackWarning": "mongars_llm.runtime._loading",
    "choose_cpu_threads": "mongars_llm.runtime._loading",
    "cpu_supports_bf16": "mongars_llm.runtime._loading",
    "no_loading_bars": "mongars_llm.runtime._loading",
    "quiet_loading_bars": "mongars_llm.runtime._loading",
    "usable_cpus": "mongars_llm._machine",
    "quiet_peft_deprecations": "mongars_llm.runtime._adapter_stack",
    "over_limit_prefix": "mongars_llm.runtime._bounds",
    "plan_chunks": "mongars_llm.runtime._embed_plan",
    "SamplingKwargs": "mongars_llm.runtime._params",
    "SamplingParams": "mongars_llm.runtime._params",
    "MATRYOSHKA_KEY": "mongars_llm.runtime._compact",
    "PRECISIONS": "mongars_llm.runtime._compact",
    "check_dimensions": "mongars_llm.runtime._compact",
    "int8_absmax": "mongars_llm.runtime._compact",
    "quantize_embeddings": "mongars_llm.runtime._compact",
    "truncate_embeddings": "mongars_llm.runtime._compact",
}

__all__ = [
    "DEFAULT_POOLING",
    "DEFAULT_RERANK_INSTRUCTION",
    "ENGINE_NAMES",
    "MATRYOSHKA_KEY",
    "POOLING_MODES",
    "PRECISIONS",
    "RERANK_SYSTEM_PROMPT",
    "AsyncGenerationStream",
    "EmbeddingConfig",
    "EmbeddingInputError",
    "EmbeddingWarning",
    "EncodedText",
    "EngineChoice",
    "FinishReason",
    "Generation",
    "GenerationStream",
    "LLMRuntimeError",
    "QuantizationFallbackWarning",
    "RerankResult",
    "RerankResults",
    "SamplingKwargs",
    "SamplingParams",
    "UnifiedLLMRuntime",
    "Usage",
    "answer_token_ids",
    "check_dimensions",
    "choose_cpu_threads",
    "choose_engine",
    "cpu_supports_bf16",
    "decoder_of",
    "embed_padded",
    "encode_inputs",
    "int8_absmax",
    "no_loading_bars",
    "normalise",
    "normalise_inputs",
    "over_limit_prefix",
    "plan_chunks",
    "pooling_mode",
    "quantize_embeddings",
    "quiet_loading_bars",
    "quiet_peft_deprecations",
    "rerank_messages",
    "run_decoder",
    "truncate_embeddings",
    "usable_cpus",
]

if TYPE_CHECKING:
    from .._machine import usable_cpus
    from ._adapter_stack import quiet_peft_deprecations
    from ._bounds import over_limit_prefix
    from ._compact import (
        MATRYOSHKA_KEY,
        PRECISIONS,
        check_dimensions,
        int8_absmax,
        quantize_embeddings,
        truncate_embeddings,
    )
    from ._embed_plan import plan_chunks
    from ._engine import ENGINE_NAMES, EngineChoice, choose_engine
    from ._loading import (
        QuantizationFallbackWarning,
        choose_cpu_threads,
        cpu_supports_bf16,
        no_loading_bars,
        quiet_loading_bars,
    )
    from ._params import SamplingKwargs, SamplingParams
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
