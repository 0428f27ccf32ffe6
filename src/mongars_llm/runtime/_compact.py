"""Compact vectors: fewer dimensions (Matryoshka truncation) and fewer bits
(int8/uint8 scalar quantisation, binary packing), torch-free.

Three jobs, shared by ``rt.embed``, the server's ``/v1/embeddings`` and the
benchmarks:

* :func:`quantize_embeddings` follows sentence-transformers'
  ``quantize_embeddings`` exactly (same precisions, same calibration, same
  output), so vectors made here and vectors made there compare:

  - ``float32``: unchanged;
  - ``int8``/``uint8``: per dimension, the range ``[min, max]`` is cut into
    255 equal steps; ``uint8 = clip(floor((v - min) / step), 0, 255)`` and
    ``int8 = uint8 - 128``. The ranges come from ``ranges`` (a ``(2, dim)``
    array of minima and maxima), else from ``calibration`` embeddings (a
    representative set, the recommended way), else from the batch's own
    minima and maxima (refused for a single vector, where they say nothing);
  - ``binary``/``ubinary``: one bit per dimension, set where ``v > 0``, packed
    8 to a byte (:func:`numpy.packbits`, most significant bit first);
    ``ubinary`` is the packed ``uint8`` bytes, ``binary`` those bytes minus 128
    as ``int8``. Compare them with the Hamming distance.

* :func:`int8_absmax` is the server's int8 (``encoding_format="int8"``): each
  vector scaled by its own largest absolute component to ``[-127, 127]``. It
  needs no calibration set and keeps cosine similarity up to rounding, which
  a per-request min/max of one vector cannot do.

* :func:`truncate_embeddings` keeps the first ``dimensions`` components
  (re-normalised to unit length when the vectors were normalised), and
  :func:`check_dimensions` refuses a truncation the model or adapter was not
  trained for (its ``llm2vec_config.json`` lists ``matryoshka_dims``) unless
  the caller forces it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, get_args

import numpy as np

from ..errors import InvalidInputError

__all__ = [
    "MATRYOSHKA_KEY",
    "PRECISIONS",
    "Precision",
    "check_dimensions",
    "int8_absmax",
    "quantize_embeddings",
    "truncate_embeddings",
]

Precision = Literal["float32", "int8", "uint8", "binary", "ubinary"]
#: the precisions of :func:`quantize_embeddings`, as sentence-transformers names them
PRECISIONS: tuple[str, ...] = get_args(Precision)
#: the ``llm2vec_config.json`` key listing the truncations an adapter was trained for
MATRYOSHKA_KEY = "matryoshka_dims"


def quantize_embeddings(
    embeddings: Any,
    precision: str,
    *,
    ranges: Any = None,
    calibration: Any = None,
) -> np.ndarray:
    """``embeddings`` (``(n, dim)`` floats) at ``precision`` (see the module doc).

    ``ranges`` (``(2, dim)``: minima, maxima) or ``calibration`` (``(m, dim)``
    float embeddings) fix the int8/uint8 buckets; without either the batch's
    own minima and maxima are used. A wrong precision, shape or a single
    vector without calibration is an :class:`InvalidInputError` naming the
    argument.
    """
    if precision not in PRECISIONS:
        raise InvalidInputError(
            f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}",
            param="precision",
        )
    vectors = np.asarray(embeddings)
    if vectors.dtype in (np.int8, np.uint8):
        raise InvalidInputError(
            "embeddings to quantize must be floats, not int8/uint8", param="embeddings"
        )
    vectors = vectors.astype(np.float32, copy=False)
    if vectors.ndim != 2:
        raise InvalidInputError(
            f"embeddings must be a (n, dim) array, got shape {vectors.shape}", param="embeddings"
        )
    if precision == "float32":
        return vectors
    if precision.endswith("binary"):
        packed = np.packbits(vectors > 0, axis=-1)
        if precision == "ubinary":
            return packed
        return (packed.astype(np.int16) - 128).astype(np.int8)
    bounds = _ranges(vectors, precision, ranges, calibration)
    starts = bounds[0]
    steps = (bounds[1] - starts) / 255
    steps = np.where(steps == 0, 1, steps)
    levels: np.ndarray = np.clip(np.floor((vectors - starts) / steps), 0, 255)
    if precision == "uint8":
        return levels.astype(np.uint8)
    return (levels - 128).astype(np.int8)


def _ranges(vectors: np.ndarray, precision: str, ranges: Any, calibration: Any) -> np.ndarray:
    dim = vectors.shape[1]
    if ranges is not None:
        bounds = np.asarray(ranges, dtype=np.float32)
        if bounds.shape != (2, dim):
            raise InvalidInputError(
                f"ranges must have shape (2, {dim}) (minima, maxima), got {bounds.shape}",
                param="ranges",
            )
        return bounds
    if calibration is not None:
        sample = np.asarray(calibration, dtype=np.float32)
        if sample.ndim != 2 or sample.shape[1] != dim or sample.shape[0] == 0:
            raise InvalidInputError(
                f"calibration must be a (m, {dim}) array of float embeddings, "
                f"got shape {sample.shape}",
                param="calibration",
            )
    else:
        if vectors.shape[0] < 2:
            raise InvalidInputError(
                f"{precision} needs calibration ranges, and one vector has none: pass "
                "calibration= (embeddings of representative texts) or ranges=",
                param="calibration",
            )
        sample = vectors
    return np.vstack((sample.min(axis=0), sample.max(axis=0)))


def int8_absmax(embeddings: Any) -> np.ndarray:
    """Each row scaled by its largest absolute component into ``int8`` ``[-127, 127]``
    (rounded); a zero row stays zero. Cosine similarity survives up to rounding."""
    vectors = np.asarray(embeddings, dtype=np.float32)
    scale = np.abs(vectors).max(axis=-1, keepdims=True) if vectors.size else vectors
    scale = np.where(scale == 0, 1, scale)
    return np.rint(vectors / scale * 127).astype(np.int8)


def truncate_embeddings(embeddings: Any, dimensions: int, *, normalize: bool) -> np.ndarray:
    """The first ``dimensions`` components of each row, re-normalised to unit length
    when ``normalize`` (the vectors were normalised before)."""
    vectors = np.asarray(embeddings, dtype=np.float32)[..., :dimensions]
    if normalize:
        norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
    return np.ascontiguousarray(vectors, dtype=np.float32)


def check_dimensions(
    dimensions: Any,
    *,
    hidden_size: int,
    trained: Sequence[int],
    force: bool,
    where: str = "the model",
    param: str = "dimensions",
    force_name: str = "force_dimensions=True",
) -> int | None:
    """``dimensions`` when it may be served (``None`` passes through).

    It must be an integer from 1 to ``hidden_size``; below ``hidden_size`` it must
    be one of the ``trained`` truncations (``matryoshka_dims``) unless ``force``:
    a vector cut where the training never looked loses more than it needs to.
    ``where`` names the model or adapter and ``force_name`` the escape in the
    :class:`InvalidInputError`.
    """
    if dimensions is None:
        return None
    if not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1:
        raise InvalidInputError(f"{param} must be an integer >= 1, got {dimensions!r}", param=param)
    if hidden_size and dimensions > hidden_size:
        raise InvalidInputError(
            f"{param}={dimensions} is larger than the model's {hidden_size} dimensions",
            param=param,
        )
    if dimensions == hidden_size or force or dimensions in trained:
        return dimensions
    if trained:
        offered = (
            f"it was trained for {', '.join(str(d) for d in sorted(trained))} and {hidden_size}"
        )
    else:
        offered = (
            "it was not trained for truncation (train with --matryoshka-dims to make "
            "short vectors that keep their quality)"
        )
    raise InvalidInputError(
        f"{param}={dimensions} is refused for {where}: {offered}; pass {force_name} to "
        "cut the vectors anyway",
        param=param,
    )
