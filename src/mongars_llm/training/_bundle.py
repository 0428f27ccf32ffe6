"""``build_bundle``: validate data → LoRA fine-tune → export → register.

Run directory layout (DESIGN §4)::

    <output_dir>/<run_name>/
      dataset_summary.json        hygiene report of the training set
      eval_dataset_summary.json   same for an explicit eval set
      adapter/                    peft format (adapter_config.json + safetensors)
      tokenizer/                  the tokenizer used for training
      wrapper_config.json         input of the wrapper export (§5)
      wrapper/                    self-contained loader + config + artefacts
      checkpoints/step-N/         resumable state (adapter, optimizer, scheduler, RNG)
      train_log.jsonl             one line per optimizer step
      run_metadata.json           resolved config, versions, metrics, digests
"""

from __future__ import annotations

import json
import logging
import platform
import random
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._fs import atomic_write_bytes, atomic_write_json, sha256_file
from .._version import __version__
from ..errors import BundleError, ConfigError, DatasetError
from ..logging import log_event
from ..provisioning._local_copy import ProvisionedCopy
from ..registry import AdapterRegistry, RegistryEntry, digest_tree
from ._config import DEFAULT_BASE_ROLE, BundleConfig, load_bundle_config
from ._data import DatasetSummary, EncodedExample, hub_rows, load_examples, read_jsonl_rows
from ._pairs import EMBEDDING_OBJECTIVES, PairExample, load_pairs
from ._stacking import (
    BaseAdapter,
    check_stackable,
    concatenate_adapters,
    merge_base_adapter,
    resolve_base_adapter,
)

if TYPE_CHECKING:
    from ..manager import ModelManager
    from ..provisioning import ProvisionEntry
    from ._distributed import Distributed
    from ._trainer import Precision

__all__ = ["BundleResult", "build_bundle"]

logger = logging.getLogger(__name__)

RUN_METADATA_VERSION = 1
RUN_LOCK_NAME = ".build.lock"


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


@dataclass(frozen=True)
class _RunContext:
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


def build_bundle(
    config_or_path: BundleConfig | Mapping[str, Any] | str | Path | None = None,
    **overrides: Any,
) -> BundleResult:
    """Build a training bundle: validate, fine-tune, export the wrapper and register.

    ``config_or_path`` is a :class:`BundleConfig`, a mapping or a JSON/YAML
    file; keyword ``overrides`` (any config field; ``None`` means "not given")
    win over it. With ``dry_run=True`` it stops after the dataset checks.
    Raises :class:`DatasetError` (every bad record listed), :class:`ConfigError`
    or :class:`BundleError`.
    """
    config = load_bundle_config(config_or_path, **overrides)
    config.require_dataset()
    config, base_copy, named = _locate_base_model(config)
    config, base_adapter = _stack_on(config)
    started_at = _now()
    run_name = config.resolved_run_name(named)
    run_dir = (config.resolved_output_dir() / run_name).resolve()
    _refuse_finished(run_dir)
    if not config.dry_run and config.resume is not False:
        from ._trainer import find_checkpoint

        find_checkpoint(run_dir, config.resume)  # a wrong --resume fails before anything loads
    # refuse impossible precision (QLoRA off CUDA) before anything is loaded
    precision = None
    dist = None
    if not config.dry_run:
        from ._distributed import env_world_size, init_distributed, launch_local
        from ._trainer import Precision, resolve_precision

        precision = resolve_precision(config)
        if config.num_processes > 1 and env_world_size() == 1:
            # N workers run this function under WORLD_SIZE=N; they must agree on the folder
            return launch_local(config.model_copy(update={"run_name": run_name}))
        dist = init_distributed(config, precision.device)
        if dist is not None and precision.device.startswith("cuda"):
            precision = Precision(
                device=str(dist.accelerator.device),
                precision=precision.precision,
                qlora=precision.qlora,
            )
    main = dist is None or dist.is_main
    # open (and check) the dataset files before any folder is created
    train_rows = _rows(
        config.dataset_path, config.dataset_id, config.dataset_config, config.dataset_split
    )
    eval_rows = None
    if config.eval_dataset_path is not None or config.eval_dataset_id is not None:
        eval_rows = _rows(
            config.eval_dataset_path,
            config.eval_dataset_id,
            config.dataset_config,
            config.eval_dataset_split,
            flag="--eval-dataset-path",
        )

    from ._data import _load_tokenizer

    if base_copy is not None:
        tokenizer = _load_tokenizer(base_copy.path)
    else:
        tokenizer = _load_tokenizer(str(config.base_model), config.base_model_revision)
    pad_added = False
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # labels are masked by position, EOS survives
        pad_added = True
    # several processes: rank 0 alone claims and writes the run folder
    claim: AbstractContextManager[None] = _claim_run_dir(run_dir) if main else nullcontext()
    with claim:
        if main:
            _refuse_finished(run_dir)  # again: another build may have finished meanwhile
        run = _RunContext(
            config=config,
            run_name=run_name,
            run_dir=run_dir,
            started_at=started_at,
            tokenizer=tokenizer,
            pad_added=pad_added,
            precision=precision,
            dist=dist,
            base_copy=base_copy,
            base_adapter=base_adapter,
        )
        return _build_claimed(run, train_rows=train_rows, eval_rows=eval_rows)


