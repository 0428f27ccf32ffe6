"""Training bundles (``[train]``): dataset hygiene, LoRA/QLoRA fine-tuning, export, registry.

``validate_dataset`` needs only a tokenizer; ``build_bundle`` runs the whole
pipeline (docs/training.md). Importing this package is cheap (the CLI reads
:class:`BundleConfig` to build its flags): the pipeline, provisioning and
numpy load on first access, torch/transformers/peft on first use.

Other packages (the CLI's ``bundle eval``) import what they use from here, never
from a private module (``tests/test_layering.py``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._config import BundleConfig, load_bundle_config

_LAZY = {
    "BundleResult": "mongars_llm.training._build",
    "build_bundle": "mongars_llm.training._bundle",
    "DatasetProblem": "mongars_llm.training._data",
    "DatasetSummary": "mongars_llm.training._data",
    "LengthStats": "mongars_llm.training._data",
    "validate_dataset": "mongars_llm.training._data",
    "adapter_use": "mongars_llm.training._stacking",
    "describe_use": "mongars_llm.training._stacking",
    "is_chat_adapter": "mongars_llm.training._stacking",
    "evaluate_pairs": "mongars_llm.training._retrieval",
    "read_pairs": "mongars_llm.training._retrieval",
    "read_documents": "mongars_llm.training._documents",
    "synthesize_pairs": "mongars_llm.training._from_documents",
    "SynthesisSummary": "mongars_llm.training._synthesis",
    "retrieval_metrics": "mongars_llm.training._retrieval",
    "Retrieved": "mongars_llm.training._retrieval",
    "ranking_metrics": "mongars_llm.training._retrieval",
    "rerank_metrics": "mongars_llm.training._retrieval",
    "retrieve": "mongars_llm.training._retrieval",
}

__all__ = [
    "BundleConfig",
    "BundleResult",
    "DatasetProblem",
    "DatasetSummary",
    "LengthStats",
    "Retrieved",
    "SynthesisSummary",
    "adapter_use",
    "build_bundle",
    "describe_use",
    "evaluate_pairs",
    "is_chat_adapter",
    "load_bundle_config",
    "ranking_metrics",
    "read_documents",
    "read_pairs",
    "rerank_metrics",
    "retrieval_metrics",
    "retrieve",
    "synthesize_pairs",
    "validate_dataset",
]

if TYPE_CHECKING:
    from ._build import BundleResult
    from ._bundle import build_bundle
    from ._data import DatasetProblem, DatasetSummary, LengthStats, validate_dataset
    from ._documents import read_documents
    from ._from_documents import synthesize_pairs
    from ._retrieval import (
        Retrieved,
        evaluate_pairs,
        ranking_metrics,
        read_pairs,
        rerank_metrics,
        retrieval_metrics,
        retrieve,
    )
    from ._stacking import adapter_use, describe_use, is_chat_adapter
    from ._synthesis import SynthesisSummary


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mongars_llm.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
