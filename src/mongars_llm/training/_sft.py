"""The ``sft`` objective: supervised fine-tuning of a chat adapter on prompt/completion
or chat records.

Why not ``transformers.Trainer``: on CPU its per-step machinery costs a lot on
small adapters, and its resume restores the data position only approximately.
Here the micro-batch order is a pure function of ``(seed, epoch)``
(:class:`~._batches.BatchPlan`), so a resumed run ends bit-for-bit where a
straight run ends. The loss is computed on label positions only
(:mod:`._sft_loss`), token-weighted across gradient-accumulation micro-batches.

Past one process (``_distributed``) the same loop runs under
``accelerate.Accelerator``: the plan is drawn for global micro-batches of
``batch_size x processes`` records, rank ``r`` trains on slice ``r`` of each,
the label-token count is summed over the ranks before the backward pass, so a
step's loss and gradient are those of one process with the whole global batch.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, DatasetError
from ..logging import log_event
from ._batches import Batch, BatchPlan, collate
from ._config import BundleConfig
from ._data import DatasetSummary, EncodedExample, load_examples
from ._objective import AdapterUse, Examples, Rows, RowsContext, TrainInputs, hold_out
from ._run import SeenUnit, StepResult, TrainingRun, TrainOutcome
from ._sft_loss import (
    count_label_tokens,
    evaluate,
    evaluate_distributed,
    label_logits_fn,
    label_loss_module,
    label_loss_sum,
)

if TYPE_CHECKING:
    from ..runtime import EmbeddingConfig
    from ._distributed import Distributed
    from ._model import Precision
    from ._stacking import BaseAdapter

__all__ = ["SFT", "SftObjective", "train"]

logger = logging.getLogger(__name__)


class SftObjective:
    """Chat records in, a chat adapter (``use="all"``) out; see the module docstring."""

    name: str = "sft"
    use: AdapterUse = "all"
    seen_unit: SeenUnit = "tokens"
    registry_metrics: tuple[str, ...] = (
        "eval_loss",
        "eval_perplexity",
        "eval_loss_initial",
        "train_loss",
        "steps",
        "tokens_seen",
    )

    def load(self, ctx: RowsContext, train_rows: Rows, eval_rows: Rows | None) -> Examples:
        config = ctx.config
        common: dict[str, Any] = {
            "tokenizer": ctx.tokenizer,
            "max_seq_len": config.max_seq_len,
            "skip_invalid": config.skip_invalid,
            "overlong": config.overlong,
        }
        train_summary, train_examples = load_examples(
            train_rows,
            source=str(config.dataset_path or config.dataset_id),
            summary_path=ctx.run_dir / "dataset_summary.json" if ctx.is_main else None,
            **common,
        )
        eval_summary: DatasetSummary | None = None
        eval_examples: list[EncodedExample] = []
        if eval_rows is not None:
            eval_summary, eval_examples = load_examples(
                eval_rows,
                source=str(config.eval_dataset_path or config.eval_dataset_id),
                summary_path=ctx.run_dir / "eval_dataset_summary.json" if ctx.is_main else None,
                **common,
            )
        elif config.eval_fraction > 0 and len(train_examples) >= 2:
            train_examples, eval_examples = hold_out(
                train_examples, config.eval_fraction, config.seed
            )
        log_event(
            logger,
            "bundle_dataset",
            rows=train_summary.rows_valid,
            invalid=train_summary.rows_invalid,
            duplicates=train_summary.duplicates,
            trainable_tokens=train_summary.trainable_tokens,
        )
        return Examples(train_summary, eval_summary, train_examples, eval_examples)

    def dry_run_metrics(self, examples: Examples) -> dict[str, Any]:
        return {}

    def check(self, config: BundleConfig, examples: Examples) -> None:
        trainable = sum(e.trainable_tokens for e in examples.train)
        if trainable < config.min_trainable_tokens:
            raise DatasetError(
                f"only {trainable} trainable (completion) token(s) remain in "
                f"{len(examples.train)} training record(s), fewer than "
                f"min_trainable_tokens={config.min_trainable_tokens}; the run would learn "
                "nothing. Add data or raise max_seq_len",
                [],
            )

    def fingerprint(self, config: BundleConfig, stacked_on: BaseAdapter | None) -> dict[str, Any]:
        return {}

    def train(self, inputs: TrainInputs) -> TrainOutcome:
        return train(
            inputs.model,
            config=inputs.config,
            precision=inputs.precision,
            train_examples=inputs.examples.train,
            eval_examples=inputs.examples.eval,
            pad_id=inputs.tokenizer.pad_token_id,
            run_dir=inputs.run_dir,
            fingerprint=inputs.fingerprint,
            dist=inputs.dist,
        )

    def embedding_config(
        self, config: BundleConfig, base: Any, stacked_on: BaseAdapter | None
    ) -> EmbeddingConfig | None:
        return None


SFT = SftObjective()


def train(
    model: Any,
    *,
    config: BundleConfig,
    precision: Precision,
    train_examples: Sequence[EncodedExample],
    eval_examples: Sequence[EncodedExample],
    pad_id: int,
    run_dir: Path,
    fingerprint: dict[str, Any],
    dist: Distributed | None = None,
) -> TrainOutcome:
    """Run the optimisation loop on a peft model; returns metrics and the loss history.

    With ``dist`` (several processes) every rank calls this with the same
    arguments; rank 0 alone writes (checkpoints, ``train_log.jsonl``) and logs.
    """
    loop = _SftLoop(
        model,
        config=config,
        device=precision.device,
        train_examples=train_examples,
        eval_examples=eval_examples,
        pad_id=pad_id,
        dist=dist,
    )
    run = TrainingRun(
        config=config,
        run_dir=run_dir,
        model=model,
        optimizer=loop.optimizer,
        total_steps=loop.plan.total_steps(config.epochs, config.max_steps),
        fingerprint=fingerprint,
        dist=dist,
    )
    if not run.resume():
        initial = loop.evaluate()
        if initial is not None:
            run.state.evals.append({"step": 0, **initial})
    loop.start()
    run.run(loop.step, evaluate=loop.evaluate, epoch_at=loop.plan.epoch_at)
    return loop.finish(run)


class _SftLoop:
    """One run's step and evaluation: the batch plan, AdamW, and past one process the
    model wrapped by ``accelerate`` (:func:`~._sft_loss.label_loss_module`)."""

    def __init__(
        self,
        model: Any,
        *,
        config: BundleConfig,
        device: str,
        train_examples: Sequence[EncodedExample],
        eval_examples: Sequence[EncodedExample],
        pad_id: int,
        dist: Distributed | None,
    ) -> None:
        import torch

        self.model, self.config, self.device, self.dist = model, config, device, dist
        self.train_examples, self.eval_examples, self.pad_id = train_examples, eval_examples, pad_id
        self.world = dist.world_size if dist is not None else 1
        self.plan = BatchPlan(
            len(train_examples),
            batch_size=config.batch_size * self.world,  # global micro-batch; rank r: slice r
            grad_accum=config.grad_accum,
            seed=config.seed,
            lengths=[len(e.input_ids) for e in train_examples] if config.group_by_length else None,
        )
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer: Any = torch.optim.AdamW(
            self.params, lr=config.learning_rate, weight_decay=config.weight_decay
        )
        self.wrapped: Any = None
        if dist is not None:
            _check_distributed(config, dist)
            self.wrapped, self.optimizer = dist.accelerator.prepare(
                label_loss_module(model), self.optimizer
            )
            self.params = [p for p in self.wrapped.parameters() if p.requires_grad]
        self.filler: Batch | None = None

    def evaluate(self) -> dict[str, Any] | None:
        kwargs: dict[str, Any] = {
            "batch_size": self.config.batch_size * 2,
            "pad_id": self.pad_id,
            "device": self.device,
        }
        if self.dist is None:
            return evaluate(self.model, self.eval_examples, **kwargs)
        return evaluate_distributed(self.wrapped, self.eval_examples, dist=self.dist, **kwargs)

    def start(self) -> None:
        """Ready for the first step (after the initial evaluation)."""
        self.logits_fn = label_logits_fn(self.model)
        self.model.train()
        if self.wrapped is not None:
            self.wrapped.train()
        if self.dist is not None:
            self.filler = collate([self.train_examples[0]], self.pad_id, self.device)

    def step(self, step: int) -> StepResult:
        import torch

        config, examples = self.config, self.train_examples
        if self.dist is not None:
            loss_value, label_tokens, tokens, grad_norm = _distributed_step(
                self.wrapped,
                self.dist,
                self.plan.step(step),
                examples,
                filler=self.filler,
                pad_id=self.pad_id,
                device=self.device,
                batch_size=config.batch_size,
                params=self.params,
                max_grad_norm=config.max_grad_norm,
            )
            return StepResult(loss_value, grad_norm, tokens, {"label_tokens": label_tokens})
        batches = [
            collate([examples[i] for i in idx], self.pad_id, self.device)
            for idx in self.plan.step(step)
        ]
        label_tokens = sum(count_label_tokens(b) for b in batches)
        loss_value = 0.0
        for batch in batches:
            loss = label_loss_sum(self.logits_fn, batch) / max(label_tokens, 1)
            loss.backward()
            loss_value += float(loss.detach())
        grad_norm = None
        if config.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, config.max_grad_norm))
        tokens = sum(b.tokens for b in batches)
        return StepResult(loss_value, grad_norm, tokens, {"label_tokens": label_tokens})

    def finish(self, run: TrainingRun) -> TrainOutcome:
        """The final evaluation and the run's metrics (the weights gathered from shards)."""
        config, state, dist = self.config, run.state, self.dist
        final = self.evaluate()
        if final is not None:
            state.evals.append({"step": state.step, **final})
        full_state = None
        if dist is not None and dist.shards_parameters:  # a collective: every rank takes part
            gathered = dist.accelerator.get_state_dict(self.wrapped)
            full_state = {k.removeprefix("model."): v for k, v in gathered.items()}
        metrics: dict[str, Any] = {
            **run.metrics(epoch_at=self.plan.epoch_at),
            "train_examples": len(self.train_examples),
            "eval_examples": len(self.eval_examples),
            "global_batch_size": config.batch_size * self.world * config.grad_accum,
        }
        if state.evals:
            metrics["eval_loss_initial"] = state.evals[0]["eval_loss"]
            metrics["eval_loss"] = state.evals[-1]["eval_loss"]
            metrics["eval_perplexity"] = state.evals[-1]["eval_perplexity"]
            metrics["evals"] = state.evals
        return TrainOutcome(
            model=self.model,
            metrics=metrics,
            history=state.history,
            resumed_from=run.resumed_from,
            state_dict=full_state,
        )


