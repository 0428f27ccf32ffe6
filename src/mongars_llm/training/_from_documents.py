"""The bundle build's documents-only routes, and ``--mine-negatives`` for labelled pairs.

:func:`documents_rows` turns the passages of ``config.documents`` into the
rows an objective reads: for ``contrastive`` the pairs :mod:`._synthesis`
writes to the run folder (``synthetic_pairs.jsonl``, ``synthesis_summary.json``;
a finished synthesis of the same run folder, documents and settings is reused), for
``simcse``/``mntp`` the passages as ``{"text"}`` rows. :func:`mine_examples`
gives labelled pairs without a ``negative`` their mined ones
(``mined_pairs.jsonl``). Both embed with a :class:`~mongars_llm.runtime.UnifiedLLMRuntime`
on the base weights (the stacked adapter loaded for ``embed``), closed before
training loads its own copy. :func:`synthesize_file` is ``bundle synthesize``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..logging import log_event
from ._config import BundleConfig
from ._documents import Passage
from ._locate import say
from ._pairs import PairExample
from ._synthesis import (
    QUESTION_PROMPT,
    PhaseProgress,
    SynthesisSettings,
    SynthesisSummary,
    synthesize,
)

if TYPE_CHECKING:
    from ._build import BuildContext
    from ._stacking import BaseAdapter

__all__ = [
    "MINED_FILE",
    "SYNTHESIS_SUMMARY",
    "SYNTHETIC_PAIRS",
    "documents_rows",
    "mine_examples",
    "open_embedder",
    "synthesis_settings",
    "synthesize_pairs",
]

logger = logging.getLogger(__name__)

SYNTHETIC_PAIRS = "synthetic_pairs.jsonl"
SYNTHESIS_SUMMARY = "synthesis_summary.json"
MINED_FILE = "mined_pairs.jsonl"
#: hard negatives per synthesized question when ``mine_negatives`` is unset
DEFAULT_NEGATIVES = 1


def synthesis_settings(config: BundleConfig) -> SynthesisSettings:
    """The synthesis settings a bundle config asks for."""
    options: dict[str, Any] = {"pooling": config.pooling, "bidirectional": config.bidirectional}
    if config.instruction:
        options["instruction"] = config.instruction
    return SynthesisSettings(
        questions_per_passage=config.questions_per_passage,
        question_prompt=config.question_prompt,
        seed=config.seed,
        round_trip_k=config.round_trip_k,
        negatives=DEFAULT_NEGATIVES if config.mine_negatives is None else config.mine_negatives,
        embed_options=options,
    )


@contextmanager
def open_embedder(
    config: BundleConfig, *, source: str, base_adapter: BaseAdapter | None = None
) -> Iterator[Any]:
    """A runtime on the base weights (``source``: the folder to load), the stacked adapter
    loaded for ``embed`` (the current embeddings); closed on exit."""
    from ..runtime import UnifiedLLMRuntime, no_loading_bars
    from ._model import resolve_precision

    precision = resolve_precision(config)
    say(config, f"loading {config.base_model} for question synthesis and mining ...")
    with no_loading_bars():
        runtime = UnifiedLLMRuntime.from_pretrained(
            source,
            device=precision.device,
            dtype=precision.torch_dtype,
            pooling=config.pooling,
            bidirectional=config.bidirectional,
            engine="torch",
            trust_remote_code=config.trust_remote_code,
        )
    try:
        if base_adapter is not None:
            runtime.load_adapter("base_adapter", base_adapter.path, use="embed")
        yield runtime
    finally:
        runtime.close()


def _progress(config: BundleConfig) -> PhaseProgress:
    return PhaseProgress(bar=config.progress, every=config.progress_every)


def documents_rows(run: BuildContext, passages: list[Passage]) -> list[tuple[int, Any]]:
    """The ``(line, row)`` rows ``config.objective`` trains on, from ``passages``."""
    config = run.config
    if config.objective != "contrastive":
        return [(p.line, {"text": p.text}) for p in passages]
    pairs_path = run.run_dir / SYNTHETIC_PAIRS
    summary_path = run.run_dir / SYNTHESIS_SUMMARY
    settings = synthesis_settings(config)
    if _finished(summary_path, settings, len(passages)) and pairs_path.is_file():
        say(config, f"reusing the finished synthesis {pairs_path} (same documents and settings)")
    elif run.is_main:
        source = str(run.base_copy.path) if run.base_copy else str(config.base_model)
        with open_embedder(config, source=source, base_adapter=run.base_adapter) as runtime:
            summary = synthesize(
                runtime,
                passages,
                settings,
                out_path=pairs_path,
                summary_path=summary_path,
                progress=_progress(config),
            )
        say(config, summary.line())
        _log_synthesis(summary)
    return _read_rows(pairs_path)


def _log_synthesis(summary: SynthesisSummary) -> None:
    log_event(
        logger,
        "bundle_synthesis",
        passages=summary.passages_done,
        generated=summary.generated,
        kept=summary.kept,
        rows=summary.rows_written,
        dropped=summary.dropped,
        seconds=summary.to_dict()["seconds"],
    )


def _finished(path: Path, settings: SynthesisSettings, passages: int) -> bool:
    """Whether ``path`` records a finished synthesis of as many passages, with the same
    prompt, count, round trip and seed (a rerun of the run reuses it)."""
    try:
        done = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(done.get("complete")) and (
        done.get("passages"),
        done.get("prompt"),
        done.get("questions_per_passage"),
        done.get("round_trip_k"),
        done.get("seed"),
    ) == (
        passages,
        settings.question_prompt or QUESTION_PROMPT,
        settings.questions_per_passage,
        settings.round_trip_k,
        settings.seed,
    )


def _read_rows(path: Path) -> list[tuple[int, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [(n, line.rstrip("\n")) for n, line in enumerate(handle, start=1)]


def mine_examples(run: BuildContext, examples: list[PairExample]) -> list[PairExample]:
    """``examples`` with ``config.mine_negatives`` mined negatives for each row that has
    none (one row per negative), written to ``mined_pairs.jsonl``."""
    from ._mining import mine_pair_negatives

    config = run.config
    count = config.mine_negatives or 0
    if count < 1 or all(e.negative is not None for e in examples):
        return examples
    source = str(run.base_copy.path) if run.base_copy else str(config.base_model)
    say(config, f"mining {count} hard negative(s) per pair without one ...")
    with open_embedder(config, source=source, base_adapter=run.base_adapter) as runtime:

        def embed(texts: list[Any]) -> Any:
            return runtime.embed(texts, pooling=config.pooling, bidirectional=config.bidirectional)

        rows, missing = mine_pair_negatives([e.as_row() for e in examples], embed, count=count)
    out: list[PairExample] = []
    by_key = {(e.instruction, e.query, e.positive): e.line for e in examples}
    for row in rows:
        instruction = row.get("instruction", "")
        out.append(
            PairExample(
                line=by_key.get((instruction, row["query"], row["positive"]), 0),
                query=row["query"],
                positive=row["positive"],
                negative=row.get("negative"),
                instruction=instruction,
            )
        )
    if run.is_main:
        with open(run.run_dir / MINED_FILE, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    say(
        config,
        f"mined negatives: {len(out)} row(s) from {len(examples)}; "
        f"{missing} pair(s) without a negative found",
    )
    log_event(logger, "bundle_mined", rows=len(out), pairs=len(examples), missing=missing)
    return out


def synthesize_pairs(
    documents: str | Path,
    output: str | Path,
    config_or_path: BundleConfig | dict[str, Any] | str | Path | None = None,
    **overrides: Any,
) -> SynthesisSummary:
    """``mongars-llm bundle synthesize``: write the contrastive pairs synthesized from
    ``documents`` (questions, filter, mined negatives) to ``output``, for a person to
    read and edit before training on them (``--dataset-path``), and their summary to
    ``<output stem>.summary.json``; the documents' data report to
    ``<output stem>.documents.json``. Settings are :class:`BundleConfig` fields
    (``base_model``, ``questions_per_passage``, ``question_prompt``, ``round_trip_k``,
    ``mine_negatives``, ``max_passages``, ``seed``, ``pooling``, ``bidirectional``,
    ``instruction``, ``device``, ``precision``, ``skip_invalid``, ``progress``).
    An interrupted run (Ctrl-C) keeps the pairs written so far."""
    from ._config import load_bundle_config
    from ._documents import read_documents
    from ._locate import locate_base_model

    overrides = {**overrides, "objective": "contrastive", "documents": Path(documents)}
    config = load_bundle_config(config_or_path, **overrides)
    output = Path(output)
    stem = output.with_suffix("") if output.suffix else output
    summary_path = stem.with_name(stem.name + ".summary.json")
    report_path = stem.with_name(stem.name + ".documents.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    assert config.documents is not None
    _, passages = read_documents(
        config.documents,
        max_passages=config.max_passages,
        seed=config.seed,
        skip_invalid=config.skip_invalid,
        summary_path=report_path,
    )
    config, base_copy, _ = locate_base_model(config)
    source = str(base_copy.path) if base_copy else str(config.base_model)
    with open_embedder(config, source=source) as runtime:
        summary = synthesize(
            runtime,
            passages,
            synthesis_settings(config),
            out_path=output,
            summary_path=summary_path,
            progress=_progress(config),
        )
    _log_synthesis(summary)
    return summary
