"""The torch-free half of decoding: chat messages to prompt ids, the chat template
check at load, and the per-request state that every engine's generation shares.

:mod:`._generator` prepares requests with these (for both engines), so a process
that chats through the llama.cpp engine never imports torch or transformers; the
torch decoding loop (:mod:`._decoding`) and the llama.cpp one
(:mod:`._llamacpp`) consume :class:`RowState` / :class:`SamplingKey`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._chat_template import ChatTemplateError, check_chat_template, render_chat_template
from ..errors import GenerationError, InputTooLongError, InvalidInputError, ModelLoadError
from ._bounds import over_limit_prefix
from ._params import check_text
from ._types import GenerationStream

__all__ = [
    "RowState",
    "SamplingKey",
    "chat_template_of",
    "check_tokenizer_template",
    "messages_to_prompt_ids",
    "render_messages",
    "special_tokens",
]


def _as_message(message: Any, index: int) -> dict[str, Any]:
    if isinstance(message, Mapping):
        data = dict(message)
    elif hasattr(message, "model_dump"):
        data = message.model_dump(exclude_none=True)
    elif hasattr(message, "role") and hasattr(message, "content"):
        data = {"role": message.role, "content": message.content}
    else:
        raise InvalidInputError(
            f"messages[{index}] must be a mapping with 'role' and 'content', got {message!r:.80}",
            param="messages",
        )
    if not isinstance(data.get("role"), str) or not isinstance(data.get("content"), str):
        raise InvalidInputError(
            f"messages[{index}] needs a string 'role' and a string 'content'", param="messages"
        )
    check_text(data["content"], f"messages[{index}].content")
    return data


def messages_to_prompt_ids(
    tokenizer: Any,
    prompt_or_messages: Any,
    *,
    lock: threading.RLock | None = None,
    max_tokens: int | None = None,
) -> list[int]:
    """A plain prompt is tokenised as is; chat messages go through the chat template.

    The template is rendered within bounds (:mod:`mongars_llm._chat_template`),
    outside ``lock``; only tokenising holds it. With ``max_tokens``, a text far
    over the limit is refused (``InputTooLongError``) after tokenising a prefix
    of it, not the whole text (:mod:`._bounds`).
    """
    if isinstance(prompt_or_messages, str):
        if not prompt_or_messages.strip():
            raise InvalidInputError("the prompt is empty", param="prompt")
        check_text(prompt_or_messages, "prompt")
        text, special, param = prompt_or_messages, True, "prompt"
    else:
        text, special, param = render_messages(tokenizer, prompt_or_messages), False, "messages"
    with lock or contextlib.nullcontext():

        def count(part: str) -> int:
            return len(tokenizer(part, add_special_tokens=special)["input_ids"])

        if max_tokens is not None:
            over = over_limit_prefix(count, text, max_tokens)
            if over is not None:
                raise InputTooLongError(
                    f"the {param} has more than {max_tokens} tokens (its first {over[0]} "
                    f"characters alone hold {over[1]}), the limit "
                    "(MONGARS_MODEL__MAX_INPUT_TOKENS / the model's context); shorten it",
                    param="prompt_or_messages",
                )
        return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def render_messages(tokenizer: Any, messages: Any) -> str:
    """The chat template applied to ``messages`` (with the generation prompt)."""
    if not isinstance(messages, Sequence) or not messages:
        raise InvalidInputError(
            "pass a prompt string or a non-empty list of chat messages "
            "([{'role': 'user', 'content': '...'}])",
            param="prompt_or_messages",
        )
    chat = [_as_message(m, i) for i, m in enumerate(messages)]
    template = chat_template_of(tokenizer)
    if template is None:
        raise InvalidInputError(
            "this tokenizer has no chat template; pass a prompt string instead of messages",
            param="messages",
        )
    try:
        return render_chat_template(template, chat, **special_tokens(tokenizer))
    except ChatTemplateError as err:
        if err.refused:
            raise InvalidInputError(str(err), param="messages") from err
        raise GenerationError(str(err)) from err


def chat_template_of(tokenizer: Any) -> str | None:
    """The tokenizer's chat template (``"default"`` of a set of named ones), or None."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, Mapping):
        template = template.get("default")
    return template if isinstance(template, str) else None


def check_tokenizer_template(tokenizer: Any, source: str) -> None:
    """Test-render the tokenizer's chat template (if any) when a model loads:
    ``ModelLoadError`` for a broken one, instead of a server that freezes on the
    first chat request."""
    template = chat_template_of(tokenizer)
    if template is None:
        return
    try:
        check_chat_template(template, **special_tokens(tokenizer))
    except ChatTemplateError as err:
        raise ModelLoadError(f"cannot use the model {source!r}: {err}") from err


def special_tokens(tokenizer: Any) -> dict[str, Any]:
    """The names a chat template sees besides the messages (``bos_token``, …), as
    ``apply_chat_template`` passes them."""
    return dict(getattr(tokenizer, "special_tokens_map", None) or {})


@dataclass(frozen=True)
class SamplingKey:
    """Settings shared by every row of one ``generate`` call (the micro-batching key)."""

    mode: tuple[str, ...]
    do_sample: bool
    temperature: float | None
    top_p: float | None
    top_k: int | None
    repetition_penalty: float | None
    seed: int | None


@dataclass
class RowState:
    """The decoding state of one request inside a batch."""

    prompt_ids: list[int]
    max_new_tokens: int
    stop: tuple[str, ...]
    stream: GenerationStream | None
    ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    finished: bool = False
    finish_reason: str = "length"
