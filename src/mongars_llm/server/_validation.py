"""Request checks that pydantic cannot make: server bounds, unsupported OpenAI options,
values the sampler cannot use, and token ids outside the loaded vocabulary.

:mod:`.protocol` already refuses wrong types and out-of-range values (422).
What is checked here depends on the server's settings or the loaded model, or
is an OpenAI option this server does not implement: each failure is an
:class:`~._errors.APIError` naming the field, raised before the runtime is
called, so a client error is never answered with the fallback reply. The
sampling values are checked by the runtime's own
:class:`~mongars_llm.runtime._params.SamplingParams` (one set of bounds): its
:class:`~mongars_llm.errors.InvalidInputError` is a 400 naming the field.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, cast

from ..errors import InvalidInputError
from ..runtime import SamplingParams
from ._errors import APIError
from ._runtime_api import RuntimeAPI
from ._state import ServerState
from .protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, EmbeddingRequest

__all__ = [
    "MAX_STOP",
    "Item",
    "chat_messages",
    "check_chars",
    "check_chat_options",
    "check_completion_options",
    "check_dimensions",
    "check_sampling",
    "check_token_ids",
    "completion_prompts",
    "embedding_inputs",
    "unsupported",
]

#: the most stop sequences a request may give (OpenAI's limit)
MAX_STOP = 4

#: one prompt or embeddings input: a text or a list of token ids
Item = str | list[int]


def unsupported(param: str, message: str) -> APIError:
    """The 400 for an OpenAI option this server does not implement (never ignored,
    since ignoring it would change what the client gets)."""
    return APIError(400, message, code="unsupported", param=param)


# ----------------------------------------------------------------- sampling


def check_sampling(
    body: ChatCompletionRequest | CompletionRequest, state: ServerState, max_tokens: int | None
) -> SamplingParams:
    """The sampling fields of a chat or text completion, as the runtime's parameters
    (without the adapter, which the model name selects)."""
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
        raise unsupported(
            "n",
            f"n={body.n} is not supported: this server returns one choice per request; "
            "omit n (or send n=1) and make several requests",
        )
    if body.logit_bias:
        raise unsupported("logit_bias", "logit_bias is not supported by this server; omit it")
    try:
        params = SamplingParams(
            max_new_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
        )
    except InvalidInputError as err:
        raise APIError(400, str(err), code="invalid_value", param=err.param) from err
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
    return dataclasses.replace(params, stop=stop or None)


def check_chat_options(body: ChatCompletionRequest) -> None:
    """Chat options that would change the answer and are not implemented (400)."""
    if body.logprobs:
        raise unsupported("logprobs", "logprobs is not supported by this server; omit it")
    if body.top_logprobs:
        raise unsupported("top_logprobs", "top_logprobs is not supported by this server; omit it")
    for name in ("tools", "functions"):
        if getattr(body, name):
            raise unsupported(
                name,
                f"{name} are not supported: this server does not call tools; "
                f"omit {name} (and tool_choice)",
            )
    for name in ("tool_choice", "function_call"):
        choice = getattr(body, name)
        if choice is not None and choice != "none":
            raise unsupported(
                name,
                f"{name}={json.dumps(choice)} is not supported: this server does not call "
                f"tools; omit {name} or send 'none'",
            )
    response_format = body.response_format
    if response_format is not None and response_format.get("type") != "text":
        kind = response_format.get("type")
        raise unsupported(
            "response_format",
            f"response_format of type {json.dumps(kind)} is not supported: this server cannot "
            'constrain the output to JSON; omit response_format or send {"type": "text"}',
        )


def check_completion_options(body: CompletionRequest) -> None:
    """Text-completion options that are not implemented (400)."""
    if body.suffix is not None:
        raise unsupported("suffix", "suffix (insertion) is not supported; omit it")
    if body.logprobs is not None:
        raise unsupported("logprobs", "logprobs is not supported by this server; omit it")
    if body.best_of is not None and body.best_of != 1:
        raise unsupported("best_of", f"best_of={body.best_of} is not supported; omit it or send 1")


# ----------------------------------------------------------------- inputs


def chat_messages(body: ChatCompletionRequest, state: ServerState) -> list[dict[str, str]]:
    """The messages as the runtime takes them (text parts joined, ``developer`` read
    as ``system``), within the server's message and character limits."""
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


