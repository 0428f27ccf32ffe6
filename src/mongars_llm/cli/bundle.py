"""``mongars-llm bundle build|export-wrapper|eval``: LoRA training bundles (DESIGN §4, §5)."""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from ..errors import DatasetError
from ..training import BundleConfig
from ._bundle_eval import add_eval_parser
from ._output import command_group, examples, print_json

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
#: steps between two progress lines when stderr is not a terminal (the bar's stand-in)
PROGRESS_EVERY = 10

# flag (--field-name) -> its help where the field's description does not fit a flag (it names
# other fields, or the CLI says more); None: the description. Type, choices and the default
# shown come from the BundleConfig field; the parsed default is None (not given: a --config
# file's value, else the field's default)
_VALUE_FLAGS: dict[str, str | None] = {
    "dataset_path": None,
    "dataset_id": "Hugging Face dataset id (needs the [train] extra)",
    "dataset_split": "split of --dataset-id",
    "dataset_config": "configuration name of --dataset-id",
    "eval_dataset_path": "eval JSONL file",
    "eval_dataset_id": "Hugging Face dataset id for eval",
    "eval_dataset_split": "split of --eval-dataset-id",
    "eval_fraction": None,
    "documents": 'documents to train on without labelled pairs: JSONL {"text"} or {"id", '
    '"text"} rows, or a .txt/.md file split into passages; contrastive synthesizes questions '
    "per passage, simcse/mntp and --recipe llm2vec train on the passages",
    "max_passages": None,
    "questions_per_passage": None,
    "question_prompt": None,
    "round_trip_k": None,
    "mine_negatives": None,
    "recipe": None,
    "base_model": "the model to fine-tune: a Hub id (org/name), a checkpoint folder, a .gguf or "
    "pkg:// file, or a role of the active profile (provisioned first). Default: the profile's "
    "'general' role, the model `mongars-llm chat` loads: without CUDA the built-in 'smol' "
    "profile's SmolLM2-135M, with CUDA 'default' (dphn/Dolphin-X1-8B); choose the profile with "
    "LLM_MODELS_PROFILE",
    "base_model_revision": None,
    "output_dir": None,
    "registry_path": None,
    "run_name": None,
    "adapter_name": None,
    "epochs": "passes over the data",
    "max_steps": "optimizer steps; overrides --epochs",
    "batch_size": "records per micro-batch",
    "grad_accum": "micro-batches per optimizer step",
    "learning_rate": "peak learning rate",
    "lr_scheduler": "learning-rate schedule",
    "warmup_steps": "linear warm-up steps",
    "lora_r": "LoRA rank",
    "lora_alpha": "LoRA alpha",
    "lora_dropout": "LoRA dropout",
    "max_seq_len": "longest record in tokens",
    "overlong": "records over --max-seq-len: an error, or truncated",
    "seed": "random seed",
    "precision": None,
    "device": None,
    "save_steps": "checkpoint every N steps (for --resume)",
    "progress_every": "when stderr is no terminal (no progress bar): a progress line every N "
    f"steps ({PROGRESS_EVERY})",
    "eval_steps": None,
    "objective": None,
    "base_adapter": None,
    "mask_probability": None,
    "mini_batch_size": "contrastive/simcse: embed each batch in chunks of N texts (GradCache): a "
    "larger batch of negatives in bounded memory",
    "pooling": None,
    "instruction": None,
    "temperature": "embedding objectives: InfoNCE temperature",
    "rerank_negatives": "rerank: documents scored against each query's positive (its own "
    "negative first, then the other rows' documents of its micro-batch)",
    "rerank_loss": "rerank: listwise (softmax over the query's documents) or bce",
    "num_processes": "train in N local processes (DDP; gloo on CPU); global batch = batch size "
    "x N x grad accum. Under accelerate launch, leave it out",
}
#: the on/off flags (`--dry-run`): given, they set the field true; help as above
_SWITCHES: dict[str, str | None] = {
    "qlora": None,
    "bidirectional": "embedding objectives: bidirectional attention (as the role's embedding "
    "setting; mntp always)",
    "gradient_checkpointing": "embedding objectives: recompute activations in backward (less "
    "memory)",
    "dry_run": None,
    "skip_invalid": "drop invalid records instead of failing",
    "verbose": "also show the libraries' loading bars for a small local base model (hidden "
    "otherwise; downloads keep theirs)",
}


