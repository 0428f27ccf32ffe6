"""``TrainingRun``: the bookkeeping every objective's loop shares, around its own step.

An objective supplies ``step(step) -> StepResult`` (forward and backward of one
optimizer step) and ``evaluate() -> metrics``; the run owns the rest: the
learning-rate schedule, the run state (:class:`RunState`, what a checkpoint
saves), ``--resume`` (the checkpoint found, its fingerprint checked), the
optimizer/scheduler update, the progress bar (or :class:`ProgressLines` off a
terminal), ``train_log.jsonl``, the ``bundle_train_step``/``bundle_eval``
events, periodic evaluation and checkpoints, and the checkpoint kept on Ctrl-C.
Several processes: every rank runs it; rank 0 alone writes and logs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

from ..logging import log_event
from ._checkpoints import find_checkpoint, load_checkpoint, read_checkpoint, save_checkpoint
from ._config import BundleConfig

if TYPE_CHECKING:
    from ._distributed import Distributed

__all__ = ["ProgressLines", "RunState", "StepResult", "TrainOutcome", "TrainingRun"]

logger = logging.getLogger(__name__)

#: what a run counts as its throughput: tokens (sft) or rows (the embedding objectives)
SeenUnit = Literal["tokens", "rows"]


@dataclass
class TrainOutcome:
    """What an objective's training returns to the bundle build."""

    model: Any
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: str | None = None
    #: the full state dict gathered from FSDP/DeepSpeed shards (``None`` otherwise)
    state_dict: dict[str, Any] | None = None


@dataclass
class StepResult:
    """What one optimisation step reports to :class:`TrainingRun` (before the update)."""

    loss: float
    grad_norm: float | None
    #: what the run counts as throughput this step: tokens (chat) or rows (embeddings)
    seen: int
    #: extra fields of the step's ``train_log.jsonl`` record
    record: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunState:
    """Where a run stands: what ``trainer_state.json`` saves and ``--resume`` restores.

    :meth:`to_json` writes the keys checkpoints have always had (``tokens_seen``
    holds the count of :attr:`seen_unit`, rows for the embedding objectives);
    :meth:`from_json` reads them back, those of older checkpoints included.
    """

    fingerprint: dict[str, Any]
    world_size: int = 1
    seen_unit: SeenUnit = "tokens"
    step: int = 0
    #: one record per optimizer step (what ``train_log.jsonl`` holds)
    history: list[dict[str, Any]] = field(default_factory=list)
    #: ``{"step": n, **metrics}`` per evaluation, the one before step 1 included
    evals: list[dict[str, Any]] = field(default_factory=list)
    tokens_seen: int = 0
    rows_seen: int = 0
    train_seconds: float = 0.0
    #: the base model's metrics (adapter off), measured once before step 1 and kept
    #: through a resume, by name: ``retrieval_base``, ``mntp_base``
    baselines: dict[str, Any] = field(default_factory=dict)

    _KEYS = ("step", "history", "evals", "tokens_seen", "train_seconds", "fingerprint")

    @property
    def seen(self) -> int:
        """The count of :attr:`seen_unit` so far."""
        return self.tokens_seen if self.seen_unit == "tokens" else self.rows_seen

    def count(self, seen: int) -> None:
        if self.seen_unit == "tokens":
            self.tokens_seen += seen
        else:
            self.rows_seen += seen

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "history": self.history,
            "evals": self.evals,
            "tokens_seen": self.seen,  # the checkpoint's name for the count, whatever its unit
            "train_seconds": self.train_seconds,
            "fingerprint": self.fingerprint,
            "world_size": self.world_size,
            **self.baselines,
        }

    @classmethod
    def from_json(cls, saved: dict[str, Any], *, seen_unit: SeenUnit, world_size: int) -> RunState:
        """The state ``saved`` (a checked ``trainer_state.json``) in a run of ``world_size``."""
        state = cls(
            fingerprint=saved["fingerprint"],
            world_size=world_size,
            seen_unit=seen_unit,
            step=saved["step"],
            history=saved["history"],
            evals=saved.get("evals", []),
            train_seconds=saved.get("train_seconds", 0.0),
            baselines={k: v for k, v in saved.items() if k not in (*cls._KEYS, "world_size")},
        )
        state.count(saved.get("tokens_seen", 0))
        return state


