"""The ``rerank`` objective: a LoRA adapter for the model's yes/no relevance answer.

The runtime's reranker (:mod:`mongars_llm.runtime._rerank`) asks the model, in its
own chat template, whether a document answers a query, and scores the document
``sigmoid(logit("yes") - logit("no"))`` at the first answer position. This
objective trains that margin on the contrastive objective's rows
(``{"query", "positive", "negative"?, "instruction"?}``, the same checks,
:mod:`._pairs`): each query is scored against its positive and
``rerank_negatives`` other documents (its own hard negative first, then the
other rows' documents of its micro-batch; a copy of its positive, or another
positive of the same query, is never a negative), and the loss is

- ``listwise`` (the default): softmax cross-entropy of the positive among the
  query's documents over their yes-minus-no margins, as RankLLaMA and
  Qwen3-Reranker train;
- ``bce``: binary cross-entropy of each document's margin against its label.

Listwise is the default: it trains the order of a query's documents, which is
all reranking reads, where BCE also spends its gradient on the absolute
calibration of documents already in order. Measured on the tests' separable toy
set (tiny model, 36 rows, 24 steps, 3 negatives, same seed; held-out embedding
top 20 reranked): MRR@10 0.12 -> 0.60 listwise, 0.12 -> 0.42 BCE (recall@1
0.42 vs 0.17). ``benchmarks/bench_rerank.py --rerank-loss`` compares them on
SmolLM2.

Only the last position's logits are computed (``logits_to_keep=1``); prompts are
left-padded with position ids counted from each prompt's first token, so a
prompt's margin does not depend on its batch mates (up to float rounding).

It runs in the embedding objectives' loop (:mod:`._embedding_loop`: batch plan,
``--resume``, DDP, progress): past one process each rank scores the queries of
its slice of the global micro-batch (the negatives still drawn from the whole
global micro-batch), and the summed gradient is that of one process. Its
evaluation is retrieve-then-rerank on the eval pairs: the base model's embedding
top ``RERANK_EVAL_TOP_K`` reordered by the margins of the base weights
(``rerank_base``) and of the adapter (``rerank``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import BundleError
from ..runtime import answer_token_ids, rerank_messages
from ._config import BundleConfig
from ._embedding_loop import EmbeddingObjective, EmbeddingSteps, Evaluation, NoEvaluations
from ._objective import AdapterUse, Examples, TrainInputs
from ._pairs import PairExample
from ._vectors import EmbeddingSpec, embedder, forward_groups

if TYPE_CHECKING:
    import torch

    from ..runtime import EmbeddingConfig
    from ._stacking import BaseAdapter

__all__ = [
    "RERANK",
    "RERANK_EVAL_TOP_K",
    "RerankScorer",
    "rerank_candidates",
    "rerank_loss",
    "rerank_prompt_ids",
]

#: how many documents of the embedding's ranking the evaluation reranks
RERANK_EVAL_TOP_K = 20


def _render_ids(tokenizer: Any, query: str, document: str, instruction: str | None) -> list[int]:
    text = tokenizer.apply_chat_template(
        rerank_messages(query, document, instruction),
        tokenize=False,
        add_generation_prompt=True,
    )
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def rerank_prompt_ids(
    tokenizer: Any, query: str, document: str, instruction: str | None, *, max_length: int
) -> list[int]:
    """The token ids of the relevance prompt of ``(query, document)`` (the chat template
    and its generation prompt; the answer comes next). Past ``max_length`` tokens the
    document is cut at its end; a query too long alone keeps the prompt's last
    ``max_length`` tokens (the answer position)."""
    ids = _render_ids(tokenizer, query, document, instruction)
    if len(ids) <= max_length:
        return ids
    doc_ids = tokenizer(document, add_special_tokens=False, verbose=False)["input_ids"]
    keep = len(doc_ids) - (len(ids) - max_length)
    for _ in range(3):  # re-tokenising at the cut may merge or split a token or two
        if keep <= 0:
            break
        cut = tokenizer.decode(doc_ids[:keep])
        ids = _render_ids(tokenizer, query, cut, instruction)
        if len(ids) <= max_length:
            return ids
        keep -= len(ids) - max_length
    return ids[-max_length:]


@dataclass(frozen=True)
class RerankScorer:
    """Yes-minus-no margins of relevance prompts with a model as it is (gradients flow
    when enabled): the ``rerank`` objective's forward, for training and evaluation."""

    tokenizer: Any
    max_length: int
    yes: int
    no: int

    @classmethod
    def of(cls, tokenizer: Any, max_length: int) -> RerankScorer:
        if not getattr(tokenizer, "chat_template", None):
            raise BundleError(
                "objective rerank asks the model in its chat template whether a document "
                "answers a query; this tokenizer has no chat template (use an instruct model)"
            )
        yes, no = answer_token_ids(
            lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])
        )
        return cls(tokenizer, max_length, yes, no)

    def prompts(self, items: Sequence[tuple[str, str, str | None]]) -> list[list[int]]:
        """The prompt ids of ``(query, document, instruction)`` items."""
        return [
            rerank_prompt_ids(self.tokenizer, q, d, i, max_length=self.max_length)
            for q, d, i in items
        ]

    def margins(self, model: Any, prompts: Sequence[list[int]], *, device: Any) -> torch.Tensor:
        """``logit(yes) - logit(no)`` (float32) at the last position of each prompt, in
        order; on the CPU in length-sorted groups (:func:`~._vectors.forward_groups`)."""
        import torch

        groups = forward_groups([len(p) for p in prompts], device=device)
        parts = [self._margins(model, [prompts[i] for i in group], device) for group in groups]
        # the groups hold the prompts sorted by length: put each margin back in its place
        order = torch.tensor([i for group in groups for i in group], device=parts[0].device)
        return torch.cat(parts).index_select(0, torch.argsort(order))

    def _margins(self, model: Any, prompts: Sequence[list[int]], device: Any) -> torch.Tensor:
        import torch

        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else self.tokenizer.eos_token_id
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), int(pad), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left-padded: the answer position is last
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            logits_to_keep=1,
            use_cache=False,
        )
        last = out.logits[:, -1, :]
        return (last[:, self.yes] - last[:, self.no]).float()


