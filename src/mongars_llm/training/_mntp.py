"""The ``mntp`` objective: masked next-token prediction (LLM2Vec's first step).

A decoder trained causally has never seen a token's right-hand context, so
its states are poor embeddings once attention is made bidirectional. MNTP
teaches it to use that context: a share of the tokens of each text
(``mask_probability``) is chosen; of those, 80% are replaced by a mask token,
10% by a random token and 10% kept (BERT's recipe, as llm2vec's collator
does); with bidirectional attention the model predicts each chosen token from
the logits of the position *before* it, so the LM head is used as trained.

The mask token is the tokenizer's own if it has one, else ``_`` (llm2vec's
``mask_token_type="blank"`` default for Llama and Mistral), else the unknown
or end-of-sequence token. The first token of a text and the tokenizer's
special tokens are never chosen (the first has no previous position).

The choice of tokens is a pure function of ``(seed, step, micro-batch)``, so a
resumed run masks exactly as a straight run would; evaluation always masks
the held-out texts the same way, so its loss is comparable between steps.

:class:`MntpObjective` runs in the loop the embedding objectives share
(:mod:`._embedding_loop`): its step is the masked-token cross-entropy,
token-weighted over the step's micro-batches; its evaluation (``mntp_loss``,
``mntp_accuracy``) runs on texts held out of the training file, beside the
retrieval metrics of an eval file of pairs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import BundleError
from ._config import BundleConfig
from ._embedding_loop import EmbeddingObjective, EmbeddingSteps, Evaluation, NoEvaluations
from ._objective import TrainInputs
from ._vectors import EmbeddingSpec

if TYPE_CHECKING:
    import torch

__all__ = ["MNTP", "MaskedBatch", "Masker", "MntpObjective", "evaluate_mntp", "masked_sums"]

#: BERT's split of the chosen tokens: replaced by the mask token, by a random token, kept
_MASK_SHARE, _RANDOM_SHARE = 0.8, 0.1


@dataclass
class MaskedBatch:
    """Padded model inputs and labels (``-100`` where nothing is predicted)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @property
    def targets(self) -> int:
        return int((self.labels != -100).sum())

    def rows(self, start: int, stop: int) -> MaskedBatch:
        """Rows ``start:stop``, cut to their longest (one process's slice of a batch)."""
        attention = self.attention_mask[start:stop]
        width = int(attention.sum(-1).max()) if len(attention) else 0
        return MaskedBatch(
            self.input_ids[start:stop, :width],
            attention[:, :width],
            self.labels[start:stop, :width],
        )


