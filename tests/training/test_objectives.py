"""The objective table: every ``BundleConfig.objective`` choice has one entry, and each
entry says what the bundle build needs of it (no objective switch elsewhere)."""

from __future__ import annotations

import sys
from typing import get_args

from mongars_llm.training import BundleConfig
from mongars_llm.training._objectives import OBJECTIVES, objective_for


def test_every_configurable_objective_is_registered_once() -> None:
    choices = get_args(BundleConfig.model_fields["objective"].annotation)
    assert sorted(OBJECTIVES) == sorted(choices)
    for name, objective in OBJECTIVES.items():
        assert objective.name == name
        assert objective_for(name) is objective


def test_each_objective_says_its_use_unit_and_registry_metrics() -> None:
    uses = {name: (o.use, o.seen_unit) for name, o in OBJECTIVES.items()}
    assert uses == {
        "sft": ("all", "tokens"),
        "contrastive": ("embed", "rows"),
        "simcse": ("embed", "rows"),
        "mntp": ("embed", "rows"),
        "rerank": ("rerank", "rows"),
    }
    for objective in OBJECTIVES.values():
        assert "train_loss" in objective.registry_metrics
        assert f"{objective.seen_unit}_seen" in objective.registry_metrics
    assert {"mntp_base", "mntp"} <= set(OBJECTIVES["mntp"].registry_metrics)
    assert "eval_loss" in OBJECTIVES["sft"].registry_metrics
    assert {"rerank_base", "rerank"} <= set(OBJECTIVES["rerank"].registry_metrics)


def test_the_table_loads_without_torch() -> None:
    import subprocess

    code = (
        "import sys, mongars_llm.training._objectives, mongars_llm.training._worker; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
