"""Query/passage pairs synthesized from documents: the chat half writes, the embedding half checks.

:func:`synthesize` turns passages (:mod:`._documents`) into contrastive rows
``{"query", "positive", "negative"}`` with one runtime (one set of weights):

1. **embed** every passage (the corpus of the round-trip check and of mining);
2. **generate** ``questions_per_passage`` questions per passage (default 2):
   :data:`QUESTION_PROMPT` (``{passage}`` replaced; ``question_prompt``
   overrides it) as the user turn of the model's chat template, sampled
   (temperature 0.8, top-p 0.95, a seed per batch: ``seed + batch number``),
   ``batch_passages`` passages per ``generate_batch`` call;
3. **filter**: a question is cleaned (its first line, a ``Question:`` label,
   numbering and quotes stripped) and kept when it is well-formed (not empty, at
   least 3 words, at most ``max_question_chars`` (200) characters, not a copy of
   the passage: 80 % of its words one run of the passage's words; not a repeat
   for the same passage) and passes the **round trip**: its source passage ranks
   within the top ``round_trip_k`` (default 10) passages for it under the
   current embeddings (the base model's, or the stacked adapter's);
4. **mine** ``negatives`` hard negatives per kept question (:mod:`._mining`:
   the passages ranked highest that are not its source nor a near-duplicate of
   it), one row per negative.

Rows are appended to the output file batch by batch (flushed), so an
interrupted run (Ctrl-C) keeps every pair written so far, and the summary
(:class:`SynthesisSummary`: kept, dropped by reason, seconds per phase) is
written with ``complete: false``. Progress for each phase goes to stderr
(:class:`PhaseProgress`: a bar on a terminal, else a line every N batches).
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._fs import atomic_write_json
from ..errors import ConfigError
from ._documents import Passage
from ._mining import NEAR_DUPLICATE, mine_negatives, source_ranks

__all__ = [
    "QUESTION_PROMPT",
    "DropReason",
    "PhaseProgress",
    "SynthesisSettings",
    "SynthesisSummary",
    "clean_question",
    "synthesize",
]

#: the default question prompt (the user turn; ``{passage}`` is replaced by the passage)
QUESTION_PROMPT = (
    "Here is a passage from a document collection:\n\n{passage}\n\n"
    "Write one short question that someone would type into a search box to find this "
    "passage. Use your own words; do not copy a sentence of the passage. Reply with the "
    "question only."
)
#: why a generated question was dropped (the summary's ``dropped`` keys)
DropReason = str
DROP_REASONS = ("empty", "too_short", "too_long", "copies_passage", "repeated", "round_trip")
_MIN_WORDS = 3
#: a question whose longest run of words copied from the passage is this share of it
COPY_SHARE = 0.8
_LABEL = re.compile(r"^\s*(?:\**\s*)?(?:question|q|query)\s*\d*\s*[:.)-]\s*", re.IGNORECASE)
_NUMBER = re.compile(r"^\s*(?:\d+[.)]|[-*•])\s+")
_WORD = re.compile(r"\w+")
_QUOTES = "*\"'` \u201c\u201d\u2018\u2019"


@dataclass(frozen=True)
class SynthesisSettings:
    """How questions are written, filtered and given negatives (see the module docstring)."""

    questions_per_passage: int = 2
    question_prompt: str | None = None
    seed: int = 42
    batch_passages: int = 8
    max_new_tokens: int = 48
    temperature: float = 0.8
    top_p: float = 0.95
    round_trip_k: int = 10
    max_question_chars: int = 200
    negatives: int = 1
    near_duplicate: float = NEAR_DUPLICATE
    #: the embedding call's options: pooling, bidirectional, adapter, instruction
    embed_options: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        prompt = self.question_prompt or QUESTION_PROMPT
        if "{passage}" not in prompt:
            raise ConfigError(
                "question_prompt must contain {passage} (where the passage goes); got "
                f"{prompt[:80]!r}"
            )
        return prompt


@dataclass
class SynthesisSummary:
    """What a synthesis did: ``synthesis_summary.json`` beside the pairs."""

    passages: int = 0
    passages_done: int = 0
    questions_per_passage: int = 2
    round_trip_k: int = 10
    generated: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    rows_written: int = 0
    #: kept questions for which no negative was found (a corpus of near-duplicates)
    without_negative: int = 0
    seconds: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(("embed", "generate", "filter", "mine"), 0.0)
    )
    complete: bool = False
    prompt: str = QUESTION_PROMPT
    seed: int = 42

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.__dict__,
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
        }

    def write(self, path: Path) -> None:
        atomic_write_json(path, self.to_dict())

    def line(self) -> str:
        """One line for a person: kept and dropped by reason."""
        dropped = ", ".join(f"{k} {v}" for k, v in self.dropped.items() if v) or "none"
        return (
            f"questions: {self.generated} generated for {self.passages_done} passage(s), "
            f"{self.kept} kept, dropped: {dropped}; {self.rows_written} pair row(s)"
        )


class PhaseProgress:
    """Progress of the synthesis phases on stderr: a bar (``bar``), else a line every
    ``every`` batches and at each phase's end (``every``), else nothing."""

    def __init__(self, *, bar: bool, every: int | None) -> None:
        self.bar, self.every = bar, every

    @contextmanager
    def phase(self, name: str, total: int, unit: str) -> Iterator[Any]:
        if self.bar:
            from tqdm.auto import tqdm

            with tqdm(total=total, desc=name, unit=unit, file=sys.stderr, leave=True) as bar:
                yield bar.update
            return
        done = [0, 0]

        def update(n: int = 1) -> None:
            done[0] += n
            done[1] += 1
            if self.every and (done[1] % self.every == 0 or done[0] >= total):
                print(f"{name}: {done[0]}/{total} {unit}", file=sys.stderr, flush=True)

        yield update


