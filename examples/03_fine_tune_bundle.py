"""Part 3 — fine-tune: dataset hygiene, a LoRA bundle, the adapter registry, the wrapper.

What it shows:

1. a dry run of ``build_bundle``: the dataset checks alone (schema, duplicates,
   over-long records, length statistics in chars and tokens), and what a bad
   dataset looks like (every bad line listed at once),
2. a short LoRA run on ``examples/data/product_qa.jsonl`` with eval loss before
   and after, and the run directory it writes,
3. the adapter registry entry (version, status, metrics, digests) and promoting it,
4. ``export_wrapper()``: a self-contained folder loadable with plain
   ``transformers`` + ``peft``, whose embeddings equal the runtime's with the
   same adapter.

The base model is a tiny random checkpoint, so the loss falls but the model
learns little. Offline, about 20 s on a laptop CPU::

    python examples/03_fine_tune_bundle.py [--workdir DIR] [--steps N]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

DATA_DIR = Path(__file__).resolve().parent / "data"


def run(workdir: Path, *, steps: int) -> None:
    import numpy as np

    from mongars_llm import DatasetError, Settings
    from mongars_llm.export import export_wrapper
    from mongars_llm.registry import AdapterRegistry
    from mongars_llm.runtime import UnifiedLLMRuntime
    from mongars_llm.testing import build_tiny_model
    from mongars_llm.training import build_bundle

    # A wider weight init than the default makes the tiny model's loss move visibly.
    base_model = build_tiny_model(workdir / "tiny-chat", hidden_size=64, initializer_range=0.2)
    registry_path = workdir / "models" / "encoders"
    common: dict[str, Any] = {
        "base_model": str(base_model),
        "output_dir": workdir / "runs",
        "registry_path": registry_path,
        "progress": False,  # no progress bars in this script's output
    }

    # 1. Dataset hygiene only (`mongars-llm bundle build --dry-run`): nothing is trained.
    for name in ("product_qa.jsonl", "product_chat.jsonl"):
        dry = build_bundle(
            dataset_path=DATA_DIR / name,
            run_name=f"check-{name}",
            dry_run=True,
            max_seq_len=512,  # the longest chat record is about 300 tokens
            **common,
        )
        summary = dry.dataset_summary
        tokens = summary.tokens or {}
        completion = tokens.get("completion")
        print(
            f"dry run {name}: format={summary.format} rows={summary.rows_valid} "
            f"invalid={summary.rows_invalid} duplicate_ratio={summary.duplicate_ratio:.2f} "
            f"trainable_tokens={summary.trainable_tokens}"
        )
        if completion is not None:
            print(
                f"  completion tokens: min={completion.min} p50={completion.p50} "
                f"p95={completion.p95} max={completion.max}"
            )
        print(f"  summary written to {dry.run_dir / 'dataset_summary.json'}")

    bad = workdir / "bad.jsonl"
    bad.write_text(
        '{"prompt": "Hi", "completion": " Hello!"}\n'
        '{"prompt": "Hi", "answer": "oops"}\n'  # wrong key
        "not json at all\n"
        '{"prompt": "", "completion": ""}\n',  # empty
        encoding="utf-8",
    )
    try:
        build_bundle(
            dataset_path=bad, run_name="check-bad", dry_run=True, max_seq_len=256, **common
        )
    except DatasetError as err:
        print(f"bad dataset rejected: {str(err).splitlines()[0]}")
        for problem in err.problems:
            print(f"  {problem}")

    # 2. A short LoRA run. Loss is taken on completion tokens only; 10% of the rows
    #    are held out for eval (eval_fraction), evaluated before and after training.
    result = build_bundle(
        dataset_path=DATA_DIR / "product_qa.jsonl",
        run_name="product-qa",
        max_steps=steps,
        max_seq_len=256,
        batch_size=4,
        learning_rate=1e-2,
        seed=0,
        **common,
    )
    metrics = result.metrics
    print(f"trained {metrics['steps']} steps in {metrics['train_seconds']:.1f}s")
    print(
        f"eval loss: {metrics['eval_loss_initial']:.3f} -> {metrics['eval_loss']:.3f} "
        f"(perplexity {metrics['eval_perplexity']:.1f})"
    )
    print(f"trainable parameters: {metrics['trainable_params']} of {metrics['total_params']}")
    print(f"run directory {result.run_dir}: {sorted(p.name for p in result.run_dir.iterdir())}")
    metadata = json.loads((result.run_dir / "run_metadata.json").read_text(encoding="utf-8"))
    print(f"run_metadata.json: base_model={metadata['base_model']} seed={metadata['seed']}")

    # 3. The registry: build_bundle registered the adapter as a "candidate".
    registry = AdapterRegistry(registry_path)
    entry = registry.latest()
    assert entry is not None
    print(
        f"registry entry: version={entry.version} name={entry.name} status={entry.status} "
        f"metrics={json.dumps(entry.metrics)}"
    )
    print(f"  adapter files verified by sha256: {sorted(entry.sha256)}")
    registry.verify(entry)
    promoted = registry.promote(entry.version)
    print(f"promoted: version={promoted.version} status={promoted.status}")

    # 4. Export the wrapper somewhere else (build_bundle already wrote <run>/wrapper).
    wrapper_dir = export_wrapper(result.run_dir, output_dir=workdir / "shipped-wrapper")
    print(f"wrapper exported to {wrapper_dir}: {sorted(p.name for p in wrapper_dir.iterdir())}")

    # The wrapper needs no mongars_llm: import its loader module like any file.
    spec = importlib.util.spec_from_file_location(
        "mongars_wrapper", wrapper_dir / "mongars_wrapper.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    wrapper = module.Wrapper.load(wrapper_dir, device="cpu")
    texts = ["What is mongars-llm?", "How do I fine-tune a model?"]
    tuned_reply = wrapper.generate("Question: What is LoRA?\nAnswer:", max_new_tokens=8)
    print(f"wrapper generate: {tuned_reply!r}")
    instruction = "Represent the question for retrieval: "
    wrapper_vectors = wrapper.embed(texts, instruction=instruction)

    # The runtime with the registered adapter gives the same vectors.
    settings = Settings(cache_dir=workdir / "cache")
    with UnifiedLLMRuntime.from_pretrained(base_model, settings=settings, dtype="float32") as rt:
        rt.load_adapter("product-qa", registry.adapter_path(promoted))
        runtime_vectors = rt.embed(texts, instruction=instruction, adapter="product-qa")
        base_vectors = rt.embed(texts, instruction=instruction, adapter=[])
    difference = float(np.abs(wrapper_vectors - runtime_vectors).max())
    print(f"wrapper vs runtime embeddings: max |difference| = {difference:.2e}")
    changed = float(np.abs(base_vectors - runtime_vectors).max())
    print(f"the adapter changes the embeddings: max |difference| vs base = {changed:.2e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir",
        type=Path,
        default=os.environ.get("MONGARS_EXAMPLES_DIR"),
        help="keep the files here instead of a temporary folder",
    )
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps (default 40)")
    args = parser.parse_args(argv)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        run(args.workdir.resolve(), steps=args.steps)
    else:
        with tempfile.TemporaryDirectory(prefix="mongars-example-") as tmp:
            run(Path(tmp), steps=args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
