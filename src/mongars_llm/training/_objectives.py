"""The training objectives by name: the one table ``BundleConfig.objective`` is looked up in.

Adding an objective is a module with an :class:`~._objective.Objective` and one
line here (and its name in ``BundleConfig.objective``'s choices).
"""

from __future__ import annotations

from ._contrastive import CONTRASTIVE, SIMCSE
from ._mntp import MNTP
from ._objective import Objective
from ._rerank import RERANK
from ._sft import SFT

__all__ = ["OBJECTIVES", "objective_for"]

OBJECTIVES: dict[str, Objective] = {
    SFT.name: SFT,
    CONTRASTIVE.name: CONTRASTIVE,
    SIMCSE.name: SIMCSE,
    MNTP.name: MNTP,
    RERANK.name: RERANK,
}


def objective_for(name: str) -> Objective:
    """The objective ``name`` names (a validated ``BundleConfig.objective``)."""
    return OBJECTIVES[name]