def clean_question(text: str) -> str:
    """The question in a generation: its first non-empty line, labels, numbering, bold
    markers and quotes stripped."""
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    for _ in range(2):
        line = _NUMBER.sub("", _LABEL.sub("", line)).strip()
    return line.strip(_QUOTES).strip()


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _copied_share(words: list[str], passage: list[str]) -> float:
    """The share of ``words`` in their longest run that also appears, contiguous, in
    ``passage``."""
    best = 0
    previous = [0] * (len(passage) + 1)
    for word in words:
        current = [0] * (len(passage) + 1)
        for j, other in enumerate(passage, start=1):
            if word == other:
                current[j] = previous[j - 1] + 1
                best = max(best, current[j])
        previous = current
    return best / len(words) if words else 0.0


def _reject(question: str, passage: str, earlier: set[str], cap: int) -> DropReason | None:
    """Why ``question`` is not well-formed for ``passage``, or ``None``."""
    if not question:
        return "empty"
    words = _words(question)
    if len(words) < _MIN_WORDS:
        return "too_short"
    if len(question) > cap:
        return "too_long"
    joined = " ".join(words)
    if _copied_share(words, _words(passage)) >= COPY_SHARE:
        return "copies_passage"
    if joined in earlier:
        return "repeated"
    return None