def _message_text(message: ChatMessage, index: int) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise unsupported(
                f"messages[{index}].content[{j}]",
                f"content part of type {part.type!r} is not supported; only 'text' parts are",
            )
        texts.append(part.text)
    return "".join(texts)


def completion_prompts(body: CompletionRequest, state: ServerState) -> list[Item]:
    """The prompts of a text completion, within MONGARS_SERVER_MAX_PROMPTS and the
    input limits (an empty text prompt is allowed)."""
    return _checked_items(
        body.prompt,
        state,
        "prompt",
        limit=state.config.max_prompts,
        env="MONGARS_SERVER_MAX_PROMPTS",
        allow_empty_text=True,
    )


def embedding_inputs(body: EmbeddingRequest, state: ServerState) -> list[Item]:
    """The inputs of an embeddings request, within MONGARS_SERVER_MAX_EMBEDDING_INPUTS
    and the input limits (an empty text is refused: it has nothing to pool)."""
    return _checked_items(
        body.input,
        state,
        "input",
        limit=state.config.max_embedding_inputs,
        env="MONGARS_SERVER_MAX_EMBEDDING_INPUTS",
        allow_empty_text=False,
    )


def _as_items(value: Any, param: str) -> list[Item]:
    """A string, a token-id list, or a list of either -> a list of items."""
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(v, int) for v in value):
        return [list(value)]
    items = cast("list[Item]", list(value))
    if not items:
        raise APIError(422, f"{param} cannot be an empty list", code="invalid_value", param=param)
    return items


def _checked_items(
    value: Any, state: ServerState, param: str, *, limit: int, env: str, allow_empty_text: bool
) -> list[Item]:
    items = _as_items(value, param)
    if len(items) > limit:
        raise APIError(
            413,
            f"{len(items)} {param}s is more than the limit of {limit} per request ({env}); "
            "split the request",
            code="too_many_inputs",
            param=param,
        )
    max_tokens = state.settings.model.max_input_tokens
    for i, item in enumerate(items):
        where = f"{param}[{i}]" if len(items) > 1 else param
        if isinstance(item, str):
            if not item and not allow_empty_text:
                raise APIError(
                    422, f"{where} is an empty string", code="invalid_value", param=where
                )
            check_chars(item, where, state)
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
    return items


def check_chars(text: str, where: str, state: ServerState) -> None:
    """A text within MONGARS_SERVER_MAX_INPUT_CHARS (413 otherwise)."""
    max_chars = state.config.max_input_chars
    if len(text) > max_chars:
        raise APIError(
            413,
            f"{where} has {len(text)} characters, more than the limit of {max_chars} "
            "(MONGARS_SERVER_MAX_INPUT_CHARS)",
            code="input_too_long",
            param=where,
        )


# ----------------------------------------------------------------- the loaded model


def check_token_ids(items: list[Item], runtime: RuntimeAPI, param: str) -> None:
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


def _vocab_size(runtime: RuntimeAPI) -> int | None:
    tokenizer = runtime.tokenizer
    if tokenizer is None:
        return None
    try:
        return len(tokenizer)
    except TypeError:
        return None


def check_dimensions(dimensions: int | None, runtime: RuntimeAPI) -> None:
    """``dimensions`` no larger than the model's hidden size (422 otherwise)."""
    hidden = runtime.hidden_size
    if dimensions is not None and hidden and dimensions > hidden:
        raise APIError(
            422,
            f"dimensions={dimensions} is larger than the model's {hidden} dimensions",
            code="invalid_value",
            param="dimensions",
        )
