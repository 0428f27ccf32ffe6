"""What one bundle build shares between its stages, and what it returns.

:class:`BuildContext` is settled before the run folder is claimed (config, run
name and folder, tokenizer, precision, processes, base model copy, stacked
adapter); :class:`BundleResult` is what :func:`~._bundle.build_bundle` returns,
in this process or, rebuilt from rank 0's payload, from
:func:`~._distributed.launch_local`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..registry import RegistryEntry
from ._config import BundleConfig
from ._data import DatasetSummary

if TYPE_CHECKING:
    from ..provisioning import ProvisionedCopy
    from ._distributed import Distributed
    from ._model import Precision
    from ._stacking import BaseAdapter

__all__ = ["BuildContext", "BundleResult"]


@dataclass
class BundleResult:
    """What :func:`build_bundle` produced. ``adapter_dir``/``wrapper_dir`` are ``None``
    for a dry run; ``registry_entry`` is ``None`` when nothing was registered."""

    run_dir: Path
    config: BundleConfig
    dataset_summary: DatasetSummary
    adapter_dir: Path | None = None
    wrapper_dir: Path | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    registry_entry: RegistryEntry | None = None
    eval_dataset_summary: DatasetSummary | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    #: the trained peft model, still in memory (``None`` for a dry run)
    model: Any = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (what ``mongars-llm bundle build --json`` prints)."""
        return {
            "run_dir": str(self.run_dir),
            "adapter_dir": str(self.adapter_dir) if self.adapter_dir else None,
            "wrapper_dir": str(self.wrapper_dir) if self.wrapper_dir else None,
            "dry_run": self.config.dry_run,
            "metrics": {k: v for k, v in self.metrics.items() if k != "evals"},
            "registry_entry": (
                self.registry_entry.model_dump(mode="json") if self.registry_entry else None
            ),
            "dataset_summary": self.dataset_summary.model_dump(mode="json"),
            "eval_dataset_summary": (
                self.eval_dataset_summary.model_dump(mode="json")
                if self.eval_dataset_summary
                else None
            ),
        }

    @classmethod
    def from_payload(cls, payload: dict[str, Any], config: BundleConfig) -> BundleResult:
        """The result a worker process wrote (:meth:`to_dict` plus metrics and history)."""
        eval_summary = payload["eval_dataset_summary"]
        entry = payload["registry_entry"]
        return cls(
            run_dir=Path(payload["run_dir"]),
            config=config,
            dataset_summary=DatasetSummary.model_validate(payload["dataset_summary"]),
            eval_dataset_summary=(
                DatasetSummary.model_validate(eval_summary) if eval_summary is not None else None
            ),
            adapter_dir=Path(payload["adapter_dir"]) if payload["adapter_dir"] else None,
            wrapper_dir=Path(payload["wrapper_dir"]) if payload["wrapper_dir"] else None,
            metrics=payload["metrics"],
            registry_entry=RegistryEntry.model_validate(entry) if entry is not None else None,
            history=payload["history"],
        )


@dataclass(frozen=True)
class BuildContext:
    """What every stage of one build shares, settled before the run folder is claimed."""

    config: BundleConfig
    run_name: str
    run_dir: Path
    started_at: str
    tokenizer: Any
    #: the tokenizer had no pad token: EOS stands in (recorded in run_metadata.json)
    pad_added: bool
    #: ``None`` for a dry run
    precision: Precision | None = None
    #: ``None`` for a single process
    dist: Distributed | None = None
    #: the provisioned copy of a Hub base model, when ``provision`` installed one
    base_copy: ProvisionedCopy | None = None
    #: the adapter this run trains on top of (``config.base_adapter``)
    base_adapter: BaseAdapter | None = None

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run folder (rank 0, or the only process)."""
        return self.dist is None or self.dist.is_main
