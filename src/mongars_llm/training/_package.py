"""The bundle a finished run leaves: adapter, tokenizer, wrapper, registry entry, metadata.

:func:`package` (rank 0 alone) writes ``train_log.jsonl`` whole, saves the
adapter (concatenated with the stacked adapter under it, if any) and its
``llm2vec_config.json`` when the objective embeds, the tokenizer, the
``wrapper_config.json`` and the wrapper (:mod:`mongars_llm.export`), registers
the adapter with the objective's metrics, and writes ``run_metadata.json``
(config, versions, precision, metrics, digests) last: a run folder with one is
finished.
"""

from __future__ import annotations

import json
import logging
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._fs import atomic_write_bytes, atomic_write_json, sha256_file
from .._version import __version__
from ..logging import log_event
from ..registry import AdapterRegistry, RegistryEntry, digest_tree
from ._build import BuildContext, BundleResult
from ._config import BundleConfig
from ._model import TORCH_DTYPES, Precision
from ._objective import Examples, Objective
from ._run import TrainOutcome
from ._stacking import concatenate_adapters

if TYPE_CHECKING:
    from ..runtime import EmbeddingConfig

__all__ = ["RUN_METADATA_VERSION", "now", "package"]

logger = logging.getLogger(__name__)

RUN_METADATA_VERSION = 1


def package(
    run: BuildContext,
    objective: Objective,
    *,
    outcome: TrainOutcome,
    examples: Examples,
    metrics: dict[str, Any],
    embedding: EmbeddingConfig | None,
    base_commit: str | None,
) -> BundleResult:
    """Write the bundle of a trained run and register its adapter (rank 0 alone)."""
    from ..export import export_wrapper

    config, run_dir, model = run.config, run.run_dir, outcome.model
    assert run.precision is not None  # set for every build but a dry run
    _write_jsonl(run_dir / "train_log.jsonl", outcome.history)
    adapter_dir, lora_shape = _save_adapter(run, outcome, embedding)
    run.tokenizer.save_pretrained(str(run_dir / "tokenizer"))
    info = _embedding_record(embedding)
    wrapper = _wrapper_config(config, run.tokenizer, base_commit, run.precision, run.run_name, info)
    if objective.use == "rerank":  # the wrapper's chat and embed run without it
        wrapper["layout"] = {"adapter_use": "rerank"}
    atomic_write_json(run_dir / "wrapper_config.json", wrapper)
    wrapper_dir = export_wrapper(run_dir)
    compatibility = _compatibility(config, model, base_commit, lora_shape)
    digests: dict[str, Any] = {
        "adapter": digest_tree(adapter_dir),
        "tokenizer": digest_tree(run_dir / "tokenizer"),
        "wrapper": digest_tree(wrapper_dir),
        "dataset_summary.json": sha256_file(run_dir / "dataset_summary.json"),
    }
    dataset_stats = _dataset_stats(examples)
    entry = None
    if config.register_adapter:
        entry = AdapterRegistry(config.registry_path).register(
            adapter_dir,
            name=config.adapter_name or run.run_name,
            run_name=run.run_name,
            run_dir=run_dir,
            compatibility=compatibility,
            metrics={k: metrics.get(k) for k in objective.registry_metrics},
            dataset=dataset_stats,
            sha256=digests["adapter"],
            use=objective.use,
            objective=config.objective,
            embedding=info,
        )
    run_metadata = {
        "schema_version": RUN_METADATA_VERSION,
        "run_name": run.run_name,
        "started_at": run.started_at,
        "finished_at": now(),
        "config": config.model_dump(mode="json"),
        "base_model": {"id": config.base_model, "revision": base_commit},
        "seed": config.seed,
        "precision": run.precision.as_dict(),
        "distributed": run.dist.as_dict() if run.dist is not None else None,
        "tokenizer": {
            "pad_token_added_as_eos": run.pad_added,
            "pad_token": run.tokenizer.pad_token,
        },
        "lora": compatibility,
        "versions": _versions(),
        "objective": config.objective,
        "use": objective.use,
        "embedding": info,
        "metrics": metrics,
        "dataset": dataset_stats,
        "resumed_from": outcome.resumed_from,
        "registry": _registry_record(config, entry),
        "sha256": digests,
    }
    atomic_write_json(run_dir / "run_metadata.json", run_metadata)
    log_event(
        logger,
        "bundle_built",
        run=run.run_name,
        steps=metrics["steps"],
        eval_loss=metrics.get("eval_loss"),
        version=entry.version if entry else None,
    )
    return BundleResult(
        run_dir=run_dir,
        config=config,
        dataset_summary=examples.train_summary,
        eval_dataset_summary=examples.eval_summary,
        adapter_dir=adapter_dir,
        wrapper_dir=wrapper_dir,
        metrics=metrics,
        registry_entry=entry,
        history=outcome.history,
        model=outcome.model,
    )


