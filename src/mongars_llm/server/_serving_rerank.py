"""``POST /v1/rerank`` (and ``/v2/rerank``, ``/rerank``): documents scored by relevance.

The shape users' clients already send and parse: Cohere v2 (the official
``cohere`` client posts to ``/v2/rerank``), Jina and TEI-style
``{"model", "query", "documents", "top_n", "return_documents"}`` in,
``{"id", "model", "results": [{"index", "relevance_score", "document"}], "usage",
"meta"}`` out, best first. The scores are the runtime's
(:meth:`~mongars_llm.runtime.UnifiedLLMRuntime.arerank`: the model's yes/no
relevance answer on the same weights as chat and embeddings); ``model`` names a
role or ``role:adapter``, and adapters registered with ``use="rerank"`` serve
this route only.

The limits are the embeddings route's: at most MONGARS_SERVER_MAX_EMBEDDING_INPUTS
documents (413 ``too_many_inputs``), each at most MONGARS_SERVER_MAX_INPUT_CHARS
characters (413 ``input_too_long``). A document longer than the prompt leaves room
for is cut to fit (its first tokens are scored); a query that leaves no room is a
413 naming ``query``. A runtime failure is an error, never a made-up order.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from fastapi.responses import JSONResponse

from ..errors import InvalidInputError
from ..logging import log_event
from ._errors import APIError, runtime_error_to_api
from ._state import ServerState
from ._validation import check_chars
from .protocol import RerankRequest

__all__ = ["create_rerank"]

logger = logging.getLogger("mongars_llm.server")

#: the runtime's argument names that this route's fields spell otherwise
_FIELDS = {"max_document_tokens": "max_tokens_per_doc"}


async def create_rerank(state: ServerState, body: RerankRequest) -> JSONResponse:
    """The documents of ``body`` by relevance to its query, best first."""
    documents = [d if isinstance(d, str) else d.text for d in body.documents]
    if not documents:
        raise APIError(
            422,
            "documents cannot be an empty list; send at least one document",
            code="invalid_value",
            param="documents",
        )
    limit = state.config.max_embedding_inputs
    if len(documents) > limit:
        raise APIError(
            413,
            f"{len(documents)} documents is more than the limit of {limit} per request "
            "(MONGARS_SERVER_MAX_EMBEDDING_INPUTS); split the request",
            code="too_many_inputs",
            param="documents",
        )
    if not body.query.strip():
        raise APIError(422, "query is empty", code="invalid_value", param="query")
    check_chars(body.query, "query", state)
    if body.instruction is not None:
        check_chars(body.instruction, "instruction", state)
    for i, document in enumerate(documents):
        check_chars(document, f"documents[{i}]", state)
    _, adapter = await state.select_model(body.model, body.adapter, kind="rerank")
    runtime = state.require_runtime()
    started = time.perf_counter()
    try:
        results = await runtime.arerank(
            body.query,
            documents,
            top_n=body.top_n,
            instruction=body.instruction,
            adapter=adapter,
            max_document_tokens=body.max_tokens_per_doc,
        )
    except InvalidInputError as err:  # its param is this route's field (query, documents[i])
        api = runtime_error_to_api(err)
        api.param = _FIELDS.get(err.param or "", err.param)
        raise api from err
    tokens = int(getattr(results, "prompt_tokens", 0))
    data: list[dict[str, Any]] = []
    for result in results:
        item: dict[str, Any] = {"index": result.index, "relevance_score": result.score}
        if body.return_documents:
            item["document"] = {"text": result.document}
        data.append(item)
    log_event(
        logger,
        "server_rerank",
        logging.DEBUG,
        documents=len(documents),
        tokens=tokens,
        seconds=round(time.perf_counter() - started, 4),
    )
    return JSONResponse(
        {
            "id": str(uuid.uuid4()),
            "model": body.model,
            "results": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "meta": {
                "api_version": {"version": "2"},
                "billed_units": {"search_units": 1},
                "tokens": {"input_tokens": tokens, "output_tokens": 0},
            },
        }
    )
