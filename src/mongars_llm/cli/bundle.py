"""``mongars-llm bundle build|export-wrapper|eval``: LoRA training bundles (DESIGN §4, §5)."""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from ..errors import DatasetError
from ._bundle_eval import add_eval_parser
from ._output import examples, print_json

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
#: steps between two progress lines when stderr is not a terminal (the bar's stand-in)
PROGRESS_EVERY = 10

# flag -> BundleConfig field for the plain value options (None = not given)
_VALUE_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--dataset-path", "dataset_path", Path, "training JSONL file"),
    ("--dataset-id", "dataset_id", str, "Hugging Face dataset id (needs the [train] extra)"),
    ("--dataset-split", "dataset_split", str, "split of --dataset-id (default: train)"),
    ("--dataset-config", "dataset_config", str, "configuration name of --dataset-id"),
    ("--eval-dataset-path", "eval_dataset_path", Path, "eval JSONL file"),
    ("--eval-dataset-id", "eval_dataset_id", str, "Hugging Face dataset id for eval"),
    ("--eval-dataset-split", "eval_dataset_split", str, "split of --eval-dataset-id"),
    ("--eval-fraction", "eval_fraction", float, "held-out share when no eval set (0.1)"),
    (
        "--base-model",
        "base_model",
        str,
        "the model to fine-tune: a Hub id (org/name), a checkpoint folder, a .gguf or pkg:// "
        "file, or a role of the active profile (provisioned first). Default: the profile's "
        "'general' role, the model `mongars-llm chat` loads: without CUDA the built-in 'smol' "
        "profile's SmolLM2-135M, with CUDA 'default' (dphn/Dolphin-X1-8B); choose the profile "
        "with LLM_MODELS_PROFILE",
    ),
    ("--base-model-revision", "base_model_revision", str, "branch, tag or commit to pin"),
    ("--output-dir", "output_dir", Path, "parent of run directories (<registry>/runs)"),
    (
        "--registry-path",
        "registry_path",
        Path,
        "adapter registry (MONGARS_LLM_ADAPTER_REGISTRY_PATH, else the user data dir's encoders/)",
    ),
    ("--run-name", "run_name", str, "run directory name (generated when unset)"),
    ("--adapter-name", "adapter_name", str, "registry name (the run name when unset)"),
    ("--epochs", "epochs", float, "passes over the data (1)"),
    ("--max-steps", "max_steps", int, "optimizer steps; overrides --epochs"),
    ("--batch-size", "batch_size", int, "records per micro-batch (4)"),
    ("--grad-accum", "grad_accum", int, "micro-batches per optimizer step (1)"),
    ("--learning-rate", "learning_rate", float, "peak learning rate (2e-4; 3e-4 for embeddings)"),
    (
        "--lr-scheduler",
        "lr_scheduler",
        str,
        "linear | cosine | constant | constant_with_warmup (linear; constant for embeddings)",
    ),
    ("--warmup-steps", "warmup_steps", int, "linear warm-up steps (0)"),
    ("--lora-r", "lora_r", int, "LoRA rank (8)"),
    ("--lora-alpha", "lora_alpha", int, "LoRA alpha (16)"),
    ("--lora-dropout", "lora_dropout", float, "LoRA dropout (0.05)"),
    ("--max-seq-len", "max_seq_len", int, "longest record in tokens (1024)"),
    ("--overlong", "overlong", str, "records over --max-seq-len: error | truncate"),
    ("--seed", "seed", int, "random seed (42)"),
    ("--precision", "precision", str, "auto | fp32 | bf16 | fp16"),
    ("--device", "device", str, "cpu | cuda | cuda:N (auto)"),
    ("--save-steps", "save_steps", int, "checkpoint every N steps (for --resume)"),
    (
        "--progress-every",
        "progress_every",
        int,
        f"when stderr is no terminal (no progress bar): a progress line every N steps "
        f"({PROGRESS_EVERY})",
    ),
    ("--eval-steps", "eval_steps", int, "also evaluate every N steps"),
    (
        "--objective",
        "objective",
        str,
        "sft (chat LoRA, the default) | contrastive (query/positive pairs) | simcse (texts) | "
        "mntp (texts; masked next-token prediction, bidirectional): the last three train an "
        "embedding adapter (use=embed)",
    ),
    (
        "--base-adapter",
        "base_adapter",
        str,
        "embedding objectives: train on top of this adapter (registered name or folder), "
        "e.g. contrastive on top of mntp, as LLM2Vec stacks them",
    ),
    ("--mask-probability", "mask_probability", float, "mntp: share of tokens predicted (0.2)"),
    (
        "--mini-batch-size",
        "mini_batch_size",
        int,
        "contrastive/simcse: embed each batch in chunks of N texts (GradCache): a larger "
        "batch of negatives in bounded memory",
    ),
    ("--pooling", "pooling", str, "embedding objectives: mean | weighted_mean | ... (mean)"),
    ("--instruction", "instruction", str, "contrastive: instruction for queries without one"),
    ("--temperature", "temperature", float, "embedding objectives: InfoNCE temperature (0.05)"),
    (
        "--num-processes",
        "num_processes",
        int,
        "train in N local processes (DDP; gloo on CPU); global batch = "
        "batch size x N x grad accum (1). Under accelerate launch, leave it out",
    ),
]


