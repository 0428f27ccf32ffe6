"""The chat objective's loss and evaluation: cross-entropy on label positions only.

The LM head runs on the positions that have a label (completion tokens, not the
prompt) where the model allows it (:func:`label_logits_fn`); the loss is a sum,
token-weighted by the caller across gradient-accumulation micro-batches.
:func:`label_loss_module` wraps it in an ``nn.Module`` so DDP/FSDP see the whole
computation; :func:`evaluate_distributed` deals the eval batches over the ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ._batches import Batch, collate
from ._data import IGNORE_INDEX, EncodedExample

if TYPE_CHECKING:
    from ._distributed import Distributed

__all__ = [
    "count_label_tokens",
    "evaluate",
    "evaluate_distributed",
    "label_logits_fn",
    "label_loss_module",
    "label_loss_sum",
]


def label_logits_fn(model: Any) -> Callable[[Batch], tuple[Any, Any]]:
    """``batch -> (logits at label positions, shifted targets)``.

    The LM head runs on the positions that have a label only; models with a
    custom logit transform (soft-capping, scaling) fall back to full logits.
    """
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = causal.config
    fast = (
        hasattr(causal, "get_decoder")
        and causal.get_output_embeddings() is not None
        and not getattr(cfg, "final_logit_softcapping", None)
        and getattr(cfg, "logit_scale", None) is None
        and getattr(cfg, "logits_scaling", None) is None
    )

    def full(batch: Batch) -> tuple[Any, Any]:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        targets = batch.labels[:, 1:]
        keep = targets != IGNORE_INDEX
        return out.logits[:, :-1][keep], targets[keep]

    if not fast:
        return full
    decoder, head = causal.get_decoder(), causal.get_output_embeddings()

    def selective(batch: Batch) -> tuple[Any, Any]:
        hidden = decoder(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        ).last_hidden_state
        targets = batch.labels[:, 1:]
        keep = targets != IGNORE_INDEX
        return head(hidden[:, :-1][keep]), targets[keep]

    return selective


def label_loss_sum(logits_fn: Callable[[Batch], tuple[Any, Any]], batch: Batch) -> Any:
    import torch.nn.functional as F

    logits, targets = logits_fn(batch)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def count_label_tokens(batch: Batch) -> int:
    return int((batch.labels[:, 1:] != IGNORE_INDEX).sum())


def evaluate(
    model: Any, examples: Sequence[EncodedExample], *, batch_size: int, pad_id: int, device: str
) -> dict[str, Any] | None:
    """Token-weighted eval loss and perplexity (``None`` without eval examples)."""
    import torch

    if not examples:
        return None
    was_training = model.training
    model.eval()
    logits_fn = label_logits_fn(model)
    total, count = 0.0, 0
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    with torch.no_grad():
        for start in range(0, len(ordered), batch_size):
            batch = collate(ordered[start : start + batch_size], pad_id, device)
            total += float(label_loss_sum(logits_fn, batch))
            count += count_label_tokens(batch)
    model.train(was_training)
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 80.0)), "eval_tokens": count}


def label_loss_module(model: Any) -> Any:
    """``model`` inside an ``nn.Module`` whose forward returns the summed label loss, so
    DDP/FSDP see the whole computation (the fast path calls the decoder and the LM head
    directly, which a wrapper around the peft model alone would never see)."""
    import torch

    class LabelLoss(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.model = inner
            self._logits: Callable[[Batch], tuple[Any, Any]] | None = None

        def forward(self, input_ids: Any, attention_mask: Any, labels: Any) -> Any:
            if self._logits is None:  # after wrapping: FSDP replaces submodules in place
                self._logits = label_logits_fn(self.model)
            return label_loss_sum(self._logits, Batch(input_ids, attention_mask, labels))

    return LabelLoss(model)


def evaluate_distributed(
    wrapped: Any,
    examples: Sequence[EncodedExample],
    *,
    batch_size: int,
    pad_id: int,
    device: str,
    dist: Distributed,
) -> dict[str, Any] | None:
    """:func:`evaluate` with the eval batches dealt round-robin over the ranks.

    Every rank runs the same number of forwards (a rank without a batch runs a
    zero-weight one): FSDP gathers parameters inside each forward on every rank.
    """
    import torch

    if not examples:
        return None
    was_training = wrapped.training
    wrapped.eval()
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    starts = list(range(0, len(ordered), batch_size))
    rounds = math.ceil(len(starts) / dist.world_size)
    total, count = 0.0, 0.0
    with torch.no_grad():
        for round_ in range(rounds):
            j = round_ * dist.world_size + dist.rank
            weight = 1.0 if j < len(starts) else 0.0
            part = ordered[starts[j] : starts[j] + batch_size] if weight else ordered[:1]
            batch = collate(part, pad_id, device)
            total += weight * float(wrapped(batch.input_ids, batch.attention_mask, batch.labels))
            count += weight * count_label_tokens(batch)
    wrapped.train(was_training)
    total, count = dist.sum([total, count])
    loss = total / max(count, 1)
    return {
        "eval_loss": loss,
        "eval_perplexity": math.exp(min(loss, 80.0)),
        "eval_tokens": int(count),
    }