#: the config the embedding objectives start from: --help shows where its defaults differ
_EMBEDDING_DEFAULTS = BundleConfig(objective="contrastive", registry_path=Path())
_RERANK_DEFAULTS = BundleConfig(objective="rerank", registry_path=Path())


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _help(field: str, text: str | None = None) -> str:
    """``text`` (else the field's description as a flag's help) and the field's default, with
    the embedding objectives' where it differs: ``peak learning rate (default: 0.0002;
    0.0003 for the embedding objectives)``."""
    info = BundleConfig.model_fields[field]
    if text is None:
        text = (info.description or "").rstrip(".")
        first = text.split(" ", 1)[0]
        if first[1:].islower():  # "Training JSONL file" -> "training ...", not "InfoNCE"
            text = text[0].lower() + text[1:]
    notes = []
    if info.default_factory is None:  # registry_path: the settings' (its text says which)
        if info.default is not None and info.default is not False:
            notes.append(f"default: {_shown(info.default)}")
        embedding = getattr(_EMBEDDING_DEFAULTS, field)
        if field != "objective" and embedding != info.default:
            notes.append(f"{_shown(embedding)} for the embedding objectives")
        rerank = getattr(_RERANK_DEFAULTS, field)
        if field != "objective" and rerank != embedding:
            notes.append(f"{_shown(rerank)} for rerank")
    text += f" ({'; '.join(notes)})" if notes else ""
    return text.replace("%", "%%")  # argparse formats help with %


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _type_and_choices(field: str) -> tuple[Any, tuple[str, ...] | None]:
    """The flag's value type (``Path | None`` -> ``Path``) and a ``Literal``'s choices."""
    kind = BundleConfig.model_fields[field].annotation
    if get_origin(kind) in (Union, UnionType):
        (kind,) = (arg for arg in get_args(kind) if arg is not type(None))
    if get_origin(kind) is Literal:
        return str, get_args(kind)
    return kind, None


_RETRIEVAL_KEYS = ("mrr@10", "recall@1", "recall@10", "ndcg@10")


def _target_modules(value: str) -> list[str]:
    return [part for part in value.replace(" ", ",").split(",") if part]


def _dimensions(value: str) -> list[int]:
    """``"64,128,256"`` -> ``[64, 128, 256]`` (argparse reports a ValueError as a bad value)."""
    return [int(part) for part in value.replace(" ", ",").split(",") if part]


