"""Training an adapter on top of another (``base_adapter``), as LLM2Vec stacks its steps.

LLM2Vec trains MNTP first, merges that LoRA into the base weights, then trains
a new LoRA (SimCSE or supervised contrastive) on the merged model. A run with
``base_adapter`` does the same: the earlier adapter is merged into the loaded
base, the new one trains on top, and the result is written as **one** LoRA
adapter holding both. Two LoRA deltas on a layer add up, ``s1·B1·A1 + s2·B2·A2
= [s1·B1, s2·B2] · [A1; A2]``, so their factors concatenated (rank ``r1 +
r2``, scaling 1) are exactly the stacked model: the runtime and the wrapper
serve it as any other adapter on the unmodified base weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BundleError, ConfigError
from ..runtime import EmbeddingConfig, EmbeddingInputError

__all__ = [
    "BaseAdapter",
    "adapter_use",
    "check_stackable",
    "concatenate_adapters",
    "describe_use",
    "is_chat_adapter",
    "merge_base_adapter",
    "resolve_base_adapter",
]

logger = logging.getLogger(__name__)

_WEIGHTS = "adapter_model.safetensors"
_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class BaseAdapter:
    """The adapter a run trains on top of."""

    path: Path
    #: how the run names it in its metadata: ``name vN`` (registered) or the folder
    label: str
    sha256: str
    #: its ``llm2vec_config.json`` (pooling, bidirectional, objective...), if it has one
    embedding: EmbeddingConfig | None
    base_model: str | None


def resolve_base_adapter(reference: str, *, registry_path: Path) -> BaseAdapter:
    """An adapter folder, or the newest registered version of an adapter name (or a
    registry version such as ``v3``), checked against its recorded digests."""
    from .._fs import sha256_file

    path = Path(reference).expanduser()
    label = str(path)
    if not (path / _CONFIG).is_file():
        from ..registry import AdapterRegistry

        registry = AdapterRegistry(registry_path)
        entry = registry.latest(name=reference)
        if entry is None:
            try:
                entry = registry.get(reference)
            except Exception as err:
                names = sorted({e.name for e in registry.list()})
                raise ConfigError(
                    f"base_adapter {reference!r} is neither an adapter folder (no {_CONFIG}) nor "
                    f"an adapter registered in {registry_path}"
                    + (f" (registered: {', '.join(names)})" if names else "")
                ) from err
        registry.verify(entry)
        path = registry.adapter_path(entry)
        label = f"{entry.name} {entry.version}"
        use: str | None = entry.use
        objective = entry.objective
    else:
        use, objective = adapter_use(path)
    if use == "rerank":
        raise ConfigError(
            f"base_adapter {label} is a {describe_use(use, objective)}, not an embedding "
            "adapter: an embedding adapter trains on top of an embedding adapter (objective "
            "mntp, contrastive or simcse, registered with use=embed); drop --base-adapter"
        )
    if is_chat_adapter(use, objective):
        raise ConfigError(
            f"base_adapter {label} is a {describe_use(use, objective)}, not an embedding adapter: "
            "an embedding adapter trains on top of an embedding adapter (objective mntp, "
            "contrastive or simcse, registered with use=embed); drop --base-adapter, or train "
            "one with --objective mntp first"
        )
    if not (path / _WEIGHTS).is_file():
        raise ConfigError(f"base_adapter {label}: {path} holds no {_WEIGHTS}")
    config = json.loads((path / _CONFIG).read_text(encoding="utf-8"))
    try:
        _refuse_unsupported(config, f"base_adapter {label}")
    except BundleError as err:
        raise ConfigError(str(err)) from err
    try:
        embedding = EmbeddingConfig.read(path)
    except EmbeddingInputError as err:
        raise ConfigError(f"base_adapter {label}: {err}") from err
    return BaseAdapter(
        path=path.resolve(),
        label=label,
        sha256=sha256_file(path / _WEIGHTS),
        embedding=embedding,
        base_model=config.get("base_model_name_or_path"),
    )


def adapter_use(folder: Path) -> tuple[str | None, str | None]:
    """``(use, objective)`` of an adapter folder, as far as it says: an embedding adapter
    carries ``llm2vec_config.json``; a bundle's ``adapter/`` has its run's
    ``run_metadata.json`` beside it (``use`` ``embed``, ``rerank`` or ``all``). ``(None,
    None)`` for a folder that says neither."""
    embedding = folder / "llm2vec_config.json"
    if embedding.is_file():
        objective = None
        with contextlib.suppress(OSError, ValueError, AttributeError):
            objective = json.loads(embedding.read_text(encoding="utf-8")).get("objective")
        return "embed", objective if isinstance(objective, str) else None
    metadata = folder.parent / "run_metadata.json"
    if metadata.is_file():
        try:
            run = json.loads(metadata.read_text(encoding="utf-8"))
            use, objective = run.get("use"), run.get("objective")
        except (OSError, ValueError, AttributeError):
            return None, None
        if isinstance(use, str):
            return use, objective if isinstance(objective, str) else None
    return None, None


def is_chat_adapter(use: str | None, objective: str | None) -> bool:
    """Whether an adapter says it is for chat: trained by ``sft``, or registered for
    generation only. (A registry entry added by hand defaults to ``use=all`` with no
    objective: that says nothing. A ``use=rerank`` adapter is not a chat adapter: it is
    for rerank calls only.)"""
    return objective == "sft" or use == "generate"


def describe_use(use: str | None, objective: str | None) -> str:
    """``chat adapter (use=all, objective sft)``: how an error names a chat adapter (or a
    ``rerank adapter (use=rerank, objective rerank)``)."""
    details = f"use={use or 'all'}" + (f", objective {objective}" if objective else "")
    kind = "rerank" if use == "rerank" else "chat"
    return f"{kind} adapter ({details})"


def check_stackable(model: Any, adapter: BaseAdapter) -> None:
    """Refuse, before training, a new LoRA (``model``, a peft model) that adapts other
    layers than ``adapter``: the two could not be written as one adapter after the run."""
    from safetensors import safe_open

    with safe_open(str(adapter.path / _WEIGHTS), framework="pt") as weights:
        lower = {k.rsplit(".lora_", 1)[0] for k in weights.keys() if ".lora_" in k}  # noqa: SIM118
    upper = {n.rsplit(".lora_", 1)[0] for n, _ in model.named_parameters() if ".lora_" in n}
    if lower != upper:
        only_lower = sorted(lower - upper)
        only_upper = sorted(upper - lower)
        found = []
        if only_lower:
            found.append(f"only the base adapter adapts {_short(only_lower)}")
        if only_upper:
            found.append(f"only this run would adapt {_short(only_upper)}")
        targets = sorted({m.rsplit(".", 1)[-1] for m in lower})
        raise ConfigError(
            f"base_adapter {adapter.label} adapts different layers than this run ("
            + "; ".join(found)
            + "): the two cannot be written as one adapter. Train with the base adapter's "
            f"target_modules (--target-modules {','.join(targets)})"
        )


def _short(modules: list[str]) -> str:
    names = [m.removeprefix("base_model.model.") for m in modules]
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def merge_base_adapter(model: Any, adapter: BaseAdapter, *, base_model: str) -> Any:
    """``model`` with ``adapter`` merged into its weights (the adapter must be for it)."""
    if adapter.base_model and adapter.base_model != base_model:
        raise ConfigError(
            f"base_adapter {adapter.label} was trained on {adapter.base_model}, this run's base "
            f"model is {base_model}; stack adapters of the same base model"
        )
    from peft import PeftModel

    from ..runtime import quiet_peft_deprecations

    with quiet_peft_deprecations():
        stacked = PeftModel.from_pretrained(model, str(adapter.path))
        return stacked.merge_and_unload()


def _scaling(config: dict[str, Any]) -> float:
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _refuse_unsupported(config: dict[str, Any], label: str) -> None:
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise BundleError(f"{label}: cannot stack an adapter with a {key}")
    if config.get("use_dora") or config.get("modules_to_save"):
        raise BundleError(f"{label}: cannot stack a DoRA adapter or one with modules_to_save")


def concatenate_adapters(lower: Path, upper: Path) -> dict[str, Any]:
    """Rewrite the adapter in ``upper`` (trained on top of ``lower`` merged) as one adapter
    on the plain base: factors concatenated, rank ``r1 + r2``, scaling 1. Returns its
    ``adapter_config.json``."""
    import torch
    from safetensors.torch import load_file, save_file

    configs = [json.loads((p / _CONFIG).read_text(encoding="utf-8")) for p in (lower, upper)]
    for config, path in zip(configs, (lower, upper), strict=True):
        _refuse_unsupported(config, str(path))
    weights = [load_file(str(p / _WEIGHTS)) for p in (lower, upper)]
    modules = [{k.rsplit(".lora_", 1)[0] for k in w if ".lora_" in k} for w in weights]
    if modules[0] != modules[1]:
        only = sorted(modules[0] ^ modules[1])[:3]
        raise BundleError(
            f"cannot stack: the adapters adapt different layers (e.g. {', '.join(only)}); train "
            "the new adapter with the base adapter's target_modules"
        )
    scales = [_scaling(c) for c in configs]
    out: dict[str, torch.Tensor] = {}
    for module in sorted(modules[1]):
        a = [w[f"{module}.lora_A.weight"] for w in weights]
        b = [w[f"{module}.lora_B.weight"] * s for w, s in zip(weights, scales, strict=True)]
        out[f"{module}.lora_A.weight"] = torch.cat(a, dim=0).contiguous()
        out[f"{module}.lora_B.weight"] = torch.cat(b, dim=1).contiguous()
    rank = int(configs[0]["r"]) + int(configs[1]["r"])
    config = {**configs[1], "r": rank, "lora_alpha": rank, "use_rslora": False}
    save_file(out, str(upper / _WEIGHTS), metadata={"format": "pt"})
    (upper / _CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return config