def _compatibility(
    config: BundleConfig, model: Any, base_commit: str | None, lora_shape: dict[str, Any]
) -> dict[str, Any]:
    """What an adapter needs of the model it is loaded on (the registry checks it)."""
    import peft

    lora_config = model.peft_config["default"]
    return {
        "base_model": config.base_model,
        "base_model_revision": base_commit,
        "peft_version": peft.__version__,
        **lora_shape,
        "target_modules": sorted(lora_config.target_modules or []),
        "modules_to_save": sorted(lora_config.modules_to_save or []),
    }


def _dataset_stats(examples: Examples) -> dict[str, Any]:
    summary = examples.train_summary
    return {
        "source": summary.source,
        "format": summary.format,
        "rows": summary.rows_valid,
        "rows_skipped": summary.rows_skipped,
        "duplicate_ratio": summary.duplicate_ratio,
        "trainable_tokens": summary.trainable_tokens,
        "train_examples": len(examples.train),
        "eval_examples": len(examples.eval),
    }


def _save_adapter(
    run: BuildContext, outcome: TrainOutcome, embedding: EmbeddingConfig | None
) -> tuple[Path, dict[str, Any]]:
    """``adapter/`` (with ``llm2vec_config.json`` when it embeds); returns its folder and
    its LoRA shape (``r``, ``lora_alpha``: the stacked adapter's sum when stacked)."""
    config, model, adapter_dir = run.config, outcome.model, run.run_dir / "adapter"
    if outcome.state_dict is not None:  # FSDP/DeepSpeed: the full weights gathered from shards
        model.save_pretrained(str(adapter_dir), state_dict=outcome.state_dict)
    else:
        model.save_pretrained(str(adapter_dir))
    lora_shape: dict[str, Any] = {"r": config.lora_r, "lora_alpha": config.lora_alpha}
    if run.base_adapter is not None:  # one adapter holding both: served as any other
        written = concatenate_adapters(run.base_adapter.path, adapter_dir)
        lora_shape = {"r": written["r"], "lora_alpha": written["lora_alpha"]}
    if embedding is not None:
        # what the runtime reads from a use="embed" adapter folder (pooling, max_length)
        embedding.write(adapter_dir)
    return adapter_dir, lora_shape


def _embedding_record(embedding: EmbeddingConfig | None) -> dict[str, Any] | None:
    """How the adapter embeds, as the registry entry and ``run_metadata.json`` keep it."""
    if embedding is None:
        return None
    return {
        "objective": embedding.objective,
        "pooling": embedding.pooling,
        "bidirectional": embedding.bidirectional,
        "max_length": embedding.max_length,
        "instruction": embedding.instruction,
        "normalize": embedding.normalize,
        **embedding.extra,
    }


def _registry_record(config: BundleConfig, entry: RegistryEntry | None) -> dict[str, Any] | None:
    if entry is None:
        return None
    return {"path": str(Path(config.registry_path).resolve()), "version": entry.version}


def _wrapper_config(
    config: BundleConfig,
    tokenizer: Any,
    base_commit: str | None,
    precision: Precision,
    run_name: str,
    embedding: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The run's part of the wrapper's ``config.json``; an embedding adapter records how
    it embeds and ``layout.adapter_use = "embed"`` (the wrapper's chat runs without it)."""
    out = {
        "base_model": {
            "id": config.base_model,
            "revision": base_commit,
            "dtype": TORCH_DTYPES[precision.precision],
            "trust_remote_code": config.trust_remote_code,
        },
        "tokenizer": {
            "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token,
            "pad_token": tokenizer.pad_token,
            "has_chat_template": bool(getattr(tokenizer, "chat_template", None)),
            "model_max_length": config.max_seq_len,
        },
        "embedding": {"max_length": config.max_seq_len},
        "adapter": {"name": config.adapter_name or run_name},
    }
    if embedding is not None:
        out["embedding"] = {
            "max_length": embedding["max_length"],
            "pooling": embedding["pooling"],
            "bidirectional": embedding["bidirectional"],
            "normalize": True,
            # for the queries only: a plain-string embed call (documents) gets none
            "query_instruction": embedding["instruction"],
        }
        out["layout"] = {"adapter_use": "embed"}
    return out


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"mongars-llm": __version__, "python": platform.python_version()}
    for name in (
        "torch",
        "transformers",
        "peft",
        "tokenizers",
        "safetensors",
        "accelerate",
        "datasets",
        "bitsandbytes",
    ):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(row) + "\n" for row in rows).encode())


def now() -> str:
    """The time now, UTC, to the second (ISO 8601)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