def rerank_candidates(
    batch: Sequence[PairExample], negatives: int
) -> list[tuple[PairExample, list[str]]]:
    """Each row of a micro-batch with its documents: its positive first, then up to
    ``negatives`` others (its own negative, then the next rows' documents in turn). A
    text equal to one of the query's positives in the batch is never its negative."""
    out = []
    n = len(batch)
    for i, example in enumerate(batch):
        key = (example.instruction, example.query.strip())
        positives = {e.positive.strip() for e in batch if (e.instruction, e.query.strip()) == key}
        chosen: list[str] = []
        seen = set(positives)
        others = [batch[(i + j) % n] for j in range(1, n)]
        pool = [example.negative] + [t for e in others for t in (e.negative, e.positive)]
        for text in pool:
            if text is None or text.strip() in seen:
                continue
            seen.add(text.strip())
            chosen.append(text)
            if len(chosen) == negatives:
                break
        out.append((example, [example.positive, *chosen]))
    return out


def rerank_loss(margins: torch.Tensor, sizes: Sequence[int], kind: str) -> torch.Tensor:
    """The summed loss of consecutive groups of margins (``sizes[g]`` documents each, the
    positive first): listwise softmax cross-entropy, or BCE averaged within a group."""
    import torch
    import torch.nn.functional as F

    total = margins.new_zeros(())
    start = 0
    for size in sizes:
        group = margins[start : start + size]
        start += size
        if kind == "listwise":
            total = total + torch.logsumexp(group, dim=0) - group[0]
        else:
            labels = torch.zeros_like(group)
            labels[0] = 1.0
            total = total + F.binary_cross_entropy_with_logits(group, labels)
    return total


class _RerankSteps(NoEvaluations):
    """A run's rerank step: each query against its documents (see the module docstring)."""

    def __init__(self, inputs: TrainInputs, scorer: RerankScorer) -> None:
        self.inputs, self.scorer = inputs, scorer

    def step(self, step: int, micro_batches: list[list[int]]) -> tuple[float, dict[str, Any]]:
        inputs, rows = self.inputs, self.inputs.examples.train
        config, dist = inputs.config, inputs.dist
        queries = sum(len(indices) for indices in micro_batches)
        loss = 0.0
        for indices in micro_batches:
            groups = rerank_candidates([rows[i] for i in indices], config.rerank_negatives)
            if dist is not None:  # rank r: rows [r * size, (r + 1) * size) of the micro-batch
                size = config.batch_size
                groups = groups[dist.rank * size : (dist.rank + 1) * size]
            if not groups:  # this rank holds no row of a short last micro-batch
                continue
            items = [(e.query, d, e.instruction or None) for e, docs in groups for d in docs]
            margins = self.scorer.margins(
                inputs.model, self.scorer.prompts(items), device=inputs.precision.device
            )
            part = rerank_loss(margins, [len(docs) for _, docs in groups], config.rerank_loss)
            part = part / queries  # the mean over the step's queries, all ranks together
            part.backward()
            loss += float(part.detach())
        if dist is not None:
            loss = dist.sum([loss])[0]
        return loss, {}


