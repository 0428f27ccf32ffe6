"""Training throughput: build_bundle's LoRA loop vs a plain peft + transformers ``Trainer``.

Both train the same LoRA config on the same tokenised records (prompt tokens
masked with -100), for the same number of whole epochs, from the same freshly
built peft model, with AdamW, a linear schedule and gradient clipping. Each
side is timed around its training call only (model loading excluded) and
tokens/s counts the non-padding tokens processed. Runs alternate and the best
of ``--repeats`` is kept for each side.

    python benchmarks/bench_training.py                 # defaults below
    python benchmarks/bench_training.py --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "product_qa.jsonl"


def _examples(tokenizer, max_seq_len: int):
    from mongars_llm.training._data import load_examples
    from mongars_llm.training._jsonl import read_jsonl_rows

    _, examples = load_examples(
        read_jsonl_rows(DATA), source=str(DATA), tokenizer=tokenizer, max_seq_len=max_seq_len
    )
    return examples


def _config(base: Path, args: argparse.Namespace):
    from mongars_llm.training import BundleConfig

    return BundleConfig(
        base_model=str(base),
        dataset_path=DATA,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        epochs=args.epochs,
        learning_rate=2e-4,
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        progress=False,
        register_adapter=False,
        eval_fraction=0.0,
        max_seq_len=512,
        seed=0,
    )


def _fresh_peft_model(config):
    from mongars_llm.training._model import build_peft_model, load_base_model, resolve_precision

    precision = resolve_precision(config)
    return build_peft_model(load_base_model(config, precision), config), precision


def run_ours(config, examples, pad_id: int, workdir: Path) -> tuple[float, int]:
    from mongars_llm.training._sft import train

    model, precision = _fresh_peft_model(config)
    workdir.mkdir(parents=True, exist_ok=True)  # build_bundle makes the run folder
    started = time.perf_counter()
    outcome = train(
        model,
        config=config,
        precision=precision,
        train_examples=examples,
        eval_examples=[],
        pad_id=pad_id,
        run_dir=workdir,
        fingerprint={},
    )
    return time.perf_counter() - started, outcome.metrics["tokens_seen"]


def run_trainer(config, examples, pad_id: int, workdir: Path) -> tuple[float, int]:
    import torch
    from transformers import Trainer, TrainingArguments

    model, _ = _fresh_peft_model(config)
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]

    def collate(batch):
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for i, r in enumerate(batch):
            n = len(r["input_ids"])
            ids[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), 1
            labels[i, :n] = torch.tensor(r["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    arguments = TrainingArguments(
        output_dir=str(workdir),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=config.epochs,
        learning_rate=config.learning_rate,
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        logging_steps=10_000,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=config.seed,
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=rows, data_collator=collate)
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # Trainer prints its metrics dict
        trainer.train()
    seconds = time.perf_counter() - started
    tokens = sum(len(e.input_ids) for e in examples) * int(config.epochs)
    return seconds, tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from mongars_llm.testing import build_tiny_model

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = build_tiny_model(
            root / "base",
            hidden_size=args.hidden,
            num_layers=args.layers,
            num_heads=max(4, args.hidden // 64),
            num_kv_heads=max(2, args.hidden // 128),
        )
        tokenizer = AutoTokenizer.from_pretrained(str(base))
        config = _config(base, args)
        examples = _examples(tokenizer, config.max_seq_len)
        ungrouped = config.model_copy(update={"group_by_length": False})
        results: dict[str, list[float]] = {"mongars": [], "mongars_random": [], "trainer": []}
        runners = (
            ("mongars", run_ours, config),
            ("mongars_random", run_ours, ungrouped),  # same loop, batches not length-grouped
            ("trainer", run_trainer, config),
        )
        for repeat in range(args.repeats):
            for name, runner, cfg in runners:
                seconds, tokens = runner(
                    cfg, examples, tokenizer.pad_token_id, root / f"{name}-{repeat}"
                )
                results[name].append(tokens / seconds)
        best = {name: max(values) for name, values in results.items()}
        report = {
            "model": {"hidden": args.hidden, "layers": args.layers},
            "records": len(examples),
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "grad_accum": args.grad_accum,
            "threads": args.threads,
            "tokens_per_second": {k: round(v, 1) for k, v in best.items()},
            "all_runs": {k: [round(v, 1) for v in vs] for k, vs in results.items()},
            "ratio": round(best["mongars"] / best["trainer"], 3),
            "ratio_random_batches": round(best["mongars_random"] / best["trainer"], 3),
        }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"records={report['records']} epochs={args.epochs} batch={args.batch_size} "
            f"accum={args.grad_accum} hidden={args.hidden} layers={args.layers} "
            f"threads={args.threads}"
        )
        for name, value in report["tokens_per_second"].items():
            print(f"  {name:15s} {value:10.1f} tokens/s   runs: {report['all_runs'][name]}")
        print(
            f"ratio mongars/trainer: {report['ratio']:.2f}x (target >= 1.0x); without length "
            f"grouping: {report['ratio_random_batches']:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
