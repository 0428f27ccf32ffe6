"""``export_wrapper(..., format="sentence-transformers")``: an embedding bundle as a
folder that ``SentenceTransformer(path, trust_remote_code=True)`` loads.

The folder holds what sentence-transformers reads (``modules.json``,
``config_sentence_transformers.json`` with the trained instruction as the
``query`` prompt, ``1_Normalize/`` when the adapter normalises), one custom
module, ``mongars_st.py`` (a copy of :mod:`._st_module`, class
``MongarsLLM2Vec``), its settings (``mongars_st_config.json``: base model,
pooling, attention, the runtime's token limit), ``_mongars_llm2vec.py`` (a
byte-for-byte copy of the runtime's LLM2Vec core, as the wrapper ships it, so
the vectors are ``rt.embed``'s), copies of ``adapter/`` and ``tokenizer/``, and
a model card (``README.md``) written from the run's metadata and its registry
entry. The base weights are not copied: the module loads them by the id (Hub
id or absolute folder) recorded at training time or passed as
``base_model_id``. Nothing here imports sentence-transformers.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

from .._fs import atomic_write_bytes, atomic_write_json
from .._version import __version__
from ..errors import BundleError

__all__ = ["ST_CONFIG_FILE", "ST_MODULE_NAME", "write_sentence_transformers"]

#: the custom module file and the class ``modules.json`` names
ST_MODULE_NAME = "mongars_st.py"
ST_MODULE_CLASS = "mongars_st.MongarsLLM2Vec"
#: the custom module's settings file (as ``_st_module.CONFIG_FILE``)
ST_CONFIG_FILE = "mongars_st_config.json"
_NORMALIZE_DIR = "1_Normalize"
_TEMPLATE = Path(__file__).with_name("_st_module.py")


def write_sentence_transformers(
    run_dir: Path,
    out: Path,
    config: dict[str, Any],
    *,
    core: Path,
    core_name: str,
    max_length: int,
) -> Path:
    """Write the sentence-transformers folder ``out`` of the embedding bundle in
    ``run_dir``; ``config`` is the merged wrapper config (base model, layout,
    embedding), ``max_length`` the runtime's token limit."""
    adapter_dir = run_dir / "adapter"
    trained = _embedding_settings(run_dir, adapter_dir, config)
    metadata_file = run_dir / "run_metadata.json"
    run_metadata = _read_json(metadata_file) if metadata_file.is_file() else {}
    out.mkdir(parents=True, exist_ok=True)
    _replace_tree(adapter_dir, out / "adapter")
    _replace_tree(run_dir / "tokenizer", out / "tokenizer")
    base = config["base_model"]
    module_config = {
        "format": "mongars-llm-sentence-transformers",
        "base_model": base["id"],
        "base_model_revision": base.get("revision"),
        "dtype": base.get("dtype") or "float32",
        "trust_remote_code": bool(base.get("trust_remote_code")),
        "adapter_dir": "adapter",
        "tokenizer_dir": "tokenizer",
        "core_file": core_name,
        "pooling": trained["pooling"],
        "bidirectional": bool(trained["bidirectional"]),
        "max_seq_length": int(max_length),
        "model_type": _model_type(base["id"]),
        "prompt_model_id": str(base["id"]),
        "doc_max_length": config.get("embedding", {}).get("doc_max_length"),
        "mongars_llm_version": __version__,
    }
    atomic_write_json(out / ST_CONFIG_FILE, module_config)
    atomic_write_bytes(out / ST_MODULE_NAME, _TEMPLATE.read_bytes())
    atomic_write_bytes(out / core_name, core.read_bytes())
    modules: list[dict[str, Any]] = [
        {"idx": 0, "name": "0", "path": "", "type": ST_MODULE_CLASS},
    ]
    if trained["normalize"]:
        modules.append(
            {
                "idx": 1,
                "name": "1",
                "path": _NORMALIZE_DIR,
                "type": "sentence_transformers.models.Normalize",
            }
        )
        atomic_write_json(
            out / _NORMALIZE_DIR / "config.json",
            {"module_input_name": "sentence_embedding", "module_output_name": "sentence_embedding"},
        )
    else:
        shutil.rmtree(out / _NORMALIZE_DIR, ignore_errors=True)
    atomic_write_json(out / "modules.json", modules)
    versions = {"mongars_llm": __version__}
    for package, key in (
        ("sentence-transformers", "sentence_transformers"),
        ("transformers", "transformers"),
        ("torch", "pytorch"),
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[key] = metadata.version(package)
    atomic_write_json(
        out / "config_sentence_transformers.json",
        {
            "__version__": versions,
            "model_type": "SentenceTransformer",
            # encode_query() applies the trained instruction, encode_document() none
            "prompts": {"query": trained["instruction"] or "", "document": ""},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
    )
    registry = _registry_entry(run_metadata)
    card = model_card(
        config=config,
        module_config=module_config,
        trained=trained,
        run_metadata=run_metadata,
        registry=registry,
        normalize=bool(trained["normalize"]),
    )
    atomic_write_bytes(out / "README.md", card.encode("utf-8"))
    return out


def _embedding_settings(run_dir: Path, adapter_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """How the adapter embeds (its ``llm2vec_config.json``); a chat adapter is refused."""
    from ..runtime import EmbeddingConfig

    try:
        trained = EmbeddingConfig.read(adapter_dir)
    except ValueError as err:
        raise BundleError(f"{run_dir}: {err}") from err
    use = config.get("layout", {}).get("adapter_use")
    if trained is None or use not in (None, "embed"):
        objective = (
            _read_json(run_dir / "run_metadata.json").get("objective")
            if (run_dir / "run_metadata.json").is_file()
            else None
        )
        raise BundleError(
            f"{run_dir} holds a chat adapter (objective {objective or 'sft'}; "
            "adapter/llm2vec_config.json is missing): a sentence-transformers export needs an "
            "embedding adapter. Train one with `mongars-llm bundle build --objective "
            "contrastive` (or simcse/mntp), or export this bundle as the wrapper (--format wrapper)"
        )
    return {
        "pooling": trained.pooling,
        "bidirectional": trained.bidirectional,
        "normalize": trained.normalize,
        "instruction": trained.instruction,
        "objective": trained.objective,
        "max_length": trained.max_length,
        "extra": dict(trained.extra),
    }


def _model_type(base_id: str) -> str:
    """The base model's ``model_type`` when its config is at hand (a local folder)."""
    path = Path(str(base_id)).expanduser() / "config.json"
    if path.is_file():
        data = _read_json(path)
        text = data.get("text_config") or {}
        return str(data.get("model_type") or text.get("model_type") or "")
    return ""


def _registry_entry(run_metadata: dict[str, Any]) -> dict[str, Any] | None:
    """The run's registry entry (version, status, metrics), when the registry still has it."""
    record = run_metadata.get("registry") or {}
    if not record.get("path") or not record.get("version"):
        return None
    from ..registry import AdapterRegistry

    try:
        entry = AdapterRegistry(record["path"]).get(str(record["version"]))
    except (OSError, LookupError, ValueError):
        return None
    return {
        "path": record["path"],
        "version": entry.version,
        "name": entry.name,
        "status": entry.status,
        "metrics": dict(entry.metrics),
        "dataset": dict(entry.dataset),
    }


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def model_card(
    *,
    config: dict[str, Any],
    module_config: dict[str, Any],
    trained: dict[str, Any],
    run_metadata: dict[str, Any],
    registry: dict[str, Any] | None,
    normalize: bool,
) -> str:
    """The export's ``README.md``: what it is, how it was trained, how well it retrieves."""
    base = str(module_config["base_model"])
    adapter_name = (
        (registry or {}).get("name")
        or config.get("adapter", {}).get("name")
        or run_metadata.get("run_name")
        or "adapter"
    )
    metrics = dict((registry or {}).get("metrics") or run_metadata.get("metrics") or {})
    dataset = dict((registry or {}).get("dataset") or run_metadata.get("dataset") or {})
    hub_base = not Path(base).expanduser().exists()
    lines = ["---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity"]
    if hub_base:
        lines.append(f"base_model: {base}")
    lines += [
        "tags:",
        "- sentence-transformers",
        "- feature-extraction",
        "- sentence-similarity",
        "- llm2vec",
        "- mongars-llm",
        "---",
        "",
        f"# {adapter_name}: an LLM2Vec embedding model (mongars-llm export)",
        "",
        "A LoRA embedding adapter on a decoder LLM, exported by mongars-llm "
        f"{__version__} so that sentence-transformers loads it. Its vectors are "
        "mongars-llm's `rt.embed` vectors with this adapter (the same LLM2Vec code, "
        "`_mongars_llm2vec.py`, computes them).",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base}`"
        + (
            f" (revision `{module_config['base_model_revision']}`)"
            if module_config.get("base_model_revision")
            else ""
        )
        + " |",
        f"| adapter | `{adapter_name}`"
        + (f", registry version {registry['version']} ({registry['status']})" if registry else "")
        + " |",
        f"| objective | {trained.get('objective') or run_metadata.get('objective') or 'unknown'} |",
        f"| pooling | {module_config['pooling']} |",
        f"| attention | {'bidirectional' if module_config['bidirectional'] else 'causal'} |",
        f"| normalised | {'yes (Normalize module)' if normalize else 'no'} |",
        f"| max_seq_length | {module_config['max_seq_length']} tokens |",
        f"| query instruction | {_quote(trained.get('instruction'))} |",
    ]
    dims = trained.get("extra", {}).get("matryoshka_dims")
    if dims:
        lines.append(
            f"| trained truncations | {', '.join(str(d) for d in dims)} dimensions "
            "(Matryoshka: pass `truncate_dim=` to `SentenceTransformer`, compare with cosine) |"
        )
    lines += [
        "",
        "## Training data",
        "",
    ]
    if dataset:
        lines += ["| | |", "|---|---|"]
        for key in (
            "source",
            "format",
            "rows",
            "train_examples",
            "eval_examples",
            "duplicate_ratio",
        ):
            if key in dataset:
                lines.append(f"| {key.replace('_', ' ')} | {_fmt(dataset[key])} |")
    else:
        lines.append("Not recorded.")
    lines += ["", "## Retrieval metrics", ""]
    tuned, before = metrics.get("retrieval"), metrics.get("retrieval_base")
    if isinstance(tuned, dict):
        keys = [k for k in tuned if k not in ("queries", "documents")]
        lines.append(
            f"On the run's held-out pairs ({tuned.get('queries', '?')} queries, "
            f"{tuned.get('documents', '?')} documents), recorded in the adapter registry:"
        )
        lines += ["", "| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        if isinstance(before, dict):
            lines.append("| base model | " + " | ".join(_fmt(before.get(k)) for k in keys) + " |")
        lines.append("| with the adapter | " + " | ".join(_fmt(tuned.get(k)) for k in keys) + " |")
    else:
        lines.append("None recorded (the run had no held-out pairs).")
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        'model = SentenceTransformer("path/to/this/folder", trust_remote_code=True)',
        'documents = model.encode_document(["The sky is blue."])',
        'queries = model.encode_query(["What color is the sky?"])  # the query instruction',
        "# any instruction: the prompt is the LLM2Vec instruction, the text alone is pooled",
        'vectors = model.encode(["What color is the sky?"], prompt="Retrieve the answer")',
        "print(model.similarity(queries, documents))",
        "```",
        "",
        "The module needs `transformers` and `peft`; it loads the base model from "
        f"`{base}` and the LoRA adapter from `adapter/`. Pass "
        '`model_kwargs={"dtype": "bfloat16"}` to load it in another precision.',
        "",
    ]
    return "\n".join(lines)


def _quote(value: Any) -> str:
    return f"`{value}`" if value else "none"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BundleError(f"cannot read {path}: {err}") from err
    if not isinstance(data, dict):
        raise BundleError(f"{path} must hold a JSON object")
    return data


def _replace_tree(source: Path, target: Path) -> None:
    if source.resolve() == target.resolve():
        return
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
