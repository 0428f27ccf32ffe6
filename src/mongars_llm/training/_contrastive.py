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

The vectors are computed by the runtime's LLM2Vec core
(:mod:`mongars_llm.runtime._llm2vec`: composition, llm2vec's counting span,
padding, the causal or bidirectional decoder run, pooling, normalisation),
so an adapter embeds at serve time exactly as it was trained.

``mini_batch_size`` embeds a batch in chunks (:func:`backward_in_chunks`,
GradCache): the gradient of the whole batch with the activations of one chunk.

``mntp`` (:mod:`._mntp`) runs in the same loop with its own step: masked-token
cross-entropy, token-weighted over the step's micro-batches.

The loop reuses the chat loop's parts (:mod:`._trainer`): the seeded batch
plan, AdamW and the learning-rate schedule, and :class:`~._trainer.TrainingRun`
(checkpoints and ``--resume``, the progress bar, ``train_log.jsonl``, events,
periodic evaluation). Past one process (DDP) each rank embeds its slice of the
global micro-batch and the in-batch negatives are gathered from every rank
(:meth:`~._distributed.Distributed.assemble`), so the negatives, the loss and
the summed gradient are those of one process with the whole global batch.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BundleError, ConfigError
from ._config import BundleConfig
from ._pairs import PairExample

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ..runtime._llm2vec import EncodedText
    from ._distributed import Distributed
    from ._trainer import Precision, TrainOutcome

__all__ = [
    "EmbeddingSpec",
    "backward_in_chunks",
    "encode_texts",
    "evaluate_retrieval",
    "forward_groups",
    "info_nce",
    "train_embeddings",
]

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
            model_id=config.base_model or "",
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
    """Pooled vectors (float32, not normalised) of ``(instruction, text)`` items, in order,
    through the runtime's LLM2Vec core; gradients flow when enabled.

    On the CPU the items run in length-sorted forward groups, each padded to its own
    longest (:func:`forward_groups`): short queries padded to the long passages beside
    them would cost the step compute and activation memory for nothing. A text's vector does not
    depend on its batch mates (up to float rounding); dropout masks are drawn per
    group, the same groups for the same items (GradCache's replay relies on it).
    """
    import torch

    encoded = _encode(tokenizer, items, spec)
    groups = forward_groups([len(e) for e in encoded], device=device)
    if len(groups) == 1:
        return _embed_encoded(model, tokenizer, encoded, spec, device=device)
    parts = [
        _embed_encoded(model, tokenizer, [encoded[i] for i in group], spec, device=device)
        for group in groups
    ]
    order = torch.tensor([i for group in groups for i in group], device=parts[0].device)
    return torch.cat(parts)[torch.argsort(order)]


#: the fixed cost of one more forward (and backward) on the CPU, in padded tokens: on
#: SmolLM2-135M at one thread a token costs ~15 ms and a forward's framework work a few
#: tokens' worth; 64 leaves room for CPUs with many cores, where a token costs less
FORWARD_COST_TOKENS = 64


def forward_groups(lengths: Sequence[int], *, device: Any) -> list[list[int]]:
    """Indices of texts cut into forward groups: sorted by length (longest first), cut
    where the padding saved outweighs :data:`FORWARD_COST_TOKENS` a forward (optimal,
    by dynamic programming over the cuts). On an accelerator one forward, in order:
    there a forward's fixed cost outweighs the padding of one batch."""
    if not str(device).startswith("cpu") or len(lengths) < 2:
        return [list(range(len(lengths)))] if lengths else []
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    # a cut between two texts of the same length never pays: cut where the length drops
    edges = [0] + [k for k in range(1, len(order)) if lengths[order[k]] != lengths[order[k - 1]]]
    edges.append(len(order))
    best = {0: 0}  # best[e]: the cheapest plan of the first e sorted texts
    cut = {0: 0}
    for b, j in enumerate(edges[1:], start=1):
        best[j], cut[j] = min(
            (best[i] + (j - i) * lengths[order[i]] + FORWARD_COST_TOKENS, i) for i in edges[:b]
        )
    groups: list[list[int]] = []
    j = len(order)
    while j:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def _encode(
    tokenizer: Any, items: Sequence[tuple[str, str]], spec: EmbeddingSpec
) -> list[EncodedText]:
    from ..runtime._llm2vec import encode_inputs

    return encode_inputs(
        tokenizer,
        list(items),
        pooling=spec.pooling,
        max_length=spec.max_length,
        truncate=True,
        model_type=spec.model_type,
        model_id=spec.model_id,
    )


