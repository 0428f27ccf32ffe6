"""``export_wrapper``: turn a bundle run directory into a portable ``wrapper/`` folder.

The wrapper folder holds ``config.json`` (DEFAULT_WRAPPER_CONFIG deep-merged
with an existing ``wrapper/config.json`` and the run's ``wrapper_config.json``),
copies of ``adapter/`` and ``tokenizer/``, an optional merged fp16 snapshot
(``merged/``), ``mongars_wrapper.py``, a loader that needs only
torch/transformers/peft, and ``_mongars_llm2vec.py``, a byte-for-byte copy of
the runtime's LLM2Vec core (:mod:`mongars_llm.runtime._llm2vec`) that the
loader embeds with, so the wrapper's vectors are the runtime's. The
``embedding.max_length`` recorded in ``config.json`` is the runtime's limit
(``settings.model.max_input_tokens`` bounded by the base model's context), so
both cut long inputs at the same token.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .._fs import atomic_write_bytes, atomic_write_json
from .._version import __version__
from ..errors import BundleError
from ..logging import log_event
from ..runtime import DEFAULT_POOLING

__all__ = [
    "DEFAULT_WRAPPER_CONFIG",
    "EXPORT_FORMATS",
    "WRAPPER_CORE_NAME",
    "WRAPPER_MANIFEST_VERSION",
    "WRAPPER_MODULE_NAME",
    "deep_merge",
    "export_wrapper",
]

logger = logging.getLogger(__name__)

WRAPPER_MANIFEST_VERSION = 1
#: what ``export_wrapper(format=...)`` writes: the wrapper, or a sentence-transformers folder
EXPORT_FORMATS: tuple[str, ...] = ("wrapper", "sentence-transformers", "st")
WRAPPER_MODULE_NAME = "mongars_wrapper.py"
#: the LLM2Vec core, shipped next to the loader (the name the loader imports)
WRAPPER_CORE_NAME = "_mongars_llm2vec.py"
_TEMPLATE = Path(__file__).with_name("_wrapper_module.py")
_CORE = Path(__file__).parents[1] / "runtime" / "_llm2vec.py"

DEFAULT_WRAPPER_CONFIG: dict[str, Any] = {
    "format": "mongars-llm-wrapper",
    "manifest_version": WRAPPER_MANIFEST_VERSION,
    "base_model": {"id": None, "revision": None, "dtype": "float32", "trust_remote_code": False},
    "tokenizer": {},
    "generation": {
        "max_new_tokens": 256,
        "temperature": 0.0,
        "top_p": 1.0,
        "stop": [],
    },
    "embedding": {
        "pooling": DEFAULT_POOLING,
        "normalize": True,
        "instruction": None,
        "bidirectional": False,
        "max_length": None,
        "batch_size": 16,
    },
    "layout": {
        "module": WRAPPER_MODULE_NAME,
        "tokenizer_dir": "tokenizer",
        "adapter_dir": "adapter",
        "merged_dir": None,
        "merged_dtype": "float16",
        "use_merged": False,
        # "all": the adapter serves generate and embed; "embed": embed only (chat on the base)
        "adapter_use": "all",
    },
}


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``update``; nested mappings merge key by key, the rest replaces."""
    merged = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BundleError(f"cannot read {path}: {err}") from err
    if not isinstance(data, dict):
        raise BundleError(f"{path} must hold a JSON object")
    return data


