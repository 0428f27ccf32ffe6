"""What the OpenAI endpoints share: the fallback policy, the one streamer, the model list.

**Fallback.** A server-side :class:`~mongars_llm.errors.LLMRuntimeError` of a
chat or text completion is answered with ``settings.fallback_reply`` when one
is configured: a normal-looking completion (``finish_reason="stop"``, zero
usage, ``system_fingerprint="mongars-fallback"``) marked by the
``X-Mongars-Fallback: <code>`` header and ``Cache-Control: no-store``. Client
errors (a 4xx ``http_status``, :func:`~._errors.is_client_error`, and every check
of :mod:`._validation`, made before the runtime is called) are never papered over.

**Streaming.** :func:`stream_generation` serves ``stream=true`` for both chat
and text completions; a :class:`ChunkFormat` says how the endpoint writes its
events. The stream is opened and its first delta awaited before the response
starts, so a failure up to there is still an HTTP status (or the fallback);
a later failure is reported inside the 200 stream as an OpenAI error event.
Every stream ends with ``data: [DONE]``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from ..errors import LLMRuntimeError
from ..logging import log_event
from ._errors import error_body, is_client_error, runtime_error_to_api
from ._runtime_api import GenerateOptions, Prompt, RuntimeAPI, TextStream
from ._state import ServerState
from .protocol import ModelCard, ModelList, UsageInfo

if TYPE_CHECKING:
    from typing import Self

    from ..runtime import FinishReason, SamplingParams
    from ..runtime import Usage as RuntimeUsage

__all__ = [
    "FALLBACK_FINGERPRINT",
    "NO_USAGE",
    "ChunkFormat",
    "fallback_or_raise",
    "fallback_response",
    "list_models",
    "new_id",
    "sampling_options",
    "sse",
    "stream_generation",
    "wire_usage",
]

logger = logging.getLogger("mongars_llm.server")

#: the ``system_fingerprint`` of a fallback answer
FALLBACK_FINGERPRINT = "mongars-fallback"
_DONE = "data: [DONE]\n\n"
#: the usage of a fallback answer
NO_USAGE = UsageInfo(prompt_tokens=0, completion_tokens=0, total_tokens=0)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def list_models(state: ServerState) -> ModelList:
    """Each role, then ``role:adapter`` for each selectable adapter; the checkpoint id
    stands in for the roles when the manifest has none."""
    runtime = state.runtime
    root = runtime.model_id if runtime is not None else None
    roles = state.role_names()
    cards = [ModelCard(id=role, root=root) for role in roles]
    if not roles and root is not None:
        cards.append(ModelCard(id=root, root=root))
    for adapter in state.adapter_names():
        for role in roles or ([root] if root else []):
            cards.append(ModelCard(id=f"{role}:{adapter}", root=root, parent=role))
    return ModelList(data=cards)


def sampling_options(
    params: SamplingParams, role: str | None, adapter: str | tuple[()] | None
) -> GenerateOptions:
    """The runtime keywords of a chat or text completion: its checked sampling
    parameters (:func:`~._validation.check_sampling`), role and adapter."""
    options = GenerateOptions(role=role, **params.as_kwargs())
    if adapter is not None:
        options["adapter"] = adapter
    return options


def wire_usage(usage: RuntimeUsage) -> UsageInfo:
    return UsageInfo(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


# ----------------------------------------------------------------- fallback


def fallback_or_raise(state: ServerState, err: LLMRuntimeError) -> str:
    """The fallback text for a server-side failure, else raise the structured error."""
    reply = state.settings.fallback_reply
    client_error = is_client_error(err)
    log_event(
        logger,
        "server_runtime_error",
        logging.INFO if client_error else logging.ERROR,
        code=err.code,
        error=str(err),
        fallback=bool(reply) and not client_error,
    )
    if reply is None or client_error:
        raise runtime_error_to_api(err, retry_after=state.config.retry_after_s) from err
    return reply


def _fallback_headers(err: LLMRuntimeError) -> dict[str, str]:
    return {"X-Mongars-Fallback": err.code, "Cache-Control": "no-store"}


def fallback_response(response: BaseModel, err: LLMRuntimeError) -> JSONResponse:
    """A fallback completion, with the headers that mark it as one."""
    return JSONResponse(response.model_dump(), headers=_fallback_headers(err))


# ----------------------------------------------------------------- streaming


class ChunkFormat(Protocol):
    """How one endpoint writes the ``data:`` events of a streamed completion."""

    def as_fallback(self) -> Self:
        """The same format for a fallback answer (``system_fingerprint`` set)."""
        ...

    def opening(self) -> list[str]:
        """The events before any text (a chat stream first announces the assistant)."""
        ...

    def text(self, text: str) -> str: ...

    def finish(self, reason: FinishReason) -> str: ...

    def usage(self, usage: UsageInfo) -> str:
        """The last event before ``[DONE]`` when ``stream_options.include_usage`` is set."""
        ...


def sse(payload: BaseModel) -> str:
    """One server-sent event holding ``payload`` as JSON."""
    return f"data: {payload.model_dump_json(exclude_none=False)}\n\n"


async def stream_generation(
    state: ServerState,
    chunks: ChunkFormat,
    prepare: Callable[[RuntimeAPI], Awaitable[Prompt]],
    options: GenerateOptions,
    *,
    echo: bool = False,
    include_usage: bool = False,
    endpoint: str = "stream",
) -> StreamingResponse:
    """Stream one generation as server-sent events.

    ``prepare`` turns the request into the runtime's prompt (it may check it
    against the loaded model); ``echo`` sends that prompt text first.
    """
    try:
        runtime = state.require_runtime()
        prompt = await prepare(runtime)
        stream, iterator, first, ended = await _open_stream(runtime, prompt, options)
    except LLMRuntimeError as err:
        reply = fallback_or_raise(state, err)
        events = _fallback_events(chunks.as_fallback(), reply, include_usage)
        return _streaming_response(events, _fallback_headers(err))
    echoed = prompt if echo and isinstance(prompt, str) else None
    events = _events(chunks, stream, iterator, first, ended, echoed, include_usage)
    if state.metrics is not None:  # `endpoint` labels the streamed tokens in /metrics
        events = state.metrics.count_stream(events, stream, endpoint)
    return _streaming_response(events)


async def _open_stream(
    runtime: RuntimeAPI, prompt: Prompt, options: GenerateOptions
) -> tuple[TextStream, AsyncIterator[str], str | None, bool]:
    """Start a runtime stream and wait for its first delta, so that input errors are
    answered with a proper HTTP status instead of an error inside a 200 stream."""
    stream = runtime.astream(prompt, **options)
    iterator = stream.__aiter__()
    try:
        first = await iterator.__anext__()
    except StopAsyncIteration:
        return stream, iterator, None, True
    except BaseException:
        await _close(iterator)
        raise
    return stream, iterator, first, False


async def _events(
    chunks: ChunkFormat,
    stream: TextStream,
    iterator: AsyncIterator[str],
    first: str | None,
    ended: bool,
    echoed: str | None,
    include_usage: bool,
) -> AsyncIterator[str]:
    try:
        for event in chunks.opening():
            yield event
        if echoed is not None:
            yield chunks.text(echoed)
        if first:
            yield chunks.text(first)
        if not ended:
            async for delta in iterator:
                if delta:
                    yield chunks.text(delta)
        result = stream.result
        yield chunks.finish(result.finish_reason)
        if include_usage:
            yield chunks.usage(wire_usage(result.usage))
    except Exception as err:  # headers are sent: report the failure inside the stream
        log_event(logger, "server_stream_failed", logging.ERROR, error=str(err))
        yield _error_event(err)
    finally:
        await _close(iterator)
    yield _DONE


async def _fallback_events(
    chunks: ChunkFormat, reply: str, include_usage: bool
) -> AsyncIterator[str]:
    for event in chunks.opening():
        yield event
    yield chunks.text(reply)
    yield chunks.finish("stop")
    if include_usage:
        yield chunks.usage(NO_USAGE)
    yield _DONE


async def _close(iterator: AsyncIterator[str]) -> None:
    aclose: Any = getattr(iterator, "aclose", None)
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