class Masker:
    """Tokenises texts once and masks them reproducibly."""

    def __init__(self, tokenizer: Any, *, probability: float, max_length: int, seed: int) -> None:
        if not 0 < probability < 1:
            raise BundleError(f"mask_probability must be between 0 and 1, got {probability}")
        self.probability, self.seed, self.max_length = probability, seed, max_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.mask_id = mask_token_id(tokenizer)
        self.special = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
        self.vocab_size = len(tokenizer)
        self._tokenizer = tokenizer

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (special tokens as the tokenizer adds them), cut at
        ``max_length``."""
        if not texts:
            return []
        encoded = self._tokenizer(
            list(texts),
            add_special_tokens=True,
            truncation=True,
            max_length=self.max_length,
            return_attention_mask=False,
            verbose=False,
        )
        return [list(ids) for ids in encoded["input_ids"]]

    def generator(self, *key: Any) -> torch.Generator:
        import torch

        digest = hashlib.sha256(repr((self.seed, *key)).encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))

    def mask(self, rows: Sequence[Sequence[int]], *key: Any, device: Any) -> MaskedBatch:
        """Right-padded inputs with the chosen tokens masked, and their labels; ``key``
        (e.g. the step and micro-batch) seeds the choice."""
        import torch

        gen = self.generator(*key)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention[i, : len(row)] = True
        eligible = attention.clone()
        eligible[:, 0] = False
        if self.special:
            eligible &= ~torch.isin(ids, torch.tensor(sorted(self.special)))
        draw = torch.rand(ids.shape, generator=gen)
        chosen = eligible & (draw < self.probability)
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        # BERT's 80/10/10 among the chosen, from a second draw
        share = torch.rand(ids.shape, generator=gen)
        inputs = ids.clone()
        inputs[chosen & (share < _MASK_SHARE)] = self.mask_id
        swap = chosen & (share >= _MASK_SHARE) & (share < _MASK_SHARE + _RANDOM_SHARE)
        inputs[swap] = torch.randint(self.vocab_size, ids.shape, generator=gen)[swap]
        return MaskedBatch(inputs.to(device), attention.to(device), labels.to(device))


def mask_token_id(tokenizer: Any) -> int:
    """The tokenizer's mask token, else ``_`` (llm2vec's default), else UNK or EOS."""
    if getattr(tokenizer, "mask_token_id", None) is not None:
        return int(tokenizer.mask_token_id)
    blank = tokenizer.convert_tokens_to_ids("_")
    unk = getattr(tokenizer, "unk_token_id", None)
    if isinstance(blank, int) and blank != unk:
        return blank
    for candidate in (unk, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise BundleError("mntp needs a mask token: the tokenizer has no mask, '_', UNK or EOS token")


def masked_sums(model: Any, batch: MaskedBatch) -> tuple[torch.Tensor, int, int]:
    """Summed cross-entropy over the masked tokens, their count and how many the model
    got right. Token ``t`` is predicted from position ``t - 1`` with bidirectional
    attention; the LM head runs on those positions only."""
    import torch.nn.functional as F

    from ..runtime import decoder_of, run_decoder

    hidden = run_decoder(
        decoder_of(model), batch.input_ids, batch.attention_mask, bidirectional=True
    )
    labels = batch.labels[:, 1:]
    where = labels != -100
    count = int(where.sum())
    if count == 0:
        return hidden.sum() * 0.0, 0, 0
    head = model.get_output_embeddings()
    logits = head(hidden[:, :-1][where]).float()
    targets = labels[where]
    loss = F.cross_entropy(logits, targets, reduction="sum")
    correct = int((logits.argmax(-1) == targets).sum())
    return loss, count, correct


def evaluate_mntp(
    model: Any,
    masker: Masker,
    rows: Sequence[Sequence[int]],
    *,
    device: Any,
    batch_size: int,
    adapter: bool = True,
) -> dict[str, float] | None:
    """``mntp_loss`` (mean over masked tokens) and ``mntp_accuracy`` of the held-out texts,
    masked the same way every time; ``adapter=False`` measures the base model."""
    if not rows:
        return None
    import contextlib

    import torch

    disable = (
        model.disable_adapter()
        if not adapter and hasattr(model, "disable_adapter")
        else contextlib.nullcontext()
    )
    total, count, correct = 0.0, 0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), disable:
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                loss, n, right = masked_sums(
                    model, masker.mask(chunk, "eval", start, device=device)
                )
                total, count, correct = total + float(loss), count + n, correct + right
    finally:
        model.train(was_training)
    if not count:
        return None
    return {"mntp_loss": round(total / count, 6), "mntp_accuracy": round(correct / count, 6)}


class _MntpSteps(NoEvaluations):
    """A run's masked-token step and evaluation (the texts tokenised once)."""

    def __init__(self, inputs: TrainInputs, spec: EmbeddingSpec) -> None:
        config = inputs.config
        self.inputs = inputs
        self.masker = Masker(
            inputs.tokenizer,
            probability=config.mask_probability,
            max_length=spec.max_length,
            seed=config.seed,
        )
        self.train_ids = self.masker.encode([e.query for e in inputs.examples.train])
        self.eval_ids = self.masker.encode([e.query for e in inputs.examples.eval_texts])

    def step(self, step: int, micro_batches: list[list[int]]) -> tuple[float, dict[str, Any]]:
        """Masked-token cross-entropy, a mean over the step's masked tokens (each rank
        its slice of every global micro-batch, masked as one process masks it)."""
        model, dist, device = self.inputs.model, self.inputs.dist, self.inputs.precision.device
        batches = [
            self.masker.mask([self.train_ids[i] for i in indices], step, k, device=device)
            for k, indices in enumerate(micro_batches)
        ]
        targets = sum(b.targets for b in batches)
        loss_value = 0.0
        for batch in batches:
            if dist is not None:
                size = self.inputs.config.batch_size
                batch = batch.rows(dist.rank * size, (dist.rank + 1) * size)
            if len(batch.labels):
                loss, _, _ = masked_sums(model, batch)
                (loss / max(targets, 1)).backward()
                loss_value += float(loss.detach()) / max(targets, 1)
        if dist is not None:
            loss_value = dist.sum([loss_value])[0]
        return loss_value, {"masked_tokens": targets}

    def evaluate(self, adapter: bool) -> dict[str, Any] | None:
        """The held-out texts' masked-token metrics (rank 0 alone)."""
        inputs = self.inputs
        if inputs.dist is not None and not inputs.dist.is_main:
            return None
        return evaluate_mntp(
            inputs.model,
            self.masker,
            self.eval_ids,
            device=inputs.precision.device,
            batch_size=max(inputs.config.batch_size, 16),
            adapter=adapter,
        )

    def evaluations(self) -> dict[str, Evaluation]:
        return {"mntp": self.evaluate}

    def metrics(self) -> dict[str, Any]:
        return {"eval_texts": len(self.inputs.examples.eval_texts)}


class MntpObjective(EmbeddingObjective):
    """Plain texts, masked next-token prediction with bidirectional attention."""

    name = "mntp"
    holds_out_texts = True
    registry_metrics: tuple[str, ...] = (
        *EmbeddingObjective.registry_metrics,
        "mntp_base",
        "mntp",
    )

    def fingerprint_extra(self, config: BundleConfig) -> dict[str, Any]:
        return {"mask_probability": config.mask_probability}

    def embedding_extra(self, config: BundleConfig) -> dict[str, Any]:
        return {"mask_probability": config.mask_probability}

    def steps(self, inputs: TrainInputs, spec: EmbeddingSpec) -> EmbeddingSteps:
        return _MntpSteps(inputs, spec)


MNTP = MntpObjective()
