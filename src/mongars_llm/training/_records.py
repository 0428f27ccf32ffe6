"""One chat record: its format, its checks, its tokens and labels.

:func:`detect_format` and :func:`parse_record` read a JSON value as a
``prompt``/``completion`` or ``messages`` record (a :class:`RowProblem` says
what is wrong with it); :func:`encode_record` renders and tokenises it into an
:class:`EncodedExample` whose labels cover the completion (and its EOS) or the
assistant turns only. :mod:`._data` runs these over a whole file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..errors import DatasetError

__all__ = [
    "CHAT_ROLES",
    "IGNORE_INDEX",
    "EncodedExample",
    "Overlong",
    "RecordFormat",
    "RowProblem",
    "char_lengths",
    "detect_format",
    "encode_record",
    "load_tokenizer",
    "parse_record",
    "type_name",
]

IGNORE_INDEX = -100
#: chat formats, and the embedding objectives' (``pairs``: contrastive, ``texts``: simcse)
RecordFormat = Literal["prompt_completion", "chat", "pairs", "texts"]
Overlong = Literal["error", "truncate"]
CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass
class EncodedExample:
    """A tokenised record: ``labels`` is ``-100`` wherever no loss is taken."""

    line: int
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def trainable_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


class RowProblem(Exception):
    """What is wrong with one record (its line is added by the caller)."""


# ------------------------------------------------------------------- records
FORMAT_NAMES = {"prompt_completion": "prompt/completion", "chat": "chat ('messages')"}


def detect_format(raw: Any) -> RecordFormat:
    if not isinstance(raw, dict):
        raise RowProblem(f"expected a JSON object, got {type_name(raw)}")
    has_chat = "messages" in raw
    has_pc = "prompt" in raw or "completion" in raw
    if has_chat and has_pc:
        raise RowProblem("a record has either 'messages' or 'prompt'/'completion', not both")
    if has_chat:
        return "chat"
    if not has_pc:
        raise RowProblem(
            "missing field: expected 'prompt' and 'completion', or 'messages'"
            f" (found keys: {', '.join(sorted(raw)) or 'none'})"
        )
    return "prompt_completion"


def parse_record(kind: RecordFormat, raw: dict[str, Any]) -> dict[str, Any]:
    if kind == "chat":
        return {"messages": _check_messages(raw["messages"])}
    record: dict[str, Any] = {}
    for name in ("prompt", "completion"):
        if name not in raw:
            raise RowProblem(f"missing field {name!r}")
        value = raw[name]
        if not isinstance(value, str):
            raise RowProblem(f"field {name!r} must be a string, got {type_name(value)}")
        if not value.strip():
            raise RowProblem(f"field {name!r} is empty")
        record[name] = value
    return record


def _check_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list):
        raise RowProblem(f"field 'messages' must be a list, got {type_name(messages)}")
    if not messages:
        raise RowProblem("field 'messages' is empty")
    clean: list[dict[str, str]] = []
    previous: str | None = None
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise RowProblem(f"{where} must be an object, got {type_name(message)}")
        role, content = message.get("role"), message.get("content")
        if role is None or content is None:
            missing = "role" if role is None else "content"
            raise RowProblem(f"{where} is missing field {missing!r}")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise RowProblem(
                f"{where} has unknown role {role!r}; known roles: {', '.join(CHAT_ROLES)}"
            )
        if not isinstance(content, str):
            raise RowProblem(f"{where}.content must be a string, got {type_name(content)}")
        if not content.strip():
            raise RowProblem(f"{where} ({role}) has empty content")
        if role == "system" and index != 0:
            raise RowProblem(f"{where}: a system message may only come first")
        if previous in (None, "system") and role != "system" and role != "user":
            raise RowProblem(f"{where}: the conversation must start with a user turn, not {role}")
        if role in ("user", "assistant") and previous == role:
            raise RowProblem(f"{where}: two {role} turns in a row; alternate user and assistant")
        if role == "tool" and previous not in ("assistant", "tool"):
            raise RowProblem(f"{where}: a tool message must follow an assistant turn")
        clean.append({"role": role, "content": content})
        previous = role
    if not any(m["role"] == "assistant" for m in clean):
        raise RowProblem("no assistant turn: there is nothing to train on")
    if clean[-1]["role"] != "assistant":
        raise RowProblem(f"the last message is from {clean[-1]['role']}; end with the assistant")
    return clean


def char_lengths(kind: RecordFormat, record: dict[str, Any]) -> tuple[int, int]:
    if kind == "prompt_completion":
        return len(record["prompt"]), len(record["completion"])
    prompt = sum(len(m["content"]) for m in record["messages"] if m["role"] != "assistant")
    completion = sum(len(m["content"]) for m in record["messages"] if m["role"] == "assistant")
    return prompt, completion


# ---------------------------------------------------------------- tokenising
def encode_record(
    kind: RecordFormat,
    record: dict[str, Any],
    line: int,
    tokenizer: Any,
    max_seq_len: int | None,
    overlong: Overlong,
) -> EncodedExample:
    segments = (
        _prompt_completion_segments(record, tokenizer)
        if kind == "prompt_completion"
        else _chat_segments(record["messages"], tokenizer)
    )
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, trainable in segments:
        input_ids.extend(ids)
        labels.extend(ids if trainable else [IGNORE_INDEX] * len(ids))
    truncated = False
    if max_seq_len is not None and len(input_ids) > max_seq_len:
        if overlong == "error":
            raise RowProblem(
                f"too long: {len(input_ids)} tokens > max_seq_len={max_seq_len}; shorten the "
                "record, raise max_seq_len, or set overlong='truncate'"
            )
        input_ids, labels, truncated = input_ids[:max_seq_len], labels[:max_seq_len], True
    example = EncodedExample(line=line, input_ids=input_ids, labels=labels, truncated=truncated)
    if example.trainable_tokens == 0:
        if truncated:
            raise RowProblem(
                f"no trainable tokens left after truncation to max_seq_len={max_seq_len}: the "
                "completion starts beyond the limit; shorten the prompt or raise max_seq_len"
            )
        raise RowProblem("no trainable tokens: the completion tokenises to nothing")
    return example


def _prompt_completion_segments(
    record: dict[str, Any], tokenizer: Any
) -> list[tuple[list[int], bool]]:
    prompt = tokenizer(record["prompt"], add_special_tokens=True, verbose=False)["input_ids"]
    completion = tokenizer(record["completion"], add_special_tokens=False, verbose=False)[
        "input_ids"
    ]
    eos = tokenizer.eos_token_id
    if eos is not None and (not completion or completion[-1] != eos):
        completion = [*completion, eos]  # kept as a label even when pad == eos
    return [(list(prompt), False), (list(completion), True)]


def _render(tokenizer: Any, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as err:  # template errors come as jinja2/ValueError/TypeError
        raise RowProblem(f"the chat template failed to render: {err}") from err
    if not isinstance(text, str):
        raise RowProblem("the chat template did not render to text")
    return text


def _chat_segments(messages: list[dict[str, str]], tokenizer: Any) -> list[tuple[list[int], bool]]:
    if not getattr(tokenizer, "chat_template", None):
        raise RowProblem(
            "the tokenizer has no chat template; use prompt/completion records or a "
            "tokenizer with a chat template"
        )
    full = _render(tokenizer, messages, generation_prompt=False)
    if not full.strip():
        raise RowProblem("the chat template rendered an empty text")
    # character spans of the assistant turns: between the generation prompt that
    # precedes each one and the end of the rendered turn (end-of-turn token included)
    spans: list[tuple[int, int]] = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:index], generation_prompt=True) if index else ""
        upto = _render(tokenizer, messages[: index + 1], generation_prompt=False)
        if not (full.startswith(upto) and upto.startswith(before)) or len(upto) <= len(before):
            raise RowProblem(
                "the chat template is not prefix-stable (rendering the first turns does not "
                "give a prefix of the whole conversation), so assistant tokens cannot be located"
            )
        spans.append((len(before), len(upto)))
    segments: list[tuple[list[int], bool]] = []
    cursor = 0
    for start, end in spans:
        if start > cursor:
            segments.append((_ids(tokenizer, full[cursor:start]), False))
        segments.append((_ids(tokenizer, full[start:end]), True))
        cursor = end
    if cursor < len(full):
        segments.append((_ids(tokenizer, full[cursor:]), False))
    return segments


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


# ------------------------------------------------------------------- helpers
def load_tokenizer(name_or_path: str | Path, revision: str | None = None) -> Any:
    from transformers import AutoTokenizer

    from .._sources import check_model_source, hub_unreachable_reason

    source = check_model_source(name_or_path, what="base model")  # a missing folder: no Hub id
    if not Path(source).expanduser().exists():  # a Hub id: the cache first, then the Hub
        try:
            return AutoTokenizer.from_pretrained(source, revision=revision, local_files_only=True)
        except (OSError, ValueError):
            pass
        reason = hub_unreachable_reason()
        if reason is not None:  # fail now, not after a minute of retries
            raise DatasetError(
                f"the dataset check needs the tokenizer of base model {source!r}, which is "
                f"not in the Hugging Face cache, and the Hub cannot be reached ({reason}); "
                f"fetch it once with `hf download {source} --include 'tokenizer*' '*.json'` "
                "(or `mongars-llm provision`), or give --base-model a local checkpoint folder"
            )
    try:
        return AutoTokenizer.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as err:
        detail = " ".join(str(err).split())  # one line
        raise DatasetError(f"cannot load a tokenizer from {name_or_path}: {detail}") from err


def type_name(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)
