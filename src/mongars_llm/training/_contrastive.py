"""The embedding objectives: a LoRA adapter trained for what ``embed`` returns.

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

The vectors are computed as serving computes them (:mod:`._vectors`), so an
adapter embeds at serve time exactly as it was trained.

``matryoshka_dims`` (Matryoshka representation learning, as
sentence-transformers' ``MatryoshkaLoss``): the loss is the sum of the loss of
the full vectors and of their first N dimensions for each N (``info_nce``
re-normalises the cut vectors, as serving does), so ``embed(dimensions=N)``
keeps most of the quality; the dimensions are recorded in
``llm2vec_config.json`` (and so in the registry) as ``matryoshka_dims``.

``mini_batch_size`` embeds a batch in chunks (:func:`backward_in_chunks`,
GradCache): the gradient of the whole batch with the activations of one chunk.

Both run in the loop the embedding objectives share (:mod:`._embedding_loop`).
Past one process (DDP) each rank embeds its slice of the global micro-batch and
the in-batch negatives are gathered from every rank
(:meth:`~._distributed.Distributed.assemble`), so the negatives, the loss and
the summed gradient are those of one process with the whole global batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import BundleError
from ._config import BundleConfig
from ._embedding_loop import EmbeddingObjective, EmbeddingSteps, NoEvaluations
from ._objective import Examples, TrainInputs
from ._pairs import PairExample
from ._vectors import EmbeddingSpec, encode_texts, hidden_size

if TYPE_CHECKING:
    import torch

    from ._distributed import Distributed

__all__ = [
    "CONTRASTIVE",
    "SIMCSE",
    "ContrastiveBatch",
    "attention_dropout",
    "backward_in_chunks",
    "contrastive_batch",
    "info_nce",
]


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


@dataclass(frozen=True)
class ContrastiveBatch:
    """What one micro-batch embeds and how its vectors are scored."""

    #: the ``(instruction, text)`` items to embed, in the order ``loss`` reads their vectors
    items: list[tuple[str, str]]
    #: the batch row each item comes from (which process embeds it, past one process)
    rows: list[int]
    #: the loss as a function of the items' vectors
    loss: Callable[[torch.Tensor], torch.Tensor]


def contrastive_batch(
    batch: Sequence[PairExample], config: BundleConfig, *, device: Any, weight: float = 1.0
) -> ContrastiveBatch:
    """The items one micro-batch embeds, and its loss (times ``weight``) as a function of
    their vectors (see the module docstring)."""
    batch_loss = _contrastive_loss(batch, config, device=device, weight=weight)
    dims = config.matryoshka_dims
    if not dims:
        return batch_loss

    def matryoshka(vectors: torch.Tensor) -> torch.Tensor:
        total = batch_loss.loss(vectors)
        for size in dims:
            if size < vectors.shape[-1]:
                total = total + batch_loss.loss(vectors[..., :size])
        return total

    return ContrastiveBatch(batch_loss.items, batch_loss.rows, matryoshka)


def _contrastive_loss(
    batch: Sequence[PairExample], config: BundleConfig, *, device: Any, weight: float
) -> ContrastiveBatch:
    n = len(batch)
    if config.objective == "simcse":
        keys = [e.query.strip() for e in batch]

        def simcse(vectors: torch.Tensor) -> torch.Tensor:
            return (
                info_nce(
                    vectors[:n],
                    vectors[n:],
                    temperature=config.temperature,
                    masked=_duplicates(keys, keys, device),
                )
                * weight
            )

        items = [("", e.query) for e in batch]
        return ContrastiveBatch(items + items, [*range(n), *range(n)], simcse)
    with_negative = [i for i, e in enumerate(batch) if e.negative is not None]
    items = (
        [(e.instruction, e.query) for e in batch]
        + [("", e.positive) for e in batch]
        + [("", batch[i].negative or "") for i in with_negative]
    )
    positive_keys = [e.positive.strip() for e in batch]
    doc_keys = positive_keys + [(batch[i].negative or "").strip() for i in with_negative]
    query_keys = [f"{e.instruction}\x00{e.query.strip()}" for e in batch]

    def contrastive(vectors: torch.Tensor) -> torch.Tensor:
        queries, documents = vectors[:n], vectors[n:]
        loss = info_nce(
            queries,
            documents,
            temperature=config.temperature,
            masked=_duplicates(positive_keys, doc_keys, device),
        )
        if config.symmetric_loss:
            reverse = info_nce(
                documents[:n],
                queries,
                temperature=config.temperature,
                masked=_duplicates(query_keys, query_keys, device),
            )
            loss = (loss + reverse) / 2
        return loss * weight

    return ContrastiveBatch(items, [*range(n), *range(n), *with_negative], contrastive)


def backward_in_chunks(
    model: Any,
    tokenizer: Any,
    items: Sequence[tuple[str, str]],
    spec: EmbeddingSpec,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    *,
    chunk: int,
    device: Any,
) -> torch.Tensor:
    """GradCache (Gao et al., 2021): the gradient of ``loss_of(vectors of items)`` with the
    activations of only ``chunk`` texts in memory at a time; returns the loss.

    1. embed every chunk without a graph, keeping the RNG state each started with;
    2. the loss on all the vectors at once (every text is a negative of every other),
       and its gradient with respect to the vectors;
    3. embed each chunk again from its saved RNG state (the same dropout masks) and
       backpropagate that chunk's share of the gradient through the model.

    The result equals one forward and backward of the whole batch, up to float
    rounding, for twice the forward compute.
    """
    import torch

    chunks = [items[i : i + chunk] for i in range(0, len(items), chunk)]
    states, parts = [], []
    with torch.no_grad():
        for part in chunks:
            states.append(_device_rng_state(device))
            parts.append(encode_texts(model, tokenizer, part, spec, device=device))
    vectors = torch.cat(parts).detach().requires_grad_(True)
    loss = loss_of(vectors)
    loss.backward()
    assert vectors.grad is not None
    grads = vectors.grad.split([len(part) for part in chunks])
    after = _device_rng_state(device)
    for part, state, grad in zip(chunks, states, grads, strict=True):
        _set_device_rng_state(state, device)
        encode_texts(model, tokenizer, part, spec, device=device).backward(grad)
    _set_device_rng_state(after, device)
    return loss.detach()


def _device_rng_state(device: Any) -> tuple[Any, Any]:
    """The torch RNG state of the CPU and of ``device`` (GradCache replays a chunk's
    dropout masks from it; not a checkpoint's RNG state, :mod:`._checkpoints`)."""
    import torch

    on_cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if on_cuda else None


def _set_device_rng_state(state: tuple[Any, Any], device: Any) -> None:
    import torch

    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


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


def _contrastive_micro_batch(
    model: Any,
    tokenizer: Any,
    spec: EmbeddingSpec,
    config: BundleConfig,
    pairs: Sequence[PairExample],
    *,
    weight: float,
    device: Any,
    dist: Distributed | None,
) -> float:
    """Forward and backward of one micro-batch of the contrastive objectives; returns its
    loss. Past one process every rank embeds its own rows (a slice of ``pairs``, the
    global micro-batch) and scores them against the vectors of all the ranks."""
    import torch

    batch = contrastive_batch(pairs, config, device=device, weight=weight)
    loss_of = batch.loss
    items = batch.items
    if dist is not None:
        size = config.batch_size  # rank r: rows [r * size, (r + 1) * size)
        positions = [
            [i for i, row in enumerate(batch.rows) if row // size == r]
            for r in range(dist.world_size)
        ]
        items = [batch.items[i] for i in positions[dist.rank]]

        def loss_of(local: torch.Tensor) -> torch.Tensor:
            return batch.loss(dist.assemble(local, positions))

    if config.mini_batch_size and len(items) > config.mini_batch_size:
        loss = backward_in_chunks(
            model, tokenizer, items, spec, loss_of, chunk=config.mini_batch_size, device=device
        )
    else:
        if items:
            vectors = encode_texts(model, tokenizer, items, spec, device=device)
        else:  # this rank holds no row of a short last micro-batch
            vectors = torch.zeros((0, hidden_size(model)), device=device)
        loss = loss_of(vectors)
        if loss.requires_grad:
            loss.backward()
    return float(loss.detach())


class _ContrastiveSteps(NoEvaluations):
    """A run's contrastive (or simcse) step: each micro-batch its own negatives."""

    def __init__(
        self, inputs: TrainInputs, spec: EmbeddingSpec, *, attention: float | None = None
    ) -> None:
        self.inputs, self.spec, self.attention = inputs, spec, attention
        dims = inputs.config.matryoshka_dims or []
        width = hidden_size(inputs.model)
        if any(size >= width for size in dims):
            raise BundleError(
                f"matryoshka_dims {dims} must be smaller than the model's {width} dimensions "
                "(the full vectors are always trained)"
            )

    def step(self, step: int, micro_batches: list[list[int]]) -> tuple[float, dict[str, Any]]:
        inputs, rows = self.inputs, self.inputs.examples.train
        loss = sum(
            _contrastive_micro_batch(
                inputs.model,
                inputs.tokenizer,
                self.spec,
                inputs.config,
                [rows[i] for i in indices],
                weight=1 / len(micro_batches),  # each micro-batch its own negatives
                device=inputs.precision.device,
                dist=inputs.dist,
            )
            for indices in micro_batches
        )
        return loss, {}

    def training(self) -> AbstractContextManager[Any]:
        if self.attention is None:
            return contextlib.nullcontext()
        return attention_dropout(self.inputs.model, self.attention)


def _matryoshka(config: BundleConfig) -> dict[str, Any]:
    """``{"matryoshka_dims": [...]}`` when the run trains truncations (absent otherwise,
    so the fingerprints of runs without them stay as they were)."""
    return {"matryoshka_dims": list(config.matryoshka_dims)} if config.matryoshka_dims else {}


def _two_rows(name: str, examples: Examples) -> None:
    if len(examples.train) < 2:
        raise BundleError(
            f"{name} needs at least 2 training rows (the other rows of a batch are "
            f"the negatives); {len(examples.train)} remain after the checks"
        )


class ContrastiveObjective(EmbeddingObjective):
    """Query/positive(/negative) pairs, InfoNCE with in-batch negatives."""

    name = "contrastive"
    holds_out_pairs = True

    def check_training(self, config: BundleConfig, examples: Examples) -> None:
        _two_rows(self.name, examples)

    def fingerprint_extra(self, config: BundleConfig) -> dict[str, Any]:
        return _matryoshka(config)

    def embedding_extra(self, config: BundleConfig) -> dict[str, Any]:
        return _matryoshka(config)

    def steps(self, inputs: TrainInputs, spec: EmbeddingSpec) -> EmbeddingSteps:
        return _ContrastiveSteps(inputs, spec)


class SimcseObjective(EmbeddingObjective):
    """Plain texts, each its own positive through two dropout masks."""

    name = "simcse"

    def check_training(self, config: BundleConfig, examples: Examples) -> None:
        if config.simcse_dropout == 0 and config.lora_dropout == 0:
            raise BundleError(
                "simcse needs dropout: its two views of a text differ only by dropout; set "
                "simcse_dropout (the base model's attention dropout) or lora_dropout above 0"
            )
        _two_rows(self.name, examples)

    def fingerprint_extra(self, config: BundleConfig) -> dict[str, Any]:
        return {"simcse_dropout": config.simcse_dropout, **_matryoshka(config)}

    def embedding_extra(self, config: BundleConfig) -> dict[str, Any]:
        return _matryoshka(config)

    def steps(self, inputs: TrainInputs, spec: EmbeddingSpec) -> EmbeddingSteps:
        return _ContrastiveSteps(inputs, spec, attention=inputs.config.simcse_dropout)


CONTRASTIVE = ContrastiveObjective()
SIMCSE = SimcseObjective()
