"""Dataset hygiene: parse, check and tokenise training records before any training.

Two record formats, one per file:

- ``{"prompt": str, "completion": str}`` — the loss covers the completion (and
  the EOS token appended to it);
- ``{"messages": [{"role": ..., "content": ...}, ...]}`` — rendered with the
  tokenizer's chat template; the loss covers the assistant turns only.

Every bad line is collected with its number and reason, so a user fixes the
whole file in one pass. Only the tokenizer is needed here (no model, no GPU).
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .._fs import atomic_write_json
from ..errors import DatasetError

__all__ = [
    "DatasetProblem",
    "DatasetSummary",
    "EncodedExample",
    "LengthStats",
    "load_examples",
    "validate_dataset",
]

IGNORE_INDEX = -100
#: chat formats, and the embedding objectives' (``pairs``: contrastive, ``texts``: simcse)
RecordFormat = Literal["prompt_completion", "chat", "pairs", "texts"]
Overlong = Literal["error", "truncate"]
CHAT_ROLES = ("system", "user", "assistant", "tool")
MAX_LISTED_PROBLEMS = 50


class DatasetProblem(BaseModel):
    """One bad record: where (1-based line, or row for Hub datasets) and why."""

    model_config = ConfigDict(frozen=True)

    line: int | None
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}" if self.line is not None else self.reason


class LengthStats(BaseModel):
    """min/mean/p50/p95/max of a length distribution (``None`` when empty)."""

    count: int = 0
    min: float | None = None
    mean: float | None = None
    p50: float | None = None
    p95: float | None = None
    max: float | None = None

    @classmethod
    def of(cls, values: Sequence[int]) -> LengthStats:
        if not values:
            return cls()
        ordered = sorted(values)
        return cls(
            count=len(ordered),
            min=ordered[0],
            mean=round(sum(ordered) / len(ordered), 3),
            p50=_percentile(ordered, 50),
            p95=_percentile(ordered, 95),
            max=ordered[-1],
        )


class DatasetSummary(BaseModel):
    """What :func:`validate_dataset` found; written as ``dataset_summary.json``.

    ``lines_total == rows_valid + rows_invalid + lines_blank`` always holds;
    ``rows_skipped`` counts the invalid rows dropped by ``skip_invalid``.
    ``prompt`` lengths cover everything the loss ignores (chat: system/user
    turns and template markup), ``completion`` what it trains on.
    """

    source: str
    format: RecordFormat | None = None
    lines_total: int = 0
    lines_blank: int = 0
    rows_valid: int = 0
    rows_invalid: int = 0
    rows_skipped: int = 0
    rows_truncated: int = 0
    duplicates: int = 0
    duplicate_ratio: float = 0.0
    problems: list[DatasetProblem] = Field(default_factory=list)
    max_seq_len: int | None = None
    tokenizer: str | None = None
    chars: dict[str, LengthStats] = Field(default_factory=dict)
    tokens: dict[str, LengthStats] | None = None
    trainable_tokens: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write_json(path, self.model_dump(mode="json"))
        return path


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


@dataclass
class _Scan:
    summary: DatasetSummary
    examples: list[EncodedExample] = field(default_factory=list)


class _RowProblem(Exception):
    pass


# --------------------------------------------------------------------- public
def validate_dataset(
    path: str | Path,
    *,
    tokenizer: Any = None,
    max_seq_len: int | None = None,
    skip_invalid: bool = False,
    overlong: Overlong = "error",
    summary_path: str | Path | None = None,
    max_line_bytes: int | None = None,
) -> DatasetSummary:
    """Check a JSONL dataset and return its :class:`DatasetSummary`.

    ``tokenizer`` (a tokenizer object, or a model/tokenizer directory or Hub id)
    enables the token checks: chat template rendering, ``max_seq_len``, token
    statistics and trainable-token counts. Without ``skip_invalid`` any problem
    raises :class:`DatasetError` listing every bad line at once (after writing
    ``summary_path`` when given); with it, bad lines are counted and skipped.
    The file is streamed; a line longer than ``max_line_bytes`` (default: the
    ``dataset_max_line_bytes`` setting) is a bad line.
    """
    rows = _open_jsonl(Path(path), max_line_bytes)
    tok = _load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    scan = _scan(
        rows,
        source=str(path),
        tokenizer=tok,
        max_seq_len=max_seq_len,
        overlong=overlong,
    )
    return _finish(scan, skip_invalid=skip_invalid, summary_path=summary_path).summary


def load_examples(
    rows: Iterable[tuple[int, Any]],
    *,
    source: str,
    tokenizer: Any,
    max_seq_len: int | None,
    skip_invalid: bool = False,
    overlong: Overlong = "error",
    summary_path: str | Path | None = None,
) -> tuple[DatasetSummary, list[EncodedExample]]:
    """Validate and tokenise ``rows`` (``(line, raw)`` pairs) for training."""
    scan = _scan(
        rows, source=source, tokenizer=tokenizer, max_seq_len=max_seq_len, overlong=overlong
    )
    scan = _finish(scan, skip_invalid=skip_invalid, summary_path=summary_path)
    return scan.summary, scan.examples


def read_jsonl_rows(
    path: str | Path, *, max_line_bytes: int | None = None, flag: str = "--dataset-path"
) -> Iterator[tuple[int, Any]]:
    """``(line_number, text)`` for every line of a JSONL file, streamed (parsed later, per line).

    The file is opened and checked (exists, a regular file) at once; lines are
    read as they are consumed, split on newlines only (see :func:`_jsonl_lines`).
    """
    return _open_jsonl(Path(path), max_line_bytes, flag=flag)


def hub_rows(dataset: Iterable[Mapping[str, Any]]) -> list[tuple[int, Any]]:
    """``(row_number, record)`` for the rows of a Hugging Face dataset split."""
    return [(index, dict(row)) for index, row in enumerate(dataset, start=1)]


# ------------------------------------------------------------------- scanning
def _open_jsonl(
    path: Path, max_line_bytes: int | None = None, *, flag: str = "--dataset-path"
) -> Iterator[tuple[int, str | _LineTooLong]]:
    """Check ``path`` is a readable regular file now; stream its lines lazily."""
    limit = _max_line_bytes() if max_line_bytes is None else max_line_bytes
    os.close(_open_regular(path, flag))  # fail here, before any work, not at the first row
    return _jsonl_lines(path, flag, limit)


def _open_regular(path: Path, flag: str) -> int:
    """A read-only descriptor of ``path``, refused unless it is a regular file."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer before it can be refused
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError as err:
        raise DatasetError(
            f"dataset file {path} does not exist; pass {flag} with a JSONL file"
        ) from err
    except OSError as err:
        raise DatasetError(
            f"cannot read the dataset file {path}: {err.strerror or err}; pass {flag} with a "
            "readable JSONL file"
        ) from err
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise DatasetError(
            f"dataset path {path} is {_file_kind(mode)}, not a regular file; pass {flag} "
            "with a JSONL file"
        )
    return fd


