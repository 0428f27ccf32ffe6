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
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from ..errors import BundleError, DatasetError
from ._build import BuildContext, BundleResult
from ._checkpoints import find_checkpoint
from ._config import BundleConfig, load_bundle_config
from ._data import DatasetSummary
from ._distributed import env_world_size, init_distributed, launch_local
from ._documents import Passage
from ._jsonl import hub_rows, read_jsonl_rows
from ._locate import locate_base_model, say, stack_on
from ._model import Precision
from ._objective import Examples, Objective, RowsContext, TrainInputs
from ._objectives import objective_for
from ._package import now, package
from ._pairs import PairExample
from ._records import load_tokenizer

__all__ = ["BundleResult", "build_bundle"]

logger = logging.getLogger(__name__)

RUN_LOCK_NAME = ".build.lock"
#: the data report of ``documents`` (the pairs synthesized from them get dataset_summary.json)
DOCUMENTS_SUMMARY = "documents_summary.json"


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
    if config.recipe == "llm2vec":
        return _llm2vec_recipe(config)
    documents = None
    if config.documents is not None:  # every bad passage listed before anything loads
        from ._documents import read_documents

        documents = read_documents(
            config.documents,
            max_passages=config.max_passages,
            seed=config.seed,
            skip_invalid=config.skip_invalid,
        )
    config, base_copy, named = locate_base_model(config)
    config, base_adapter = stack_on(config)
    started_at = now()
    run_name = config.resolved_run_name(named)
    run_dir = (config.resolved_output_dir() / run_name).resolve()
    _refuse_finished(run_dir)
    if not config.dry_run and config.resume is not False:
        find_checkpoint(run_dir, config.resume)  # a wrong --resume fails before anything loads
    # refuse impossible precision (QLoRA off CUDA) before anything is loaded
    precision = None
    dist = None
    if not config.dry_run:
        from ._model import resolve_precision

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
    train_rows: Iterable[tuple[int, Any]] = []
    if documents is None:
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

    if base_copy is not None:
        tokenizer = load_tokenizer(base_copy.path)
    else:
        tokenizer = load_tokenizer(str(config.base_model), config.base_model_revision)
    pad_added = False
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # labels are masked by position, EOS survives
        pad_added = True
    # several processes: rank 0 alone claims and writes the run folder
    claim: AbstractContextManager[None] = _claim_run_dir(run_dir) if main else nullcontext()
    with claim:
        if main:
            _refuse_finished(run_dir)  # again: another build may have finished meanwhile
        run = BuildContext(
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
        return _build_claimed(run, train_rows=train_rows, eval_rows=eval_rows, documents=documents)


def _build_claimed(
    run: BuildContext,
    *,
    train_rows: Iterable[tuple[int, Any]],
    eval_rows: Iterable[tuple[int, Any]] | None,
    documents: tuple[DatasetSummary, list[Passage]] | None = None,
) -> BundleResult:
    """The build once the run folder is held: the objective's rows (synthesized from
    ``documents`` when given), then (unless a dry run) the training and the bundle."""
    config = run.config
    objective = objective_for(config.objective)
    if documents is not None:
        from ._from_documents import documents_rows

        documents_summary, passages = documents
        if run.is_main:
            documents_summary.write(run.run_dir / DOCUMENTS_SUMMARY)
        if config.dry_run and config.objective == "contrastive":  # no model: no questions
            return BundleResult(
                run_dir=run.run_dir,
                config=config,
                dataset_summary=documents_summary,
                metrics={"passages": len(passages)},
            )
        train_rows = documents_rows(run, passages)
    rows = RowsContext(config, run.tokenizer, run.run_dir, run.is_main)
    examples = objective.load(rows, train_rows, eval_rows)
    if config.mine_negatives and not config.dry_run and documents is None:
        from ._from_documents import mine_examples

        examples.train = mine_examples(run, examples.train)
    if config.dry_run:
        return BundleResult(
            run_dir=run.run_dir,
            config=config,
            dataset_summary=examples.train_summary,
            eval_dataset_summary=examples.eval_summary,
            metrics=objective.dry_run_metrics(examples),
        )
    objective.check(config, examples)
    return _train_and_package(run, objective, examples)


def _train_and_package(run: BuildContext, objective: Objective, examples: Examples) -> BundleResult:
    """Load the base model, train the objective's adapter on it, write the bundle."""
    config, precision, dist = run.config, run.precision, run.dist
    assert precision is not None  # set for every build but a dry run
    t0 = time.perf_counter()
    model, base, base_commit = _load_model(run)
    trainable_params, total_params = model.get_nb_trainable_parameters()
    fingerprint = {
        **_fingerprint(config, examples.train, precision),
        **objective.fingerprint(config, run.base_adapter),
    }
    outcome = objective.train(
        TrainInputs(
            model=model,
            base=base,
            tokenizer=run.tokenizer,
            config=config,
            precision=precision,
            examples=examples,
            run_dir=run.run_dir,
            fingerprint=fingerprint,
            dist=dist,
        )
    )
    metrics = {
        **outcome.metrics,
        "trainable_params": trainable_params,
        "total_params": total_params,
        "wall_seconds": round(time.perf_counter() - t0, 3),
    }
    if not run.is_main:  # rank 0 alone writes the bundle and the registry entry
        return BundleResult(
            run_dir=run.run_dir,
            config=config,
            dataset_summary=examples.train_summary,
            eval_dataset_summary=examples.eval_summary,
            metrics=metrics,
            history=outcome.history,
            model=outcome.model,
        )
    return package(
        run,
        objective,
        outcome=outcome,
        examples=examples,
        metrics=metrics,
        embedding=objective.embedding_config(config, base, run.base_adapter),
        base_commit=base_commit,
    )


def _load_model(run: BuildContext) -> tuple[Any, Any, str | None]:
    """The peft model to train, the base model under it and the base's revision: the base
    loaded (the stacked adapter merged into it), the LoRA layers injected (seeded), each
    rank then seeded for its own dropout masks."""
    from ._model import build_peft_model, load_base_model, seed_everything
    from ._stacking import check_stackable, merge_base_adapter

    config, precision, base_copy, dist = run.config, run.precision, run.base_copy, run.dist
    assert precision is not None
    seed_everything(config.seed)
    source = base_copy.path if base_copy else None
    if run.is_main:
        say(config, f"loading the base model {config.base_model} ...")
    with _loading_bars(config, str(source or config.base_model), main=run.is_main):
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
    return model, base, base_commit


def _llm2vec_recipe(config: BundleConfig) -> BundleResult:
    """LLM2Vec's unsupervised recipe as one build: ``mntp`` on the texts (run
    ``<run>-mntp``, adapter ``<name>-mntp``), then ``simcse`` stacked on it (run ``<run>``,
    adapter ``<name>``: one adapter holding both). A finished mntp run of the same name is
    reused (a rerun after an interrupted simcse stage). A dry run checks the data once."""
    located, _, named = locate_base_model(config)
    run_name = config.resolved_run_name(named)
    name = config.adapter_name or run_name
    data = config.model_dump(exclude_unset=True)
    data.update(recipe=None, base_model=located.base_model)
    mntp_dir = (config.resolved_output_dir() / f"{run_name}-mntp").resolve()
    if (mntp_dir / "run_metadata.json").is_file() and (mntp_dir / "adapter").is_dir():
        say(config, f"llm2vec recipe: reusing the finished mntp stage {mntp_dir}")
        mntp_adapter = mntp_dir / "adapter"
        mntp_metrics: dict[str, Any] = {"run_dir": str(mntp_dir), "reused": True}
    else:
        say(config, "llm2vec recipe: stage 1 of 2, mntp")
        stage = {k: v for k, v in data.items() if k not in ("bidirectional", "simcse_dropout")}
        first = build_bundle(
            {**stage, "objective": "mntp", "run_name": f"{run_name}-mntp",
             "adapter_name": f"{name}-mntp"}
        )  # fmt: skip
        if config.dry_run:
            return first
        assert first.adapter_dir is not None
        mntp_adapter = first.adapter_dir
        mntp_metrics = {
            "run_dir": str(first.run_dir),
            "steps": first.metrics.get("steps"),
            "wall_seconds": first.metrics.get("wall_seconds"),
            "mntp": first.metrics.get("mntp"),
        }
    say(config, "llm2vec recipe: stage 2 of 2, simcse on top of mntp")
    second = build_bundle(
        {**data, "objective": "simcse", "run_name": run_name, "adapter_name": name,
         "base_adapter": str(mntp_adapter)}
    )  # fmt: skip
    second.metrics["recipe"] = {"name": "llm2vec", "mntp": mntp_metrics}
    return second


# ------------------------------------------------------------------ helpers
@contextmanager
def _loading_bars(config: BundleConfig, source: str, *, main: bool) -> Iterator[None]:
    """transformers' and the Hub's bars while the base model loads: none when the run
    shows no progress bar (``--json`` off a terminal, a log file, ranks past 0); with
    ``verbose`` all; else as the runtime loads (none for a local model under 2 GB, a
    download and a bigger model keep theirs)."""
    from ..runtime import no_loading_bars, quiet_loading_bars

    if config.progress and main:
        with nullcontext() if config.verbose else quiet_loading_bars(source):
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