_RETRIEVAL_KEYS = ("mrr@10", "recall@1", "recall@10", "ndcg@10")


def _target_modules(value: str) -> list[str]:
    return [part for part in value.replace(" ", ",").split(",") if part]


def _build(args: argparse.Namespace) -> int:
    from ..training import build_bundle

    overrides: dict[str, Any] = {field: getattr(args, field) for _, field, _, _ in _VALUE_FLAGS}
    if args.target_modules:
        overrides["target_modules"] = [m for group in args.target_modules for m in group]
    for flag in (
        "dry_run",
        "skip_invalid",
        "qlora",
        "bidirectional",
        "gradient_checkpointing",
        "verbose",
    ):
        if getattr(args, flag):
            overrides[flag] = True
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
    if summary.format in ("pairs", "texts"):  # the embedding objectives: rows, not tokens
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
    from ..runtime._loading import no_loading_bars

    with nullcontext() if args.verbose else no_loading_bars():
        out = export_wrapper(
            args.run_dir,
            output_dir=args.output_dir,
            base_model_id=args.base_model_id,
            merge=args.merge,
        )
    if args.json:
        print_json({"ok": True, "wrapper_dir": str(out), "merged": args.merge})
    else:
        print(f"wrapper: {out}")
    return EXIT_OK


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bundle",
        help="build LoRA training bundles and export wrappers",
        description="Validate a dataset, LoRA/QLoRA fine-tune, export and register (docs/training.md).",
        **examples(
            "mongars-llm bundle build --dataset-path data.jsonl --base-model Qwen/Qwen2.5-0.5B-Instruct",
            "mongars-llm bundle export-wrapper RUN_DIR --merge",
        ),
    )
    commands = parser.add_subparsers(dest="bundle_command", metavar="COMMAND")
    parser.set_defaults(handler=lambda _args: (parser.print_help(sys.stderr), EXIT_USAGE)[1])

    build = commands.add_parser(
        "build",
        help="validate data, fine-tune, export the wrapper and register the adapter",
        description="Flags win over --config; unset flags keep the file's (or default) values.",
        **examples(
            "mongars-llm bundle build --dataset-path data.jsonl --base-model ./tiny-model --dry-run",
            "mongars-llm bundle build --dataset-path data.jsonl --base-model org/name \\",
            "    --run-name qa --max-steps 200 --lora-r 16 --target-modules q_proj,v_proj",
            "mongars-llm bundle build --config bundle.yaml --resume",
            "mongars-llm bundle build --config bundle.yaml --run-name qa-2 \\",
            "    --resume ~/.local/share/mongars-llm/encoders/runs/qa/checkpoints/step-10",
            note="Runs go to <registry>/runs/<run name>; the registry is "
            "MONGARS_LLM_ADAPTER_REGISTRY_PATH, else the user data dir's encoders/. A Hub id "
            "that `mongars-llm provision` installed is read from the models dir.",
        ),
    )
    build.add_argument("--config", type=Path, help="bundle config file (JSON or YAML)")
    for flag, field, kind, text in _VALUE_FLAGS:
        build.add_argument(flag, dest=field, type=kind, default=None, help=text)
    build.add_argument(
        "--target-modules",
        type=_target_modules,
        action="append",
        metavar="NAMES",
        help="modules to adapt, comma-separated (q_proj,v_proj) or all-linear",
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
    build.add_argument("--qlora", action="store_true", help="4-bit base (CUDA + bitsandbytes)")
    build.add_argument(
        "--bidirectional",
        action="store_true",
        help="embedding objectives: bidirectional attention (as the role's embedding setting)",
    )
    build.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="embedding objectives: recompute activations in backward (less memory)",
    )
    build.add_argument("--dry-run", action="store_true", help="check the data, write the summary")
    build.add_argument(
        "--skip-invalid", action="store_true", help="drop invalid records instead of failing"
    )
    build.add_argument("--no-register", action="store_true", help="do not touch the registry")
    build.add_argument(
        "--verbose",
        action="store_true",
        help="also show the libraries' loading bars for a small local base model (hidden "
        "otherwise; downloads keep theirs)",
    )
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
        ),
    )
    export.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="bundle run directory")
    export.add_argument("--output-dir", type=Path, help="wrapper folder (RUN_DIR/wrapper)")
    export.add_argument("--base-model-id", help="override the base model id in the config")
    export.add_argument("--merge", action="store_true", help="also write a merged fp16 snapshot")
    export.add_argument("--json", action="store_true", help="print one JSON document")
    export.add_argument(
        "--verbose", action="store_true", help="show the loading/writing bars of --merge"
    )
    export.set_defaults(handler=_export)

    add_eval_parser(commands)