def _embed_encoded(
    model: Any, tokenizer: Any, encoded: Sequence[EncodedText], spec: EmbeddingSpec, *, device: Any
) -> torch.Tensor:
    """Pooled vectors of already tokenised texts, padded to their longest."""
    from ..runtime._llm2vec import decoder_of, embed_padded

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


@dataclass(frozen=True)
class Objective:
    """What one micro-batch embeds and how its vectors are scored."""

    #: the ``(instruction, text)`` items to embed, in the order ``loss`` reads their vectors
    items: list[tuple[str, str]]
    #: the batch row each item comes from (which process embeds it, past one process)
    rows: list[int]
    #: the loss as a function of the items' vectors
    loss: Callable[[torch.Tensor], torch.Tensor]


def contrastive_objective(
    batch: Sequence[PairExample], config: BundleConfig, *, device: Any, weight: float = 1.0
) -> Objective:
    """The items one micro-batch embeds, and its loss (times ``weight``) as a function of
    their vectors (see the module docstring)."""
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
        return Objective(items + items, [*range(n), *range(n)], simcse)
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

    return Objective(items, [*range(n), *range(n), *with_negative], contrastive)


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
            states.append(_rng_state(device))
            parts.append(encode_texts(model, tokenizer, part, spec, device=device))
    vectors = torch.cat(parts).detach().requires_grad_(True)
    loss = loss_of(vectors)
    loss.backward()
    assert vectors.grad is not None
    grads = vectors.grad.split([len(part) for part in chunks])
    after = _rng_state(device)
    for part, state, grad in zip(chunks, states, grads, strict=True):
        _set_rng_state(state, device)
        encode_texts(model, tokenizer, part, spec, device=device).backward(grad)
    _set_rng_state(after, device)
    return loss.detach()


def _rng_state(device: Any) -> tuple[Any, Any]:
    import torch

    on_cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if on_cuda else None


def _set_rng_state(state: tuple[Any, Any], device: Any) -> None:
    import torch

    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