def _jsonl_lines(path: Path, flag: str, limit: int) -> Iterator[tuple[int, str | _LineTooLong]]:
    r"""``(line_number, text)`` pairs, split on ``\n`` only (``\r\n`` tolerated).

    Unicode line separators (U+2028, U+2029, U+0085) are ordinary characters
    inside JSON strings, so ``str.splitlines`` would cut valid records apart. At
    most ``limit`` bytes of a line are held in memory; a longer line is read
    through and reported as a :class:`_LineTooLong` row.
    """
    with os.fdopen(_open_regular(path, flag), "rb") as handle:
        number = 0
        while True:
            data = handle.readline(limit + 1)
            if not data:
                return
            number += 1
            if len(data) > limit and not data.endswith(b"\n"):
                while data and not data.endswith(b"\n"):  # skip the rest of the line
                    data = handle.readline(1 << 20)
                yield number, _LineTooLong(limit)
                continue
            data = data[:-1] if data.endswith(b"\n") else data
            data = data[:-1] if data.endswith(b"\r") else data
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DatasetError(
                    f"dataset file {path} is not UTF-8 text (line {number}, byte {err.start + 1}): "
                    f"{err.reason}; convert it to UTF-8"
                ) from err
            if number == 1 and text.startswith("\ufeff"):
                text = text[1:]  # a UTF-8 byte order mark
            yield number, text