class ProgressLines:
    """The progress bar's stand-in where stderr is no terminal (a log file, CI): one line
    every ``every`` steps, and at the first and the last, with the loss, the time per step
    and the time left. ``every=None``: silent."""

    def __init__(self, desc: str, total: int, *, every: int | None, start: int = 0) -> None:
        self.desc, self.total, self.every, self.start = desc, total, every, start
        self.started = time.perf_counter()
        if every is not None and start < total:
            resumed = f", resumed at step {start}" if start else ""
            self._print(f"{desc}: {total} step(s){resumed}; a line every {every} step(s)")

    def step(self, step: int, loss: float) -> None:
        if self.every is None:
            return
        if step % self.every and step not in (self.start + 1, self.total):
            return
        per_step = (time.perf_counter() - self.started) / max(step - self.start, 1)
        left = per_step * (self.total - step)
        self._print(
            f"{self.desc}: step {step}/{self.total} ({100 * step // self.total}%), loss "
            f"{loss:.4f}, {per_step:.2f} s/step"
            + (f", about {_duration(left)} left" if step < self.total else "")
        )

    @staticmethod
    def _print(text: str) -> None:
        print(text, file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class TrainingRun:
    """The bookkeeping every training loop shares, around a loop-specific step (see the
    module docstring). ``seen_unit`` names what :attr:`StepResult.seen` counts."""

    def __init__(
        self,
        *,
        config: BundleConfig,
        run_dir: Path,
        model: Any,
        optimizer: Any,
        total_steps: int,
        fingerprint: dict[str, Any],
        dist: Distributed | None = None,
        desc: str = "training",
        seen_unit: SeenUnit = "tokens",
    ) -> None:
        from transformers import get_scheduler

        self.config, self.run_dir, self.model = config, run_dir, model
        self.optimizer, self.dist = optimizer, dist
        self.scheduler = get_scheduler(
            config.lr_scheduler,
            optimizer,
            num_warmup_steps=config.warmup_steps,
            num_training_steps=total_steps,
        )
        self.total_steps, self.desc = total_steps, desc
        self.world = dist.world_size if dist is not None else 1
        self.main = dist is None or dist.is_main
        self.fingerprint = {**fingerprint, "total_steps": total_steps}
        self.state = RunState(
            fingerprint=self.fingerprint, world_size=self.world, seen_unit=seen_unit
        )
        self.resumed_from: str | None = None

    def resume(self) -> bool:
        """Load the checkpoint ``config.resume`` names, if any; ``True`` when one was."""
        checkpoint = find_checkpoint(self.run_dir, self.config.resume)
        if checkpoint is None:
            return False
        # checked before anything else of the checkpoint is read
        saved = read_checkpoint(checkpoint, fingerprint=self.fingerprint, dist=self.dist)
        load_checkpoint(
            checkpoint,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            dist=self.dist,
        )
        self.state = RunState.from_json(
            saved, seen_unit=self.state.seen_unit, world_size=self.world
        )
        self.resumed_from = str(checkpoint)
        if self.main:
            log_event(logger, "bundle_resume", checkpoint=str(checkpoint), step=self.state.step)
        return True

    def _save(self) -> None:
        save_checkpoint(
            self.run_dir / "checkpoints",
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            state=self.state.to_json(),
            dist=self.dist,
        )

    def _open_log(self) -> IO[str] | None:
        """``train_log.jsonl`` (rank 0), holding the history so far; it grows as steps
        happen, and the bundle rewrites it whole at the end."""
        if not self.main:
            return None
        log_file = open(self.run_dir / "train_log.jsonl", "w", encoding="utf-8")  # noqa: SIM115
        log_file.writelines(json.dumps(row) + "\n" for row in self.state.history)
        log_file.flush()
        return log_file

    def run(
        self,
        step_fn: Callable[[int], StepResult],
        *,
        evaluate: Callable[[], dict[str, Any] | None],
        epoch_at: Callable[[int], float],
    ) -> None:
        """Run ``step_fn(step)`` (forward and backward of one step) until the last step,
        updating the weights and doing the bookkeeping after each."""
        from tqdm.auto import tqdm

        config, state = self.config, self.state
        bar = tqdm(
            total=self.total_steps,
            initial=state.step,
            desc=self.desc,
            unit="step",
            disable=not (config.progress and self.main),
            file=sys.stderr,
            dynamic_ncols=True,
        )
        log_file = self._open_log()
        lines = ProgressLines(
            self.desc,
            self.total_steps,
            every=config.progress_every if self.main and bar.disable else None,
            start=state.step,
        )
        try:
            while state.step < self.total_steps:
                self._one_step(step_fn, epoch_at, bar=bar, lines=lines, log_file=log_file)
                self._evaluate_and_save(evaluate)
        except KeyboardInterrupt:
            # keep the work done so far: --resume continues from here (one process only: the
            # others of a multi-process run may already be gone, a collective would hang)
            if state.step > 0 and self.dist is None:
                with contextlib.suppress(Exception):
                    self._save()
            raise
        finally:
            bar.close()
            if log_file is not None:
                log_file.close()

    def _one_step(
        self,
        step_fn: Callable[[int], StepResult],
        epoch_at: Callable[[int], float],
        *,
        bar: Any,
        lines: ProgressLines,
        log_file: IO[str] | None,
    ) -> None:
        """One optimizer step: the objective's forward and backward, the update, the
        counters, the step's ``train_log.jsonl`` record, progress and event."""
        state = self.state
        started = time.perf_counter()
        result = step_fn(state.step)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.train_seconds += time.perf_counter() - started
        state.count(result.seen)
        state.step = step = state.step + 1
        record = {
            "step": step,
            "loss": result.loss,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": result.grad_norm,
            **result.record,
            "epoch": epoch_at(step),
        }
        state.history.append(record)
        if log_file is not None:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
        bar.update(1)
        bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
        lines.step(step, result.loss)
        if self.main and (step % self.config.logging_steps == 0 or step == self.total_steps):
            log_event(logger, "bundle_train_step", **record)

    def _evaluate_and_save(self, evaluate: Callable[[], dict[str, Any] | None]) -> None:
        """The evaluation and the checkpoint that fall due after a step (none after the
        last: the objective evaluates then, the bundle saves the adapter)."""
        config, step = self.config, self.state.step
        last = step == self.total_steps
        if config.eval_steps and step % config.eval_steps == 0 and not last:
            found = evaluate()
            if found is not None:
                self.state.evals.append({"step": step, **found})
                if self.main:
                    log_event(logger, "bundle_eval", step=step, **found)
        if config.save_steps and step % config.save_steps == 0 and not last:
            self._save()

    def metrics(self, *, epoch_at: Callable[[int], float]) -> dict[str, Any]:
        """The figures every loop reports (the throughput in :attr:`RunState.seen_unit`)."""
        state, history = self.state, self.state.history
        seconds, seen, unit = state.train_seconds, state.seen, state.seen_unit
        return {
            "steps": state.step,
            "epochs": epoch_at(state.step),
            "train_loss": history[-1]["loss"] if history else None,
            "train_loss_mean": sum(h["loss"] for h in history) / len(history) if history else None,
            f"{unit}_seen": seen,
            "train_seconds": round(seconds, 3),
            f"{unit}_per_second": round(seen / seconds, 2) if seconds else None,
            "world_size": self.world,
        }