def _locate_base_model(config: BundleConfig) -> tuple[BundleConfig, ProvisionedCopy | None, str]:
    """Settle ``base_model``; returns the config, the provisioned copy of a Hub model to
    load instead of the Hub, and the model as the user named it (for the run name).

    In order: unset is the active profile's ``general`` role (else its first), the model
    ``chat`` loads; a ``pkg://`` or ``.gguf`` file is provisioned (converted once) as the
    ``local`` provider does; a local folder becomes absolute (the wrapper and the adapter
    must load it from any folder); a role of the active profile is provisioned as
    ``chat`` provisions it; anything else is a Hub id, read from the copy ``provision``
    installed when there is one.
    """
    from ..provisioning.local import PACKAGE_SCHEME

    name = config.base_model
    if name is None:
        manager = _manager()
        roles = manager.role_names
        if not roles:
            raise ConfigError(
                f"no --base-model and profile {manager.profile_name!r} has no roles; pass "
                "--base-model (a Hub id, a checkpoint folder or a role)"
            )
        role = DEFAULT_BASE_ROLE if DEFAULT_BASE_ROLE in roles else roles[0]
        _say(
            config,
            f"base model: role {role!r} of profile {manager.profile_name!r} "
            f"({manager.profile.models[role].name}); choose another with --base-model",
        )
        return _role_base(config, manager, role)
    local = Path(name).expanduser()
    if name.startswith(PACKAGE_SCHEME) or (local.is_file() and local.suffix.lower() == ".gguf"):
        return _provisioned_file(config, name)
    if local.exists():
        return config.model_copy(update={"base_model": str(local.resolve())}), None, name
    if "/" not in name and not name.startswith("."):
        manager = _manager()
        if name in manager.role_names:
            return _role_base(config, manager, name)
    from ..provisioning._local_copy import provisioned_copy
    from ..settings import get_settings

    copy = provisioned_copy(
        name,
        revision=config.base_model_revision,
        settings=get_settings(),
        trust_remote_code=config.trust_remote_code,
    )
    if copy is not None:
        logger.info("base model %s: using the provisioned copy %s", name, copy.path)
    return config, copy, name


def _manager() -> ModelManager:
    from ..manager import ModelManager

    return ModelManager()


def _provision_one(config: BundleConfig, manager: ModelManager, role: str) -> ProvisionEntry:
    """Provision ``role`` as ``chat`` does; a failure is a ``BundleError`` saying how to fix it."""
    from ..provisioning import provision

    entry = manager.profile.models[role]
    _say(config, f"provisioning {entry.name} ({entry.provider}) ...")
    report = provision([role], manager=manager, show_progress=config.progress)
    found = report[role]
    if not found.ok or not found.path:
        raise BundleError(
            f"base model {entry.name!r} (role {role!r} of profile {manager.profile_name!r}) "
            f"could not be provisioned: {found.error or found.verified or found.action}; run "
            f"`mongars-llm provision --roles {role}`, or pass --base-model a checkpoint folder"
        )
    return found


