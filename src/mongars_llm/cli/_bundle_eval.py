"""``mongars-llm bundle eval``: retrieval metrics of the base model and of its adapters.

The pairs file is read as ``bundle build --objective contrastive`` reads it; the
model loads as ``mongars-llm embed`` loads it (a role, or ``--base-model``); the
base is evaluated first, then the adapter is loaded beside it (``use="embed"``)
and the same pairs are evaluated again. Metrics: see
:func:`mongars_llm.training.retrieval_metrics`.

With ``--rerank`` (or a rerank adapter: ``--rerank-adapter``, or an ``--adapter``
registered with ``use=rerank``) each retrieval is also reranked: every query's
embedding top ``--rerank-top-k`` documents reordered by ``rt.rerank`` (the
model's yes/no answer; the base weights, then the rerank adapter loaded with
``use="rerank"``), the metrics of the final order side by side with the
embedding's (:func:`mongars_llm.training.rerank_metrics`).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, get_args

from ..errors import ConfigError
from ..manifest.models import Pooling
from ._output import examples, print_json, print_table

__all__ = ["add_eval_parser"]

EXIT_OK = 0
PREFERRED_ROLES = ("embedding", "general")
#: the name the evaluated adapter is loaded under (beside the role's own adapters)
CANDIDATE = "bundle-eval-candidate"
#: the name the evaluated rerank adapter is loaded under
RERANK_CANDIDATE = "bundle-eval-reranker"
METRICS = ("mrr@10", "recall@1", "recall@10", "ndcg@10")


def add_eval_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "eval",
        help="retrieval metrics (MRR@10, recall@1/@10, nDCG@10) of the base and an adapter",
        description='Evaluate retrieval on a pairs JSONL file ({"query", "positive"} rows, '
        'optional "negative" and "instruction"): the corpus is every distinct positive and '
        "negative, each query is ranked against it by cosine similarity. The base model is "
        "evaluated, then the adapter (if given) loaded for embedding calls.",
        **examples(
            "mongars-llm bundle eval --dataset-path heldout.jsonl --adapter product-search",
            "mongars-llm bundle eval --dataset-path pairs.jsonl --base-model ./model \\",
            "    --adapter runs/r1/adapter --pooling mean --json",
            note="--adapter is a peft folder, or a name, version or 'latest' in the adapter "
            "registry; a registry entry also gives the base model when neither --base-model "
            "nor --role is given, and the pooling, attention and instruction it was trained with "
            "(flags win). Queries get --instruction (or their row's); documents none.",
        ),
    )
    parser.add_argument(
        "--objective",
        choices=("contrastive",),
        default="contrastive",
        help="what the rows are (contrastive: query/positive pairs)",
    )
    parser.add_argument(
        "--dataset-path", type=Path, required=True, metavar="PATH", help="pairs JSONL file"
    )
    parser.add_argument(
        "--adapter",
        metavar="NAME|PATH",
        help="the adapter to evaluate: a peft folder, or a registry name, version or 'latest' "
        "(a rerank adapter, use=rerank, counts as --rerank-adapter)",
    )
    parser.add_argument(
        "--registry-path", type=Path, metavar="DIR", help="adapter registry (default: settings)"
    )
    model = parser.add_argument_group("model")
    which = model.add_mutually_exclusive_group()
    which.add_argument(
        "--base-model", metavar="DIR|ORG/NAME", help="checkpoint folder or Hub id of the base"
    )
    which.add_argument(
        "--role", metavar="ROLE", help="a manifest role (default: 'embedding', else 'general')"
    )
    model.add_argument("--profile", metavar="NAME", help="manifest profile")
    model.add_argument("--manifest", type=Path, metavar="PATH", help="manifest file")
    model.add_argument("--device", metavar="DEVICE", help="'cpu', 'cuda' or 'cuda:1'")
    embedding = parser.add_argument_group("embedding")
    embedding.add_argument(
        "--pooling",
        choices=get_args(Pooling),
        help="pooling (default: the role's, else mean)",
    )
    embedding.add_argument(
        "--bidirectional",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bidirectional attention (default: the role's, else causal)",
    )
    embedding.add_argument(
        "--instruction", metavar="TEXT", help="instruction for queries without their own"
    )
    embedding.add_argument(
        "--batch-size", type=int, default=64, metavar="N", help="texts per embed call (64)"
    )
    rerank = parser.add_argument_group("rerank (retrieve, then rerank the top documents)")
    rerank.add_argument(
        "--rerank",
        action="store_true",
        help="also rerank each retrieval's top documents with the base weights (rt.rerank)",
    )
    rerank.add_argument(
        "--rerank-adapter",
        metavar="NAME|PATH",
        help="a rerank adapter (bundle build --objective rerank) to rerank with as well; "
        "implies --rerank",
    )
    rerank.add_argument(
        "--rerank-top-k",
        type=int,
        default=20,
        metavar="K",
        help="documents of the embedding's ranking reranked per query (20)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.set_defaults(handler=_eval)


def _resolve_adapter(
    args: argparse.Namespace, reference: str | None, flag: str = "--adapter"
) -> tuple[Path | None, str | None, str | None, dict[str, Any], str | None]:
    """``(adapter folder, label, base model, embedding settings, use)`` of ``reference``;
    the base model and settings come from a registry entry (``None`` and ``{}`` for a
    folder)."""
    if reference is None:
        return None, None, None, {}, None
    folder = Path(reference).expanduser()
    if folder.is_dir():
        if not (folder / "adapter_config.json").is_file():
            raise ConfigError(
                f"{flag} {reference}: the folder has no adapter_config.json; give a peft "
                "adapter folder (a bundle's adapter/) or a registry name"
            )
        from ..training import adapter_use

        use, objective = adapter_use(folder)
        _refuse_chat_adapter(reference, use, objective, flag)
        return folder, str(folder), None, {}, use
    from ..registry import AdapterRegistry, default_registry_path

    registry = AdapterRegistry(args.registry_path or default_registry_path())
    entries = registry.list()
    if reference == "latest":
        entry = registry.latest()
    elif re.fullmatch(r"v?\d+", reference) and not any(e.name == reference for e in entries):
        number = reference.lstrip("v")
        entry = next((e for e in entries if e.version.lstrip("v") == number), None)
    else:
        entry = registry.latest(name=reference)
    if entry is None:
        names = sorted({e.name for e in entries})
        raise ConfigError(
            f"{flag} {reference!r} is neither an adapter folder nor a name, version or "
            f"'latest' in the registry {registry.path} (names there: "
            f"{', '.join(names) or 'none'}); pass a path, or --registry-path"
        )
    _refuse_chat_adapter(reference, entry.use, entry.objective, flag)
    label = f"{entry.name} (version {entry.version})"
    embedding = dict(getattr(entry, "embedding", None) or {})
    return registry.adapter_path(entry), label, entry.base_model, embedding, entry.use


def _refuse_chat_adapter(
    reference: str, use: str | None, objective: str | None, flag: str = "--adapter"
) -> None:
    """Retrieval figures mean something for an embedding adapter (``use=embed``) or a
    rerank adapter (``use=rerank``) only."""
    from ..training import describe_use, is_chat_adapter

    if flag == "--rerank-adapter" and use not in ("rerank", None):
        raise ConfigError(
            f"--rerank-adapter {reference} is not a rerank adapter (use={use}): train one with "
            "bundle build --objective rerank; an embedding adapter goes to --adapter"
        )
    if not is_chat_adapter(use, objective):
        return

    raise ConfigError(
        f"{flag} {reference} is a {describe_use(use, objective)}, not an embedding adapter: "
        "bundle eval measures the retrieval of an embedding adapter (bundle build --objective "
        "contrastive, simcse or mntp) or the reranking of a rerank adapter (--objective "
        "rerank); try a chat adapter with `mongars-llm chat --adapter NAME`"
    )


def _eval(args: argparse.Namespace) -> int:
    from ..training import ranking_metrics, read_pairs, retrieve
    from ._runtime import load_runtime

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} must be at least 1")
    if args.rerank_top_k < 1:
        raise ConfigError(f"--rerank-top-k {args.rerank_top_k} must be at least 1")
    rows = read_pairs(args.dataset_path)
    adapter_path, adapter_label, registry_base, trained, use = _resolve_adapter(args, args.adapter)
    rerank_path, rerank_label, rerank_base, _, _ = _resolve_adapter(
        args, args.rerank_adapter, "--rerank-adapter"
    )
    if use == "rerank":  # an --adapter registered for rerank calls reranks
        if rerank_path is not None:
            raise ConfigError(
                f"--adapter {args.adapter} is a rerank adapter and --rerank-adapter is given "
                "too; pass the embedding adapter as --adapter, the rerank adapter as "
                "--rerank-adapter"
            )
        rerank_path, rerank_label, rerank_base = adapter_path, adapter_label, registry_base
        adapter_path, adapter_label, registry_base, trained = None, None, None, {}
    reranking = bool(args.rerank) or rerank_path is not None
    # an embedding adapter from the registry is evaluated as it was trained, unless flags say
    for flag in ("pooling", "bidirectional", "instruction"):
        if getattr(args, flag) is None and trained.get(flag) is not None:
            setattr(args, flag, trained[flag])
    base_model = args.base_model
    if base_model is None and args.role is None:
        base_model = registry_base or rerank_base
    runtime_args = argparse.Namespace(
        manifest=args.manifest,
        profile=args.profile,
        model=base_model,
        device=args.device,
        quantize_4bit=None,
    )
    runtime, _ = load_runtime(runtime_args, args.role, PREFERRED_ROLES)
    options: dict[str, Any] = {"pooling": args.pooling, "bidirectional": args.bidirectional}
    options = {key: value for key, value in options.items() if value is not None}

    def embed(texts: list[Any]) -> Any:
        # instruction="": documents (plain strings) never get the role's instruction
        return runtime.embed(texts, instruction="", batch_size=args.batch_size, **options)

    report: dict[str, Any] = {
        "ok": True,
        "objective": args.objective,
        "dataset": str(args.dataset_path),
        "model": runtime.model_id,
        "pooling": args.pooling,
        "bidirectional": args.bidirectional,
        "instruction": args.instruction,
        "base_adapters": runtime.adapter_names,
    }
    with runtime:
        common = {"instruction": args.instruction, "batch_size": args.batch_size}
        found = {"base": retrieve(embed, rows, **common)}
        base: dict[str, Any] = ranking_metrics(found["base"].scores, found["base"].relevant)
        report["queries"] = len(found["base"].queries)
        report["documents"] = len(found["base"].documents)
        report["base"] = base
        if adapter_path is not None:
            print(f"loading adapter {adapter_label} ...", file=sys.stderr, flush=True)
            runtime.load_adapter(CANDIDATE, adapter_path, use="embed")
            found["adapter"] = retrieve(embed, rows, **common)
            tuned = ranking_metrics(found["adapter"].scores, found["adapter"].relevant)
            report["adapter"] = {"name": adapter_label, "path": str(adapter_path), **tuned}
            report["delta"] = {key: tuned[key] - base[key] for key in base}
        if reranking:
            report["rerank"] = _rerank_report(
                runtime, found, args.rerank_top_k, rerank_path, rerank_label
            )
    if args.json:
        print_json(report)
        return EXIT_OK
    print(
        f"{report['queries']} queries against {report['documents']} documents "
        f"({args.dataset_path}), model {runtime.model_id}"
    )
    headers = ["metric", "base"]
    if adapter_path is not None:
        headers += ["adapter", "delta"]
    table = []
    for key in METRICS:
        line = [key, f"{base[key]:.4f}"]
        if adapter_path is not None:
            line += [f"{report['adapter'][key]:.4f}", f"{report['delta'][key]:+.4f}"]
        table.append(line)
    print_table(headers, table)
    if adapter_label is not None:
        print(f"adapter: {adapter_label}")
    if reranking:
        _print_rerank(report["rerank"])
    return EXIT_OK


def _rerank_report(
    runtime: Any,
    found: dict[str, Any],
    top_k: int,
    rerank_path: Path | None,
    rerank_label: str | None,
) -> dict[str, Any]:
    """Each retrieval (``base``, ``adapter``) alone and reranked: by the base weights
    (``rerank``), then by the rerank adapter (``rerank_adapter``) once it is loaded."""
    from ..training import ranking_metrics, rerank_metrics

    def rerank(query: str, documents: list[str], instruction: str | None) -> list[float]:
        scores = [0.0] * len(documents)
        for result in runtime.rerank(query, documents, instruction=instruction):
            scores[result.index] = result.score
        return scores

    out: dict[str, Any] = {"top_k": top_k, "rerank_adapter": None}
    for name, retrieved in found.items():
        out[name] = {
            "embed": ranking_metrics(retrieved.scores, retrieved.relevant),
            "rerank": _picked(rerank_metrics(retrieved, rerank, top_k=top_k)),
        }
    if rerank_path is not None:
        print(f"loading rerank adapter {rerank_label} ...", file=sys.stderr, flush=True)
        runtime.load_adapter(RERANK_CANDIDATE, rerank_path, use="rerank")
        out["rerank_adapter"] = {"name": rerank_label, "path": str(rerank_path)}
        for name, retrieved in found.items():
            out[name]["rerank_adapter"] = _picked(rerank_metrics(retrieved, rerank, top_k=top_k))
    return out


def _picked(metrics: dict[str, Any]) -> dict[str, Any]:
    return {key: metrics[key] for key in METRICS}


PIPELINES = {
    "embed": "embedding",
    "rerank": "embedding + rerank (base weights)",
    "rerank_adapter": "embedding + rerank adapter",
}


def _print_rerank(report: dict[str, Any]) -> None:
    print(f"\nretrieve then rerank (each query's top {report['top_k']} documents):")
    table = []
    for retrieval in ("base", "adapter"):
        for pipeline, label in PIPELINES.items():
            metrics = report.get(retrieval, {}).get(pipeline)
            if metrics is not None:
                table.append([f"{retrieval} {label}", *(f"{metrics[k]:.4f}" for k in METRICS)])
    print_table(["pipeline", *METRICS], table)
    if report["rerank_adapter"] is not None:
        print(f"rerank adapter: {report['rerank_adapter']['name']}")