@dataclass(frozen=True)
class _LineTooLong:
    """Stands in for a line longer than the limit (its text is never held)."""

    limit: int


def _max_line_bytes() -> int:
    from ..settings import get_settings

    return get_settings().dataset_max_line_bytes


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _scan(
    rows: Iterable[tuple[int, Any]],
    *,
    source: str,
    tokenizer: Any,
    max_seq_len: int | None,
    overlong: Overlong,
) -> _Scan:
    summary = DatasetSummary(
        source=source,
        max_seq_len=max_seq_len,
        tokenizer=getattr(tokenizer, "name_or_path", None) if tokenizer is not None else None,
    )
    scan = _Scan(summary)
    file_format: RecordFormat | None = None
    format_line: int | None = None
    seen: set[str] = set()
    chars: dict[str, list[int]] = {"prompt": [], "completion": [], "total": []}
    tokens: dict[str, list[int]] = {"prompt": [], "completion": [], "total": []}
    problems: list[DatasetProblem] = []
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is None:
        problems.append(DatasetProblem(line=None, reason="the tokenizer has no EOS token"))

    for line, raw in rows:
        raw = decode_line(raw, line, summary, problems)
        if raw is SKIP:
            continue
        try:
            kind = _detect_format(raw)
            if file_format is not None and kind != file_format:
                raise _RowProblem(
                    f"mixed formats: this row is {_FORMAT_NAMES[kind]} but line {format_line} "
                    f"is {_FORMAT_NAMES[file_format]}; use one format per file"
                )
            if file_format is None:
                file_format, format_line = kind, line
            record = _parse_record(kind, raw)
            if tokenizer is not None:
                example = _encode(kind, record, line, tokenizer, max_seq_len, overlong)
            else:
                example = None
        except _RowProblem as err:
            problems.append(DatasetProblem(line=line, reason=str(err)))
            summary.rows_invalid += 1
            continue

        summary.rows_valid += 1
        key = json.dumps(record, sort_keys=True, ensure_ascii=False)
        if key in seen:
            summary.duplicates += 1
        seen.add(key)
        prompt_chars, completion_chars = _char_lengths(kind, record)
        chars["prompt"].append(prompt_chars)
        chars["completion"].append(completion_chars)
        chars["total"].append(prompt_chars + completion_chars)
        if example is not None:
            scan.examples.append(example)
            trainable = example.trainable_tokens
            tokens["prompt"].append(len(example.input_ids) - trainable)
            tokens["completion"].append(trainable)
            tokens["total"].append(len(example.input_ids))
            summary.rows_truncated += int(example.truncated)

    summary.format = file_format
    summary.problems = problems
    summary.duplicate_ratio = (
        round(summary.duplicates / summary.rows_valid, 6) if summary.rows_valid else 0.0
    )
    summary.chars = {name: LengthStats.of(values) for name, values in chars.items()}
    if tokenizer is not None:
        summary.tokens = {name: LengthStats.of(values) for name, values in tokens.items()}
        summary.trainable_tokens = sum(tokens["completion"])
    return scan


#: what :func:`decode_line` returns for a line that holds no record
SKIP: Any = object()


