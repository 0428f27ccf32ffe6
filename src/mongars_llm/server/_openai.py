"""The OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions,
/v1/embeddings.

Each handler validates what pydantic cannot (server bounds, unsupported
options, values the sampler cannot use), resolves ``model`` to a role (and
adapter), then awaits the runtime's
async API — concurrent requests are micro-batched inside the runtime, so they
share forward passes. Failures become OpenAI-shaped errors; for chat and text
completions, a server-side :class:`LLMRuntimeError` is answered with
``settings.fallback_reply`` when one is configured (marked by the
``X-Mongars-Fallback`` header and ``Cache-Control: no-store``). Client errors
are checked before the runtime is called, so they are never papered over.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import LLMRuntimeError
from ..logging import log_event
from ._auth import require_api_key
from ._errors import CLIENT_RUNTIME_CODES, APIError, error_body, runtime_error_to_api
from ._state import ServerState
from .protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    ResponseMessage,
    Usage,
)

__all__ = ["build_openai_router"]

logger = logging.getLogger("mongars_llm.server")

MAX_STOP = 4
FALLBACK_FINGERPRINT = "mongars-fallback"
#: the smallest temperature that still samples: below it the logits overflow (0 is greedy)
MIN_TEMPERATURE = 1e-5
#: the seeds torch's generator takes
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1

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


def _state(request: Request) -> ServerState:
    return request.app.state.mongars


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# ----------------------------------------------------------------- validation


def _check_sampling(body: Any, state: ServerState, max_tokens: int | None) -> None:
    bound = state.settings.model.max_new_tokens
    if max_tokens is not None and max_tokens > bound:
        raise APIError(
            422,
            f"max_tokens={max_tokens} is above this server's limit of {bound} "
            "(MONGARS_MODEL__MAX_NEW_TOKENS); ask for at most that many",
            code="max_tokens_too_large",
            param="max_tokens",
        )
    if body.n is not None and body.n != 1:
        raise _unsupported(
            "n",
            f"n={body.n} is not supported: this server returns one choice per request; "
            "omit n (or send n=1) and make several requests",
        )
    if body.logit_bias:
        raise _unsupported("logit_bias", "logit_bias is not supported by this server; omit it")
    temperature = body.temperature
    if temperature is not None and 0 < temperature < MIN_TEMPERATURE:
        raise APIError(
            400,
            f"temperature={temperature!r} is too small to sample with (the smallest is "
            f"{MIN_TEMPERATURE:g}); use 0 for greedy decoding",
            code="invalid_value",
            param="temperature",
        )
    if body.seed is not None and not SEED_MIN <= body.seed <= SEED_MAX:
        raise APIError(
            400,
            f"seed={body.seed} is outside the 64-bit range the sampler takes "
            f"({SEED_MIN} to {SEED_MAX})",
            code="invalid_value",
            param="seed",
        )
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    if len(stop) > MAX_STOP:
        raise APIError(
            422,
            f"at most {MAX_STOP} stop sequences are allowed",
            code="invalid_value",
            param="stop",
        )
    if any(s == "" for s in stop):
        raise APIError(422, "a stop sequence cannot be empty", code="invalid_value", param="stop")
    if body.stream_options is not None and not body.stream:
        raise APIError(
            422,
            "stream_options is only allowed with stream=true",
            code="invalid_value",
            param="stream_options",
        )


def _sampling_kwargs(
    body: Any, role: str | None, adapter: str | tuple[()] | None, max_tokens: int | None
) -> dict[str, Any]:
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    return {
        "role": role,
        "max_new_tokens": max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "stop": stop or None,
        "adapter": adapter,
        "seed": body.seed,
    }


def _message_text(message: ChatMessage, index: int) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise _unsupported(
                f"messages[{index}].content[{j}]",
                f"content part of type {part.type!r} is not supported; only 'text' parts are",
            )
        texts.append(part.text)
    return "".join(texts)


def _messages(body: ChatCompletionRequest, state: ServerState) -> list[dict[str, str]]:
    limit = state.config.max_messages
    if len(body.messages) > limit:
        raise APIError(
            413,
            f"{len(body.messages)} messages is more than the limit of {limit} "
            "(MONGARS_SERVER_MAX_MESSAGES)",
            code="too_many_messages",
            param="messages",
        )
    messages = []
    total = 0
    for i, message in enumerate(body.messages):
        text = _message_text(message, i)
        total += len(text)
        role = "system" if message.role == "developer" else message.role
        messages.append({"role": role, "content": text})
    if total > state.config.max_input_chars:
        raise APIError(
            413,
            f"the messages hold {total} characters, more than the limit of "
            f"{state.config.max_input_chars} (MONGARS_SERVER_MAX_INPUT_CHARS)",
            code="input_too_long",
            param="messages",
        )
    return messages


def _unsupported(param: str, message: str) -> APIError:
    """The 400 for an OpenAI option this server does not implement (never ignored,
    since ignoring it would change what the client gets)."""
    return APIError(400, message, code="unsupported", param=param)


def _check_chat_options(body: ChatCompletionRequest) -> None:
    if body.logprobs:
        raise _unsupported("logprobs", "logprobs is not supported by this server; omit it")
    if body.top_logprobs:
        raise _unsupported("top_logprobs", "top_logprobs is not supported by this server; omit it")
    for name in ("tools", "functions"):
        if getattr(body, name):
            raise _unsupported(
                name,
                f"{name} are not supported: this server does not call tools; "
                f"omit {name} (and tool_choice)",
            )
    for name in ("tool_choice", "function_call"):
        choice = getattr(body, name)
        if choice is not None and choice != "none":
            raise _unsupported(
                name,
                f"{name}={json.dumps(choice)} is not supported: this server does not call "
                f"tools; omit {name} or send 'none'",
            )
    response_format = body.response_format
    if response_format is not None and response_format.get("type") != "text":
        kind = response_format.get("type")
        raise _unsupported(
            "response_format",
            f"response_format of type {json.dumps(kind)} is not supported: this server cannot "
            'constrain the output to JSON; omit response_format or send {"type": "text"}',
        )


def _check_completion_options(body: CompletionRequest) -> None:
    if body.suffix is not None:
        raise _unsupported("suffix", "suffix (insertion) is not supported; omit it")
    if body.logprobs is not None:
        raise _unsupported("logprobs", "logprobs is not supported by this server; omit it")
    if body.best_of is not None and body.best_of != 1:
        raise _unsupported("best_of", f"best_of={body.best_of} is not supported; omit it or send 1")


# ----------------------------------------------------------------- fallback


def _fallback_or_raise(state: ServerState, err: LLMRuntimeError) -> str:
    """The fallback text for a server-side failure, else raise the structured error."""
    reply = state.settings.fallback_reply
    log_event(
        logger,
        "server_runtime_error",
        logging.ERROR if err.code not in CLIENT_RUNTIME_CODES else logging.INFO,
        code=err.code,
        error=str(err),
        fallback=bool(reply) and err.code not in CLIENT_RUNTIME_CODES,
    )
    if reply is None or err.code in CLIENT_RUNTIME_CODES:
        raise runtime_error_to_api(err, retry_after=state.config.retry_after_s) from err
    return reply


def _fallback_headers(err: LLMRuntimeError) -> dict[str, str]:
    return {"X-Mongars-Fallback": err.code, "Cache-Control": "no-store"}


# ----------------------------------------------------------------- streaming helpers


def _sse(payload: Any) -> str:
    data = (
        payload.model_dump_json(exclude_none=False)
        if hasattr(payload, "model_dump_json")
        else json.dumps(payload)
    )
    return f"data: {data}\n\n"


async def _open_stream(
    runtime: Any, prompt: Any, kwargs: dict[str, Any]
) -> tuple[Any, Any, str | None, bool]:
    """Start a runtime stream and wait for its first delta, so that input errors are
    answered with a proper HTTP status instead of an error inside a 200 stream."""
    stream = runtime.astream(prompt, **kwargs)
    if inspect.isawaitable(stream):
        stream = await stream
    iterator = stream.__aiter__()
    try:
        first = await iterator.__anext__()
    except StopAsyncIteration:
        return stream, iterator, None, True
    except BaseException:
        await _close(iterator)
        raise
    return stream, iterator, first, False


async def _close(iterator: Any) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        # closing a failed stream must not mask the original error
        with contextlib.suppress(Exception):
            await aclose()


def _streaming_response(
    events: AsyncIterator[str], headers: dict[str, str] | None = None
) -> StreamingResponse:
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})},
    )


def _error_event(err: BaseException) -> str:
    if isinstance(err, LLMRuntimeError):
        body = runtime_error_to_api(err).body()
    else:
        body = error_body(
            "generation failed; the server log has the details",
            type="server_error",
            code="internal_error",
        )
    return f"data: {json.dumps(body)}\n\n"


# ----------------------------------------------------------------- router


def build_openai_router(*, embeddings_only: bool) -> APIRouter:
    router = APIRouter(dependencies=[Depends(require_api_key)], tags=["openai"])

    @router.get(
        "/v1/models",
        response_model=ModelList,
        responses={401: _ERRORS[401]},
        summary="List models: roles, and role:adapter for each loaded adapter",
    )
    async def list_models(request: Request) -> ModelList:
        state = _state(request)
        runtime = state.runtime
        root = getattr(runtime, "model_id", None) if runtime is not None else None
        roles = state.role_names()
        cards = [ModelCard(id=role, root=root) for role in roles]
        if not roles and root is not None:
            cards.append(ModelCard(id=root, root=root))
        for adapter in state.adapter_names():
            for role in roles or ([root] if root else []):
                cards.append(ModelCard(id=f"{role}:{adapter}", root=root, parent=role))
        return ModelList(data=cards)

    @router.post(
        "/v1/embeddings",
        response_model=EmbeddingResponse,
        responses={k: _ERRORS[k] for k in (400, 401, 404, 408, 413, 422, 431, 503)},
        summary="Create embeddings (LLM2Vec pooling on the shared weights)",
    )
    async def create_embeddings(body: EmbeddingRequest, request: Request) -> Any:
        state = _state(request)
        items = _embedding_inputs(body, state)
        if body.instruction is not None:
            _check_chars(body.instruction, "instruction", state)
        role, adapter = state.resolve_model(body.model, body.adapter)
        runtime = state.require_runtime()
        _check_token_ids(items, runtime, "input")
        hidden = int(getattr(runtime, "hidden_size", 0) or 0)
        if body.dimensions is not None and hidden and body.dimensions > hidden:
            raise APIError(
                422,
                f"dimensions={body.dimensions} is larger than the model's {hidden} dimensions",
                code="invalid_value",
                param="dimensions",
            )
        kwargs = _embedding_options(state.role_entry(role), body.instruction)
        instruction = kwargs.get("instruction", getattr(runtime, "instruction", None))
        texts, token_count = await asyncio.to_thread(
            _texts_and_tokens,
            runtime,
            items,
            instruction if isinstance(instruction, str) else None,
            state.settings.model.max_input_tokens,
        )
        kwargs.update(adapter=adapter, truncate=False)
        started = time.perf_counter()
        if state.embed_fn is not None:
            vectors = await state.embed_fn(texts, **kwargs)
        else:
            vectors = await runtime.aembed(texts, **kwargs)
        vectors = np.asarray(vectors, dtype=np.float32)
        if body.dimensions is not None:
            vectors = vectors[:, : body.dimensions]
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, 1e-12)
        data = []
        for i, vector in enumerate(vectors):
            if body.encoding_format == "base64":
                value: Any = base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
            else:
                value = vector.tolist()
            data.append({"object": "embedding", "index": i, "embedding": value})
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

    if embeddings_only:
        return router

    @router.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses={
            **{k: _ERRORS[k] for k in (400, 401, 404, 408, 413, 422, 431, 503)},
            200: {
                "description": "A chat completion, or with stream=true a text/event-stream of "
                "chat.completion.chunk objects ending with 'data: [DONE]'",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            },
        },
        summary="Chat completion (stream=true for server-sent events)",
    )
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Any:
        state = _state(request)
        max_tokens = body.max_completion_tokens or body.max_tokens
        _check_sampling(body, state, max_tokens)
        _check_chat_options(body)
        messages = _messages(body, state)
        role, adapter = state.resolve_model(body.model, body.adapter)
        kwargs = _sampling_kwargs(body, role, adapter, max_tokens)
        completion_id = _new_id("chatcmpl")
        if body.stream:
            return await _stream_chat(state, body, messages, kwargs, completion_id)
        try:
            runtime = state.require_runtime()
            generation = await runtime.agenerate(messages, **kwargs)
        except LLMRuntimeError as err:
            reply = _fallback_or_raise(state, err)
            response = ChatCompletionResponse(
                id=completion_id,
                model=body.model,
                choices=[
                    ChatCompletionChoice(
                        index=0, message=ResponseMessage(content=reply), finish_reason="stop"
                    )
                ],
                usage=Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0),
                system_fingerprint=FALLBACK_FINGERPRINT,
            )
            return JSONResponse(response.model_dump(), headers=_fallback_headers(err))
        usage = generation.usage
        return ChatCompletionResponse(
            id=completion_id,
            model=body.model,
            choices=[
                ChatCompletionChoice(
                    index=0,
                    message=ResponseMessage(content=generation.text),
                    finish_reason=generation.finish_reason,
                )
            ],
            usage=Usage(
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                total_tokens=usage.total_tokens,
            ),
        )

    @router.post(
        "/v1/completions",
        response_model=CompletionResponse,
        responses={
            **{k: _ERRORS[k] for k in (400, 401, 404, 408, 413, 422, 431, 503)},
            200: {
                "description": "A text completion, or with stream=true a text/event-stream",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            },
        },
        summary="Text completion of a raw prompt (no chat template)",
    )
    async def create_completion(body: CompletionRequest, request: Request) -> Any:
        state = _state(request)
        _check_sampling(body, state, body.max_tokens)
        _check_completion_options(body)
        prompts = _completion_prompts(body, state)
        role, adapter = state.resolve_model(body.model, body.adapter)
        kwargs = _sampling_kwargs(body, role, adapter, body.max_tokens)
        completion_id = _new_id("cmpl")
        if body.stream:
            if len(prompts) != 1:
                raise _unsupported("prompt", "stream=true takes a single prompt")
            return await _stream_completion(state, body, prompts[0], kwargs, completion_id)
        try:
            runtime = state.require_runtime()
            _check_token_ids(prompts, runtime, "prompt")
            texts = await asyncio.to_thread(_decode_prompts, runtime, prompts)
            generations = await asyncio.gather(
                *(runtime.agenerate(text, **kwargs) for text in texts)
            )
        except LLMRuntimeError as err:
            reply = _fallback_or_raise(state, err)
            response = CompletionResponse(
                id=completion_id,
                model=body.model,
                choices=[
                    CompletionChoice(index=i, text=reply, finish_reason="stop")
                    for i in range(len(prompts))
                ],
                usage=Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0),
                system_fingerprint=FALLBACK_FINGERPRINT,
            )
            return JSONResponse(response.model_dump(), headers=_fallback_headers(err))
        choices = [
            CompletionChoice(
                index=i,
                text=(texts[i] + g.text) if body.echo else g.text,
                finish_reason=g.finish_reason,
            )
            for i, g in enumerate(generations)
        ]
        prompt_tokens = sum(g.usage.prompt_tokens for g in generations)
        completion_tokens = sum(g.usage.completion_tokens for g in generations)
        return CompletionResponse(
            id=completion_id,
            model=body.model,
            choices=choices,
            usage=Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens,
            ),
        )

    return router


# ----------------------------------------------------------------- chat streaming


async def _stream_chat(
    state: ServerState,
    body: ChatCompletionRequest,
    messages: list[dict[str, str]],
    kwargs: dict[str, Any],
    completion_id: str,
) -> StreamingResponse:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(delta: DeltaMessage, finish: str | None = None, *, fallback: bool = False) -> str:
        return _sse(
            ChatCompletionChunk(
                id=completion_id,
                model=body.model,
                choices=[ChatCompletionChunkChoice(index=0, delta=delta, finish_reason=finish)],
                system_fingerprint=FALLBACK_FINGERPRINT if fallback else None,
            )
        )

    try:
        runtime = state.require_runtime()
        stream, iterator, first, ended = await _open_stream(runtime, messages, kwargs)
    except LLMRuntimeError as err:
        reply = _fallback_or_raise(state, err)

        async def fallback_events() -> AsyncIterator[str]:
            yield chunk(DeltaMessage(role="assistant", content=""), fallback=True)
            yield chunk(DeltaMessage(content=reply), fallback=True)
            yield chunk(DeltaMessage(), "stop", fallback=True)
            if include_usage:
                yield _sse(
                    ChatCompletionChunk(
                        id=completion_id,
                        model=body.model,
                        choices=[],
                        usage=Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0),
                        system_fingerprint=FALLBACK_FINGERPRINT,
                    )
                )
            yield "data: [DONE]\n\n"

        return _streaming_response(fallback_events(), _fallback_headers(err))

    async def events() -> AsyncIterator[str]:
        try:
            yield chunk(DeltaMessage(role="assistant", content=""))
            if first:
                yield chunk(DeltaMessage(content=first))
            if not ended:
                async for delta in iterator:
                    if delta:
                        yield chunk(DeltaMessage(content=delta))
            result = stream.result
            yield chunk(DeltaMessage(), result.finish_reason)
            if include_usage:
                u = result.usage
                yield _sse(
                    ChatCompletionChunk(
                        id=completion_id,
                        model=body.model,
                        choices=[],
                        usage=Usage(
                            prompt_tokens=u.prompt_tokens,
                            completion_tokens=u.completion_tokens,
                            total_tokens=u.total_tokens,
                        ),
                    )
                )
        except Exception as err:  # headers are sent: report the failure inside the stream
            log_event(logger, "server_stream_failed", logging.ERROR, error=str(err))
            yield _error_event(err)
        finally:
            await _close(iterator)
        yield "data: [DONE]\n\n"

    return _streaming_response(events())


async def _stream_completion(
    state: ServerState,
    body: CompletionRequest,
    prompt: str | list[int],
    kwargs: dict[str, Any],
    completion_id: str,
) -> StreamingResponse:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(
        text: str, finish: str | None = None, usage: Usage | None = None, *, fallback: bool = False
    ) -> str:
        return _sse(
            CompletionResponse(
                id=completion_id,
                model=body.model,
                choices=[]
                if usage is not None
                else [CompletionChoice(index=0, text=text, finish_reason=finish)],
                usage=usage,
                system_fingerprint=FALLBACK_FINGERPRINT if fallback else None,
            )
        )

    try:
        runtime = state.require_runtime()
        _check_token_ids([prompt], runtime, "prompt")
        (text_prompt,) = await asyncio.to_thread(_decode_prompts, runtime, [prompt])
        stream, iterator, first, ended = await _open_stream(runtime, text_prompt, kwargs)
    except LLMRuntimeError as err:
        reply = _fallback_or_raise(state, err)

        async def fallback_events() -> AsyncIterator[str]:
            yield chunk(reply, fallback=True)
            yield chunk("", "stop", fallback=True)
            yield "data: [DONE]\n\n"

        return _streaming_response(fallback_events(), _fallback_headers(err))

    async def events() -> AsyncIterator[str]:
        try:
            if body.echo:
                yield chunk(text_prompt)
            if first:
                yield chunk(first)
            if not ended:
                async for delta in iterator:
                    if delta:
                        yield chunk(delta)
            result = stream.result
            yield chunk("", result.finish_reason)
            if include_usage:
                u = result.usage
                yield chunk(
                    "",
                    usage=Usage(
                        prompt_tokens=u.prompt_tokens,
                        completion_tokens=u.completion_tokens,
                        total_tokens=u.total_tokens,
                    ),
                )
        except Exception as err:
            log_event(logger, "server_stream_failed", logging.ERROR, error=str(err))
            yield _error_event(err)
        finally:
            await _close(iterator)
        yield "data: [DONE]\n\n"

    return _streaming_response(events())


# ----------------------------------------------------------------- inputs


def _as_items(value: Any, param: str) -> list[str | list[int]]:
    """A string, a token-id list, or a list of either -> a list of items."""
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(v, int) for v in value):
        return [list(value)]
    items = list(value)
    if not items:
        raise APIError(422, f"{param} cannot be an empty list", code="invalid_value", param=param)
    return items


def _checked_items(
    value: Any, state: ServerState, param: str, *, limit: int, env: str, allow_empty_text: bool
) -> list[str | list[int]]:
    items = _as_items(value, param)
    if len(items) > limit:
        raise APIError(
            413,
            f"{len(items)} {param}s is more than the limit of {limit} per request ({env}); "
            "split the request",
            code="too_many_inputs",
            param=param,
        )
    _check_items(items, state, param, allow_empty_text=allow_empty_text)
    return items


def _completion_prompts(body: CompletionRequest, state: ServerState) -> list[str | list[int]]:
    return _checked_items(
        body.prompt,
        state,
        "prompt",
        limit=state.config.max_prompts,
        env="MONGARS_SERVER_MAX_PROMPTS",
        allow_empty_text=True,
    )


def _embedding_inputs(body: EmbeddingRequest, state: ServerState) -> list[str | list[int]]:
    return _checked_items(
        body.input,
        state,
        "input",
        limit=state.config.max_embedding_inputs,
        env="MONGARS_SERVER_MAX_EMBEDDING_INPUTS",
        allow_empty_text=False,
    )


def _check_items(
    items: list[str | list[int]], state: ServerState, param: str, *, allow_empty_text: bool
) -> None:
    max_tokens = state.settings.model.max_input_tokens
    for i, item in enumerate(items):
        where = f"{param}[{i}]" if len(items) > 1 else param
        if isinstance(item, str):
            if not item and not allow_empty_text:
                raise APIError(
                    422, f"{where} is an empty string", code="invalid_value", param=where
                )
            _check_chars(item, where, state)
        else:
            if not item:
                raise APIError(
                    422, f"{where} is an empty token list", code="invalid_value", param=where
                )
            if len(item) > max_tokens:
                raise APIError(
                    413,
                    f"{where} has {len(item)} tokens, more than the limit of {max_tokens} "
                    "(MONGARS_MODEL__MAX_INPUT_TOKENS)",
                    code="input_too_long",
                    param=where,
                )


def _check_chars(text: str, where: str, state: ServerState) -> None:
    max_chars = state.config.max_input_chars
    if len(text) > max_chars:
        raise APIError(
            413,
            f"{where} has {len(text)} characters, more than the limit of {max_chars} "
            "(MONGARS_SERVER_MAX_INPUT_CHARS)",
            code="input_too_long",
            param=where,
        )


def _check_token_ids(items: list[str | list[int]], runtime: Any, param: str) -> None:
    """Token ids must exist in the loaded tokenizer's vocabulary (422 otherwise)."""
    vocab = _vocab_size(runtime)
    if vocab is None:
        return
    for i, item in enumerate(items):
        if isinstance(item, list) and max(item) >= vocab:
            where = f"{param}[{i}]" if len(items) > 1 else param
            raise APIError(
                422,
                f"{where} holds token id {max(item)}, outside the vocabulary (size {vocab})",
                code="invalid_value",
                param=where,
            )


