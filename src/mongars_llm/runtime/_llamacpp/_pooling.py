"""LLM2Vec pooling of one text's per-token states, in numpy (no torch).

The same rules as :func:`.._llm2vec.pool` (a test holds them equal), for one
unpadded text at a time: llama.cpp returns each text's own rows, so there is
no padding to mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .._llm2vec import pooling_mode

__all__ = ["normalise_rows", "pool_states"]


def pool_states(
    hidden: np.ndarray,
    pooled: Sequence[bool],
    ids: Sequence[int],
    *,
    mode: str,
    bos_token_id: int | None,
) -> np.ndarray:
    """One float32 vector from ``hidden`` (tokens, width).

    ``mean``: the pooled span's states averaged (an empty span: the whole
    input); ``weighted_mean``: weights 1..n over the span, in order;
    ``eos_token``/``last_token``: the last token; ``bos_token``: the first BOS.
    """
    mode = pooling_mode(mode)
    h = hidden.astype(np.float32, copy=False)
    if mode in ("mean", "weighted_mean"):
        span = np.asarray(pooled, dtype=bool)
        if not span.any():
            span = np.ones(len(h), dtype=bool)
        weights = span.astype(np.float64)
        if mode == "weighted_mean":
            weights = np.cumsum(weights) * weights
        weights /= max(weights.sum(), 1e-9)
        vector: np.ndarray = (weights[:, None] * h.astype(np.float64)).sum(0).astype(np.float32)
        return vector
    if mode in ("eos_token", "last_token"):
        last: np.ndarray = h[-1].copy()
        return last
    # bos_token
    hits = [i for i, t in enumerate(ids) if t == bos_token_id] if bos_token_id is not None else []
    first: np.ndarray = h[hits[0] if hits else 0].copy()
    return first


def normalise_rows(vectors: np.ndarray) -> np.ndarray:
    """L2-normalised rows (a zero row stays zero), as ``torch.nn.functional.normalize``."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    rows: np.ndarray = (vectors / np.maximum(norms, 1e-12)).astype(np.float32)
    return rows