def _check_distributed(config: BundleConfig, dist: Distributed) -> None:
    """Refuse what the sharded engines do not support yet."""
    if dist.shards_parameters and (config.save_steps or config.resume is not False):
        raise ConfigError(
            f"checkpoints (save_steps/--resume) are not supported under "
            f"{dist.distributed_type} yet; use DDP (accelerate's multi-GPU config without "
            "FSDP/DeepSpeed) for a resumable run"
        )
    if dist.distributed_type == "DEEPSPEED" and config.grad_accum > 1:
        raise ConfigError(
            f"grad_accum={config.grad_accum} under DeepSpeed: its engine steps on every "
            "backward; set gradient_accumulation_steps in the DeepSpeed config and "
            "--grad-accum 1"
        )


def _distributed_step(
    wrapped: Any,
    dist: Distributed,
    global_batches: list[list[int]],
    examples: Sequence[EncodedExample],
    *,
    filler: Batch | None,
    pad_id: int,
    device: str,
    batch_size: int,
    params: list[Any],
    max_grad_norm: float | None,
) -> tuple[float, int, int, float | None]:
    """Forward/backward of one optimizer step on this rank's slices; gradients end equal
    on every rank. Returns the global ``(loss, label_tokens, tokens, grad_norm)``.

    Each rank's loss is its label-loss sum over the *global* label-token count,
    times the world size (DDP averages gradients), so the synchronised gradient
    is exactly the one process's gradient of the whole global batch.
    """
    accelerator, world, rank = dist.accelerator, dist.world_size, dist.rank
    slices = [idx[rank * batch_size : (rank + 1) * batch_size] for idx in global_batches]
    batches = [
        collate([examples[i] for i in part], pad_id, device) if part else None for part in slices
    ]
    local_labels = sum(count_label_tokens(b) for b in batches if b is not None)
    local_tokens = sum(b.tokens for b in batches if b is not None)
    label_tokens = int(dist.sum([float(local_labels)])[0])
    loss_local = 0.0
    for i, maybe in enumerate(batches):
        # a rank with no records left in this micro-batch still joins the gradient sync
        batch, weight = (maybe, world / max(label_tokens, 1)) if maybe else (filler, 0.0)
        assert batch is not None
        last = i == len(batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(wrapped):
            loss = wrapped(batch.input_ids, batch.attention_mask, batch.labels) * weight
            accelerator.backward(loss)
        loss_local += float(loss.detach()) / world
    grad_norm = None
    if max_grad_norm is not None:  # DeepSpeed clips inside its engine and returns None
        norm = accelerator.clip_grad_norm_(params, max_grad_norm)
        grad_norm = float(norm) if norm is not None else None
    loss_value, tokens = dist.sum([loss_local, float(local_tokens)])
    return loss_value, label_tokens, int(tokens), grad_norm
