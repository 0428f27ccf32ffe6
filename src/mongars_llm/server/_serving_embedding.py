"""``POST /v1/embeddings``: LLM2Vec vectors from the shared weights.

The role's manifest entry supplies the embedding options it sets explicitly
(pooling, normalize, bidirectional, instruction; the request's
``instruction`` wins). Inputs are embedded without truncation, so an input
too long for the model is a 413, never a vector of a cut text. A runtime
failure is an error, never a fallback: there is no sensible fake vector.

Compact vectors (:mod:`mongars_llm.runtime._compact`): ``dimensions`` cuts and
re-normalises, refused (422) for a truncation the adapter was not trained for
unless ``force_dimensions``; ``encoding_format`` ``int8``/``binary``/``ubinary``
answer integer lists instead of floats.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi.responses import JSONResponse

from ..errors import InvalidInputError
from ..logging import log_event
from ..runtime import check_dimensions as check_trained_dimensions
from ..runtime import int8_absmax, over_limit_prefix, quantize_embeddings, truncate_embeddings
from ._errors import APIError
from ._runtime_api import EmbedKwargs, RuntimeAPI
from ._state import ServerState
from ._validation import Item, check_chars, check_dimensions, check_token_ids, embedding_inputs
from .protocol import EmbeddingRequest

if TYPE_CHECKING:
    from ..manifest import ResolvedRole

__all__ = ["create_embeddings"]

logger = logging.getLogger("mongars_llm.server")


async def create_embeddings(state: ServerState, body: EmbeddingRequest) -> JSONResponse:
    """The vectors of ``body.input`` in order, as floats, base64 float32, int8 or packed
    bits (``encoding_format``), cut to ``dimensions`` where that is allowed."""
    items = embedding_inputs(body, state)
    if body.instruction is not None:
        check_chars(body.instruction, "instruction", state)
    role, adapter = await state.select_model(body.model, body.adapter, kind="embed")
    runtime = state.require_runtime()
    check_token_ids(items, runtime, "input")
    check_dimensions(body.dimensions, runtime)
    dimensions = _served_dimensions(body, runtime, adapter)
    options = _embedding_options(state.role_entry(role), body.instruction)
    instruction = options.get("instruction", runtime.instruction)
    texts, token_count = await asyncio.to_thread(
        _texts_and_tokens,
        runtime,
        items,
        instruction if isinstance(instruction, str) else None,
        state.settings.model.max_input_tokens,
    )
    options["adapter"] = adapter
    options["truncate"] = False
    started = time.perf_counter()
    if state.embed_fn is not None:
        vectors = await state.embed_fn(texts, **options)
    else:
        vectors = await runtime.aembed(texts, **options)
    vectors = np.asarray(vectors, dtype=np.float32)
    if dimensions is not None:
        vectors = truncate_embeddings(vectors, dimensions, normalize=True)
    data = [
        {"object": "embedding", "index": i, "embedding": value}
        for i, value in enumerate(_encoded(vectors, body.encoding_format))
    ]
    if state.metrics is not None:
        state.metrics.embedded(len(texts), token_count)
    log_event(
        logger,
        "server_embeddings",
        logging.DEBUG,
        inputs=len(texts),
        tokens=token_count,
        seconds=round(time.perf_counter() - started, 4),
    )
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "model": body.model,
            "usage": {"prompt_tokens": token_count, "total_tokens": token_count},
        }
    )


def _served_dimensions(
    body: EmbeddingRequest, runtime: RuntimeAPI, adapter: str | tuple[()] | None
) -> int | None:
    """``body.dimensions`` when the adapter was trained for it (or it is forced, or it
    is the full size); else the 422 naming the field and ``force_dimensions``."""
    if body.dimensions is None or body.dimensions >= runtime.hidden_size:
        return None
    try:
        return check_trained_dimensions(
            body.dimensions,
            hidden_size=runtime.hidden_size,
            trained=() if body.force_dimensions else runtime.trained_dimensions(adapter),
            force=body.force_dimensions,
            where=f"adapter {adapter!r}" if adapter else "this role's model",
            force_name='"force_dimensions": true',
        )
    except InvalidInputError as err:
        raise APIError(422, str(err), code="invalid_value", param="dimensions") from err


def _encoded(vectors: np.ndarray, encoding_format: str) -> list[Any]:
    """Each vector in ``encoding_format`` (see :class:`~.protocol.EmbeddingRequest`)."""
    if encoding_format == "base64":
        return [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vectors]
    if encoding_format == "int8":
        return int8_absmax(vectors).tolist()  # type: ignore[no-any-return]
    if encoding_format in ("binary", "ubinary"):
        return quantize_embeddings(vectors, encoding_format).tolist()  # type: ignore[no-any-return]
    return vectors.tolist()  # type: ignore[no-any-return]


def _embedding_options(resolved: ResolvedRole | None, instruction: str | None) -> EmbedKwargs:
    """The role's embedding options that its manifest entry sets explicitly (the
    runtime's own defaults apply to the rest); the request's instruction wins."""
    options = EmbedKwargs()
    if resolved is not None:
        configured = resolved.entry.embedding
        chosen = configured.model_fields_set
        if "pooling" in chosen:
            options["pooling"] = configured.pooling
        if "normalize" in chosen:
            options["normalize"] = configured.normalize
        if "bidirectional" in chosen:
            options["bidirectional"] = configured.bidirectional
        if "instruction" in chosen:
            options["instruction"] = configured.instruction
    if instruction is not None:
        options["instruction"] = instruction
    return options


def _texts_and_tokens(
    runtime: RuntimeAPI, items: list[Item], instruction: str | None, max_tokens: int
) -> tuple[list[str], int]:
    """The texts to embed and their token count, after checking the instruction.

    The instruction is tokenised once for the request (not once per input) and
    refused (413) when it alone fills the model's input window, before any input
    is tokenised. An input over the limit is refused (413) at once, after
    tokenising at most a few times the characters the limit allows
    (:func:`~mongars_llm.runtime._bounds.over_limit_prefix`), never its whole
    text; the runtime checks each ``instruction + input`` exactly.
    """
    if instruction and instruction.strip():
        special = int(runtime.count_tokens(""))
        count = int(runtime.count_tokens(instruction.strip())) - special
        if count >= max_tokens:
            raise APIError(
                413,
                f"the instruction has {count} tokens, which leaves no room for the input "
                f"within the limit of {max_tokens} tokens (MONGARS_MODEL__MAX_INPUT_TOKENS); "
                "shorten it",
                code="input_too_long",
                param="instruction",
            )
    texts: list[str] = []
    tokens = 0
    for i, item in enumerate(items):
        if isinstance(item, str):
            texts.append(item)
            tokens += _count_within(
                runtime, item, max_tokens, f"input[{i}]" if len(items) > 1 else "input"
            )
        else:
            texts.append(runtime.tokenizer.decode(item, skip_special_tokens=True))
            tokens += len(item)
    return texts, tokens


def _count_within(runtime: RuntimeAPI, text: str, max_tokens: int, where: str) -> int:
    """The tokens of ``text``; 413 when they pass ``max_tokens`` (found on a prefix
    for a text far over it)."""
    over = over_limit_prefix(runtime.count_tokens, text, max_tokens)
    if over is not None:
        size = (
            f"more than {max_tokens} tokens (its first {over[0]} characters alone hold "
            f"{over[1]}), the limit"
        )
        count = over[1]
    else:
        count = int(runtime.count_tokens(text))
        size = f"{count} tokens, more than the limit of {max_tokens}"
    if count > max_tokens:
        raise APIError(
            413,
            f"{where} has {size} (MONGARS_MODEL__MAX_INPUT_TOKENS); shorten it",
            code="input_too_long",
            param=where,
        )
    return count