def export_wrapper(
    run_dir: str | Path,
    *,
    output_dir: str | Path | None = None,
    base_model_id: str | None = None,
    merge: bool = False,
    format: str = "wrapper",
) -> Path:
    """Write the wrapper folder of the bundle in ``run_dir`` and return its path.

    ``output_dir`` defaults to ``<run_dir>/wrapper``; ``base_model_id`` replaces
    the base model recorded at training time (e.g. a mirror or a local copy);
    ``merge=True`` also writes a merged fp16 snapshot that the loader prefers.

    ``format="sentence-transformers"`` (or ``"st"``) writes instead, for an
    embedding bundle, a folder that ``SentenceTransformer(path,
    trust_remote_code=True)`` loads and that embeds as ``rt.embed`` with the
    adapter (default ``<run_dir>/sentence-transformers``; a chat bundle is a
    :class:`BundleError`); see :mod:`._st_export`.
    """
    run_dir = Path(run_dir)
    if format not in EXPORT_FORMATS:
        raise BundleError(
            f"format={format!r} is not an export format; use one of {', '.join(EXPORT_FORMATS)}"
        )
    st_format = format in ("sentence-transformers", "st")
    if st_format and merge:
        raise BundleError(
            "merge=True (--merge) is for the wrapper: the sentence-transformers export loads "
            "the base model and the embedding adapter; export it without --merge"
        )
    adapter_dir, tokenizer_dir = run_dir / "adapter", run_dir / "tokenizer"
    for needed in (adapter_dir, tokenizer_dir):
        if not needed.is_dir():
            raise BundleError(
                f"{run_dir} is not a bundle run directory: {needed.name}/ is missing (build one "
                "with `mongars-llm bundle build`)"
            )
    default_dir = run_dir / ("sentence-transformers" if st_format else "wrapper")
    out = Path(output_dir) if output_dir is not None else default_dir
    if st_format:
        return _export_sentence_transformers(run_dir, out, base_model_id)
    out.mkdir(parents=True, exist_ok=True)

    config = copy.deepcopy(DEFAULT_WRAPPER_CONFIG)
    if (out / "config.json").is_file():
        config = deep_merge(config, _read_json(out / "config.json"))
    config = _run_config(run_dir, config, base_model_id)
    layout = config["layout"]
    _replace_tree(adapter_dir, out / layout["adapter_dir"])
    _replace_tree(tokenizer_dir, out / layout["tokenizer_dir"])
    merged = out / "merged"
    if merge and layout.get("adapter_use") in ("embed", "rerank"):
        use = layout["adapter_use"]
        raise BundleError(
            f"{run_dir} holds a{'n embedding' if use == 'embed' else ' rerank'} adapter (use "
            f"{use!r}): merging it into the weights "
            "would change chat too; export it without --merge"
        )
    if merge:
        _write_merged(config, adapter_dir, tokenizer_dir, merged)
        layout.update(merged_dir="merged", merged_dtype="float16", use_merged=True)
    else:
        shutil.rmtree(merged, ignore_errors=True)
        layout.update(merged_dir=None, use_merged=False)
    atomic_write_bytes(out / layout["module"], _TEMPLATE.read_bytes())
    atomic_write_bytes(out / WRAPPER_CORE_NAME, _CORE.read_bytes())
    config["embedding"]["max_length"] = _runtime_max_length(config, out)
    config.update(
        manifest_version=WRAPPER_MANIFEST_VERSION,
        mongars_llm_version=__version__,
        exported_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    atomic_write_json(out / "config.json", config)
    log_event(logger, "wrapper_exported", run_dir=str(run_dir), output=str(out), merged=bool(merge))
    return out


def _run_config(run_dir: Path, config: dict[str, Any], base_model_id: str | None) -> dict[str, Any]:
    """``config`` updated by the run's ``wrapper_config.json`` and the base model id
    (``base_model_id``, else the one recorded; none at all is a :class:`BundleError`)."""
    if (run_dir / "wrapper_config.json").is_file():
        config = deep_merge(config, _read_json(run_dir / "wrapper_config.json"))
    if base_model_id:
        local = Path(base_model_id).expanduser()
        if local.exists():  # a folder: absolute, so the wrapper loads from anywhere
            base_model_id = str(local.resolve())
        config = deep_merge(config, {"base_model": {"id": base_model_id, "revision": None}})
    if not config["base_model"].get("id"):
        metadata_file = run_dir / "run_metadata.json"
        recorded = (
            _read_json(metadata_file).get("base_model", {}) if metadata_file.is_file() else {}
        )
        if not recorded.get("id"):
            raise BundleError(
                f"{run_dir}: no base model recorded; pass base_model_id= (--base-model-id)"
            )
        config["base_model"].update({"id": recorded["id"], "revision": recorded.get("revision")})

    return config


def _export_sentence_transformers(run_dir: Path, out: Path, base_model_id: str | None) -> Path:
    from ._st_export import write_sentence_transformers

    config = _run_config(run_dir, copy.deepcopy(DEFAULT_WRAPPER_CONFIG), base_model_id)
    config["layout"].update(merged_dir=None, use_merged=False)
    written = write_sentence_transformers(
        run_dir,
        out,
        config,
        core=_CORE,
        core_name=WRAPPER_CORE_NAME,
        max_length=_runtime_max_length(config, out),
    )
    log_event(logger, "wrapper_exported", run_dir=str(run_dir), output=str(written), merged=False)
    return written


def _runtime_max_length(config: dict[str, Any], out: Path) -> int:
    """The token limit the runtime embeds with for this model: ``max_input_tokens``
    bounded by the model's ``max_position_embeddings`` when its config is at hand
    (the wrapper applies the same bound when it loads the model)."""
    from ..settings import get_settings

    limit = get_settings().model.max_input_tokens
    merged_dir = config["layout"].get("merged_dir")
    candidates = [out / merged_dir] if merged_dir else []
    candidates.append(Path(str(config["base_model"]["id"])).expanduser())
    for folder in candidates:
        path = folder / "config.json"
        if path.is_file():
            model_config = _read_json(path)
            text_config = model_config.get("text_config") or {}
            positions = model_config.get("max_position_embeddings") or text_config.get(
                "max_position_embeddings"
            )
            if isinstance(positions, int) and positions > 0:
                limit = min(limit, positions)
            break
    return int(limit)


def _replace_tree(source: Path, target: Path) -> None:
    if source.resolve() == target.resolve():
        return
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)


def _write_merged(
    config: dict[str, Any], adapter_dir: Path, tokenizer_dir: Path, target: Path
) -> None:
    """Base + adapter merged into plain weights, saved in fp16 with the tokenizer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = config["base_model"]
    try:
        model = AutoModelForCausalLM.from_pretrained(
            base["id"],
            revision=base.get("revision"),
            dtype=torch.float32,
            trust_remote_code=bool(base.get("trust_remote_code")),
        )
    except (OSError, ValueError) as err:
        raise BundleError(
            f"cannot load the base model {base['id']!r} to merge the adapter: {err}; pass "
            "base_model_id= to point at a reachable copy"
        ) from err
    from ..runtime import quiet_peft_deprecations

    with quiet_peft_deprecations():
        merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.to(torch.float16)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp))
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(tmp))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