def synthesize(
    runtime: Any,
    passages: Sequence[Passage],
    settings: SynthesisSettings,
    *,
    out_path: Path,
    summary_path: Path | None = None,
    progress: PhaseProgress | None = None,
) -> SynthesisSummary:
    """Write contrastive rows synthesized from ``passages`` to ``out_path`` (see the module
    docstring); returns the summary (also written to ``summary_path``)."""
    progress = progress or PhaseProgress(bar=False, every=None)
    prompt = settings.prompt
    k = settings.questions_per_passage
    summary = SynthesisSummary(
        passages=len(passages),
        questions_per_passage=k,
        round_trip_k=settings.round_trip_k,
        prompt=prompt,
        seed=settings.seed,
    )
    texts = [p.text for p in passages]

    def embed(items: list[str], *, query: bool) -> Any:
        options = dict(settings.embed_options)
        if not query:
            options["instruction"] = ""
        return runtime.embed(items, **options)

    started = time.perf_counter()
    chunks = [texts[i : i + 32] for i in range(0, len(texts), 32)]
    parts = []
    with progress.phase("embedding passages", len(texts), "passages") as update:
        for chunk in chunks:
            parts.append(embed(chunk, query=False))
            update(len(chunk))
    import numpy as np

    passage_vectors = np.concatenate(parts)
    summary.seconds["embed"] += time.perf_counter() - started

    out_path.parent.mkdir(parents=True, exist_ok=True)
    size = settings.batch_passages
    batches = [range(i, min(i + size, len(passages))) for i in range(0, len(passages), size)]
    try:
        with (
            open(out_path, "w", encoding="utf-8") as out,
            progress.phase("synthesizing questions", len(passages), "passages") as update,
        ):
            for number, batch in enumerate(batches):
                _one_batch(
                    runtime, passages, batch, number, settings, prompt, passage_vectors,
                    embed, summary, out,
                )  # fmt: skip
                out.flush()
                summary.passages_done += len(batch)
                update(len(batch))
        summary.complete = True
    finally:  # Ctrl-C: the rows written so far stay, the summary says how far it got
        if summary_path is not None:
            summary.write(summary_path)
    return summary


def _one_batch(
    runtime: Any,
    passages: Sequence[Passage],
    batch: range,
    number: int,
    settings: SynthesisSettings,
    prompt: str,
    passage_vectors: Any,
    embed: Any,
    summary: SynthesisSummary,
    out: Any,
) -> None:
    """Generate, filter, mine and write the rows of one batch of passages."""
    k = settings.questions_per_passage
    started = time.perf_counter()
    requests = [
        [{"role": "user", "content": prompt.replace("{passage}", passages[i].text)}]
        for i in batch
        for _ in range(k)
    ]
    generations = runtime.generate_batch(
        requests,
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        seed=settings.seed + number,
    )
    summary.generated += len(generations)
    summary.seconds["generate"] += time.perf_counter() - started

    started = time.perf_counter()
    candidates: list[tuple[str, int]] = []
    for offset, generation in enumerate(generations):
        source = batch[offset // k]
        earlier = {" ".join(_words(q)) for q, s in candidates if s == source}
        question = clean_question(generation.text)
        reason = _reject(question, passages[source].text, earlier, settings.max_question_chars)
        if reason is not None:
            summary.dropped[reason] += 1
            continue
        candidates.append((question, source))
    kept: list[tuple[str, int]] = []
    vectors = None
    if candidates:
        vectors = embed([q for q, _ in candidates], query=True)
        ranks = source_ranks(vectors, passage_vectors, [s for _, s in candidates])
        keep = [rank <= settings.round_trip_k for rank in ranks]
        summary.dropped["round_trip"] += keep.count(False)
        kept = [c for c, ok in zip(candidates, keep, strict=True) if ok]
        vectors = vectors[[i for i, ok in enumerate(keep) if ok]]
    summary.kept += len(kept)
    summary.seconds["filter"] += time.perf_counter() - started
    if not kept:
        return

    started = time.perf_counter()
    negatives = mine_negatives(
        vectors,
        passage_vectors,
        [s for _, s in kept],
        count=settings.negatives,
        near_duplicate=settings.near_duplicate,
    )
    summary.seconds["mine"] += time.perf_counter() - started
    for (question, source), found in zip(kept, negatives, strict=True):
        row = {"query": question, "positive": passages[source].text}
        if not found:
            summary.without_negative += int(settings.negatives > 0)
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            summary.rows_written += 1
        for j in found:
            out.write(json.dumps({**row, "negative": passages[j].text}, ensure_ascii=False) + "\n")
            summary.rows_written += 1
