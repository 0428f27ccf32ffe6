"""``BundleConfig``: every knob of a training bundle, from a file, code or CLI flags."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import ConfigError
from ..manifest.models import Pooling
from ..registry import is_safe_adapter_name

__all__ = ["BundleConfig", "load_bundle_config"]

#: the role ``base_model`` names when unset: the active profile's, as ``chat`` loads it
DEFAULT_BASE_ROLE = "general"
#: what the embedding objectives change in the defaults (fields the caller left unset)
EMBEDDING_DEFAULTS: dict[str, Any] = {
    "lora_r": 16,
    "lora_alpha": 32,
    "target_modules": ["all-linear"],
    "batch_size": 16,
    # measured on SmolLM2-135M, 20 steps (benchmarks/bench_embedding_training.py): held-out
    # MRR@10 0.34 at 2e-4 decayed linearly, 0.44 at 2e-4 constant, 0.54 at 3e-4 constant
    "learning_rate": 3e-4,
    "lr_scheduler": "constant",
}
#: what the rerank objective changes in the defaults: the embedding objectives' LoRA, a
#: batch of 8 queries (each scored against its positive and ``rerank_negatives`` others)
RERANK_DEFAULTS: dict[str, Any] = {**EMBEDDING_DEFAULTS, "batch_size": 8}


class BundleConfig(BaseModel):
    """Configuration of :func:`~mongars_llm.training.build_bundle`.

    Each field is also a ``mongars-llm bundle build`` flag (``lora_r`` →
    ``--lora-r``); flags and keyword overrides win over a config file. The
    resolved config is written to ``run_metadata.json``.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    objective: Literal["sft", "contrastive", "simcse", "mntp", "rerank"] = Field(
        "sft",
        description="sft: chat LoRA on prompt/completion or messages rows; contrastive: an "
        "embedding adapter from query/positive(/negative) pairs (InfoNCE); simcse: an "
        "embedding adapter from plain texts (two dropout views as positives); mntp: masked "
        "next-token prediction on plain texts with bidirectional attention (LLM2Vec's first "
        "step); rerank: a rerank adapter from the same query/positive(/negative) pairs (the "
        "yes/no relevance answer, rt.rerank's score).",
    )

    # data
    dataset_path: Path | None = Field(None, description="Training JSONL file.")
    dataset_id: str | None = Field(None, description="Hugging Face dataset id (needs [train]).")
    dataset_split: str = "train"
    dataset_config: str | None = Field(None, description="Hub dataset configuration name.")
    documents: Path | None = Field(
        None,
        description='Documents to train on without labelled pairs: JSONL rows {"text"} or '
        '{"id", "text"}, or a .txt/.md file split into passages (docs/training.md). '
        "contrastive writes questions for each passage with the base model's chat half "
        "(synthetic_pairs.jsonl); simcse and mntp train on the passages.",
    )
    max_passages: int | None = Field(
        None, ge=2, description="documents: train on a seeded sample of N passages."
    )
    questions_per_passage: int = Field(
        2, ge=1, le=16, description="documents + contrastive: questions generated per passage."
    )
    question_prompt: str | None = Field(
        None,
        description="documents + contrastive: the user turn that asks for a question; "
        "{passage} is replaced by the passage (default: the documented prompt).",
    )
    round_trip_k: int = Field(
        10,
        ge=1,
        description="documents + contrastive: keep a question when its passage ranks within "
        "the top k passages for it under the current embeddings.",
    )
    mine_negatives: int | None = Field(
        None,
        ge=0,
        description="contrastive: hard negatives mined per query with the current embeddings "
        "(top-ranked passages that are not the answer, near-duplicates skipped), one row "
        "each; for labelled pairs without a 'negative' (off when unset), for documents "
        "(1 when unset; 0: none).",
    )
    recipe: Literal["llm2vec"] | None = Field(
        None,
        description="llm2vec: the unsupervised LLM2Vec recipe in one build: mntp on the texts, "
        "then simcse stacked on it (two runs, <run>-mntp and <run>); objective is simcse.",
    )
    eval_dataset_path: Path | None = None
    eval_dataset_id: str | None = None
    eval_dataset_split: str = "validation"
    eval_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Held-out share of the training rows used for eval when no eval set is given.",
    )
    skip_invalid: bool = Field(False, description="Drop (and count) invalid records.")
    overlong: Literal["error", "truncate"] = Field(
        "error", description="Records longer than max_seq_len: an error, or truncated."
    )
    max_seq_len: int = Field(1024, ge=8)
    min_trainable_tokens: int = Field(
        1, ge=1, description="Refuse to train when fewer label tokens remain in the whole set."
    )

    # model
    base_model: str | None = Field(
        None,
        description="Hub id, local checkpoint dir, .gguf or pkg:// file, or a role of the active "
        "manifest profile (provisioned first). Unset: the profile's 'general' role (else its "
        "first), the model `mongars-llm chat` loads.",
    )
    base_model_revision: str | None = Field(None, description="Branch, tag or commit to pin.")
    trust_remote_code: bool = False
    qlora: bool = Field(False, description="4-bit base + LoRA (CUDA and bitsandbytes only).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: fp32 on CPU, bf16 on CUDA when supported, else fp16."
    )
    device: str | None = Field(None, description="'cpu', 'cuda', 'cuda:1'; auto when unset.")

    # LoRA
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, gt=0)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt (or ['all-linear']); peft's default when unset."
    )
    modules_to_save: list[str] | None = None

    # optimisation
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs.")
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 42
    group_by_length: bool = Field(
        True, description="Batch records of similar length together (less padding, faster)."
    )

    # run
    output_dir: Path | None = Field(None, description="Parent of run dirs; <registry>/runs.")
    run_name: str | None = Field(None, description="Run directory name; generated when unset.")
    adapter_name: str | None = Field(None, description="Registry name; the run name when unset.")
    registry_path: Path = Field(
        default_factory=lambda: _settings_registry_path(),
        description="Adapter registry; default MONGARS_LLM_ADAPTER_REGISTRY_PATH "
        "(the user data dir's encoders/).",
    )
    register_adapter: bool = Field(True, description="Add the adapter to the registry.")
    eval_steps: int | None = Field(None, ge=1, description="Evaluate every N steps too.")
    save_steps: int | None = Field(None, ge=1, description="Checkpoint every N steps.")
    logging_steps: int = Field(10, ge=1)
    resume: bool | Path = Field(
        False,
        description="True: newest checkpoint of the run; or a checkpoint directory, or a "
        "step (10, step-10) of the run's checkpoints.",
    )
    dry_run: bool = Field(False, description="Validate the data, write the summary, stop.")
    progress: bool = Field(True, description="Progress bar on stderr (the CLI: when a terminal).")
    progress_every: int | None = Field(
        None,
        ge=1,
        description="Without the progress bar, print a progress line on stderr every N steps "
        "(and at the first and last); the CLI sets 10 when stderr is not a terminal.",
    )
    verbose: bool = Field(
        False,
        description="Also show the libraries' loading bars (transformers, the Hub) for a local "
        "base model under 2 GB; downloads and bigger models show them anyway.",
    )

    # embedding objectives (contrastive, simcse, mntp): how texts are embedded, in training and
    # serving
    pooling: Pooling = Field(
        "mean", description="Embedding pooling (the role's embedding.pooling at serve time)."
    )
    bidirectional: bool = Field(
        False,
        description="Embed with bidirectional attention (the role's embedding setting; mntp "
        "trains it and defaults to true).",
    )
    instruction: str | None = Field(
        None,
        description="LLM2Vec instruction for the queries of rows without their own "
        "(documents never get one).",
    )
    temperature: float = Field(0.05, gt=0, description="InfoNCE temperature.")
    symmetric_loss: bool = Field(
        False,
        description="Also score each positive against the batch's queries (InfoNCE both ways).",
    )
    matryoshka_dims: list[int] | None = Field(
        None,
        description="contrastive/simcse: also train these truncations of the vectors "
        "(Matryoshka: the loss is summed over the full vectors and their first N dimensions, "
        "each re-normalised), e.g. [64, 128, 256]; recorded in llm2vec_config.json and the "
        "registry, so that embed(dimensions=N) and /v1/embeddings serve them.",
    )
    simcse_dropout: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="simcse: the base model's attention dropout while training (the two views "
        "differ by dropout; LoRA dropout adds to it).",
    )
    mask_probability: float = Field(
        0.2,
        gt=0.0,
        lt=1.0,
        description="mntp: the share of tokens chosen for prediction (80% masked, 10% random, "
        "10% kept).",
    )
    base_adapter: str | None = Field(
        None,
        description="An embedding adapter (registered name, version or folder) to train on top "
        "of, as LLM2Vec trains its contrastive step on top of MNTP: it is merged into the base "
        "for training and the result registered as one adapter holding both.",
    )
    mini_batch_size: int | None = Field(
        None,
        ge=1,
        description="contrastive/simcse: embed a batch in forward chunks of this many texts "
        "(GradCache): a batch of negatives larger than memory allows, the same gradient, "
        "twice the forward compute. None: the whole batch in one forward.",
    )
    rerank_negatives: int = Field(
        3,
        ge=1,
        description="rerank: documents scored against each query's positive: its own "
        "negative first, then the other rows' documents of its micro-batch.",
    )
    rerank_loss: Literal["listwise", "bce"] = Field(
        "listwise",
        description="rerank: listwise (softmax cross-entropy of the positive among its "
        "query's documents) or bce (each document's yes/no answer on its own).",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass (less memory, slower)."
    )

    # processes
    num_processes: int = Field(
        1,
        ge=1,
        description="Local training processes (DDP; gloo on CPU). Under accelerate launch / "
        "torchrun leave it at 1: the launcher decides.",
    )
    distributed_timeout: float = Field(
        600.0,
        gt=0,
        description="Seconds a process waits in a collective for the others before failing.",
    )

    @model_validator(mode="before")
    @classmethod
    def _embedding_defaults(cls, data: Any) -> Any:
        # an embedding adapter needs more capacity than a chat LoRA: r=16 on every linear
        # layer, a batch of 16 (in-batch negatives) and a constant rate, unless the caller
        # chose otherwise
        if isinstance(data, dict) and data.get("recipe") == "llm2vec":
            if data.get("objective") not in (None, "simcse"):
                raise ValueError(
                    "recipe 'llm2vec' runs mntp then simcse; drop objective "
                    f"{data['objective']!r} (or drop the recipe)"
                )
            data = {**data, "objective": "simcse"}
        if isinstance(data, dict) and data.get("objective") in ("contrastive", "simcse", "mntp"):
            for key, value in EMBEDDING_DEFAULTS.items():
                if data.get(key) is None:
                    data = {**data, key: value}
            if data["objective"] == "mntp" and data.get("bidirectional") is None:
                data = {**data, "bidirectional": True}
        if isinstance(data, dict) and data.get("objective") == "rerank":
            for key, value in RERANK_DEFAULTS.items():
                if data.get(key) is None:
                    data = {**data, key: value}
        return data

    @field_validator("matryoshka_dims")
    @classmethod
    def _sorted_dimensions(cls, value: list[int] | None) -> list[int] | None:
        return sorted(set(value)) if value is not None else None

    @field_validator("resume", mode="before")
    @classmethod
    def _step_number_is_a_checkpoint(cls, value: Any) -> Any:
        # `resume: 10` in a config file names step 10, not True (nor an error)
        if isinstance(value, int) and not isinstance(value, bool):
            return Path(str(value))
        if isinstance(value, str) and value.isdigit():
            return Path(value)
        return value

    @model_validator(mode="after")
    def _one_source(self) -> BundleConfig:
        if self.dataset_path is not None and self.dataset_id is not None:
            raise ValueError("give dataset_path or dataset_id, not both")
        if self.eval_dataset_path is not None and self.eval_dataset_id is not None:
            raise ValueError("give eval_dataset_path or eval_dataset_id, not both")
        if self.documents is not None and (
            self.dataset_path is not None or self.dataset_id is not None
        ):
            raise ValueError(
                "give documents (synthesized pairs or texts) or dataset_path/dataset_id "
                "(labelled rows), not both"
            )
        if self.documents is not None and self.objective == "sft":
            raise ValueError(
                "documents train an embedding adapter: pass objective contrastive (questions "
                "synthesized per passage), simcse or mntp, or recipe llm2vec"
            )
        if self.documents is not None and self.num_processes > 1:
            raise ValueError(
                "documents with num_processes > 1: run `mongars-llm bundle synthesize` first, "
                "then train on its pairs (--dataset-path) in several processes"
            )
        if self.mine_negatives and self.objective != "contrastive":
            raise ValueError("mine_negatives adds hard negatives to contrastive rows")
        if self.recipe is not None and self.base_adapter is not None:
            raise ValueError(
                "recipe 'llm2vec' trains its own mntp adapter under simcse; drop base_adapter"
            )
        if self.mini_batch_size is not None and self.objective not in ("contrastive", "simcse"):
            raise ValueError(
                "mini_batch_size chunks the in-batch negatives of contrastive and simcse; for "
                f"{self.objective!r} use a smaller batch_size with grad_accum"
            )
        if self.matryoshka_dims is not None:
            if self.objective not in ("contrastive", "simcse"):
                raise ValueError(
                    "matryoshka_dims trains truncated vectors with the contrastive and simcse "
                    f"objectives; drop it for {self.objective!r}"
                )
            if not self.matryoshka_dims or any(d < 1 for d in self.matryoshka_dims):
                raise ValueError(
                    f"matryoshka_dims {self.matryoshka_dims} must be dimensions >= 1 "
                    "(for example [64, 128, 256])"
                )
        if self.objective == "mntp" and not self.bidirectional:
            raise ValueError(
                "objective 'mntp' trains bidirectional attention (a causal model already "
                "predicts the next token); drop bidirectional: false"
            )
        if self.base_adapter is not None and self.objective in ("sft", "rerank"):
            raise ValueError(
                "base_adapter stacks embedding adapters (objective contrastive, simcse or mntp); "
                f"objective {self.objective!r} trains on the base weights"
            )
        if self.base_adapter is not None and self.modules_to_save:
            raise ValueError(
                "base_adapter and modules_to_save: the stacked result is one LoRA adapter, "
                "which cannot hold fully trained modules; drop modules_to_save"
            )
        if self.base_adapter is not None and self.qlora:
            raise ValueError(
                "base_adapter is merged into the base weights for training, which a 4-bit "
                "(QLoRA) base cannot take; train in full precision or drop base_adapter"
            )
        if self.run_name is not None and not re.fullmatch(
            r"[A-Za-z0-9][A-Za-z0-9._-]*", self.run_name
        ):
            raise ValueError(
                f"run_name {self.run_name!r} must be letters, digits, '.', '_' or '-' "
                "(it names a directory)"
            )
        if self.adapter_name is not None and not is_safe_adapter_name(self.adapter_name):
            raise ValueError(
                f"adapter_name {self.adapter_name!r} must be letters, digits, '.', '_' or '-', "
                "starting with a letter or digit, at most 255 characters (it may name a folder)"
            )
        return self

    def require_dataset(self) -> None:
        if self.dataset_path is None and self.dataset_id is None and self.documents is None:
            raise ConfigError(
                "no training data: pass --dataset-path FILE.jsonl or --dataset-id ORG/NAME "
                "(or set dataset_path in the config file); for an embedding adapter from "
                "documents alone, --documents FILE (.jsonl or .txt)"
            )

    def resolved_run_name(self, model: str | None = None) -> str:
        """``run_name``, else ``<model's last part>-<UTC time>`` (``model``: the base model
        as the user named it; default ``base_model``)."""
        if self.run_name:
            return self.run_name
        name = Path(model or self.base_model or "model").name.removesuffix(".gguf")
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        return f"{base}-{stamp}"

    def resolved_output_dir(self) -> Path:
        return self.output_dir if self.output_dir is not None else self.registry_path / "runs"


