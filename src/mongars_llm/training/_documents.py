"""Documents read as passages: the input of documents-only embedding training.

Two formats, told apart by the file's suffix:

- JSON lines (any suffix but ``.txt``/``.md``): one passage a row, ``{"text": str}``
  or ``{"id": str | int, "text": str}``. Each row is one passage, as written.
- plain text (``.txt``, ``.md``): split into passages by one rule (:func:`split_text`):
  paragraphs are the runs of non-blank lines between blank lines; consecutive
  paragraphs are packed into one passage while it stays within ``passage_chars``
  characters (default :data:`PASSAGE_CHARS`, about 250 tokens of English); a paragraph
  longer than that is cut at sentence ends (``. ``, ``? ``, ``! ``), a sentence longer
  than that at spaces, a word longer than that at the bound itself; a passage
  shorter than :data:`MIN_PASSAGE_CHARS` joins the one before it. Passage ids are
  ``p1``, ``p2``... and a passage's line is the line its first paragraph starts on.

Every bad row is a numbered :class:`~._data.DatasetProblem` in the data report
(``documents_summary.json``), and without ``skip_invalid`` one
:class:`~mongars_llm.errors.DatasetError` lists them all, before any model
loads: a row that is not ``{"text"}``/``{"id", "text"}``, an empty text, a
passage under :data:`MIN_PASSAGE_CHARS` characters (nothing to ask a question
about), a passage over :data:`MAX_PASSAGE_CHARS` characters (split it, or give
a ``.txt`` file, which is split for you), an id given twice. A passage whose
text repeats an earlier one is counted (``duplicates``) and dropped. A file
that is not UTF-8 is refused naming the line and byte; an empty file, or fewer
than two passages, is refused (the other passages are the round-trip corpus
and the negatives); more than :data:`MAX_PASSAGES` passages is refused unless
``max_passages`` picks a seeded sample.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DatasetError
from ._data import SKIP, DatasetProblem, DatasetSummary, LengthStats, _finish, _Scan, decode_line
from ._jsonl import open_jsonl
from ._records import type_name

__all__ = [
    "MAX_PASSAGES",
    "MAX_PASSAGE_CHARS",
    "MIN_PASSAGE_CHARS",
    "PASSAGE_CHARS",
    "TEXT_SUFFIXES",
    "Passage",
    "read_documents",
    "split_text",
]

#: a plain-text file's passages are packed up to this many characters
PASSAGE_CHARS = 1000
#: a JSONL passage longer than this is refused (split it first)
MAX_PASSAGE_CHARS = 8000
#: a passage shorter than this gives nothing to ask about
MIN_PASSAGE_CHARS = 16
#: more passages than this need ``max_passages`` (hours of generation otherwise)
MAX_PASSAGES = 20_000
#: the longest line of a plain-text file (it is split into passages: longer than JSONL's)
TEXT_LINE_BYTES = 64 << 20
#: the suffixes read as plain text (anything else is JSON lines)
TEXT_SUFFIXES = (".txt", ".md")
_EXAMPLE = '{"text": ...} or {"id": ..., "text": ...}'
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Passage:
    """One passage of the documents: its id, its text and the line it starts on."""

    id: str
    text: str
    line: int


def read_documents(
    path: str | Path,
    *,
    passage_chars: int = PASSAGE_CHARS,
    max_passages: int | None = None,
    seed: int = 42,
    skip_invalid: bool = False,
    summary_path: str | Path | None = None,
    flag: str = "--documents",
) -> tuple[DatasetSummary, list[Passage]]:
    """The passages of a documents file (see the module docstring for the formats and
    the checks); returns the data report and the passages, duplicates dropped.

    Raises :class:`DatasetError` (every bad row listed; ``skip_invalid`` drops them
    instead) before anything else runs; ``summary_path`` receives the report either way.
    """
    path = Path(path)
    text_file = path.suffix.lower() in TEXT_SUFFIXES
    summary = DatasetSummary(source=str(path), format="texts")
    problems: list[DatasetProblem] = []
    passages: list[Passage] = []
    seen_text: set[str] = set()
    seen_id: dict[str, int] = {}
    rows = _text_passages(path, passage_chars, flag) if text_file else _json_passages(path, flag)
    for line, raw in rows:
        if text_file:
            summary.lines_total += 1
            value: Any = raw
        else:
            value = decode_line(raw, line, summary, problems)
            if value is SKIP:
                continue
        try:
            passage = _parse(value, line, text_file, len(passages))
        except _Bad as err:
            problems.append(DatasetProblem(line=line, reason=str(err)))
            summary.rows_invalid += 1
            continue
        if passage.id in seen_id and not text_file:
            problems.append(
                DatasetProblem(
                    line=line,
                    reason=f"id {passage.id!r} was already given on line {seen_id[passage.id]}; "
                    "give each passage its own id",
                )
            )
            summary.rows_invalid += 1
            continue
        summary.rows_valid += 1
        key = " ".join(passage.text.split()).lower()
        if key in seen_text:
            summary.duplicates += 1
            continue
        seen_text.add(key)
        seen_id[passage.id] = line
        passages.append(passage)
    summary.problems = problems
    summary.duplicate_ratio = (
        round(summary.duplicates / summary.rows_valid, 6) if summary.rows_valid else 0.0
    )
    summary.chars = {"text": LengthStats.of([len(p.text) for p in passages])}
    if not summary.rows_valid and not problems:
        kind = "text" if text_file else f"JSON lines {_EXAMPLE}"
        problems.append(
            DatasetProblem(line=None, reason=f"no passages found; expected {kind} (empty file?)")
        )
    _finish(_Scan(summary), skip_invalid=skip_invalid, summary_path=summary_path)
    if len(passages) < 2:
        raise DatasetError(
            f"{path}: {len(passages)} distinct passage(s); documents-only training needs at "
            "least 2 (the other passages are each question's round-trip corpus and its "
            "negatives); add documents",
            problems,
        )
    if max_passages is not None and len(passages) > max_passages:
        chosen = sorted(random.Random(seed).sample(range(len(passages)), max_passages))
        passages = [passages[i] for i in chosen]
    elif len(passages) > MAX_PASSAGES:
        raise DatasetError(
            f"{path}: {len(passages)} passages, more than {MAX_PASSAGES} (hours of question "
            f"generation); pass --max-passages N for a seeded sample of N, or split the file",
            problems,
        )
    return summary, passages


class _Bad(Exception):
    pass


def _parse(value: Any, line: int, text_file: bool, index: int) -> Passage:
    if text_file:
        text = str(value)
        passage_id = f"p{index + 1}"
    else:
        if not isinstance(value, dict):
            raise _Bad(f"expected a JSON object {_EXAMPLE}, got {type_name(value)}")
        if "text" not in value:
            hint = ""
            if "query" in value:
                hint = " (a {'query', 'positive'} row is labelled pairs: pass --dataset-path)"
            raise _Bad(f"missing field 'text'; expected {_EXAMPLE}{hint}")
        unknown = sorted(set(value) - {"id", "text"})
        if unknown:
            raise _Bad(f"unknown field(s) {', '.join(map(repr, unknown))}; expected {_EXAMPLE}")
        text = value["text"]
        if not isinstance(text, str):
            raise _Bad(f"'text' must be a string, got {type_name(text)}")
        raw_id = value.get("id", f"line-{line}")
        if isinstance(raw_id, bool) or not isinstance(raw_id, str | int):
            raise _Bad(f"'id' must be a string or a number, got {type_name(raw_id)}")
        passage_id = str(raw_id)
    text = text.strip()
    if not text:
        raise _Bad("'text' is empty")
    if len(text) < MIN_PASSAGE_CHARS:
        raise _Bad(
            f"passage of {len(text)} character(s), under {MIN_PASSAGE_CHARS}: too short to ask "
            "a question about; merge it with its neighbours or drop it"
        )
    if len(text) > MAX_PASSAGE_CHARS:
        raise _Bad(
            f"passage of {len(text):,} characters, over the {MAX_PASSAGE_CHARS:,}-character "
            "limit of one passage (the embedding reads only its start); split it into "
            "passages, or give a .txt file, which is split for you"
        )
    return Passage(id=passage_id, text=text, line=line)


def _json_passages(path: Path, flag: str) -> Iterator[tuple[int, Any]]:
    return open_jsonl(path, flag=flag)


def _text_passages(path: Path, passage_chars: int, flag: str) -> Iterator[tuple[int, str]]:
    """``(line, passage)`` of a plain-text file, split by :func:`split_text` (a non-UTF-8
    line is refused by :func:`~._jsonl.open_jsonl`, naming it)."""

    def lines() -> Iterator[str]:
        for number, text in open_jsonl(path, TEXT_LINE_BYTES, flag=flag):
            if not isinstance(text, str):
                raise DatasetError(
                    f"{path}: line {number} is longer than {TEXT_LINE_BYTES:,} bytes; a plain "
                    "text file is read line by line: break the line"
                )
            yield text

    return split_text(lines(), passage_chars=passage_chars)


def split_text(lines: Any, *, passage_chars: int = PASSAGE_CHARS) -> Iterator[tuple[int, str]]:
    """``(first line, passage)`` of plain-text lines, split by the module's rule."""
    if passage_chars < MIN_PASSAGE_CHARS:
        raise DatasetError(f"passage_chars={passage_chars} is under {MIN_PASSAGE_CHARS}")
    pending: tuple[int, str] | None = None
    for line, text in _packed(lines, passage_chars):
        if pending is not None and len(text) < MIN_PASSAGE_CHARS:
            pending = (pending[0], f"{pending[1]}\n\n{text}")  # too short alone: joins
            continue
        if pending is not None:
            yield pending
        pending = (line, text)
    if pending is not None:
        yield pending