def _role_base(
    config: BundleConfig, manager: ModelManager, role: str
) -> tuple[BundleConfig, ProvisionedCopy | None, str]:
    """A manifest role as the base: provisioned first. A Hub model keeps its id (the
    adapter names it, loaded from the provisioned copy); any other is its local copy."""
    entry = manager.profile.models[role]
    found = _provision_one(config, manager, role)
    update: dict[str, Any] = {}
    if "trust_remote_code" not in config.model_fields_set:
        update["trust_remote_code"] = bool(entry.trust_remote_code)
    path = Path(str(found.path)).resolve()
    if found.provider == "huggingface" and found.revision:
        update["base_model"] = entry.name
        copy = ProvisionedCopy(repo_id=entry.name, revision=found.revision, path=path)
        return config.model_copy(update=update), copy, entry.name
    update["base_model"] = str(path)
    return config.model_copy(update=update), None, entry.name


def _provisioned_file(
    config: BundleConfig, name: str
) -> tuple[BundleConfig, ProvisionedCopy | None, str]:
    """A ``pkg://`` or ``.gguf`` file, provisioned (converted once) by the ``local``
    provider through a one-role manifest; the run trains on the converted folder."""
    from ..manager import ModelManager
    from ..manifest import parse_manifest

    manifest = parse_manifest(
        {"profiles": {"base": {"models": {"base": {"name": name, "provider": "local"}}}}},
        base_dir=Path.cwd(),
    )
    manager = ModelManager(manifest, profile="base")
    found = _provision_one(config, manager, "base")
    path = Path(str(found.path)).resolve()
    return config.model_copy(update={"base_model": str(path)}), None, name


def _say(config: BundleConfig, text: str) -> None:
    """A status line on stderr when the run shows its progress (bar or lines)."""
    if config.progress or config.progress_every:
        print(text, file=sys.stderr, flush=True)


def _stack_on(config: BundleConfig) -> tuple[BundleConfig, BaseAdapter | None]:
    """The adapter ``base_adapter`` names, checked; its pooling and attention mode become
    this run's unless the caller set them (the stack embeds one way)."""
    if config.base_adapter is None:
        return config, None
    adapter = resolve_base_adapter(config.base_adapter, registry_path=config.registry_path)
    inherited = {
        key: adapter.embedding[key]
        for key in ("pooling", "bidirectional")
        if key in adapter.embedding and key not in config.model_fields_set
    }
    if inherited:
        config = load_bundle_config(config, **inherited)
    return config, adapter


def _build_claimed(
    run: _RunContext,
    *,
    train_rows: Iterable[tuple[int, Any]],
    eval_rows: Iterable[tuple[int, Any]] | None,
) -> BundleResult:
    config, run_dir, tokenizer = run.config, run.run_dir, run.tokenizer
    if config.objective in EMBEDDING_OBJECTIVES:
        return _build_embedding_claimed(run, train_rows=train_rows, eval_rows=eval_rows)
    train_summary, train_examples = load_examples(
        train_rows,
        source=str(config.dataset_path or config.dataset_id),
        tokenizer=tokenizer,
        max_seq_len=config.max_seq_len,
        skip_invalid=config.skip_invalid,
        overlong=config.overlong,
        summary_path=run_dir / "dataset_summary.json" if run.is_main else None,
    )
    eval_summary: DatasetSummary | None = None
    eval_examples: list[EncodedExample] = []
    if eval_rows is not None:
        eval_summary, eval_examples = load_examples(
            eval_rows,
            source=str(config.eval_dataset_path or config.eval_dataset_id),
            tokenizer=tokenizer,
            max_seq_len=config.max_seq_len,
            skip_invalid=config.skip_invalid,
            overlong=config.overlong,
            summary_path=run_dir / "eval_dataset_summary.json" if run.is_main else None,
        )
    elif config.eval_fraction > 0 and len(train_examples) >= 2:
        train_examples, eval_examples = _hold_out(train_examples, config.eval_fraction, config.seed)
    log_event(
        logger,
        "bundle_dataset",
        rows=train_summary.rows_valid,
        invalid=train_summary.rows_invalid,
        duplicates=train_summary.duplicates,
        trainable_tokens=train_summary.trainable_tokens,
    )
    if config.dry_run:
        return BundleResult(
            run_dir=run_dir,
            config=config,
            dataset_summary=train_summary,
            eval_dataset_summary=eval_summary,
        )

    trainable = sum(e.trainable_tokens for e in train_examples)
    if trainable < config.min_trainable_tokens:
        raise DatasetError(
            f"only {trainable} trainable (completion) token(s) remain in {len(train_examples)} "
            f"training record(s), fewer than min_trainable_tokens={config.min_trainable_tokens}; "
            "the run would learn nothing. Add data or raise max_seq_len",
            [],
        )
    return _train_and_package(
        run,
        train_summary=train_summary,
        eval_summary=eval_summary,
        train_examples=train_examples,
        eval_examples=eval_examples,
    )


