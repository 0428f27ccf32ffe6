"""Wrapper export (DESIGN §5): a portable folder with a loader that needs no mongars_llm,
or (``format="sentence-transformers"``) a folder that ``SentenceTransformer`` loads."""

from __future__ import annotations

from ._export import (
    DEFAULT_WRAPPER_CONFIG,
    EXPORT_FORMATS,
    WRAPPER_MANIFEST_VERSION,
    WRAPPER_MODULE_NAME,
    deep_merge,
    export_wrapper,
)

__all__ = [
    "DEFAULT_WRAPPER_CONFIG",
    "EXPORT_FORMATS",
    "WRAPPER_MANIFEST_VERSION",
    "WRAPPER_MODULE_NAME",
    "deep_merge",
    "export_wrapper",
]
