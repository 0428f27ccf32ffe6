"""What a training objective is to the bundle build: :class:`Objective`.

An objective owns its rows (:meth:`Objective.load`: checked, held out, counted),
what ``--resume`` must also compare (:meth:`Objective.fingerprint`), its
training (:meth:`Objective.train`: the objective's step and evaluation inside a
:class:`~._run.TrainingRun`), what the adapter records about how it embeds
(:meth:`Objective.embedding_config`) and the metrics the registry keeps. The
bundle build (:mod:`._bundle`) reads straight through with no objective
switch; the objectives are registered in :mod:`._objectives`, one line each.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from ..runtime import EmbeddingConfig
    from ._config import BundleConfig
    from ._data import DatasetSummary
    from ._distributed import Distributed
    from ._model import Precision
    from ._run import SeenUnit, TrainOutcome
    from ._stacking import BaseAdapter

__all__ = ["Examples", "Objective", "RowsContext", "TrainInputs", "hold_out"]

#: the registry's ``use`` of an objective's adapters: every use, ``embed`` or ``rerank`` only
AdapterUse = Literal["all", "embed", "rerank"]

Rows = Iterable[tuple[int, Any]]


@dataclass(frozen=True)
class RowsContext:
    """What loading an objective's rows needs of the build."""

    config: BundleConfig
    tokenizer: Any
    run_dir: Path
    #: whether this process writes the dataset summaries (rank 0, or the only process)
    is_main: bool


@dataclass
class Examples:
    """An objective's rows once checked: what it trains on and evaluates with."""

    train_summary: DatasetSummary
    eval_summary: DatasetSummary | None
    train: list[Any]
    eval: list[Any]
    #: held-out texts of the training file (mntp's masked-token evaluation)
    eval_texts: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class TrainInputs:
    """What an objective's training gets from the build: the peft model, ready."""

    model: Any
    #: the base model under the adapter (its config: max positions, model type)
    base: Any
    tokenizer: Any
    config: BundleConfig
    precision: Precision
    examples: Examples
    run_dir: Path
    fingerprint: dict[str, Any]
    dist: Distributed | None = None


class Objective(Protocol):
    """A training objective, as the bundle build uses it (one instance per objective)."""

    #: ``BundleConfig.objective``'s value
    name: str
    use: AdapterUse
    #: what the run counts as throughput (``tokens_seen`` or ``rows_seen`` in the metrics)
    seen_unit: SeenUnit
    #: the metrics the registry entry keeps (``None`` where a run has none)
    registry_metrics: tuple[str, ...]

    def load(self, ctx: RowsContext, train_rows: Rows, eval_rows: Rows | None) -> Examples:
        """Check the rows (every bad one listed), hold out what evaluation needs, write the
        dataset summaries and log ``bundle_dataset``."""
        ...

    def dry_run_metrics(self, examples: Examples) -> dict[str, Any]:
        """What a dry run reports (the counts a real run would train on)."""
        ...

    def check(self, config: BundleConfig, examples: Examples) -> None:
        """Refuse, before any weight loads, rows the run would learn nothing from."""
        ...

    def fingerprint(self, config: BundleConfig, stacked_on: BaseAdapter | None) -> dict[str, Any]:
        """The objective's settings ``--resume`` compares, beyond the shared ones."""
        ...

    def train(self, inputs: TrainInputs) -> TrainOutcome:
        """Train the peft model; returns its metrics and loss history."""
        ...

    def embedding_config(
        self, config: BundleConfig, base: Any, stacked_on: BaseAdapter | None
    ) -> EmbeddingConfig | None:
        """How the adapter embeds (its ``llm2vec_config.json``, the registry's
        ``embedding``); ``None`` for a chat adapter."""
        ...


def hold_out(examples: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """``examples`` split into training and a seeded ``fraction`` held out (at least one)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(examples) * fraction))
    held = set(order[:n_eval])
    train = [e for i, e in enumerate(examples) if i not in held]
    evals = [e for i, e in enumerate(examples) if i in held]
    return train, evals