def _build_embedding_claimed(
    run: _RunContext,
    *,
    train_rows: Iterable[tuple[int, Any]],
    eval_rows: Iterable[tuple[int, Any]] | None,
) -> BundleResult:
    """:func:`_build_claimed` for the embedding objectives (pairs or texts, not chat)."""
    config, run_dir, tokenizer = run.config, run.run_dir, run.tokenizer
    common: dict[str, Any] = {
        "objective": config.objective,
        "tokenizer": tokenizer,
        "max_seq_len": config.max_seq_len,
        "instruction": config.instruction,
        "skip_invalid": config.skip_invalid,
    }
    train_summary, train_examples = load_pairs(
        train_rows,
        source=str(config.dataset_path or config.dataset_id),
        summary_path=run_dir / "dataset_summary.json" if run.is_main else None,
        **common,
    )
    eval_summary: DatasetSummary | None = None
    eval_examples: list[PairExample] = []
    if eval_rows is not None:  # retrieval pairs, whatever the objective (simcse too)
        eval_summary, eval_examples = load_pairs(
            eval_rows,
            source=str(config.eval_dataset_path or config.eval_dataset_id),
            summary_path=run_dir / "eval_dataset_summary.json" if run.is_main else None,
            **{**common, "objective": "contrastive"},
        )
    elif (
        config.objective == "contrastive" and config.eval_fraction > 0 and len(train_examples) >= 4
    ):
        # simcse texts hold no pairs to retrieve: its metrics need an eval set of pairs
        train_examples, eval_examples = _hold_out(train_examples, config.eval_fraction, config.seed)
    eval_texts: list[PairExample] = []
    if config.objective == "mntp" and config.eval_fraction > 0 and len(train_examples) >= 4:
        # held-out texts for the masked-token loss (retrieval needs an eval file of pairs)
        train_examples, eval_texts = _hold_out(train_examples, config.eval_fraction, config.seed)
    log_event(
        logger,
        "bundle_dataset",
        objective=config.objective,
        rows=train_summary.rows_valid,
        invalid=train_summary.rows_invalid,
        duplicates=train_summary.duplicates,
        train=len(train_examples),
        eval=len(eval_examples),
        eval_texts=len(eval_texts),
    )
    if config.dry_run:
        counts = {"train_examples": len(train_examples), "eval_examples": len(eval_examples)}
        if config.objective == "mntp":
            counts["eval_texts"] = len(eval_texts)
        return BundleResult(
            run_dir=run_dir,
            config=config,
            dataset_summary=train_summary,
            eval_dataset_summary=eval_summary,
            metrics=counts,
        )
    return _train_and_package(
        run,
        train_summary=train_summary,
        eval_summary=eval_summary,
        train_examples=train_examples,
        eval_examples=eval_examples,
        eval_texts=eval_texts,
    )


