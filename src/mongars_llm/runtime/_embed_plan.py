"""Forward-batch planning for embeddings (standard library only).

The runtime's :class:`~._embedder.Embedder` tokenises a micro-batch of texts
and asks this module how to run them (the LLM2Vec core, :mod:`._llm2vec`,
then runs each forward batch):

* :func:`plan_chunks`: length-sorted (longest first) batches of texts, each
  padded to its longest, capped by a size (``batch_size``) and a token budget
  (``max_batch_tokens`` padded tokens); ``batch_invariant`` runs every text
  alone so its vector never depends on its batch mates.
* :func:`plan_packed`: short texts *packed* into rows of at most
  ``embed_pack_tokens`` tokens, each text with its own positions and a
  block-diagonal mask (:func:`~._llm2vec.collate_packed`), so nothing is
  computed for padding between them; a packed text gets the vector it has alone
  (up to float rounding).
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence

__all__ = ["plan_chunks", "plan_packed"]


def plan_chunks(
    lengths: Sequence[int], *, batch_size: int, max_batch_tokens: int, batch_invariant: bool
) -> list[list[int]]:
    """Length-sorted (longest first) chunks of indices within size and token budgets."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if batch_invariant:
        return [[i] for i in order]
    chunks: list[list[int]] = []
    current: list[int] = []
    for index in order:
        longest = lengths[current[0]] if current else lengths[index]
        if current and (
            len(current) >= batch_size or (len(current) + 1) * longest > max_batch_tokens
        ):
            chunks.append(current)
            current = []
        current.append(index)
    if current:
        chunks.append(current)
    return chunks


def plan_packed(
    lengths: Sequence[int], *, batch_size: int, max_batch_tokens: int, row_tokens: int
) -> list[list[list[int]]]:
    """Forward batches of rows of indices: short inputs share rows of <= ``row_tokens``.

    Best-fit decreasing says how many rows are needed; the texts are then dealt,
    longest first, to the least-filled row, so the rows end up about equally
    long (the longest row is the batch's padded width). A text longer than
    ``row_tokens`` gets a row of its own; a row holds at most ``batch_size``
    texts. Batches hold at most ``batch_size`` texts and ``max_batch_tokens``
    padded tokens (one row may exceed the budget, as one text may in
    :func:`plan_chunks`). O(n log n).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    room: list[tuple[int, int]] = []  # (free tokens, row) of rows with free texts, sorted
    counts: list[int] = []
    for index in order:  # best-fit decreasing: how many rows are needed
        n = lengths[index]
        at = bisect.bisect_left(room, (n, -1))
        if at < len(room):
            free, row = room.pop(at)
        else:
            free, row = row_tokens, len(counts)
            counts.append(0)
        counts[row] += 1
        if free - n > 0 and counts[row] < batch_size:
            bisect.insort(room, (free - n, row))
    rows: list[list[int]] = [[] for _ in counts]
    heap = [(0, row) for row in range(len(rows))]  # (fill, row): least filled first
    for index in order:
        n = lengths[index]
        fill, row = heapq.heappop(heap)
        if rows[row] and (fill + n > row_tokens or len(rows[row]) >= batch_size):
            heapq.heappush(heap, (fill, row))
            fill, row = 0, len(rows)
            rows.append([])
        rows[row].append(index)
        heapq.heappush(heap, (fill + n, row))
    fills = {row: fill for fill, row in heap}
    batches: list[list[list[int]]] = []
    current: list[list[int]] = []
    texts = width = 0  # the current batch's texts, and its width (its first, fullest row)
    for row in sorted(fills, key=lambda r: -fills[r]):
        if current and (
            texts + len(rows[row]) > batch_size or (len(current) + 1) * width > max_batch_tokens
        ):
            batches.append(current)
            current, texts = [], 0
        if not current:
            width = fills[row]
        current.append(rows[row])
        texts += len(rows[row])
    if current:
        batches.append(current)
    return batches