def _vocab_size(runtime: Any) -> int | None:
    tokenizer = getattr(runtime, "tokenizer", None)
    if tokenizer is None:
        return None
    try:
        return len(tokenizer)
    except TypeError:
        return None


def _embedding_options(resolved: Any, instruction: str | None) -> dict[str, Any]:
    """The role's embedding options that its manifest entry sets explicitly (the
    runtime's own defaults apply to the rest); the request's instruction wins."""
    options: dict[str, Any] = {}
    configured = getattr(getattr(resolved, "entry", None), "embedding", None)
    if configured is not None:
        for name in ("pooling", "normalize", "bidirectional", "instruction"):
            if name in configured.model_fields_set:
                options[name] = getattr(configured, name)
    if instruction is not None:
        options["instruction"] = instruction
    return options


def _decode_prompts(runtime: Any, prompts: list[str | list[int]]) -> list[str]:
    """Token-id prompts become text (the runtime tokenizes text itself)."""
    return [
        p if isinstance(p, str) else runtime.tokenizer.decode(p, skip_special_tokens=False)
        for p in prompts
    ]


def _texts_and_tokens(
    runtime: Any, items: list[str | list[int]], instruction: str | None, max_tokens: int
) -> tuple[list[str], int]:
    """The texts to embed and their token count, after checking the instruction.

    The instruction is tokenised once for the request (not once per input) and
    refused (413) when it alone fills the model's input window, before any input
    is tokenised; the runtime checks each ``instruction + input`` exactly.
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
    for item in items:
        if isinstance(item, str):
            texts.append(item)
            tokens += int(runtime.count_tokens(item))
        else:
            texts.append(runtime.tokenizer.decode(item, skip_special_tokens=True))
            tokens += len(item)
    return texts, tokens
