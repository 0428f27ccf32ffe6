"""The OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions,
/v1/embeddings; and the Cohere/Jina-compatible /v1/rerank (also /v2/rerank, /rerank).

A thin router, as in vLLM's server: the wire models live in :mod:`.protocol`,
the checks pydantic cannot make in :mod:`._validation`, and each endpoint's
serving logic in ``_serving_chat``, ``_serving_completion``,
``_serving_embedding`` and ``_serving_rerank`` (fallback policy and the one streamer in
:mod:`._serving`). A route declares its OpenAPI documentation and hands the
request to its serving function.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from . import (
    _serving,
    _serving_chat,
    _serving_completion,
    _serving_embedding,
    _serving_rerank,
)
from ._auth import require_api_key
from ._state import ServerState
from .protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    ModelList,
    RerankRequest,
    RerankResponse,
)

__all__ = ["RERANK_PATHS", "build_openai_router"]

#: the rerank route's paths: Jina's and ours, Cohere v2's (its client posts there), TEI's
RERANK_PATHS = ("/v1/rerank", "/v2/rerank", "/rerank")

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "Unsupported option, text that is not valid Unicode, or a value the sampler "
        "cannot use (field named in error.param)",
        401: "Missing or wrong API key (when one is configured)",
        404: "Unknown model or adapter",
        408: "The request body was not received within MONGARS_SERVER_BODY_TIMEOUT_S",
        413: "Too many inputs or an input too long",
        422: "Invalid request (field named in error.param)",
        431: "Too many or too large request headers",
        503: "Overloaded or the model is still loading (see Retry-After)",
    }.items()
}
_INFERENCE_ERRORS: dict[int | str, dict[str, Any]] = {
    k: _ERRORS[k] for k in (400, 401, 404, 408, 413, 422, 431, 503)
}


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.mongars
    return state


def _stream_or_json(description: str) -> dict[int | str, dict[str, Any]]:
    return {
        **_INFERENCE_ERRORS,
        200: {
            "description": description,
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
    }


def build_openai_router(*, embeddings_only: bool) -> APIRouter:
    """The /v1 routes; ``embeddings_only`` leaves out the two completion endpoints."""
    router = APIRouter(dependencies=[Depends(require_api_key)], tags=["openai"])

    @router.get(
        "/v1/models",
        response_model=ModelList,
        responses={401: _ERRORS[401]},
        summary="List models: roles, and role:adapter for each loaded adapter",
    )
    async def list_models(request: Request) -> ModelList:
        return _serving.list_models(_state(request))

    @router.post(
        "/v1/embeddings",
        response_model=EmbeddingResponse,
        responses=_INFERENCE_ERRORS,
        summary="Create embeddings (LLM2Vec pooling on the shared weights)",
    )
    async def create_embeddings(body: EmbeddingRequest, request: Request) -> Any:
        return await _serving_embedding.create_embeddings(_state(request), body)

    if embeddings_only:
        return router

    @router.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses=_stream_or_json(
            "A chat completion, or with stream=true a text/event-stream of "
            "chat.completion.chunk objects ending with 'data: [DONE]'"
        ),
        summary="Chat completion (stream=true for server-sent events)",
    )
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Any:
        return await _serving_chat.create_chat_completion(_state(request), body)

    @router.post(
        "/v1/completions",
        response_model=CompletionResponse,
        responses=_stream_or_json("A text completion, or with stream=true a text/event-stream"),
        summary="Text completion of a raw prompt (no chat template)",
    )
    async def create_completion(body: CompletionRequest, request: Request) -> Any:
        return await _serving_completion.create_completion(_state(request), body)

    async def create_rerank(body: RerankRequest, request: Request) -> Any:
        return await _serving_rerank.create_rerank(_state(request), body)

    for path in RERANK_PATHS:
        router.add_api_route(
            path,
            create_rerank,
            methods=["POST"],
            response_model=RerankResponse,
            responses=_INFERENCE_ERRORS,
            summary="Rerank documents by relevance to a query (Cohere v2 / Jina shape)",
            include_in_schema=path == RERANK_PATHS[0],
        )
    return router