def _packed(lines: Any, bound: int) -> Iterator[tuple[int, str]]:
    """Paragraph pieces packed greedily into passages of at most ``bound`` characters."""
    current: list[str] = []
    size = 0
    start = 0
    for line, paragraph in _paragraphs(lines):
        for piece in _cut(paragraph, bound):
            if current and size + 2 + len(piece) > bound:
                yield start, "\n\n".join(current)
                current, size = [], 0
            if not current:
                start, size = line, len(piece)
            else:
                size += 2 + len(piece)
            current.append(piece)
    if current:
        yield start, "\n\n".join(current)


def _paragraphs(lines: Any) -> Iterator[tuple[int, str]]:
    block: list[str] = []
    start = 0
    for number, text in enumerate(lines, start=1):
        if text.strip():
            if not block:
                start = number
            block.append(text.strip())
        elif block:
            yield start, " ".join(block)
            block = []
    if block:
        yield start, " ".join(block)


def _cut(paragraph: str, bound: int) -> list[str]:
    """``paragraph`` in pieces of at most ``bound`` characters: at sentence ends, else at
    spaces, else at the bound."""
    if len(paragraph) <= bound:
        return [paragraph]
    pieces: list[str] = []
    for unit in _pack(_SENTENCE_END.split(paragraph), bound, " "):
        if len(unit) <= bound:
            pieces.append(unit)
            continue
        for words in _pack(unit.split(" "), bound, " "):
            pieces.extend(words[i : i + bound] for i in range(0, len(words), bound))
    return pieces


def _pack(parts: list[str], bound: int, glue: str) -> list[str]:
    out: list[str] = []
    for part in parts:
        if out and len(out[-1]) + len(glue) + len(part) <= bound:
            out[-1] += glue + part
        else:
            out.append(part)
    return out