def _build(args: argparse.Namespace) -> int:
    from ..training import build_bundle

    overrides: dict[str, Any] = {field: getattr(args, field) for field in _VALUE_FLAGS}
    if args.target_modules:
        overrides["target_modules"] = [m for group in args.target_modules for m in group]
    if args.matryoshka_dims:
        overrides["matryoshka_dims"] = args.matryoshka_dims
    for field in _SWITCHES:
        if getattr(args, field):
            overrides[field] = True
    if args.no_register:
        overrides["register_adapter"] = False
    if args.resume is not None:
        overrides["resume"] = True if args.resume is True else Path(args.resume)
    # the progress bar goes to stderr whenever it is a terminal, --json or not; elsewhere
    # (a log file, CI) a line every N steps stands in for it
    if not sys.stderr.isatty():
        overrides["progress"] = False
        if args.progress_every is None:
            overrides["progress_every"] = PROGRESS_EVERY
    # under accelerate launch / torchrun every process runs this command: rank 0 speaks
    quiet = os.environ.get("RANK", "0") not in ("", "0")
    if quiet:
        overrides["progress"] = False
        overrides.pop("progress_every", None)
    try:
        result = build_bundle(args.config, **overrides)
    except Exception as err:
        if quiet:  # one line, tagged: rank 0 usually reports the same error in full
            print(f"mongars-llm: rank {os.environ['RANK']}: error: {err}", file=sys.stderr)
            return EXIT_FAILED
        if args.json:  # one JSON document on stdout, whatever failed
            summary = getattr(err, "summary", None)
            print_json(
                {
                    "ok": False,
                    "error": str(err),
                    "error_type": type(err).__name__,
                    "dataset_summary": summary.model_dump(mode="json") if summary else None,
                }
            )
        if not isinstance(err, DatasetError):
            raise  # the CLI's main turns it into a one-line error and its exit code
        print(f"mongars-llm: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    if quiet:
        return EXIT_OK
    if args.json:
        print_json({"ok": True, **result.to_dict()})
        return EXIT_OK
    summary = result.dataset_summary
    if "passages" in result.metrics:  # a dry run of --documents: no question written yet
        sizes = f"{result.metrics['passages']} passage(s) to write questions for"
    elif summary.format in ("pairs", "texts"):  # the embedding objectives: rows, not tokens
        sizes = f"{result.metrics.get('train_examples')} training row(s)"
        if result.metrics.get("eval_examples"):
            sizes += f", {result.metrics['eval_examples']} eval row(s)"
    else:
        sizes = f"{summary.trainable_tokens} trainable token(s)"
    print(
        f"dataset: {summary.rows_valid} valid record(s), {summary.rows_skipped} skipped, "
        f"{summary.lines_blank} blank line(s), duplicate ratio {summary.duplicate_ratio:.1%}, "
        + sizes
    )
    print(f"summary: {result.run_dir / 'dataset_summary.json'}")
    if result.config.dry_run:
        print("dry run: stopped after the dataset checks")
        return EXIT_OK
    metrics = result.metrics
    base, trained = metrics.get("retrieval_base"), metrics.get("retrieval")
    if base and trained:
        print(
            f"retrieval on {trained['queries']} held-out quer(ies): "
            + ", ".join(f"{k} {base[k]:.3f} -> {trained[k]:.3f}" for k in _RETRIEVAL_KEYS)
            + f" (base -> adapter) after {metrics['steps']} step(s)"
        )
    rerank_base, rerank = metrics.get("rerank_base"), metrics.get("rerank")
    if rerank_base and rerank:
        print(
            f"embedding top {rerank['top_k']} reranked, {rerank['queries']} held-out "
            "quer(ies): "
            + ", ".join(f"{k} {rerank_base[k]:.3f} -> {rerank[k]:.3f}" for k in _RETRIEVAL_KEYS)
            + f" (base weights -> adapter) after {metrics['steps']} step(s)"
        )
    mntp_base, mntp = metrics.get("mntp_base"), metrics.get("mntp")
    if mntp_base and mntp:
        print(
            f"masked-token loss on {metrics['eval_texts']} held-out text(s): "
            f"{mntp_base['mntp_loss']:.4f} -> {mntp['mntp_loss']:.4f}, accuracy "
            f"{mntp_base['mntp_accuracy']:.3f} -> {mntp['mntp_accuracy']:.3f} (base -> adapter)"
        )
    if metrics.get("eval_loss") is not None:
        print(
            f"eval loss {metrics['eval_loss_initial']:.4f} -> {metrics['eval_loss']:.4f} "
            f"(perplexity {metrics['eval_perplexity']:.2f}) after {metrics['steps']} step(s)"
        )
    print(f"bundle: {result.run_dir}")
    if result.registry_entry is not None:
        print(
            f"registered: version {result.registry_entry.version} "
            f"({result.registry_entry.name}) in {result.config.registry_path}"
        )
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    from ..export import export_wrapper
    from ..runtime import no_loading_bars

    st_format = args.format in ("sentence-transformers", "st")
    with nullcontext() if args.verbose else no_loading_bars():
        out = export_wrapper(
            args.run_dir,
            output_dir=args.output_dir,
            base_model_id=args.base_model_id,
            merge=args.merge,
            format=args.format,
        )
    if st_format:
        if args.json:
            print_json({"ok": True, "format": "sentence-transformers", "output_dir": str(out)})
        else:
            print(f"sentence-transformers: {out}")
            print(f'load it: SentenceTransformer("{out}", trust_remote_code=True)')
    elif args.json:
        print_json({"ok": True, "wrapper_dir": str(out), "merged": args.merge})
    else:
        print(f"wrapper: {out}")
    return EXIT_OK


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``bundle export-wrapper`` and ``export`` (one handler)."""
    from ..export import EXPORT_FORMATS

    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="bundle run directory")
    parser.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        default="wrapper",
        help="wrapper (default): the self-contained loader; sentence-transformers (st): a "
        "folder SentenceTransformer(path, trust_remote_code=True) loads (embedding bundles)",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        help="output folder (RUN_DIR/wrapper, or RUN_DIR/sentence-transformers)",
    )
    parser.add_argument("--base-model-id", help="override the base model id in the config")
    parser.add_argument(
        "--merge", action="store_true", help="also write a merged fp16 snapshot (wrapper only)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument(
        "--verbose", action="store_true", help="show the loading/writing bars of --merge"
    )
    parser.set_defaults(handler=_export)


#: the BundleConfig fields `bundle synthesize` takes as flags (help as for `bundle build`)
_SYNTHESIZE_FLAGS = (
    "base_model",
    "questions_per_passage",
    "question_prompt",
    "round_trip_k",
    "mine_negatives",
    "max_passages",
    "seed",
    "pooling",
    "instruction",
    "device",
    "precision",
)


def _synthesize(args: argparse.Namespace) -> int:
    from ..training import synthesize_pairs

    overrides: dict[str, Any] = {field: getattr(args, field) for field in _SYNTHESIZE_FLAGS}
    for field in ("bidirectional", "skip_invalid"):
        if getattr(args, field):
            overrides[field] = True
    if not sys.stderr.isatty():  # a log file, CI: a line every N batches for the bar
        overrides["progress"] = False
        overrides["progress_every"] = PROGRESS_EVERY
    try:
        summary = synthesize_pairs(args.documents, args.output, args.config, **overrides)
    except DatasetError as err:
        if args.json:
            report = getattr(err, "summary", None)
            print_json(
                {
                    "ok": False,
                    "error": str(err),
                    "error_type": type(err).__name__,
                    "documents_summary": report.model_dump(mode="json") if report else None,
                }
            )
        print(f"mongars-llm: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(
            f"mongars-llm: interrupted; the pairs written so far are in {args.output}",
            file=sys.stderr,
        )
        return 130
    if args.json:
        print_json({"ok": True, "output": str(args.output), **summary.to_dict()})
        return EXIT_OK
    print(summary.line())
    print(f"pairs: {args.output}")
    print(
        "train on them: mongars-llm bundle build --objective contrastive --dataset-path "
        f"{args.output}"
    )
    return EXIT_OK


def _add_synthesize_parser(commands: argparse._SubParsersAction) -> None:
    synth = commands.add_parser(
        "synthesize",
        help="write query/passage pairs from documents (questions, filter, hard negatives)",
        description="The first steps of `bundle build --documents` alone: the base model "
        "writes questions for each passage, keeps those whose passage it retrieves "
        "(round trip), mines hard negatives, and writes the pairs for you to read and edit "
        "(docs/training.md).",
        **examples(
            "mongars-llm bundle synthesize --documents docs.jsonl -o pairs.jsonl",
            "mongars-llm bundle synthesize --documents manual.txt -o pairs.jsonl \\",
            "    --questions-per-passage 3 --round-trip-k 5",
            "mongars-llm bundle build --objective contrastive --dataset-path pairs.jsonl",
            note="Beside the pairs: <output>.summary.json (kept, dropped by reason, seconds per "
            "phase) and <output>.documents.json (the documents' data report). Ctrl-C keeps "
            "the pairs written so far.",
        ),
    )
    synth.add_argument("--documents", type=Path, required=True, help=_help("documents"))
    synth.add_argument(
        "-o", "--output", type=Path, required=True, help="the pairs JSONL file to write"
    )
    synth.add_argument("--config", type=Path, help="bundle config file (JSON or YAML)")
    for field in _SYNTHESIZE_FLAGS:
        kind, choices = _type_and_choices(field)
        text = _VALUE_FLAGS.get(field)
        if field == "mine_negatives":
            text = "hard negatives mined per kept question, one row each (default: 1; 0: none)"
        synth.add_argument(
            _flag(field), type=kind, choices=choices, default=None, help=_help(field, text)
        )
    synth.add_argument(
        "--bidirectional",
        action="store_true",
        help=_help("bidirectional", _SWITCHES["bidirectional"]),
    )
    synth.add_argument(
        "--skip-invalid", action="store_true", help=_help("skip_invalid", _SWITCHES["skip_invalid"])
    )
    synth.add_argument("--json", action="store_true", help="print one JSON document")
    synth.set_defaults(handler=_synthesize)


def register(subparsers: argparse._SubParsersAction) -> None:
    commands = command_group(
        subparsers,
        "bundle",
        help="build LoRA training bundles and export wrappers",
        description="Validate a dataset, LoRA/QLoRA fine-tune, export and register (docs/training.md).",
        **examples(
            "mongars-llm bundle build --dataset-path data.jsonl --base-model Qwen/Qwen2.5-0.5B-Instruct",
            "mongars-llm bundle export-wrapper RUN_DIR --merge",
        ),
    )

    build = commands.add_parser(
        "build",
        help="validate data, fine-tune, export the wrapper and register the adapter",
        description="Flags win over --config; unset flags keep the file's (or default) values.",
        **examples(
            "mongars-llm bundle build --dataset-path data.jsonl --base-model ./tiny-model --dry-run",
            "mongars-llm bundle build --dataset-path data.jsonl --base-model org/name \\",
            "    --run-name qa --max-steps 200 --lora-r 16 --target-modules q_proj,v_proj",
            "mongars-llm bundle build --config bundle.yaml --resume",
            "mongars-llm bundle build --objective contrastive --documents docs.jsonl",
            "mongars-llm bundle build --recipe llm2vec --documents docs.txt --max-steps 200",
            "mongars-llm bundle build --config bundle.yaml --run-name qa-2 \\",
            "    --resume ~/.local/share/mongars-llm/encoders/runs/qa/checkpoints/step-10",
            note="Runs go to <registry>/runs/<run name>; the registry is "
            "MONGARS_LLM_ADAPTER_REGISTRY_PATH, else the user data dir's encoders/. A Hub id "
            "that `mongars-llm provision` installed is read from the models dir.",
        ),
    )
    build.add_argument("--config", type=Path, help="bundle config file (JSON or YAML)")
    for field, text in _VALUE_FLAGS.items():
        kind, choices = _type_and_choices(field)
        build.add_argument(
            _flag(field), type=kind, choices=choices, default=None, help=_help(field, text)
        )
    build.add_argument(
        "--target-modules",
        type=_target_modules,
        action="append",
        metavar="NAMES",
        help=_help(
            "target_modules", "modules to adapt, comma-separated (q_proj,v_proj) or all-linear"
        ),
    )
    build.add_argument(
        "--matryoshka-dims",
        type=_dimensions,
        metavar="N,N,...",
        help=_help(
            "matryoshka_dims",
            "contrastive/simcse: also train these truncations of the vectors, comma-separated "
            "(64,128,256); embed(dimensions=N) then serves them",
        ),
    )
    build.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="continue from the run's newest checkpoint, or the one given: a checkpoint "
        "folder, or a step of this run's (10, step-10)",
    )
    for field, text in _SWITCHES.items():
        build.add_argument(_flag(field), action="store_true", help=_help(field, text))
    build.add_argument("--no-register", action="store_true", help="do not touch the registry")
    build.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document on stdout (the progress bar stays on a terminal's stderr)",
    )
    build.set_defaults(handler=_build)

    export = commands.add_parser(
        "export-wrapper",
        help="(re)write the wrapper folder of a bundle run",
        description="Deep-merges wrapper_config.json into wrapper/config.json and writes the "
        "self-contained loader module.",
        **examples(
            "mongars-llm bundle export-wrapper ~/.local/share/mongars-llm/encoders/runs/qa",
            "mongars-llm bundle export-wrapper RUN_DIR --base-model-id /mnt/models/base --merge",
            "mongars-llm bundle export-wrapper RUN_DIR --format st",
        ),
    )
    add_export_arguments(export)

    _add_synthesize_parser(commands)
    add_eval_parser(commands)