def _settings_registry_path() -> Path:
    from ..settings import get_settings

    return Path(get_settings().llm_adapter_registry_path)


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read the bundle config {path}: {err}") from err
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except ValueError as err:  # json.JSONDecodeError and yaml.YAMLError (via str)
        raise ConfigError(f"{path}: not valid {path.suffix.lstrip('.') or 'JSON'}: {err}") from err
    except Exception as err:  # yaml.YAMLError is no ValueError
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the bundle config must be a mapping of options")
    base = path.parent
    for key in ("dataset_path", "eval_dataset_path", "documents", "output_dir", "registry_path"):
        value = data.get(key)
        if isinstance(value, str) and not Path(value).is_absolute():
            data[key] = str(base / value)  # relative to the config file, like the manifest
    return data


def load_bundle_config(
    config_or_path: BundleConfig | Mapping[str, Any] | str | Path | None = None,
    **overrides: Any,
) -> BundleConfig:
    """Merge a config (object, mapping or JSON/YAML file) with ``overrides`` (``None`` = unset)."""
    if isinstance(config_or_path, BundleConfig):
        data = config_or_path.model_dump(exclude_unset=True)
        source = "<BundleConfig>"
    elif isinstance(config_or_path, Mapping):
        data, source = dict(config_or_path), "<mapping>"
    elif config_or_path is not None:
        path = Path(config_or_path)
        data, source = _read_config_file(path), str(path)
    else:
        data, source = {}, "<defaults>"
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return BundleConfig.model_validate(data)
    except ValidationError as err:
        details = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in err.errors()
        )
        raise ConfigError(f"invalid bundle config ({source}): {details}") from err
