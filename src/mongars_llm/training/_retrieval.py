"""Retrieval evaluation of embeddings: MRR@k, recall@1/@k and nDCG@k on query/passage pairs.

Definitions (one query ``q`` with relevant documents ``R(q)``, ``k`` = 10 by default):

- documents are ranked by cosine similarity to the query (both sides L2-normalised;
  a zero vector scores 0 against everything);
- ties are broken *pessimistically* and deterministically: among documents with
  the same score, the non-relevant ones rank first, then the relevant ones in
  corpus order. An embedder that gives every text the same vector therefore
  scores no better than the worst ranking, never by luck of the corpus order;
- ``mrr@k``: ``1 / rank`` of the first relevant document when ``rank <= k``, else 0;
- ``recall@n``: the share of ``R(q)`` among the top ``n`` documents (with one
  relevant document: whether it is in the top ``n``);
- ``ndcg@k``: binary relevance, ``DCG = sum(1 / log2(rank + 1))`` over the relevant
  documents in the top ``k``, divided by the ideal ``sum(1 / log2(i + 1))`` for
  ``i = 1 .. min(|R(q)|, k)``.

Every metric is the mean over the queries. :func:`ranking_metrics` computes them
for any score matrix; :func:`retrieve` then :func:`rerank_metrics` is retrieve-then-
rerank (each query's embedding top ``k`` reordered by a reranker's scores, the
rest below in their embedding order). Only numpy is imported here; the embedding
and rerank functions passed in bring the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DatasetError

__all__ = [
    "EmbedFunction",
    "RerankFunction",
    "Retrieved",
    "evaluate_pairs",
    "ranking_metrics",
    "read_pairs",
    "rerank_metrics",
    "retrieval_metrics",
    "retrieve",
]

#: ``embed(texts) -> (n, dim) array``; ``texts`` is a list of strings, or a list of
#: ``[instruction, text]`` pairs (every item of one call has the same form)
EmbedFunction = Callable[[list[Any]], Any]

_PAIR_FIELDS = ("query", "positive", "negative", "instruction")


def retrieval_metrics(
    query_vectors: Any,
    doc_vectors: Any,
    relevant: Sequence[int | Iterable[int]],
    k: int = 10,
) -> dict[str, float]:
    """``{"mrr@k", "recall@1", "recall@k", "ndcg@k"}`` of ranking ``doc_vectors`` for each query.

    ``relevant[i]`` is the index (or a set of indices) into ``doc_vectors`` of
    query ``i``'s relevant documents. See the module docstring for the definitions.
    """
    queries = _matrix(query_vectors, "query_vectors")
    docs = _matrix(doc_vectors, "doc_vectors")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k={k!r} must be a positive integer")
    if queries.shape[0] == 0 or docs.shape[0] == 0:
        raise ConfigError(
            f"nothing to rank: {queries.shape[0]} query vector(s), {docs.shape[0]} document "
            "vector(s); give at least one of each"
        )
    if queries.shape[1] != docs.shape[1]:
        raise ConfigError(
            f"query vectors have {queries.shape[1]} dimensions but document vectors "
            f"{docs.shape[1]}; embed both with the same model"
        )
    if len(relevant) != queries.shape[0]:
        raise ConfigError(
            f"relevant has {len(relevant)} entr(ies) for {queries.shape[0]} query vector(s); "
            "give one index or set of indices per query"
        )
    scores = _normalised(queries) @ _normalised(docs).T  # (queries, docs)
    return ranking_metrics(scores, relevant, k=k)


def ranking_metrics(
    scores: Any, relevant: Sequence[int | Iterable[int]], k: int = 10
) -> dict[str, float]:
    """The metrics of :func:`retrieval_metrics` for any ``(queries, docs)`` score matrix
    (higher ranks first; ties broken pessimistically, see the module docstring)."""
    scores = np.asarray(scores, dtype=np.float64)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k={k!r} must be a positive integer")
    n_docs = scores.shape[1]
    relevant_sets = [_relevant_set(entry, i, n_docs) for i, entry in enumerate(relevant)]
    totals = {"mrr": 0.0, "recall@1": 0.0, "recall@k": 0.0, "ndcg": 0.0}
    for row, rel in zip(scores, relevant_sets, strict=True):
        is_relevant = np.zeros(n_docs, dtype=bool)
        is_relevant[list(rel)] = True
        # lexsort: the last key is the primary one -> score descending, then
        # non-relevant before relevant, then corpus order
        order = np.lexsort((np.arange(n_docs), is_relevant, -row))
        ranks = np.flatnonzero(is_relevant[order]) + 1  # 1-based ranks of relevant docs
        first = int(ranks[0])
        totals["mrr"] += 1.0 / first if first <= k else 0.0
        totals["recall@1"] += float(np.sum(ranks <= 1)) / len(rel)
        totals["recall@k"] += float(np.sum(ranks <= k)) / len(rel)
        dcg = sum(1.0 / math.log2(rank + 1) for rank in ranks if rank <= k)
        ideal = sum(1.0 / math.log2(i + 1) for i in range(1, min(len(rel), k) + 1))
        totals["ndcg"] += dcg / ideal
    n = float(scores.shape[0])
    return {
        f"mrr@{k}": totals["mrr"] / n,
        "recall@1": totals["recall@1"] / n,
        f"recall@{k}": totals["recall@k"] / n,
        f"ndcg@{k}": totals["ndcg"] / n,
    }


def evaluate_pairs(
    embed: EmbedFunction,
    rows: Iterable[Mapping[str, Any]],
    *,
    instruction: str | None = None,
    batch_size: int = 64,
    k: int = 10,
) -> dict[str, Any]:
    """Retrieval metrics of ``embed`` on pair rows, plus ``queries`` and ``documents`` counts.

    Each row is ``{"query", "positive", "negative"?, "instruction"?}``. The corpus
    is every distinct positive and negative text (embedded without instruction);
    each distinct query (with its instruction) is one query whose relevant
    documents are all its rows' positives. A row's ``instruction`` wins over
    ``instruction``; as LLM2Vec does for retrieval, it is applied to queries only,
    as ``[instruction, query]`` pairs. ``embed`` is called with at most
    ``batch_size`` texts at a time, all of one form.
    """
    found = retrieve(embed, rows, instruction=instruction, batch_size=batch_size)
    metrics: dict[str, Any] = ranking_metrics(found.scores, found.relevant, k=k)
    metrics["queries"] = len(found.queries)
    metrics["documents"] = len(found.documents)
    return metrics


@dataclass(frozen=True)
class Retrieved:
    """Pair rows as a retrieval task, and the embedding scores of every query and document."""

    #: each distinct ``(instruction, query)``
    queries: list[tuple[str | None, str]]
    #: the corpus: every distinct positive and negative text
    documents: list[str]
    #: ``relevant[i]``: the documents of query ``i``'s rows' positives
    relevant: list[set[int]]
    #: ``(queries, documents)`` cosine similarities
    scores: np.ndarray


def retrieve(
    embed: EmbedFunction,
    rows: Iterable[Mapping[str, Any]],
    *,
    instruction: str | None = None,
    batch_size: int = 64,
) -> Retrieved:
    """The corpus and queries of pair rows (as :func:`evaluate_pairs` reads them) scored
    by ``embed``'s cosine similarity."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be a positive integer")
    doc_index: dict[str, int] = {}
    query_index: dict[tuple[str | None, str], int] = {}
    relevant: list[set[int]] = []
    for number, row in enumerate(rows, start=1):
        query, positive, negative, row_instruction = _pair_fields(row, number)
        for text in (positive, negative):
            if text is not None and text not in doc_index:
                doc_index[text] = len(doc_index)
        key = (row_instruction or instruction or None, query)
        if key not in query_index:
            query_index[key] = len(query_index)
            relevant.append(set())
        relevant[query_index[key]].add(doc_index[positive])
    if not query_index:
        raise DatasetError("no pairs to evaluate: the rows are empty")
    query_vectors = _embed_grouped(embed, list(query_index), batch_size)
    doc_vectors = _embed_grouped(embed, [(None, text) for text in doc_index], batch_size)
    scores = _normalised(query_vectors) @ _normalised(doc_vectors).T
    return Retrieved(list(query_index), list(doc_index), relevant, scores)


