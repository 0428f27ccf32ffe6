"""The embedding objectives: a LoRA adapter trained on pooled, L2-normalised vectors.

``contrastive`` (LLM2Vec's supervised step): InfoNCE of each query against
every positive of its micro-batch (in-batch negatives) plus every hard
negative of the micro-batch, at temperature ``config.temperature``. The loss
is one-way (query -> documents) by default, as LLM2Vec and E5 train it:
queries carry the instruction and documents do not, so the reverse direction
would teach documents to find instructed queries, which serving never asks;
``symmetric_loss`` adds it for symmetric tasks (paraphrase, duplicate
detection). A candidate whose text equals the query's own positive (two rows
sharing a passage) is masked, not counted as a negative.

``simcse`` (LLM2Vec's unsupervised step): each text is embedded twice in one
forward batch; the dropout masks differ per row, so the two views differ and
are each other's positive, the other texts the negatives. Dropout comes from
LoRA (``lora_dropout``) and from the base model's attention dropout, raised to
``simcse_dropout`` on every attention module for the run (Llama-style models
read it per module at construction; it is put back afterwards).

The vectors are computed by the runtime's LLM2Vec core
(:mod:`mongars_llm.runtime._llm2vec`: composition, llm2vec's counting span,
padding, the causal or bidirectional decoder run, pooling, normalisation),
so an adapter embeds at serve time exactly as it was trained.

The loop reuses the chat loop's parts (:mod:`._trainer`): the seeded batch
plan, AdamW and the learning-rate schedule, checkpoints and ``--resume``, the
progress bar and ``train_log.jsonl``. One process only: in-batch negatives
across processes would need the batch gathered (refused in the config).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BundleError
from ..logging import log_event
from ._config import BundleConfig
from ._pairs import PairExample

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ._trainer import Precision, TrainOutcome

__all__ = ["EmbeddingSpec", "encode_texts", "evaluate_retrieval", "info_nce", "train_embeddings"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddingSpec:
    """How texts are embedded: the same in training, evaluation and serving."""

    pooling: str
    bidirectional: bool
    max_length: int
    #: the config's ``model_type`` and the base model's Hub id (llm2vec's EOS and prompts)
    model_type: str = ""
    model_id: str = ""

    @classmethod
    def of(cls, config: BundleConfig, model: Any) -> EmbeddingSpec:
        model_config = model.config
        if hasattr(model_config, "get_text_config"):
            model_config = model_config.get_text_config()
        limit = config.max_seq_len
        positions = getattr(model_config, "max_position_embeddings", None)
        if positions:
            limit = min(limit, int(positions))
        return cls(
            pooling=config.pooling,
            bidirectional=config.bidirectional,
            max_length=limit,
            model_type=str(getattr(model_config, "model_type", "") or ""),
            model_id=config.base_model,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "pooling": self.pooling,
            "bidirectional": self.bidirectional,
            "max_length": self.max_length,
        }


def encode_texts(
    model: Any,
    tokenizer: Any,
    items: Sequence[tuple[str, str]],
    spec: EmbeddingSpec,
    *,
    device: Any,
) -> torch.Tensor:
    """Pooled vectors (float32, not normalised) of ``(instruction, text)`` items in one
    padded forward batch, through the runtime's LLM2Vec core; gradients flow when enabled."""
    from ..runtime._llm2vec import decoder_of, embed_padded, encode_inputs

    encoded = encode_inputs(
        tokenizer,
        list(items),
        pooling=spec.pooling,
        max_length=spec.max_length,
        truncate=True,
        model_type=spec.model_type,
        model_id=spec.model_id,
    )
    return embed_padded(
        decoder_of(model),
        encoded,
        pooling=spec.pooling,
        bidirectional=spec.bidirectional,
        pad_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        padding_side=getattr(tokenizer, "padding_side", None) or "right",
        device=device,
    )


