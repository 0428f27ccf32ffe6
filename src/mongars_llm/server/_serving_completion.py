"""``POST /v1/completions``: raw prompts (no chat template), one choice per prompt.

Token-id prompts are checked against the loaded vocabulary and decoded to
text (the runtime tokenizes text itself); several prompts run concurrently and
share the runtime's micro-batches; ``stream=true`` takes a single prompt.
Fallback and streaming follow :mod:`._serving`.
"""

from __future__ import annotations

import asyncio
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
)
from ._state import ServerState
from ._validation import (
    Item,
    check_completion_options,
    check_sampling,
    check_token_ids,
    completion_prompts,
    unsupported,
)
from .protocol import CompletionChoice, CompletionRequest, CompletionResponse, UsageInfo

if TYPE_CHECKING:
    from ..runtime import FinishReason

__all__ = ["create_completion"]


async def create_completion(state: ServerState, body: CompletionRequest) -> Any:
    """A :class:`CompletionResponse`, a fallback ``JSONResponse``, or an event stream."""
    params = check_sampling(body, state, body.max_tokens)
    check_completion_options(body)
    prompts = completion_prompts(body, state)
    role, adapter = await state.select_model(body.model, body.adapter, kind="chat")
    options = sampling_options(params, role, adapter)
    completion_id = new_id("cmpl")
    if body.stream:
        if len(prompts) != 1:
            raise unsupported("prompt", "stream=true takes a single prompt")

        async def prepare(runtime: RuntimeAPI) -> Prompt:
            (text,) = await _prompt_texts(runtime, prompts)
            return text

        return await stream_generation(
            state,
            CompletionChunks(completion_id, body.model),
            prepare,
            options,
            echo=body.echo,
            endpoint="completion",
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
        )
    try:
        runtime = state.require_runtime()
        texts = await _prompt_texts(runtime, prompts)
        generations = await asyncio.gather(*(runtime.agenerate(t, **options) for t in texts))
    except LLMRuntimeError as err:
        reply = fallback_or_raise(state, err)
        response = CompletionResponse(
            id=completion_id,
            model=body.model,
            choices=[
                CompletionChoice(index=i, text=reply, finish_reason="stop")
                for i in range(len(prompts))
            ],
            usage=NO_USAGE,
            system_fingerprint=FALLBACK_FINGERPRINT,
        )
        return fallback_response(response, err)
    prompt_tokens = sum(g.usage.prompt_tokens for g in generations)
    completion_tokens = sum(g.usage.completion_tokens for g in generations)
    if state.metrics is not None:
        state.metrics.generated("completion", prompt_tokens, completion_tokens)
    return CompletionResponse(
        id=completion_id,
        model=body.model,
        choices=[
            CompletionChoice(
                index=i,
                text=(texts[i] + g.text) if body.echo else g.text,
                finish_reason=g.finish_reason,
            )
            for i, g in enumerate(generations)
        ],
        usage=UsageInfo(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        ),
    )


async def _prompt_texts(runtime: RuntimeAPI, prompts: list[Item]) -> list[str]:
    """The prompts as text: token ids checked against the vocabulary (422), then
    decoded with their special tokens (off the event loop)."""
    check_token_ids(prompts, runtime, "prompt")
    return await asyncio.to_thread(_decode, runtime, prompts)


def _decode(runtime: RuntimeAPI, prompts: list[Item]) -> list[str]:
    return [
        p if isinstance(p, str) else runtime.tokenizer.decode(p, skip_special_tokens=False)
        for p in prompts
    ]


@dataclass(frozen=True)
class CompletionChunks:
    """``text_completion`` events (a :class:`~._serving.ChunkFormat`)."""

    completion_id: str
    model: str
    fallback: bool = False

    def as_fallback(self) -> CompletionChunks:
        return replace(self, fallback=True)

    def opening(self) -> list[str]:
        return []

    def text(self, text: str) -> str:
        return self._event([CompletionChoice(index=0, text=text, finish_reason=None)])

    def finish(self, reason: FinishReason) -> str:
        return self._event([CompletionChoice(index=0, text="", finish_reason=reason)])

    def usage(self, usage: UsageInfo) -> str:
        return self._event([], usage)

    def _event(self, choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
        return sse(
            CompletionResponse(
                id=self.completion_id,
                model=self.model,
                choices=choices,
                usage=usage,
                system_fingerprint=FALLBACK_FINGERPRINT if self.fallback else None,
            )
        )
