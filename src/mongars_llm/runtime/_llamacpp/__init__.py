"""The llama.cpp engine (the ``cpu`` extra): a GGUF file run as GGUF on a CPU.

:class:`LlamaCppEngine` serves chat (continuous batching, the runtime's
sampling contract, streaming, usage) and LLM2Vec embeddings (the runtime's
input rules and pooling, causal or bidirectional) from one llama.cpp context.
The package's modules, in call order: :mod:`._gguf` checks the file before
llama.cpp reads it (llama.cpp aborts the process on some malformed files),
:mod:`._native` imports ``llama_cpp`` and routes its logs, :mod:`._engine`
schedules requests on the context, :mod:`._sequences` turns one request's
tokens into text and deltas, :mod:`._pooling` pools per-token states, and
:mod:`._lora` converts a peft LoRA folder to the GGUF LoRA the engine loads.

Importing this package imports neither ``llama_cpp`` nor torch; building an
engine without the extra raises :class:`~mongars_llm.errors.MissingExtraError`
(``pip install "mongars-llm[cpu]"``).
"""

from __future__ import annotations

from ._engine import LlamaCppEngine
from ._gguf import DECODER_ARCHITECTURES, GGUFInfo, check_gguf, inspect_gguf

__all__ = ["DECODER_ARCHITECTURES", "GGUFInfo", "LlamaCppEngine", "check_gguf", "inspect_gguf"]
