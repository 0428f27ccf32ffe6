"""Training bundles (``[train]``): dataset hygiene, LoRA/QLoRA fine-tuning, export, registry.

``validate_dataset`` needs only a tokenizer; ``build_bundle`` runs the whole
pipeline (docs/training.md). torch/transformers/peft load on first use.
"""

from __future__ import annotations

from ._bundle import BundleResult, build_bundle
from ._config import BundleConfig, load_bundle_config
from ._data import DatasetProblem, DatasetSummary, LengthStats, validate_dataset

__all__ = [
    "BundleConfig",
    "BundleResult",
    "DatasetProblem",
    "DatasetSummary",
    "LengthStats",
    "build_bundle",
    "load_bundle_config",
    "validate_dataset",
]