def decode_line(
    raw: str | Any, line: int, summary: DatasetSummary, problems: list[DatasetProblem]
) -> Any:
    """One line read from a dataset -> its JSON value, or :data:`SKIP` for a blank line
    (counted) or one that is too long or not JSON (counted invalid, a problem recorded).
    Rows given as Python objects pass through."""
    summary.lines_total += 1
    if isinstance(raw, _LineTooLong):
        problems.append(
            DatasetProblem(
                line=line,
                reason=f"line longer than {raw.limit} bytes (the limit, setting "
                "MONGARS_DATASET_MAX_LINE_BYTES); shorten or split the record, or raise "
                "the limit",
            )
        )
        summary.rows_invalid += 1
        return SKIP
    if isinstance(raw, str):
        if not raw.strip():
            summary.lines_blank += 1
            return SKIP
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as err:
            problems.append(DatasetProblem(line=line, reason=_json_problem(err)))
            summary.rows_invalid += 1
            return SKIP
    return raw


def _json_problem(err: ValueError | RecursionError) -> str:
    if isinstance(err, json.JSONDecodeError):
        return f"invalid JSON: {err.msg} (column {err.colno})"
    if isinstance(err, RecursionError):
        return "invalid JSON: nested too deeply to parse; flatten the record"
    return f"invalid JSON: {err}"  # e.g. an integer with more digits than Python converts


def _finish(scan: _Scan, *, skip_invalid: bool, summary_path: str | Path | None) -> _Scan:
    summary = scan.summary
    file_level = [p for p in summary.problems if p.line is None]
    if skip_invalid and not file_level:
        summary.rows_skipped = summary.rows_invalid
    if summary_path is not None:
        summary.write(summary_path)
    if summary.rows_valid == 0 and not summary.problems:
        raise DatasetError(
            f"{summary.source}: no records found; expected JSON lines with "
            '{"prompt", "completion"} or {"messages": [...]}',
            [],
        )
    if summary.problems and not (skip_invalid and not file_level):
        err = DatasetError(_problem_message(summary), summary.problems)
        err.summary = summary  # type: ignore[attr-defined]
        raise err
    if summary.rows_valid == 0:
        err = DatasetError(f"{summary.source}: every record is invalid", summary.problems)
        err.summary = summary  # type: ignore[attr-defined]
        raise err
    return scan


def _problem_message(summary: DatasetSummary) -> str:
    listed = [f"  {problem}" for problem in summary.problems[:MAX_LISTED_PROBLEMS]]
    more = len(summary.problems) - len(listed)
    if more > 0:
        listed.append(f"  ... and {more} more (all of them in dataset_summary.json)")
    return (
        f"{summary.source}: {summary.rows_invalid or len(summary.problems)} invalid record(s) "
        f"out of {summary.lines_total} line(s); fix them or pass --skip-invalid to drop them:\n"
        + "\n".join(listed)
    )


# ------------------------------------------------------------------- records
_FORMAT_NAMES = {"prompt_completion": "prompt/completion", "chat": "chat ('messages')"}


def _detect_format(raw: Any) -> RecordFormat:
    if not isinstance(raw, dict):
        raise _RowProblem(f"expected a JSON object, got {_type_name(raw)}")
    has_chat = "messages" in raw
    has_pc = "prompt" in raw or "completion" in raw
    if has_chat and has_pc:
        raise _RowProblem("a record has either 'messages' or 'prompt'/'completion', not both")
    if has_chat:
        return "chat"
    if not has_pc:
        raise _RowProblem(
            "missing field: expected 'prompt' and 'completion', or 'messages'"
            f" (found keys: {', '.join(sorted(raw)) or 'none'})"
        )
    return "prompt_completion"


def _parse_record(kind: RecordFormat, raw: dict[str, Any]) -> dict[str, Any]:
    if kind == "chat":
        return {"messages": _check_messages(raw["messages"])}
    record: dict[str, Any] = {}
    for name in ("prompt", "completion"):
        if name not in raw:
            raise _RowProblem(f"missing field {name!r}")
        value = raw[name]
        if not isinstance(value, str):
            raise _RowProblem(f"field {name!r} must be a string, got {_type_name(value)}")
        if not value.strip():
            raise _RowProblem(f"field {name!r} is empty")
        record[name] = value
    return record