def _train_and_package(
    run: _RunContext,
    *,
    train_summary: DatasetSummary,
    eval_summary: DatasetSummary | None,
    train_examples: list[Any],
    eval_examples: list[Any],
    eval_texts: list[PairExample] | None = None,
) -> BundleResult:
    import peft

    from ..export import export_wrapper
    from ._trainer import TrainOutcome, build_peft_model, load_base_model, seed_everything, train

    config, run_name, run_dir, tokenizer = run.config, run.run_name, run.run_dir, run.tokenizer
    dist, precision, base_copy, main = run.dist, run.precision, run.base_copy, run.is_main
    assert precision is not None  # set for every build but a dry run
    seed_everything(config.seed)
    t0 = time.perf_counter()
    source = base_copy.path if base_copy else None
    if main:
        _say(config, f"loading the base model {config.base_model} ...")
    with _loading_bars(config, str(source or config.base_model), main=main):
        base = load_base_model(config, precision, source=source)
    stacked_on = run.base_adapter
    if stacked_on is not None:  # trained on top of the merged earlier adapter
        base = merge_base_adapter(base, stacked_on, base_model=str(config.base_model))
    base_commit = (
        base_copy.revision
        if base_copy is not None
        else getattr(base.config, "_commit_hash", None) or config.base_model_revision
    )
    model = build_peft_model(base, config)
    if stacked_on is not None:  # before training: the two must become one adapter after it
        check_stackable(model, stacked_on)
    if base_copy is not None:  # the adapter names the Hub id, not this machine's folder
        for peft_config in model.peft_config.values():
            peft_config.base_model_name_or_path = config.base_model
    if dist is not None:  # the same LoRA init on every rank, but each its own dropout masks
        seed_everything(config.seed + dist.rank)
    trainable_params, total_params = model.get_nb_trainable_parameters()
    fingerprint = _fingerprint(config, train_examples, precision)
    embedding = config.objective in EMBEDDING_OBJECTIVES
    outcome: TrainOutcome
    spec = None
    if embedding:
        from ._contrastive import EmbeddingSpec, train_embeddings

        spec = EmbeddingSpec.of(config, base)
        fingerprint.update(
            objective=config.objective,
            temperature=config.temperature,
            pooling=config.pooling,
            bidirectional=config.bidirectional,
            instruction=config.instruction,
            symmetric_loss=config.symmetric_loss,
            simcse_dropout=config.simcse_dropout if config.objective == "simcse" else None,
            mask_probability=config.mask_probability if config.objective == "mntp" else None,
            base_adapter=stacked_on.sha256 if stacked_on is not None else None,
        )
        outcome = train_embeddings(
            model,
            tokenizer=tokenizer,
            config=config,
            precision=precision,
            spec=spec,
            train_examples=train_examples,
            eval_examples=eval_examples,
            run_dir=run_dir,
            fingerprint=fingerprint,
            eval_texts=eval_texts or (),
            dist=dist,
        )
    else:
        outcome = train(
            model,
            config=config,
            precision=precision,
            train_examples=train_examples,
            eval_examples=eval_examples,
            pad_id=tokenizer.pad_token_id,
            run_dir=run_dir,
            fingerprint=fingerprint,
            dist=dist,
        )
    metrics = {
        **outcome.metrics,
        "trainable_params": trainable_params,
        "total_params": total_params,
        "wall_seconds": round(time.perf_counter() - t0, 3),
    }
    if not main:  # rank 0 alone writes the bundle and the registry entry
        return BundleResult(
            run_dir=run_dir,
            config=config,
            dataset_summary=train_summary,
            eval_dataset_summary=eval_summary,
            metrics=metrics,
            history=outcome.history,
            model=outcome.model,
        )
    _write_jsonl(run_dir / "train_log.jsonl", outcome.history)

    adapter_dir = run_dir / "adapter"
    tokenizer_dir = run_dir / "tokenizer"
    if outcome.state_dict is not None:  # FSDP/DeepSpeed: the full weights gathered from shards
        model.save_pretrained(str(adapter_dir), state_dict=outcome.state_dict)
    else:
        model.save_pretrained(str(adapter_dir))
    lora_shape = {"r": config.lora_r, "lora_alpha": config.lora_alpha}
    if stacked_on is not None:  # one adapter holding both: the runtime serves it as any other
        written = concatenate_adapters(stacked_on.path, adapter_dir)
        lora_shape = {"r": written["r"], "lora_alpha": written["lora_alpha"]}
    embedding_info: dict[str, Any] | None = None
    if spec is not None:
        embedding_info = {
            "objective": config.objective,
            **spec.as_dict(),
            "instruction": config.instruction,
            "normalize": True,
            "temperature": config.temperature,
        }
        if config.objective == "mntp":
            embedding_info["mask_probability"] = config.mask_probability
        if stacked_on is not None:
            embedding_info["stacked_on"] = {
                "adapter": stacked_on.label,
                "objective": stacked_on.embedding.get("objective"),
                "sha256": stacked_on.sha256,
            }
        # what the runtime reads from a use="embed" adapter folder (pooling, max_length)
        atomic_write_json(
            adapter_dir / "llm2vec_config.json",
            {"pooling_mode": spec.pooling, "max_length": spec.max_length, **embedding_info},
        )
    tokenizer.save_pretrained(str(tokenizer_dir))
    lora_config = model.peft_config["default"]
    target_modules = sorted(lora_config.target_modules or [])
    modules_to_save = sorted(lora_config.modules_to_save or [])

    atomic_write_json(
        run_dir / "wrapper_config.json",
        _wrapper_config(config, tokenizer, base_commit, precision, run_name, embedding_info),
    )
    wrapper_dir = export_wrapper(run_dir)

    compatibility = {
        "base_model": config.base_model,
        "base_model_revision": base_commit,
        "peft_version": peft.__version__,
        **lora_shape,
        "target_modules": target_modules,
        "modules_to_save": modules_to_save,
    }
    digests: dict[str, Any] = {
        "adapter": digest_tree(adapter_dir),
        "tokenizer": digest_tree(tokenizer_dir),
        "wrapper": digest_tree(wrapper_dir),
        "dataset_summary.json": sha256_file(run_dir / "dataset_summary.json"),
    }
    registry_keys: tuple[str, ...] = (
        "eval_loss",
        "eval_perplexity",
        "eval_loss_initial",
        "train_loss",
        "steps",
        "tokens_seen",
    )
    if embedding:
        registry_keys = ("train_loss", "steps", "rows_seen", "retrieval_base", "retrieval")
        if config.objective == "mntp":
            registry_keys += ("mntp_base", "mntp")
    registry_metrics = {k: metrics.get(k) for k in registry_keys}
    dataset_stats = {
        "source": train_summary.source,
        "format": train_summary.format,
        "rows": train_summary.rows_valid,
        "rows_skipped": train_summary.rows_skipped,
        "duplicate_ratio": train_summary.duplicate_ratio,
        "trainable_tokens": train_summary.trainable_tokens,
        "train_examples": len(train_examples),
        "eval_examples": len(eval_examples),
    }
    entry = None
    if config.register_adapter:
        entry = AdapterRegistry(config.registry_path).register(
            adapter_dir,
            name=config.adapter_name or run_name,
            run_name=run_name,
            run_dir=run_dir,
            compatibility=compatibility,
            metrics=registry_metrics,
            dataset=dataset_stats,
            sha256=digests["adapter"],
            use="embed" if embedding else "all",
            objective=config.objective,
            embedding=embedding_info,
        )
    run_metadata = {
        "schema_version": RUN_METADATA_VERSION,
        "run_name": run_name,
        "started_at": run.started_at,
        "finished_at": _now(),
        "config": config.model_dump(mode="json"),
        "base_model": {"id": config.base_model, "revision": base_commit},
        "seed": config.seed,
        "precision": precision.as_dict(),
        "distributed": dist.as_dict() if dist is not None else None,
        "tokenizer": {"pad_token_added_as_eos": run.pad_added, "pad_token": tokenizer.pad_token},
        "lora": compatibility,
        "versions": _versions(),
        "objective": config.objective,
        "use": "embed" if embedding else "all",
        "embedding": embedding_info,
        "metrics": metrics,
        "dataset": dataset_stats,
        "resumed_from": outcome.resumed_from,
        "registry": (
            {"path": str(Path(config.registry_path).resolve()), "version": entry.version}
            if entry
            else None
        ),
        "sha256": digests,
    }
    atomic_write_json(run_dir / "run_metadata.json", run_metadata)
    log_event(
        logger,
        "bundle_built",
        run=run_name,
        steps=metrics["steps"],
        eval_loss=metrics.get("eval_loss"),
        version=entry.version if entry else None,
    )
    return BundleResult(
        run_dir=run_dir,
        config=config,
        dataset_summary=train_summary,
        eval_dataset_summary=eval_summary,
        adapter_dir=adapter_dir,
        wrapper_dir=wrapper_dir,
        metrics=metrics,
        registry_entry=entry,
        history=outcome.history,
        model=outcome.model,
    )


