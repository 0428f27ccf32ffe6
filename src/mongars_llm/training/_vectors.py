"""How training embeds texts: the same vectors as serving, for the loss and for evaluation.

:class:`EmbeddingSpec` is how texts are embedded (pooling, attention, max
length, llm2vec's model type); :func:`encode_texts` computes the vectors of
``(instruction, text)`` items through the runtime's LLM2Vec core
(:mod:`mongars_llm.runtime._llm2vec`: composition, llm2vec's counting span,
padding, the causal or bidirectional decoder run, pooling), gradients flowing,
in length-sorted forward groups on the CPU (:func:`forward_groups`), so an
adapter embeds at serve time exactly as it was trained. :func:`embedder` and
:func:`evaluate_retrieval` measure the model as it is (retrieval metrics of
pairs, of the adapter or of the base model).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._config import BundleConfig
from ._pairs import PairExample

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ..runtime import EncodedText

__all__ = [
    "EmbeddingSpec",
    "embedder",
    "encode_texts",
    "evaluate_retrieval",
    "forward_groups",
    "hidden_size",
]


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
    from ..runtime import encode_inputs

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
    from ..runtime import decoder_of, embed_padded

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


def embedder(
    model: Any, tokenizer: Any, spec: EmbeddingSpec, *, device: Any, batch_size: int
) -> Callable[[Sequence[Any]], np.ndarray]:
    """``embed(texts or [instruction, text] pairs) -> normalised numpy vectors`` with the
    model as it is now (eval mode is the caller's business).

    The texts are tokenised once and run in length-sorted forward batches of at most
    ``batch_size`` (the runtime's :func:`~mongars_llm.runtime._embed_plan.plan_chunks`),
    each padded to its own longest, without autograd: a text's vector does not depend
    on its batch mates (up to float rounding), so the order only saves padding.
    """

    def embed(texts: Sequence[Any]) -> np.ndarray:
        import numpy as np
        import torch

        from ..runtime import normalise, normalise_inputs, plan_chunks

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


def hidden_size(model: Any) -> int:
    """The width of the model's vectors."""
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return int(config.hidden_size)