#: ``rerank(query, documents, instruction) -> one score per document`` (higher: more relevant)
RerankFunction = Callable[[str, list[str], "str | None"], Sequence[float]]


def rerank_metrics(
    found: Retrieved, rerank: RerankFunction, *, top_k: int = 20, k: int = 10
) -> dict[str, Any]:
    """Retrieve then rerank: each query's ``top_k`` documents by embedding reordered by
    ``rerank``'s scores (the rest keep their embedding order below them); the metrics of
    :func:`ranking_metrics` on the final order, plus ``top_k`` and ``queries``.

    The reranker sees each query's rows' instruction only when the rows carry one
    (``instruction`` of the query key); ``rerank`` gets ``None`` otherwise.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ConfigError(f"top_k={top_k!r} must be a positive integer")
    n_docs = len(found.documents)
    final = np.empty_like(found.scores)
    for i, (instruction, query) in enumerate(found.queries):
        # the embedding's ranking, ties broken as the metrics break them (pessimistically)
        is_relevant = np.zeros(n_docs, dtype=bool)
        is_relevant[list(found.relevant[i])] = True
        order = np.lexsort((np.arange(n_docs), is_relevant, -found.scores[i]))
        head = order[:top_k]
        reranked = np.asarray(rerank(query, [found.documents[j] for j in head], instruction))
        if reranked.shape != (len(head),) or not np.all(np.isfinite(reranked)):
            raise ConfigError(
                f"rerank returned {reranked.shape} scores for {len(head)} documents; "
                "expected one finite score per document"
            )
        # stable: equal rerank scores keep their embedding order
        head = head[np.argsort(-reranked, kind="stable")]
        ranked = np.concatenate([head, order[top_k:]])
        final[i, ranked] = -np.arange(n_docs, dtype=np.float64)
    metrics: dict[str, Any] = ranking_metrics(final, found.relevant, k=k)
    metrics["top_k"] = min(top_k, n_docs)
    metrics["queries"] = len(found.queries)
    return metrics


def read_pairs(path: str | Path, *, flag: str = "--dataset-path") -> list[dict[str, Any]]:
    """The rows of a pairs JSONL file, checked as training checks them.

    Every bad line is reported at once, with its number, in one
    :class:`DatasetError` (the ``contrastive`` objective's checks: fields, empty
    texts, a query equal to its positive); duplicate rows are dropped.
    """
    from ._jsonl import read_jsonl_rows
    from ._pairs import load_pairs

    _, examples = load_pairs(
        read_jsonl_rows(path, flag=flag),
        objective="contrastive",
        source=str(path),
        tokenizer=None,
        max_seq_len=1,  # only recorded: no tokenizer, no length checks here
    )
    return [example.as_row() for example in examples]


# ------------------------------------------------------------------- helpers
def _matrix(value: Any, name: str) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != 2:
        raise ConfigError(f"{name} must be a 2-D array (n, dim), got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ConfigError(f"{name} holds NaN or infinite values")
    return array


def _normalised(array: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return array / np.where(norms == 0, 1.0, norms)


def _relevant_set(entry: int | Iterable[int], query: int, n_docs: int) -> set[int]:
    items = [entry] if isinstance(entry, int | np.integer) else list(entry)
    indices = set()
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int | np.integer):
            raise ConfigError(f"relevant[{query}] holds {item!r}, not a document index")
        if not 0 <= int(item) < n_docs:
            raise ConfigError(
                f"relevant[{query}] = {int(item)} is out of range for {n_docs} document(s)"
            )
        indices.add(int(item))
    if not indices:
        raise ConfigError(f"relevant[{query}] is empty; every query needs a relevant document")
    return indices


def _pair_fields(row: Any, number: int) -> tuple[str, str, str | None, str | None]:
    """``(query, positive, negative, instruction)`` of one row, or a :class:`DatasetError`."""
    if not isinstance(row, Mapping):
        raise DatasetError(f"row {number}: expected a JSON object, got {type(row).__name__}")
    unknown = sorted(set(row) - set(_PAIR_FIELDS))
    if unknown:
        raise DatasetError(
            f"row {number}: unknown field(s) {', '.join(map(repr, unknown))}; a pair has "
            "query, positive, and optionally negative and instruction"
        )
    values: list[str | None] = []
    for field in _PAIR_FIELDS:
        value = row.get(field)
        required = field in ("query", "positive")
        if field == "instruction" and value == "":
            value = None  # no instruction
        if value is None and not required:
            values.append(None)
            continue
        if not isinstance(value, str) or not value.strip():
            what = "missing" if value is None else f"{type(value).__name__} {value!r}"[:60]
            raise DatasetError(f"row {number}: {field!r} must be a non-empty string ({what})")
        values.append(value)
    query, positive, negative, instruction = values
    assert query is not None and positive is not None
    return query, positive, negative, instruction


def _embed_grouped(
    embed: EmbedFunction, items: list[tuple[str | None, str]], batch_size: int
) -> np.ndarray:
    """Vectors of ``(instruction, text)`` items in order: one form per ``embed`` call."""
    groups: dict[str | None, list[int]] = {}
    for position, (instruction, _) in enumerate(items):
        groups.setdefault(instruction, []).append(position)
    out: np.ndarray | None = None
    for instruction, positions in groups.items():
        for start in range(0, len(positions), batch_size):
            chunk = positions[start : start + batch_size]
            texts: list[Any] = [
                items[p][1] if instruction is None else [instruction, items[p][1]] for p in chunk
            ]
            vectors = np.asarray(embed(texts), dtype=np.float64)
            if vectors.ndim != 2 or vectors.shape[0] != len(chunk):
                raise ConfigError(
                    f"embed returned shape {vectors.shape} for {len(chunk)} text(s); "
                    "expected (n, dim)"
                )
            if out is None:
                out = np.empty((len(items), vectors.shape[1]), dtype=np.float64)
            out[chunk] = vectors
    assert out is not None
    return out
