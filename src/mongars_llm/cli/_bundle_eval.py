"""``mongars-llm bundle eval``: retrieval metrics of the base model and of an embedding adapter.

The pairs file is read as ``bundle build --objective contrastive`` reads it; the
model loads as ``mongars-llm embed`` loads it (a role, or ``--base-model``); the
base is evaluated first, then the adapter is loaded beside it (``use="embed"``)
and the same pairs are evaluated again. Metrics: see
:func:`mongars_llm.training.retrieval_metrics`.
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
        help="the adapter to evaluate: a peft folder, or a registry name, version or 'latest'",
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
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.set_defaults(handler=_eval)


def _resolve_adapter(
    args: argparse.Namespace,
) -> tuple[Path | None, str | None, str | None, dict[str, Any]]:
    """``(adapter folder, label, base model, embedding settings)`` of ``--adapter``; the last
    two come from a registry entry (``None`` and ``{}`` for a folder)."""
    if args.adapter is None:
        return None, None, None, {}
    folder = Path(args.adapter).expanduser()
    if folder.is_dir():
        if not (folder / "adapter_config.json").is_file():
            raise ConfigError(
                f"--adapter {args.adapter}: the folder has no adapter_config.json; give a peft "
                "adapter folder (a bundle's adapter/) or a registry name"
            )
        from ..training import adapter_use

        _refuse_chat_adapter(args.adapter, *adapter_use(folder))
        return folder, str(folder), None, {}
    from ..registry import AdapterRegistry, default_registry_path

    registry = AdapterRegistry(args.registry_path or default_registry_path())
    entries = registry.list()
    if args.adapter == "latest":
        entry = registry.latest()
    elif re.fullmatch(r"v?\d+", args.adapter) and not any(e.name == args.adapter for e in entries):
        number = args.adapter.lstrip("v")
        entry = next((e for e in entries if e.version.lstrip("v") == number), None)
    else:
        entry = registry.latest(name=args.adapter)
    if entry is None:
        names = sorted({e.name for e in entries})
        raise ConfigError(
            f"--adapter {args.adapter!r} is neither an adapter folder nor a name, version or "
            f"'latest' in the registry {registry.path} (names there: "
            f"{', '.join(names) or 'none'}); pass a path, or --registry-path"
        )
    _refuse_chat_adapter(args.adapter, entry.use, entry.objective)
    label = f"{entry.name} (version {entry.version})"
    embedding = dict(getattr(entry, "embedding", None) or {})
    return registry.adapter_path(entry), label, entry.base_model, embedding


def _refuse_chat_adapter(reference: str, use: str | None, objective: str | None) -> None:
    """Retrieval figures mean something for an embedding adapter only (``use=embed``)."""
    from ..training import describe_use, is_chat_adapter

    if not is_chat_adapter(use, objective):
        return

    raise ConfigError(
        f"--adapter {reference} is a {describe_use(use, objective)}, not an embedding adapter: "
        "bundle eval measures the retrieval of an embedding adapter (bundle build --objective "
        "contrastive, simcse or mntp); try a chat adapter with `mongars-llm chat --adapter "
        "NAME`"
    )


def _eval(args: argparse.Namespace) -> int:
    from ..training import evaluate_pairs, read_pairs
    from ._runtime import load_runtime

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} must be at least 1")
    rows = read_pairs(args.dataset_path)
    adapter_path, adapter_label, registry_base, trained = _resolve_adapter(args)
    # an embedding adapter from the registry is evaluated as it was trained, unless flags say
    for flag in ("pooling", "bidirectional", "instruction"):
        if getattr(args, flag) is None and trained.get(flag) is not None:
            setattr(args, flag, trained[flag])
    base_model = args.base_model
    if base_model is None and args.role is None and registry_base is not None:
        base_model = registry_base
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
        base = evaluate_pairs(embed, rows, **common)
        report["queries"], report["documents"] = base.pop("queries"), base.pop("documents")
        report["base"] = base
        if adapter_path is not None:
            print(f"loading adapter {adapter_label} ...", file=sys.stderr, flush=True)
            runtime.load_adapter(CANDIDATE, adapter_path, use="embed")
            tuned = evaluate_pairs(embed, rows, **common)
            del tuned["queries"], tuned["documents"]
            report["adapter"] = {"name": adapter_label, "path": str(adapter_path), **tuned}
            report["delta"] = {key: tuned[key] - base[key] for key in base}
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
    return EXIT_OK
