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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .._fs import atomic_write_json
from ..errors import DatasetError
from ._jsonl import LineTooLong, open_jsonl
from ._records import (
    FORMAT_NAMES,
    IGNORE_INDEX,
    EncodedExample,
    Overlong,
    RecordFormat,
    RowProblem,
    char_lengths,
    detect_format,
    encode_record,
    load_tokenizer,
    parse_record,
)

__all__ = [
    "IGNORE_INDEX",
    "DatasetProblem",
    "DatasetSummary",
    "EncodedExample",
    "LengthStats",
    "load_examples",
    "validate_dataset",
]

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
class _Scan:
    summary: DatasetSummary
    examples: list[EncodedExample] = field(default_factory=list)


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
    rows = open_jsonl(Path(path), max_line_bytes)
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
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
            kind = detect_format(raw)
            if file_format is not None and kind != file_format:
                raise RowProblem(
                    f"mixed formats: this row is {FORMAT_NAMES[kind]} but line {format_line} "
                    f"is {FORMAT_NAMES[file_format]}; use one format per file"
                )
            if file_format is None:
                file_format, format_line = kind, line
            record = parse_record(kind, raw)
            if tokenizer is not None:
                example = encode_record(kind, record, line, tokenizer, max_seq_len, overlong)
            else:
                example = None
        except RowProblem as err:
            problems.append(DatasetProblem(line=line, reason=str(err)))
            summary.rows_invalid += 1
            continue

        summary.rows_valid += 1
        key = json.dumps(record, sort_keys=True, ensure_ascii=False)
        if key in seen:
            summary.duplicates += 1
        seen.add(key)
        prompt_chars, completion_chars = char_lengths(kind, record)
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
    if isinstance(raw, LineTooLong):
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


def _percentile(ordered: Sequence[int], q: float) -> float:
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    value = ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
    return round(float(value), 3)
