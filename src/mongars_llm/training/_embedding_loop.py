"""What the embedding objectives share: their rows, their record, and their loop.

:class:`EmbeddingObjective` is the part of :class:`~._objective.Objective`
every embedding objective (``contrastive``, ``simcse``, ``mntp``) has in
common: rows as pairs or texts (:mod:`._pairs`), the settings ``--resume``
compares, the ``llm2vec_config.json`` record, the registry's metrics (the
retrieval metrics of the base model and of the adapter). A subclass adds its
checks and its :class:`EmbeddingSteps` (the step, and any evaluation beside
retrieval).

:func:`train_embeddings` is the loop: the seeded batch plan, AdamW and
:class:`~._run.TrainingRun` (schedule, checkpoints and ``--resume``, progress,
``train_log.jsonl``, events, periodic evaluation). Past one process (DDP) each
rank computes its slice of the global micro-batch, the gradients are summed
over the ranks (:meth:`~._distributed.Distributed.sum_gradients`), so a step
is that of one process with the whole global batch; rank 0 alone evaluates.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import ConfigError
from ..logging import log_event
from ._batches import BatchPlan
from ._config import BundleConfig
from ._data import DatasetSummary
from ._objective import AdapterUse, Examples, Rows, RowsContext, TrainInputs, hold_out
from ._pairs import PairExample, load_pairs
from ._run import SeenUnit, StepResult, TrainingRun, TrainOutcome
from ._vectors import EmbeddingSpec, evaluate_retrieval

if TYPE_CHECKING:
    from ..runtime import EmbeddingConfig
    from ._stacking import BaseAdapter

__all__ = ["EmbeddingObjective", "EmbeddingSteps", "Evaluation", "train_embeddings"]

logger = logging.getLogger(__name__)

#: ``evaluate(adapter)``: metrics of the adapter (``True``) or of the base model, or ``None``
Evaluation = Callable[[bool], "dict[str, Any] | None"]


class EmbeddingSteps(Protocol):
    """One run of an embedding objective: its step and its own evaluations."""

    def step(self, step: int, micro_batches: list[list[int]]) -> tuple[float, dict[str, Any]]:
        """Forward and backward of optimizer step ``step`` (this rank's share of the
        global micro-batches); returns the loss and the fields it adds to the step's
        record."""
        ...

    def evaluations(self) -> dict[str, Evaluation]:
        """The evaluations beside retrieval, by metric name (``mntp``)."""
        ...

    def metrics(self) -> dict[str, Any]:
        """Counts the final metrics hold beside the shared ones (``eval_texts``)."""
        ...

    def training(self) -> AbstractContextManager[Any]:
        """What holds while the steps run (simcse's attention dropout)."""
        ...


class EmbeddingObjective:
    """The shared part of the embedding objectives (see the module docstring)."""

    name: str = ""
    use: AdapterUse = "embed"
    seen_unit: SeenUnit = "rows"
    registry_metrics: tuple[str, ...] = (
        "train_loss",
        "steps",
        "rows_seen",
        "retrieval_base",
        "retrieval",
    )
    #: the training file holds retrieval pairs: hold some out when no eval file is given
    holds_out_pairs = False
    #: hold out texts of the training file for an evaluation of the objective's own
    holds_out_texts = False
    #: the record format of its rows (:mod:`._pairs`), when not the objective's name
    rows_format = ""

    # ---------------------------------------------------------------- rows
    def load(self, ctx: RowsContext, train_rows: Rows, eval_rows: Rows | None) -> Examples:
        config = ctx.config
        common: dict[str, Any] = {
            "objective": self.rows_format or self.name,
            "tokenizer": ctx.tokenizer,
            "max_seq_len": config.max_seq_len,
            "instruction": config.instruction,
            "skip_invalid": config.skip_invalid,
        }
        train_summary, train_examples = load_pairs(
            train_rows,
            source=str(config.dataset_path or config.dataset_id or config.documents),
            summary_path=ctx.run_dir / "dataset_summary.json" if ctx.is_main else None,
            **common,
        )
        eval_summary: DatasetSummary | None = None
        eval_examples: list[PairExample] = []
        if eval_rows is not None:  # retrieval pairs, whatever the objective (simcse too)
            eval_summary, eval_examples = load_pairs(
                eval_rows,
                source=str(config.eval_dataset_path or config.eval_dataset_id),
                summary_path=ctx.run_dir / "eval_dataset_summary.json" if ctx.is_main else None,
                **{**common, "objective": "contrastive"},
            )
        elif self.holds_out_pairs and config.eval_fraction > 0 and len(train_examples) >= 4:
            train_examples, eval_examples = hold_out(
                train_examples, config.eval_fraction, config.seed
            )
        eval_texts: list[PairExample] = []
        if self.holds_out_texts and config.eval_fraction > 0 and len(train_examples) >= 4:
            train_examples, eval_texts = hold_out(train_examples, config.eval_fraction, config.seed)
        log_event(
            logger,
            "bundle_dataset",
            objective=config.objective,
            rows=train_summary.rows_valid,
            invalid=train_summary.rows_invalid,
            duplicates=train_summary.duplicates,
            train=len(train_examples),
            eval=len(eval_examples),
            eval_texts=len(eval_texts),
        )
        return Examples(train_summary, eval_summary, train_examples, eval_examples, eval_texts)

    def dry_run_metrics(self, examples: Examples) -> dict[str, Any]:
        counts = {"train_examples": len(examples.train), "eval_examples": len(examples.eval)}
        if self.holds_out_texts:
            counts["eval_texts"] = len(examples.eval_texts)
        return counts

    def check(self, config: BundleConfig, examples: Examples) -> None:
        """Nothing before the model loads (:meth:`check_training` runs in the loop)."""

    # -------------------------------------------------------------- record
    def fingerprint(self, config: BundleConfig, stacked_on: BaseAdapter | None) -> dict[str, Any]:
        return {
            "objective": config.objective,
            "temperature": config.temperature,
            "pooling": config.pooling,
            "bidirectional": config.bidirectional,
            "instruction": config.instruction,
            "symmetric_loss": config.symmetric_loss,
            "simcse_dropout": None,
            "mask_probability": None,
            **self.fingerprint_extra(config),
            "base_adapter": stacked_on.sha256 if stacked_on is not None else None,
        }

    def fingerprint_extra(self, config: BundleConfig) -> dict[str, Any]:
        """The objective's own settings among the fingerprint's (``None`` for the others)."""
        return {}

    def embedding_config(
        self, config: BundleConfig, base: Any, stacked_on: BaseAdapter | None
    ) -> EmbeddingConfig | None:
        from ..runtime import EmbeddingConfig, pooling_mode

        spec = EmbeddingSpec.of(config, base)
        extra: dict[str, Any] = {"temperature": config.temperature, **self.embedding_extra(config)}
        if stacked_on is not None:
            extra["stacked_on"] = {
                "adapter": stacked_on.label,
                "objective": stacked_on.embedding.objective if stacked_on.embedding else None,
                "sha256": stacked_on.sha256,
            }
        return EmbeddingConfig(
            pooling=pooling_mode(spec.pooling),
            bidirectional=spec.bidirectional,
            max_length=spec.max_length,
            normalize=True,
            instruction=config.instruction,
            objective=config.objective,
            extra=extra,
        )

    def embedding_extra(self, config: BundleConfig) -> dict[str, Any]:
        """The objective's own settings in its ``llm2vec_config.json``."""
        return {}

    # ------------------------------------------------------------ training
    def check_training(self, config: BundleConfig, examples: Examples) -> None:
        """Refuse a run the objective cannot train (the model is loaded by now)."""

    def steps(self, inputs: TrainInputs, spec: EmbeddingSpec) -> EmbeddingSteps:
        """This run's step and evaluations."""
        raise NotImplementedError

    def evaluations(self, inputs: TrainInputs, spec: EmbeddingSpec) -> dict[str, Evaluation]:
        """The evaluations every run of the objective has: the retrieval metrics of the
        eval pairs (``rerank`` has its own instead)."""
        return {"retrieval": _retrieval(inputs, spec)}

    def train(self, inputs: TrainInputs) -> TrainOutcome:
        return train_embeddings(self, inputs)


def train_embeddings(objective: EmbeddingObjective, inputs: TrainInputs) -> TrainOutcome:
    """Train the peft model on an embedding objective; returns metrics and the loss
    history. The metrics hold the retrieval metrics of the base model and of the adapter
    on the eval pairs and those of the objective's own evaluations (mntp: the
    masked-token loss and accuracy on held-out texts), before and after.

    With ``dist`` (several processes, DDP) every rank calls this with the same
    arguments: the plan is drawn for global micro-batches of ``batch_size x
    processes`` rows, rank ``r`` computes slice ``r`` of each and the gradients are
    summed over the ranks. Rank 0 alone evaluates, writes and logs.
    """
    import torch

    model, config, dist, examples = inputs.model, inputs.config, inputs.dist, inputs.examples
    world = dist.world_size if dist is not None else 1
    if dist is not None and dist.shards_parameters:
        raise ConfigError(
            f"objective {config.objective!r} trains under DDP (accelerate's multi-GPU or "
            f"multi-CPU config), not {dist.distributed_type}: a LoRA adapter's weights fit "
            "every process"
        )
    objective.check_training(config, examples)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    plan = BatchPlan(
        len(examples.train),
        batch_size=config.batch_size * world,  # global micro-batch; rank r: slice r
        grad_accum=config.grad_accum,
        seed=config.seed,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    run = TrainingRun(
        config=config,
        run_dir=inputs.run_dir,
        model=model,
        optimizer=optimizer,
        total_steps=plan.total_steps(config.epochs, config.max_steps),
        fingerprint=inputs.fingerprint,
        dist=dist,
        desc=f"training ({config.objective})",
        seen_unit="rows",
    )
    spec = EmbeddingSpec.of(config, inputs.base)
    steps = objective.steps(inputs, spec)
    evaluations = {**objective.evaluations(inputs, spec), **steps.evaluations()}

    def evaluate() -> dict[str, Any] | None:
        found: dict[str, Any] = {}
        for evaluation in evaluations.values():
            found.update(evaluation(True) or {})
        return found or None

    # the base model's metrics: the adapter switched off (exact: peft skips the LoRA path)
    if not run.resume():
        for name, evaluation in evaluations.items():
            run.state.baselines[f"{name}_base"] = evaluation(False)

    def one_step(step: int) -> StepResult:
        micro_batches = plan.step(step)
        rows = sum(len(indices) for indices in micro_batches)
        loss_value, extra = steps.step(step, micro_batches)
        if dist is not None:  # each rank's gradient is its share of the global loss
            dist.sum_gradients(params)
        grad_norm = None
        if config.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
        return StepResult(loss_value, grad_norm, rows, {"rows": rows, **extra})

    model.train()
    try:
        with steps.training():
            run.run(one_step, evaluate=evaluate, epoch_at=plan.epoch_at)
    finally:
        if config.gradient_checkpointing:
            model.gradient_checkpointing_disable()
    return _finish(run, inputs, evaluations, steps, plan)


def _retrieval(inputs: TrainInputs, spec: EmbeddingSpec) -> Evaluation:
    """The retrieval metrics of the eval pairs (rank 0: every rank holds the same weights)."""
    main = inputs.dist is None or inputs.dist.is_main
    config = inputs.config

    def evaluate(adapter: bool) -> dict[str, Any] | None:
        if not main:
            return None
        return evaluate_retrieval(
            inputs.model,
            inputs.tokenizer,
            inputs.examples.eval,
            spec,
            adapter=adapter,
            instruction=config.instruction,
            device=inputs.precision.device,
            batch_size=max(config.batch_size, 16),
        )

    return evaluate


def _finish(
    run: TrainingRun,
    inputs: TrainInputs,
    evaluations: dict[str, Evaluation],
    steps: EmbeddingSteps,
    plan: BatchPlan,
) -> TrainOutcome:
    """The final evaluations and the run's metrics."""
    config, state, examples, model = inputs.config, run.state, inputs.examples, inputs.model
    world = inputs.dist.world_size if inputs.dist is not None else 1
    final = {name: evaluation(True) for name, evaluation in evaluations.items()}
    if any(found is not None for found in final.values()):
        merged: dict[str, Any] = {"step": state.step}
        for found in final.values():
            merged.update(found or {})
        state.evals.append(merged)
    model.eval()
    metrics: dict[str, Any] = {
        "objective": config.objective,
        **run.metrics(epoch_at=plan.epoch_at),
        "train_examples": len(examples.train),
        "eval_examples": len(examples.eval),
        "global_batch_size": config.batch_size * world * config.grad_accum,
        **steps.metrics(),
    }
    for name in evaluations:
        metrics[f"{name}_base"] = state.baselines.get(f"{name}_base")
        metrics[name] = final[name]
    if state.evals:
        metrics["evals"] = state.evals
    return TrainOutcome(
        model=model, metrics=metrics, history=state.history, resumed_from=run.resumed_from
    )


class NoEvaluations:
    """:class:`EmbeddingSteps`' defaults: no evaluation beside retrieval, no extra counts,
    nothing held while the steps run."""

    def evaluations(self) -> dict[str, Evaluation]:
        return {}

    def metrics(self) -> dict[str, Any]:
        return {}

    def training(self) -> AbstractContextManager[Any]:
        return contextlib.nullcontext()
