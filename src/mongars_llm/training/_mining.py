"""Hard negatives and round-trip ranks from embeddings: numpy only, the model brought by the caller.

A *hard negative* of a query is a passage the embeddings rank high for it that
is not its source. :func:`mine_negatives` takes, for each query, the
top-ranked passages (cosine similarity, ties in corpus order) that are

- not one of its sources (every passage relevant to it), and
- not a near-duplicate of a source: a passage whose cosine similarity to a
  source passage is at least ``near_duplicate`` (default
  :data:`NEAR_DUPLICATE`) is more likely a second copy of the answer than a
  negative, and training against it would teach the model to push the answer
  away. This similarity is measured on the passage vectors *centred* (the
  corpus mean subtracted): a decoder's raw embeddings share one large common
  direction, so every pair of passages is above 0.9 raw, and the margin would
  skip them all.

:func:`source_ranks` is the round-trip check of synthesized questions: the
1-based rank of each query's source among the passages (ties counted against
it, as :mod:`._retrieval` counts them). :func:`mine_pair_negatives` is
``--mine-negatives K`` for labelled pairs: the corpus is every distinct
positive of the file, and a row without a negative becomes up to ``K`` rows,
one per mined negative (the sentence-transformers ``mine_hard_negatives`` habit).
The similarity matrices are computed a block of queries at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["NEAR_DUPLICATE", "mine_negatives", "mine_pair_negatives", "source_ranks"]

#: a candidate at least this similar (cosine) to a source passage is not a negative
NEAR_DUPLICATE = 0.95
_BLOCK = 256


def _normalised(vectors: Any) -> np.ndarray:
    array = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return array / np.where(norms == 0, 1.0, norms)


def source_ranks(query_vectors: Any, passage_vectors: Any, sources: Sequence[int]) -> list[int]:
    """The 1-based rank of passage ``sources[i]`` for query ``i`` (a tie ranks it last)."""
    queries, passages = _normalised(query_vectors), _normalised(passage_vectors)
    ranks: list[int] = []
    for start in range(0, len(queries), _BLOCK):
        scores = queries[start : start + _BLOCK] @ passages.T
        for row, source in zip(scores, sources[start : start + _BLOCK], strict=True):
            ranks.append(int(np.sum(row >= row[source])))
    return ranks


def mine_negatives(
    query_vectors: Any,
    passage_vectors: Any,
    sources: Sequence[int | set[int]],
    *,
    count: int,
    near_duplicate: float = NEAR_DUPLICATE,
) -> list[list[int]]:
    """For each query, up to ``count`` passage indices, best first: the top-ranked passages
    that are neither a source nor a near-duplicate of one (see the module docstring)."""
    if count < 1:
        return [[] for _ in sources]
    queries, passages = _normalised(query_vectors), _normalised(passage_vectors)
    centred = _normalised(passages - passages.mean(axis=0, keepdims=True))
    source_sets = [{s} if isinstance(s, int | np.integer) else set(s) for s in sources]
    out: list[list[int]] = []
    for start in range(0, len(queries), _BLOCK):
        scores = queries[start : start + _BLOCK] @ passages.T
        for row, own in zip(scores, source_sets[start : start + _BLOCK], strict=True):
            blocked = np.zeros(len(passages), dtype=bool)
            for source in own:
                blocked |= centred @ centred[source] >= near_duplicate
                blocked[source] = True
            order = np.lexsort((np.arange(len(passages)), -row))
            out.append([int(i) for i in order if not blocked[i]][:count])
    return out


def mine_pair_negatives(
    rows: Sequence[dict[str, Any]],
    embed: Callable[[list[Any]], Any],
    *,
    count: int,
    near_duplicate: float = NEAR_DUPLICATE,
    batch_size: int = 32,
) -> tuple[list[dict[str, Any]], int]:
    """Labelled pair rows with up to ``count`` mined negatives each (see the module
    docstring); rows that have a ``negative`` stay as they are. Returns the rows and how
    many rows got no negative (a corpus too small). ``embed`` is
    :data:`~._retrieval.EmbedFunction` (plain texts, or ``[instruction, text]`` pairs)."""
    from ._retrieval import _embed_grouped

    corpus: dict[str, int] = {}
    for row in rows:
        corpus.setdefault(row["positive"], len(corpus))
    positives_of: dict[tuple[str, str], set[int]] = {}
    for row in rows:
        key = (row.get("instruction") or "", row["query"])
        positives_of.setdefault(key, set()).add(corpus[row["positive"]])
    todo = [i for i, row in enumerate(rows) if row.get("negative") is None]
    if not todo:
        return list(rows), 0
    texts = list(corpus)
    passage_vectors = _embed_grouped(embed, [(None, t) for t in texts], batch_size)
    query_vectors = _embed_grouped(
        embed, [(rows[i].get("instruction") or None, rows[i]["query"]) for i in todo], batch_size
    )
    sources = [positives_of[(rows[i].get("instruction") or "", rows[i]["query"])] for i in todo]
    mined = mine_negatives(
        query_vectors, passage_vectors, sources, count=count, near_duplicate=near_duplicate
    )
    found = dict(zip(todo, mined, strict=True))
    out: list[dict[str, Any]] = []
    missing = 0
    for i, row in enumerate(rows):
        if i not in found:
            out.append(dict(row))
            continue
        if not found[i]:
            missing += 1
            out.append(dict(row))
        out.extend({**row, "negative": texts[j]} for j in found[i])
    return out, missing
