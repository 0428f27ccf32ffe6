"""``POST /v1/chat/completions``: checks, one generation (or a stream), the response.

The messages go to the runtime as they are (the chat template is the model's);
``max_completion_tokens`` wins over ``max_tokens``. Fallback and streaming
follow :mod:`._serving`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ..errors import LLMRuntimeError
from ._runtime_api import Prompt, RuntimeAPI
from ._serving import (
    FALLBACK_FINGERPRINT,
    NO_USAGE,
    fallback_or_raise,
    fallback_response,
    new_id,
    sampling_options,
    sse,
    stream_generation,
    wire_usage,
)
from ._state import ServerState
from ._validation import chat_messages, check_chat_options, check_sampling
from .protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    DeltaMessage,
    ResponseMessage,
    UsageInfo,
)

if TYPE_CHECKING:
    from ..runtime import FinishReason

__all__ = ["create_chat_completion"]


async def create_chat_completion(state: ServerState, body: ChatCompletionRequest) -> Any:
    """A :class:`ChatCompletionResponse`, a fallback ``JSONResponse``, or an event stream."""
    max_tokens = body.max_completion_tokens or body.max_tokens
    params = check_sampling(body, state, max_tokens)
    check_chat_options(body)
    messages = chat_messages(body, state)
    role, adapter = await state.select_model(body.model, body.adapter, kind="chat")
    options = sampling_options(params, role, adapter)
    completion_id = new_id("chatcmpl")
    if body.stream:

        async def prepare(_: RuntimeAPI) -> Prompt:
            return messages

        return await stream_generation(
            state,
            ChatChunks(completion_id, body.model),
            prepare,
            options,
            endpoint="chat",
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
        )
    try:
        runtime = state.require_runtime()
        generation = await runtime.agenerate(messages, **options)
    except LLMRuntimeError as err:
        reply = fallback_or_raise(state, err)
        response = _response(
            completion_id, body.model, reply, "stop", NO_USAGE, fingerprint=FALLBACK_FINGERPRINT
        )
        return fallback_response(response, err)
    if state.metrics is not None:
        usage = generation.usage
        state.metrics.generated("chat", usage.prompt_tokens, usage.completion_tokens)
    return _response(
        completion_id,
        body.model,
        generation.text,
        generation.finish_reason,
        wire_usage(generation.usage),
    )


def _response(
    completion_id: str,
    model: str,
    text: str,
    finish_reason: FinishReason,
    usage: UsageInfo,
    *,
    fingerprint: str | None = None,
) -> ChatCompletionResponse:
    return ChatCompletionResponse(
        id=completion_id,
        model=model,
        choices=[
            ChatCompletionChoice(
                index=0, message=ResponseMessage(content=text), finish_reason=finish_reason
            )
        ],
        usage=usage,
        system_fingerprint=fingerprint,
    )


@dataclass(frozen=True)
class ChatChunks:
    """``chat.completion.chunk`` events (a :class:`~._serving.ChunkFormat`)."""

    completion_id: str
    model: str
    fallback: bool = False

    def as_fallback(self) -> ChatChunks:
        return replace(self, fallback=True)

    def opening(self) -> list[str]:
        return [self._chunk(DeltaMessage(role="assistant", content=""))]

    def text(self, text: str) -> str:
        return self._chunk(DeltaMessage(content=text))

    def finish(self, reason: FinishReason) -> str:
        return self._chunk(DeltaMessage(), reason)

    def usage(self, usage: UsageInfo) -> str:
        return sse(
            ChatCompletionChunk(
                id=self.completion_id,
                model=self.model,
                choices=[],
                usage=usage,
                system_fingerprint=self._fingerprint,
            )
        )

    @property
    def _fingerprint(self) -> str | None:
        return FALLBACK_FINGERPRINT if self.fallback else None

    def _chunk(self, delta: DeltaMessage, finish: FinishReason | None = None) -> str:
        return sse(
            ChatCompletionChunk(
                id=self.completion_id,
                model=self.model,
                choices=[ChatCompletionChunkChoice(index=0, delta=delta, finish_reason=finish)],
                system_fingerprint=self._fingerprint,
            )
        )