def info_nce(
    queries: torch.Tensor,
    documents: torch.Tensor,
    *,
    temperature: float,
    masked: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean InfoNCE loss: row ``i`` of ``queries`` against every document, its positive
    being document ``i``; ``masked[i, j]`` drops document ``j`` from row ``i``'s candidates.
    Scores are cosine similarities (the vectors are L2-normalised here) over ``temperature``."""
    import torch
    import torch.nn.functional as F

    q = F.normalize(queries.float(), dim=-1)
    d = F.normalize(documents.float(), dim=-1)
    scores = q @ d.T / temperature
    if masked is not None:
        scores = scores.masked_fill(masked, torch.finfo(scores.dtype).min)
    target = torch.arange(q.shape[0], device=q.device)
    return F.cross_entropy(scores, target)


def _duplicates(keys_rows: Sequence[str], keys_cols: Sequence[str], device: Any) -> torch.Tensor:
    """``[i, j]``: column ``j`` has row ``i``'s own key but is not column ``i`` (a false
    negative: another row's copy of this row's positive)."""
    import torch

    mask = torch.tensor(
        [
            [j != i and col == row for j, col in enumerate(keys_cols)]
            for i, row in enumerate(keys_rows)
        ],
        dtype=torch.bool,
    )
    return mask.to(device)


def contrastive_loss(
    model: Any,
    tokenizer: Any,
    batch: Sequence[PairExample],
    spec: EmbeddingSpec,
    config: BundleConfig,
    *,
    device: Any,
) -> torch.Tensor:
    """The loss of one micro-batch (see the module docstring)."""
    n = len(batch)
    if config.objective == "simcse":
        items = [("", e.query) for e in batch]
        vectors = encode_texts(model, tokenizer, items + items, spec, device=device)
        queries, documents = vectors[:n], vectors[n:]
        keys = [e.query.strip() for e in batch]
        loss = info_nce(
            queries,
            documents,
            temperature=config.temperature,
            masked=_duplicates(keys, keys, device),
        )
        return loss
    negatives = [e.negative for e in batch if e.negative is not None]
    items = (
        [(e.instruction, e.query) for e in batch]
        + [("", e.positive) for e in batch]
        + [("", text) for text in negatives]
    )
    vectors = encode_texts(model, tokenizer, items, spec, device=device)
    queries, documents = vectors[:n], vectors[n:]
    positive_keys = [e.positive.strip() for e in batch]
    doc_keys = positive_keys + [text.strip() for text in negatives]
    loss = info_nce(
        queries,
        documents,
        temperature=config.temperature,
        masked=_duplicates(positive_keys, doc_keys, device),
    )
    if config.symmetric_loss:
        query_keys = [f"{e.instruction}\x00{e.query.strip()}" for e in batch]
        reverse = info_nce(
            documents[:n],
            queries,
            temperature=config.temperature,
            masked=_duplicates(query_keys, query_keys, device),
        )
        loss = (loss + reverse) / 2
    return loss


# -------------------------------------------------------------------- evaluation
def embedder(
    model: Any, tokenizer: Any, spec: EmbeddingSpec, *, device: Any, batch_size: int
) -> Callable[[Sequence[Any]], np.ndarray]:
    """``embed(texts or [instruction, text] pairs) -> normalised numpy vectors`` with the
    model as it is now (eval mode is the caller's business)."""

    def embed(texts: Sequence[Any]) -> np.ndarray:
        import numpy as np
        import torch

        from ..runtime._llm2vec import normalise, normalise_inputs

        items = normalise_inputs(list(texts), None)
        out = []
        with torch.no_grad():
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                vectors = encode_texts(model, tokenizer, chunk, spec, device=device)
                out.append(normalise(vectors).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)

    return embed


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def evaluate_retrieval(
    model: Any,
    tokenizer: Any,
    rows: Sequence[PairExample],
    spec: EmbeddingSpec,
    *,
    instruction: str | None,
    device: Any,
    batch_size: int,
    adapter: bool = True,
) -> dict[str, Any] | None:
    """Retrieval metrics (MRR@10, recall@1/@10, nDCG@10) of ``rows`` against the corpus of
    their positives and negatives; ``adapter=False`` measures the base model."""
    if not rows:
        return None
    from ._retrieval import evaluate_pairs

    embed = embedder(model, tokenizer, spec, device=device, batch_size=batch_size)
    disable = (
        model.disable_adapter()
        if not adapter and hasattr(model, "disable_adapter")
        else contextlib.nullcontext()
    )
    with _eval_mode(model), disable:
        result = evaluate_pairs(embed, [e.as_row() for e in rows], instruction=instruction)
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in dict(result).items()}