# ------------------------------------------------------------------ helpers
@contextmanager
def _loading_bars(config: BundleConfig, source: str, *, main: bool) -> Iterator[None]:
    """transformers' and the Hub's bars while the base model loads: none when the run
    shows no progress bar (``--json`` off a terminal, a log file, ranks past 0); with
    ``verbose`` all; else as the runtime loads (none for a local model under 2 GB, a
    download and a bigger model keep theirs)."""
    from ..runtime._loading import _quiet_loading_bars, no_loading_bars

    if config.progress and main:
        with nullcontext() if config.verbose else _quiet_loading_bars(source):
            yield
        return
    with no_loading_bars():
        yield


def _refuse_finished(run_dir: Path) -> None:
    """A finished bundle (its adapter maybe registered) is never written again."""
    if (run_dir / "run_metadata.json").exists():
        raise BundleError(
            f"{run_dir} already holds a finished bundle; choose another --run-name or "
            "--output-dir (bundles are never overwritten; to train on from one of its "
            "checkpoints, pass --resume CHECKPOINT_DIR with a new --run-name)"
        )


@contextmanager
def _claim_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold the run folder for this build: a second build of the same run fails at once.

    The claim is an OS file lock (``<run_dir>/.build.lock``), released when the
    build ends, however it ends (even ``kill -9``), so a crashed run can be
    resumed with ``--resume``.
    """
    from filelock import FileLock, Timeout

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BundleError(f"cannot create the run directory {run_dir}: {err}") from err
    lock = FileLock(str(run_dir / RUN_LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout as err:
        raise BundleError(
            f"another bundle build is writing {run_dir} right now; choose another --run-name "
            "(or --output-dir), or wait for it to finish (a crashed build can be continued "
            "with --resume)"
        ) from err
    try:
        yield
    finally:
        lock.release()


def _rows(
    path: Path | None,
    dataset_id: str | None,
    dataset_config: str | None,
    split: str,
    *,
    flag: str = "--dataset-path",
) -> Iterable[tuple[int, Any]]:
    if path is not None:
        return read_jsonl_rows(path, flag=flag)
    from .._extras import require

    datasets = require("datasets", "train", feature="--dataset-id")
    try:
        dataset = datasets.load_dataset(dataset_id, dataset_config, split=split)
    except Exception as err:  # the datasets library raises many unrelated types
        raise DatasetError(f"cannot load dataset {dataset_id!r} (split {split!r}): {err}") from err
    return hub_rows(dataset)


def _hold_out(examples: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(examples) * fraction))
    held = set(order[:n_eval])
    train = [e for i, e in enumerate(examples) if i not in held]
    evals = [e for i, e in enumerate(examples) if i in held]
    return train, evals


#: the settings a resumed run must share with the run that wrote the checkpoint (each
#: changes the result: the data, its order, the adapter's shape, the schedule, the loss)
FINGERPRINT_FIELDS = (
    "batch_size",
    "grad_accum",
    "group_by_length",
    "seed",
    "max_seq_len",
    "overlong",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "modules_to_save",
    "learning_rate",
    "lr_scheduler",
    "warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "base_model",
    "base_model_revision",
)


def _fingerprint(config: BundleConfig, examples: list[Any], precision: Precision) -> dict[str, Any]:
    """What ``--resume`` compares (the embedding objectives add theirs): the data, every
    setting in :data:`FINGERPRINT_FIELDS` and the precision."""
    values = config.model_dump(mode="json", include=set(FINGERPRINT_FIELDS))
    return {
        "dataset_sha256": _examples_digest(examples),
        **{key: values[key] for key in FINGERPRINT_FIELDS},
        "precision": precision.precision,
        "qlora": precision.qlora,
    }


def _examples_digest(examples: list[Any]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for example in examples:
        if isinstance(example, PairExample):
            row = [example.instruction, example.query, example.positive, example.negative]
        else:
            row = [example.input_ids, example.labels]
        digest.update(json.dumps(row).encode())
    return digest.hexdigest()


def _wrapper_config(
    config: BundleConfig,
    tokenizer: Any,
    base_commit: str | None,
    precision: Any,
    run_name: str,
    embedding: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The run's part of the wrapper's ``config.json``; an embedding adapter records how
    it embeds and ``layout.adapter_use = "embed"`` (the wrapper's chat runs without it)."""
    out = {
        "base_model": {
            "id": config.base_model,
            "revision": base_commit,
            "dtype": {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[
                precision.precision
            ],
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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