class RerankObjective(EmbeddingObjective):
    """Query/positive(/negative) pairs, the yes/no margin of each (query, document)."""

    name = "rerank"
    use: AdapterUse = "rerank"
    rows_format = "contrastive"
    holds_out_pairs = True
    registry_metrics: tuple[str, ...] = (
        "train_loss",
        "steps",
        "rows_seen",
        "rerank_base",
        "rerank",
    )

    def check_training(self, config: BundleConfig, examples: Examples) -> None:
        if config.batch_size < 2 and any(e.negative is None for e in examples.train):
            raise BundleError(
                "rerank needs a negative document for every query: give each row a "
                "'negative', or a batch_size of 2 or more (the other rows' documents)"
            )

    def fingerprint(self, config: BundleConfig, stacked_on: BaseAdapter | None) -> dict[str, Any]:
        return {
            "objective": config.objective,
            "instruction": config.instruction,
            "rerank_negatives": config.rerank_negatives,
            "rerank_loss": config.rerank_loss,
        }

    def embedding_config(
        self, config: BundleConfig, base: Any, stacked_on: BaseAdapter | None
    ) -> EmbeddingConfig | None:
        return None  # not an embedding adapter: no llm2vec_config.json

    def steps(self, inputs: TrainInputs, spec: EmbeddingSpec) -> EmbeddingSteps:
        return _RerankSteps(inputs, _scorer(inputs, spec))

    def evaluations(self, inputs: TrainInputs, spec: EmbeddingSpec) -> dict[str, Evaluation]:
        return {"rerank": _RerankEvaluation(inputs, spec, _scorer(inputs, spec))}


def _scorer(inputs: TrainInputs, spec: EmbeddingSpec) -> RerankScorer:
    return RerankScorer.of(inputs.tokenizer, spec.max_length)


@contextlib.contextmanager
def _measuring(model: Any, adapter: bool) -> Iterator[None]:
    """Eval mode, no autograd, the adapter on or off (peft skips the LoRA path)."""
    import torch

    was_training = model.training
    model.eval()
    disable = (
        model.disable_adapter()
        if not adapter and hasattr(model, "disable_adapter")
        else contextlib.nullcontext()
    )
    try:
        with torch.inference_mode(), disable:
            yield
    finally:
        model.train(was_training)


class _RerankEvaluation:
    """Retrieve (the base model's embedding) then rerank (base weights or adapter) on the
    eval pairs; rank 0 alone (every rank holds the same weights)."""

    def __init__(self, inputs: TrainInputs, spec: EmbeddingSpec, scorer: RerankScorer) -> None:
        self.inputs, self.spec, self.scorer = inputs, spec, scorer
        self.found: Any = None

    def __call__(self, adapter: bool) -> dict[str, Any] | None:
        from ._retrieval import ranking_metrics, rerank_metrics, retrieve

        inputs = self.inputs
        if not inputs.examples.eval or not (inputs.dist is None or inputs.dist.is_main):
            return None
        model, device = inputs.model, inputs.precision.device
        if self.found is None:  # the candidates: the base model's embedding, once
            embed = embedder(model, inputs.tokenizer, self.spec, device=device, batch_size=32)
            with _measuring(model, adapter=False):
                self.found = retrieve(
                    embed,
                    [e.as_row() for e in inputs.examples.eval],
                    instruction=inputs.config.instruction,
                    batch_size=1024,
                )
        rerank = self._rerank_function()
        with _measuring(model, adapter):
            metrics = rerank_metrics(self.found, rerank, top_k=RERANK_EVAL_TOP_K)
        embed_only = ranking_metrics(self.found.scores, self.found.relevant)
        metrics["embed_mrr@10"] = embed_only["mrr@10"]
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}

    def _rerank_function(self) -> Callable[[str, list[str], str | None], list[float]]:
        inputs, scorer = self.inputs, self.scorer

        def rerank(query: str, documents: list[str], instruction: str | None) -> list[float]:
            prompts = scorer.prompts([(query, d, instruction) for d in documents])
            margins = scorer.margins(inputs.model, prompts, device=inputs.precision.device)
            return [float(v) for v in margins.cpu().tolist()]

        return rerank


RERANK = RerankObjective()