# -------------------------------------------------------------------------- loop
@contextlib.contextmanager
def attention_dropout(model: Any, rate: float) -> Iterator[int]:
    """Set ``attention_dropout`` of every attention module (and the config) to ``rate``
    for the block; yields how many modules took it."""
    changed: list[tuple[Any, str, Any]] = []
    for module in model.modules():
        value = getattr(module, "attention_dropout", None)
        if isinstance(value, float) and not isinstance(value, bool):
            changed.append((module, "attention_dropout", value))
            module.attention_dropout = rate
    base_config = getattr(model, "config", None)
    if base_config is not None and isinstance(
        getattr(base_config, "attention_dropout", None), float
    ):
        changed.append((base_config, "attention_dropout", base_config.attention_dropout))
        base_config.attention_dropout = rate
    try:
        yield len(changed)
    finally:
        for owner, name, value in changed:
            setattr(owner, name, value)


def train_embeddings(
    model: Any,
    *,
    tokenizer: Any,
    config: BundleConfig,
    precision: Precision,
    spec: EmbeddingSpec,
    train_examples: Sequence[PairExample],
    eval_examples: Sequence[PairExample],
    run_dir: Path,
    fingerprint: dict[str, Any],
) -> TrainOutcome:
    """Train the peft ``model`` on an embedding objective; returns metrics (with the
    retrieval metrics of the base model and of the adapter on ``eval_examples``) and
    the loss history."""
    import torch
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from ._trainer import BatchPlan, TrainOutcome, find_checkpoint, load_checkpoint, save_checkpoint

    device = precision.device
    if config.objective == "simcse" and config.simcse_dropout == 0 and config.lora_dropout == 0:
        raise BundleError(
            "simcse needs dropout: its two views of a text differ only by dropout; set "
            "simcse_dropout (the base model's attention dropout) or lora_dropout above 0"
        )
    if len(train_examples) < 2:
        raise BundleError(
            f"{config.objective} needs at least 2 training rows (the other rows of a batch are "
            f"the negatives); {len(train_examples)} remain after the checks"
        )
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    plan = BatchPlan(
        len(train_examples),
        batch_size=config.batch_size,
        grad_accum=config.grad_accum,
        seed=config.seed,
    )
    total_steps = plan.total_steps(config.epochs, config.max_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.warmup_steps,
        num_training_steps=total_steps,
    )
    fingerprint = {**fingerprint, "total_steps": total_steps}
    eval_kwargs: dict[str, Any] = {
        "instruction": config.instruction,
        "device": device,
        "batch_size": max(config.batch_size, 16),
    }
    state: dict[str, Any] = {
        "step": 0,
        "history": [],
        "evals": [],
        "tokens_seen": 0,
        "train_seconds": 0.0,
        "fingerprint": fingerprint,
        "world_size": 1,
    }
    resumed_from = None
    checkpoint = find_checkpoint(run_dir, config.resume)
    if checkpoint is not None:
        saved = load_checkpoint(checkpoint, model=model, optimizer=optimizer, scheduler=scheduler)
        changed = {
            k: (saved["fingerprint"].get(k), v)
            for k, v in fingerprint.items()
            if saved["fingerprint"].get(k) != v
        }
        if changed:
            raise BundleError(
                f"cannot resume from {checkpoint}: the run changed since it was written "
                + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            )
        state = {**saved, "world_size": 1}
        resumed_from = str(checkpoint)
        log_event(logger, "bundle_resume", checkpoint=str(checkpoint), step=state["step"])

    def run_eval(adapter: bool = True) -> dict[str, Any] | None:
        return evaluate_retrieval(
            model, tokenizer, eval_examples, spec, adapter=adapter, **eval_kwargs
        )

    # the base model's metrics: the adapter switched off (exact: peft skips the LoRA path)
    base_metrics = state.get("retrieval_base") if checkpoint is not None else None
    if checkpoint is None:
        base_metrics = run_eval(adapter=False)
        state["retrieval_base"] = base_metrics
    model.train()
    bar = tqdm(
        total=total_steps,
        initial=state["step"],
        desc=f"training ({config.objective})",
        unit="step",
        disable=not config.progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    log_file = open(run_dir / "train_log.jsonl", "w", encoding="utf-8")  # noqa: SIM115
    log_file.writelines(json.dumps(row) + "\n" for row in state["history"])
    log_file.flush()
    dropout = (
        attention_dropout(model, config.simcse_dropout)
        if config.objective == "simcse"
        else contextlib.nullcontext()
    )
    try:
        with dropout:
            while state["step"] < total_steps:
                step = state["step"]
                started = time.perf_counter()
                micro_batches = plan.step(step)
                loss_value = 0.0
                rows = 0
                for indices in micro_batches:
                    batch = [train_examples[i] for i in indices]
                    loss = contrastive_loss(model, tokenizer, batch, spec, config, device=device)
                    (loss / len(micro_batches)).backward()
                    loss_value += float(loss.detach()) / len(micro_batches)
                    rows += len(batch)
                grad_norm = None
                if config.max_grad_norm is not None:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["train_seconds"] += time.perf_counter() - started
                state["tokens_seen"] += rows  # rows (pairs or texts) for the embedding objectives
                state["step"] = step = step + 1
                record = {
                    "step": step,
                    "loss": loss_value,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm,
                    "rows": rows,
                    "epoch": plan.epoch_at(step),
                }
                state["history"].append(record)
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
                if step % config.logging_steps == 0 or step == total_steps:
                    log_event(logger, "bundle_train_step", **record)
                if config.eval_steps and step % config.eval_steps == 0 and step < total_steps:
                    result = run_eval()
                    if result is not None:
                        state["evals"].append({"step": step, **result})
                        log_event(logger, "bundle_eval", step=step, **result)
                if config.save_steps and step % config.save_steps == 0 and step < total_steps:
                    save_checkpoint(
                        run_dir / "checkpoints",
                        model=model,
                        optimizer=optimizer,
                        scheduler=scheduler,
                        state=state,
                    )
    except KeyboardInterrupt:
        if state["step"] > 0:
            with contextlib.suppress(Exception):
                save_checkpoint(
                    run_dir / "checkpoints",
                    model=model,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    state=state,
                )
        raise
    finally:
        bar.close()
        log_file.close()
        if config.gradient_checkpointing:
            model.gradient_checkpointing_disable()

    final = run_eval()
    if final is not None:
        state["evals"].append({"step": state["step"], **final})
    model.eval()
    history = state["history"]
    seconds = state["train_seconds"]
    metrics: dict[str, Any] = {
        "objective": config.objective,
        "steps": state["step"],
        "epochs": plan.epoch_at(state["step"]),
        "train_loss": history[-1]["loss"] if history else None,
        "train_loss_mean": sum(h["loss"] for h in history) / len(history) if history else None,
        "rows_seen": state["tokens_seen"],
        "train_seconds": round(seconds, 3),
        "rows_per_second": round(state["tokens_seen"] / seconds, 2) if seconds else None,
        "train_examples": len(train_examples),
        "eval_examples": len(eval_examples),
        "world_size": 1,
        "global_batch_size": config.batch_size * config.grad_accum,
        "retrieval_base": base_metrics,
        "retrieval": final,
    }
    if state["evals"]:
        metrics["evals"] = state["evals"]
    return TrainOutcome(model=model, metrics=metrics, history=history, resumed_from=resumed_from)
