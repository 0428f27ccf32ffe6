"""Dataset hygiene for the embedding objectives: query/positive pairs and plain texts.

Two record formats, one per file (the objective says which):

- ``contrastive``: ``{"query": str, "positive": str}`` with an optional
  ``"negative"`` (a hard negative: a passage that looks relevant and is not)
  and an optional ``"instruction"`` (prepended to the query only, as LLM2Vec
  does; the global ``instruction`` option applies to rows without one);
- ``simcse`` and ``mntp``: ``{"text": str}``, one text per row (for simcse two
  dropout views of it are the positive pair; mntp masks and predicts its tokens).

As for chat data every bad line is collected with its number and reason, and
one :class:`~mongars_llm.errors.DatasetError` lists them all. A duplicate row
(the same query, positive, negative and instruction) is counted and dropped
from training: in a batch of in-batch negatives a copy of a pair is a false
negative of its twin. The counts add up: ``lines_total == rows_valid +
rows_invalid + lines_blank``, and ``rows_valid == len(examples) + duplicates``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._data import (
    SKIP,
    DatasetProblem,
    DatasetSummary,
    LengthStats,
    _finish,
    _Scan,
    decode_line,
)
from ._records import type_name

__all__ = ["EMBEDDING_OBJECTIVES", "PairExample", "load_pairs"]

#: the objectives that train an embedding adapter (``use="embed"``)
EMBEDDING_OBJECTIVES = ("contrastive", "simcse", "mntp")
_FIELDS = {
    "contrastive": (("query", "positive"), ("negative", "instruction")),
    "simcse": (("text",), ()),
    "mntp": (("text",), ()),
}
_EXAMPLE = {
    "contrastive": '{"query": ..., "positive": ...} (optional "negative", "instruction")',
    "simcse": '{"text": ...}',
    "mntp": '{"text": ...}',
}


@dataclass(frozen=True)
class PairExample:
    """One training row: for ``simcse`` and ``mntp`` the query and the positive are the
    same text."""

    line: int
    query: str
    positive: str
    negative: str | None = None
    instruction: str = ""

    def as_row(self) -> dict[str, Any]:
        """The row as the retrieval evaluation reads it."""
        row: dict[str, Any] = {"query": self.query, "positive": self.positive}
        if self.negative is not None:
            row["negative"] = self.negative
        if self.instruction:
            row["instruction"] = self.instruction
        return row


class _Bad(Exception):
    pass


def load_pairs(
    rows: Iterable[tuple[int, Any]],
    *,
    objective: str,
    source: str,
    tokenizer: Any,
    max_seq_len: int,
    instruction: str | None = None,
    skip_invalid: bool = False,
    summary_path: str | Path | None = None,
) -> tuple[DatasetSummary, list[PairExample]]:
    """Validate ``(line, raw)`` rows for ``objective``; returns the summary and the rows
    to train on (duplicates dropped). Texts longer than ``max_seq_len`` tokens are cut
    at embedding time, as the runtime cuts them (counted in ``rows_truncated``)."""
    required, optional = _FIELDS[objective]
    summary = DatasetSummary(
        source=source,
        format="pairs" if objective == "contrastive" else "texts",
        max_seq_len=max_seq_len,
        tokenizer=getattr(tokenizer, "name_or_path", None) if tokenizer is not None else None,
    )
    problems: list[DatasetProblem] = []
    examples: list[PairExample] = []
    seen: set[str] = set()
    names = [*required, *(n for n in optional if n != "instruction")]
    chars: dict[str, list[int]] = {name: [] for name in names}
    texts: dict[str, list[str]] = {name: [] for name in names}
    for line, raw in rows:
        raw = decode_line(raw, line, summary, problems)
        if raw is SKIP:
            continue
        try:
            example = _parse(raw, line, objective, required, optional, instruction)
        except _Bad as err:
            problems.append(DatasetProblem(line=line, reason=str(err)))
            summary.rows_invalid += 1
            continue
        summary.rows_valid += 1
        key = json.dumps(
            [example.instruction, example.query, example.positive, example.negative],
            ensure_ascii=False,
        )
        if key in seen:
            summary.duplicates += 1
            continue
        seen.add(key)
        examples.append(example)
        values = {"query": example.query, "positive": example.positive, "text": example.query}
        if example.negative is not None:
            values["negative"] = example.negative
        for name in names:
            if name in values:
                chars[name].append(len(values[name]))
                texts[name].append(values[name])
    summary.problems = problems
    summary.duplicate_ratio = (
        round(summary.duplicates / summary.rows_valid, 6) if summary.rows_valid else 0.0
    )
    summary.chars = {name: LengthStats.of(values) for name, values in chars.items()}
    if tokenizer is not None:
        summary.tokens = {}
        long_rows: set[int] = set()
        for name, strings in texts.items():
            counts = _token_counts(tokenizer, strings)
            summary.tokens[name] = LengthStats.of(counts)
            owners = [i for i, e in enumerate(examples) if name != "negative" or e.negative]
            long_rows.update(owners[k] for k, n in enumerate(counts) if n > max_seq_len)
        summary.rows_truncated = len(long_rows)
    if not summary.rows_valid and not problems:
        problems.append(
            DatasetProblem(
                line=None, reason=f"no records found; expected JSON lines {_EXAMPLE[objective]}"
            )
        )
    scan = _finish(_Scan(summary), skip_invalid=skip_invalid, summary_path=summary_path)
    return scan.summary, examples


def _parse(
    raw: Any,
    line: int,
    objective: str,
    required: Sequence[str],
    optional: Sequence[str],
    instruction: str | None,
) -> PairExample:
    if not isinstance(raw, dict):
        raise _Bad(f"expected a JSON object {_EXAMPLE[objective]}, got {type_name(raw)}")
    missing = [name for name in required if name not in raw]
    if missing:
        hint = ""
        if objective == "contrastive" and "text" in raw:
            hint = " (a {'text'} row is simcse or mntp data: pass --objective simcse or mntp)"
        elif objective != "contrastive" and "query" in raw:
            hint = " (a {'query', 'positive'} row is contrastive data: --objective contrastive)"
        elif {"prompt", "messages"} & set(raw):
            hint = " (chat data is for --objective sft)"
        raise _Bad(f"missing field(s) {', '.join(map(repr, missing))}{hint}")
    unknown = sorted(set(raw) - set(required) - set(optional))
    if unknown:
        raise _Bad(
            f"unknown field(s) {', '.join(map(repr, unknown))}; expected {_EXAMPLE[objective]}"
        )
    values: dict[str, str | None] = {}
    for name in (*required, *optional):
        value = raw.get(name)
        if value is None and name in optional:
            values[name] = None
            continue
        if not isinstance(value, str):
            raise _Bad(f"{name!r} must be a string, got {type_name(value)}")
        if not value.strip():
            raise _Bad(f"{name!r} is empty")
        values[name] = value
    if objective != "contrastive":
        text = values["text"]
        assert text is not None
        return PairExample(line=line, query=text, positive=text)
    query, positive, negative = values["query"], values["positive"], values["negative"]
    assert query is not None and positive is not None
    if query.strip() == positive.strip():
        raise _Bad("the query equals its positive: the pair teaches nothing")
    if negative is not None and negative.strip() == positive.strip():
        raise _Bad("the negative equals the positive")
    row_instruction = values["instruction"]
    return PairExample(
        line=line,
        query=query,
        positive=positive,
        negative=negative,
        instruction=row_instruction if row_instruction is not None else (instruction or ""),
    )


def _token_counts(tokenizer: Any, texts: list[str]) -> list[int]:
    if not texts:
        return []
    ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return [len(row) for row in ids["input_ids"]]
