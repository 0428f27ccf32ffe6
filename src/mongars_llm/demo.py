"""Deprecated alias of the demo's former home; import nothing from here in new code.

``mongars-llm demo`` runs the demo (its engine is private CLI code,
``mongars_llm.cli._demo``); the datasets it trains on are located by
:func:`mongars_llm.testing.fact_dataset_paths` and
:func:`mongars_llm.testing.example_dataset_path`.
"""

from __future__ import annotations

import warnings

from .cli._demo import (
    REAL_MODEL_INSTALL,
    DemoReport,
    DemoStep,
    choose_model,
    real_model_installed,
    run_demo,
)
from .testing import example_dataset_path, fact_dataset_paths

__all__ = [
    "REAL_MODEL_INSTALL",
    "DemoReport",
    "DemoStep",
    "choose_model",
    "example_dataset_path",
    "fact_dataset_paths",
    "real_model_installed",
    "run_demo",
]

warnings.warn(
    "mongars_llm.demo is deprecated and will be removed in a future release; use "
    "mongars_llm.testing.fact_dataset_paths()/example_dataset_path() for the datasets and "
    "the `mongars-llm demo` command for the demo",
    DeprecationWarning,
    stacklevel=2,
)