def _check_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list):
        raise _RowProblem(f"field 'messages' must be a list, got {_type_name(messages)}")
    if not messages:
        raise _RowProblem("field 'messages' is empty")
    clean: list[dict[str, str]] = []
    previous: str | None = None
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _RowProblem(f"{where} must be an object, got {_type_name(message)}")
        role, content = message.get("role"), message.get("content")
        if role is None or content is None:
            missing = "role" if role is None else "content"
            raise _RowProblem(f"{where} is missing field {missing!r}")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise _RowProblem(
                f"{where} has unknown role {role!r}; known roles: {', '.join(CHAT_ROLES)}"
            )
        if not isinstance(content, str):
            raise _RowProblem(f"{where}.content must be a string, got {_type_name(content)}")
        if not content.strip():
            raise _RowProblem(f"{where} ({role}) has empty content")
        if role == "system" and index != 0:
            raise _RowProblem(f"{where}: a system message may only come first")
        if previous in (None, "system") and role != "system" and role != "user":
            raise _RowProblem(f"{where}: the conversation must start with a user turn, not {role}")
        if role in ("user", "assistant") and previous == role:
            raise _RowProblem(f"{where}: two {role} turns in a row; alternate user and assistant")
        if role == "tool" and previous not in ("assistant", "tool"):
            raise _RowProblem(f"{where}: a tool message must follow an assistant turn")
        clean.append({"role": role, "content": content})
        previous = role
    if not any(m["role"] == "assistant" for m in clean):
        raise _RowProblem("no assistant turn: there is nothing to train on")
    if clean[-1]["role"] != "assistant":
        raise _RowProblem(f"the last message is from {clean[-1]['role']}; end with the assistant")
    return clean


def _char_lengths(kind: RecordFormat, record: dict[str, Any]) -> tuple[int, int]:
    if kind == "prompt_completion":
        return len(record["prompt"]), len(record["completion"])
    prompt = sum(len(m["content"]) for m in record["messages"] if m["role"] != "assistant")
    completion = sum(len(m["content"]) for m in record["messages"] if m["role"] == "assistant")
    return prompt, completion


# ---------------------------------------------------------------- tokenising
def _encode(
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
            raise _RowProblem(
                f"too long: {len(input_ids)} tokens > max_seq_len={max_seq_len}; shorten the "
                "record, raise max_seq_len, or set overlong='truncate'"
            )
        input_ids, labels, truncated = input_ids[:max_seq_len], labels[:max_seq_len], True
    example = EncodedExample(line=line, input_ids=input_ids, labels=labels, truncated=truncated)
    if example.trainable_tokens == 0:
        if truncated:
            raise _RowProblem(
                f"no trainable tokens left after truncation to max_seq_len={max_seq_len}: the "
                "completion starts beyond the limit; shorten the prompt or raise max_seq_len"
            )
        raise _RowProblem("no trainable tokens: the completion tokenises to nothing")
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
        raise _RowProblem(f"the chat template failed to render: {err}") from err
    if not isinstance(text, str):
        raise _RowProblem("the chat template did not render to text")
    return text


def _chat_segments(messages: list[dict[str, str]], tokenizer: Any) -> list[tuple[list[int], bool]]:
    if not getattr(tokenizer, "chat_template", None):
        raise _RowProblem(
            "the tokenizer has no chat template; use prompt/completion records or a "
            "tokenizer with a chat template"
        )
    full = _render(tokenizer, messages, generation_prompt=False)
    if not full.strip():
        raise _RowProblem("the chat template rendered an empty text")
    # character spans of the assistant turns: between the generation prompt that
    # precedes each one and the end of the rendered turn (end-of-turn token included)
    spans: list[tuple[int, int]] = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:index], generation_prompt=True) if index else ""
        upto = _render(tokenizer, messages[: index + 1], generation_prompt=False)
        if not (full.startswith(upto) and upto.startswith(before)) or len(upto) <= len(before):
            raise _RowProblem(
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
def _load_tokenizer(name_or_path: str | Path, revision: str | None = None) -> Any:
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


def _percentile(ordered: Sequence[int], q: float) -> float:
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    value = ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
    return round(float(value), 3)


def _type_name(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)