# -------------------------------------------------------------------- evaluation
def embedder(
    model: Any, tokenizer: Any, spec: EmbeddingSpec, *, device: Any, batch_size: int
) -> Callable[[Sequence[Any]], np.ndarray]:
    """``embed(texts or [instruction, text] pairs) -> normalised numpy vectors`` with the
    model as it is now (eval mode is the caller's business).

    The texts are tokenised once and run in length-sorted forward batches of at most
    ``batch_size`` (the runtime's :func:`~mongars_llm.runtime._embedding.plan_chunks`),
    each padded to its own longest, without autograd: a text's vector does not depend
    on its batch mates (up to float rounding), so the order only saves padding.
    """

    def embed(texts: Sequence[Any]) -> np.ndarray:
        import numpy as np
        import torch

        from ..runtime._embedding import plan_chunks
        from ..runtime._llm2vec import normalise, normalise_inputs

        items = normalise_inputs(list(texts), None)
        if not items:
            return np.zeros((0, 0), dtype=np.float32)
        encoded = _encode(tokenizer, items, spec)
        lengths = [len(e) for e in encoded]
        chunks = plan_chunks(
            lengths,
            batch_size=batch_size,
            max_batch_tokens=batch_size * max(lengths),  # the size cap alone decides
            batch_invariant=False,
        )
        out: np.ndarray | None = None
        with torch.inference_mode():
            for chunk in chunks:
                vectors = _embed_encoded(
                    model, tokenizer, [encoded[i] for i in chunk], spec, device=device
                )
                array = normalise(vectors).float().cpu().numpy()
                if out is None:
                    out = np.empty((len(items), array.shape[1]), dtype=np.float32)
                out[chunk] = array
        assert out is not None
        return out

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
    pairs = [e.as_row() for e in rows]
    with _eval_mode(model), disable:
        # every text of one form in one call: the embedder sorts them all by length
        result = evaluate_pairs(embed, pairs, instruction=instruction, batch_size=2 * len(pairs))
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

    objective = contrastive_objective(pairs, config, device=device, weight=weight)
    loss_of = objective.loss
    items = objective.items
    if dist is not None:
        size = config.batch_size  # rank r: rows [r * size, (r + 1) * size)
        positions = [
            [i for i, row in enumerate(objective.rows) if row // size == r]
            for r in range(dist.world_size)
        ]
        items = [objective.items[i] for i in positions[dist.rank]]

        def loss_of(local: torch.Tensor) -> torch.Tensor:
            return objective.loss(dist.assemble(local, positions))

    if config.mini_batch_size and len(items) > config.mini_batch_size:
        loss = backward_in_chunks(
            model, tokenizer, items, spec, loss_of, chunk=config.mini_batch_size, device=device
        )
    else:
        if items:
            vectors = encode_texts(model, tokenizer, items, spec, device=device)
        else:  # this rank holds no row of a short last micro-batch
            vectors = torch.zeros((0, _hidden_size(model)), device=device)
        loss = loss_of(vectors)
        if loss.requires_grad:
            loss.backward()
    return float(loss.detach())


def _hidden_size(model: Any) -> int:
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return int(config.hidden_size)


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
    eval_texts: Sequence[PairExample] = (),
    dist: Distributed | None = None,
) -> TrainOutcome:
    """Train the peft ``model`` on an embedding objective; returns metrics and the loss
    history. The metrics hold the retrieval metrics of the base model and of the adapter
    on the pairs ``eval_examples`` and, for ``mntp``, the masked-token loss and accuracy
    of both on the held-out ``eval_texts``.

    With ``dist`` (several processes, DDP) every rank calls this with the same
    arguments: the plan is drawn for global micro-batches of ``batch_size x
    processes`` rows, rank ``r`` embeds slice ``r`` of each, the in-batch negatives
    are those of the global micro-batch (vectors gathered from every rank) and the
    gradients are summed over the ranks, so a step is that of one process with the
    whole global batch. Rank 0 alone evaluates, writes and logs.
    """
    import torch

    from ._trainer import BatchPlan, StepResult, TrainingRun, TrainOutcome

    device = precision.device
    world = dist.world_size if dist is not None else 1
    main = dist is None or dist.is_main
    if dist is not None and dist.shards_parameters:
        raise ConfigError(
            f"objective {config.objective!r} trains under DDP (accelerate's multi-GPU or "
            f"multi-CPU config), not {dist.distributed_type}: a LoRA adapter's weights fit "
            "every process"
        )
    if config.objective == "simcse" and config.simcse_dropout == 0 and config.lora_dropout == 0:
        raise BundleError(
            "simcse needs dropout: its two views of a text differ only by dropout; set "
            "simcse_dropout (the base model's attention dropout) or lora_dropout above 0"
        )
    if len(train_examples) < 2 and config.objective != "mntp":
        raise BundleError(
            f"{config.objective} needs at least 2 training rows (the other rows of a batch are "
            f"the negatives); {len(train_examples)} remain after the checks"
        )
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    plan = BatchPlan(
        len(train_examples),
        batch_size=config.batch_size * world,  # global micro-batch; rank r embeds slice r
        grad_accum=config.grad_accum,
        seed=config.seed,
    )
    total_steps = plan.total_steps(config.epochs, config.max_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    run = TrainingRun(
        config=config,
        run_dir=run_dir,
        model=model,
        optimizer=optimizer,
        total_steps=total_steps,
        fingerprint=fingerprint,
        dist=dist,
        desc=f"training ({config.objective})",
    )
    eval_kwargs: dict[str, Any] = {
        "instruction": config.instruction,
        "device": device,
        "batch_size": max(config.batch_size, 16),
    }

    masker = None
    if config.objective == "mntp":
        from ._mntp import Masker, evaluate_mntp, masked_sums

        masker = Masker(
            tokenizer,
            probability=config.mask_probability,
            max_length=spec.max_length,
            seed=config.seed,
        )
        train_ids = masker.encode([e.query for e in train_examples])
        eval_ids = masker.encode([e.query for e in eval_texts])

    def run_retrieval(adapter: bool = True) -> dict[str, Any] | None:
        if not main:  # every rank holds the same weights: one evaluates
            return None
        return evaluate_retrieval(
            model, tokenizer, eval_examples, spec, adapter=adapter, **eval_kwargs
        )

    def run_mntp_eval(adapter: bool = True) -> dict[str, Any] | None:
        if masker is None or not main:
            return None
        return evaluate_mntp(
            model,
            masker,
            eval_ids,
            device=device,
            batch_size=eval_kwargs["batch_size"],
            adapter=adapter,
        )

    def run_eval() -> dict[str, Any] | None:
        return {**(run_retrieval() or {}), **(run_mntp_eval() or {})} or None

    # the base model's metrics: the adapter switched off (exact: peft skips the LoRA path)
    if not run.resume():
        run.state["retrieval_base"] = run_retrieval(adapter=False)
        run.state["mntp_base"] = run_mntp_eval(adapter=False)

    def mntp_step(step: int, micro_batches: list[list[int]]) -> tuple[float, dict[str, Any]]:
        """Masked-token cross-entropy, a mean over the step's masked tokens (each rank
        its slice of every global micro-batch, masked as one process masks it)."""
        assert masker is not None
        batches = [
            masker.mask([train_ids[i] for i in indices], step, k, device=device)
            for k, indices in enumerate(micro_batches)
        ]
        targets = sum(b.targets for b in batches)
        loss_value = 0.0
        for batch in batches:
            if dist is not None:
                size = config.batch_size
                batch = batch.rows(dist.rank * size, (dist.rank + 1) * size)
            if len(batch.labels):
                loss, _, _ = masked_sums(model, batch)
                (loss / max(targets, 1)).backward()
                loss_value += float(loss.detach()) / max(targets, 1)
        if dist is not None:
            loss_value = dist.sum([loss_value])[0]
        return loss_value, {"masked_tokens": targets}

    def one_step(step: int) -> StepResult:
        micro_batches = plan.step(step)
        rows = sum(len(indices) for indices in micro_batches)
        record: dict[str, Any] = {"rows": rows}
        if masker is not None:
            loss_value, counts = mntp_step(step, micro_batches)
            record.update(counts)
        else:
            loss_value = sum(
                _contrastive_micro_batch(
                    model,
                    tokenizer,
                    spec,
                    config,
                    [train_examples[i] for i in indices],
                    weight=1 / len(micro_batches),  # each micro-batch its own negatives
                    device=device,
                    dist=dist,
                )
                for indices in micro_batches
            )
        if dist is not None:  # each rank's gradient is its share of the global loss
            dist.sum_gradients(params)
        grad_norm = None
        if config.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
        return StepResult(loss_value, grad_norm, rows, record)

    model.train()
    dropout = (
        attention_dropout(model, config.simcse_dropout)
        if config.objective == "simcse"
        else contextlib.nullcontext()
    )
    try:
        with dropout:
            run.run(one_step, evaluate=run_eval, epoch_at=plan.epoch_at)
    finally:
        if config.gradient_checkpointing:
            model.gradient_checkpointing_disable()

    state = run.state
    retrieval, mntp = run_retrieval(), run_mntp_eval()
    if retrieval is not None or mntp is not None:
        state["evals"].append({"step": state["step"], **(retrieval or {}), **(mntp or {})})
    model.eval()
    metrics: dict[str, Any] = {
        "objective": config.objective,
        **run.metrics(seen="rows", epoch_at=plan.epoch_at),
        "train_examples": len(train_examples),
        "eval_examples": len(eval_examples),
        "global_batch_size": config.batch_size * world * config.grad_accum,
        "retrieval_base": state.get("retrieval_base"),
        "retrieval": retrieval,
    }
    if masker is not None:
        metrics["eval_texts"] = len(eval_texts)
        metrics["mntp_base"] = state.get("mntp_base")
        metrics["mntp"] = mntp
    if state["evals"]:
        metrics["evals"] = state["evals"]
    return TrainOutcome(
        model=model, metrics=metrics, history=state["history"], resumed_from=run.resumed_from
    )
