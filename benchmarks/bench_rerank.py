"""Retrieve then rerank on SmolLM2-135M: held-out MRR@10, rerank latency, resident memory.

The data is the made-up product catalogue of ``_retrieval_data.py`` (paraphrased
queries, look-alike sibling passages, held-out brands never trained on). Three
configurations, each ranked by embedding alone and by embedding top ``--top-k``
(20) reranked with ``rt.rerank`` (the model's yes/no answer, one copy of the
weights):

* (a) base: the base weights embed and rerank;
* (b) contrastive: a ``build_bundle(objective="contrastive")`` embed adapter
  (``--embed-steps``, or ``--embed-adapter DIR`` to reuse one) retrieves, the base
  weights rerank;
* (c) contrastive + rerank: the same retrieval, reranked by a
  ``build_bundle(objective="rerank")`` adapter trained ``--steps`` (<= 100) on the
  same training rows.

Then, in the same process (after the training runs: the resident memory of chat alone
includes what training left allocated, so the ratio is a bound, not an exact figure): the latency of one query x 20 documents through
``rt.rerank`` against embedding the same 20 documents, documents/s at batch 32
(rerank vs embed), and the resident memory (VmRSS) with chat alone vs with the
embed and rerank adapters loaded and used.

Quick check (a few minutes on a shared CPU)::

    nice -n 10 python benchmarks/bench_rerank.py --quick

``--quick`` is ``--steps 4 --embed-steps 4 --queries 8 --top-k 10 --rerank-batch 2``;
the figures of a quick run say that everything runs, not how good it gets.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _retrieval_data
from bench_generation import real_model_dir  # SmolLM2, provisioned as the `smol` profile

KEYS = ("mrr@10", "recall@1", "ndcg@10")
CHAT = [{"role": "user", "content": "Name three things to pack for a weekend hike."}]


def rss_mib() -> float:
    """This process's resident memory (VmRSS), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def train(objective: str, model: Path, data: Path, work: Path, **knobs: Any) -> Path:
    from mongars_llm.training import build_bundle

    started = time.perf_counter()
    result = build_bundle(
        objective=objective,
        dataset_path=data,
        base_model=str(model),
        output_dir=work / "runs",
        registry_path=work / "registry",
        run_name=f"bench-{objective}-{int(time.time())}",
        precision="fp32",
        device="cpu",
        progress=False,
        eval_fraction=0.0,
        **knobs,
    )
    seconds = time.perf_counter() - started
    losses = [round(h["loss"], 3) for h in result.history]
    print(f"{objective}: {len(losses)} steps in {seconds:.0f} s, loss {losses}", file=sys.stderr)
    assert result.adapter_dir is not None
    return result.adapter_dir


def pipelines(rt: Any, rows: list[dict], args: argparse.Namespace) -> dict[str, Any]:
    """The three configurations' metrics, embedding alone and reranked."""
    from mongars_llm.training import Retrieved, ranking_metrics, rerank_metrics, retrieve

    def embed_with(adapter: list[str] | None) -> Any:
        def embed(texts: list) -> Any:
            return rt.embed(texts, adapter=adapter, instruction="", batch_size=32)

        return embed

    def rerank_with(adapter: list[str]) -> Any:
        def rerank(query: str, documents: list[str], instruction: str | None) -> list[float]:
            scores = [0.0] * len(documents)
            found = rt.rerank(
                query, documents, instruction=instruction, adapter=adapter, batch_size=32
            )
            for result in found:
                scores[result.index] = result.score
            return scores

        return rerank

    def first(found: Retrieved) -> Retrieved:  # every held-out document, fewer queries
        n = args.queries or len(found.queries)
        return Retrieved(found.queries[:n], found.documents, found.relevant[:n], found.scores[:n])

    base = first(retrieve(embed_with([]), rows, batch_size=32))
    tuned = first(retrieve(embed_with(["embed"]), rows, batch_size=32))
    out: dict[str, Any] = {}
    plan = (
        ("(a) base", base, []),
        ("(b) contrastive", tuned, []),
        ("(c) contrastive + rerank", tuned, ["rerank"]),
    )
    for label, found, reranker in plan:
        started = time.perf_counter()
        reranked = rerank_metrics(found, rerank_with(reranker), top_k=args.top_k)
        out[label] = {
            "embed": {
                k: round(v, 4) for k, v in ranking_metrics(found.scores, found.relevant).items()
            },
            "rerank": {k: round(reranked[k], 4) for k in (*KEYS, "recall@10")},
            "seconds": round(time.perf_counter() - started, 1),
        }
        print(f"{label}: {out[label]}", file=sys.stderr)
    return out


def latency(rt: Any, rows: list[dict], repeats: int) -> dict[str, Any]:
    """One query x 20 documents (rerank vs embed), and documents/s at batch 32."""
    documents = list(dict.fromkeys(r["positive"] for r in rows))
    twenty, thirty_two = documents[:20], documents[:32]
    query = rows[0]["query"]

    def timed(call: Any) -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            call()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    rt.rerank(query, twenty[:2], adapter=["rerank"])  # warm-up
    return {
        "rerank_1x20_s": round(timed(lambda: rt.rerank(query, twenty, adapter=["rerank"])), 3),
        "embed_20_s": round(timed(lambda: rt.embed(twenty, adapter=["embed"])), 3),
        "rerank_docs_per_s_b32": round(
            len(thirty_two)
            / timed(lambda: rt.rerank(query, thirty_two, adapter=["rerank"], batch_size=32)),
            2,
        ),
        "embed_docs_per_s_b32": round(
            len(thirty_two) / timed(lambda: rt.embed(thirty_two, adapter=["embed"], batch_size=32)),
            2,
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a transformers folder (default: SmolLM2)")
    parser.add_argument("--models-dir", type=Path, help="where SmolLM2 is converted")
    parser.add_argument("--work-dir", type=Path, help="data, runs and adapters (a temp dir)")
    parser.add_argument("--steps", type=int, default=100, help="rerank training steps (100)")
    parser.add_argument("--embed-steps", type=int, default=100, help="contrastive steps (100)")
    parser.add_argument("--embed-adapter", type=Path, help="reuse this contrastive adapter")
    parser.add_argument("--queries", type=int, help="held-out queries ranked (default: all)")
    parser.add_argument("--top-k", type=int, default=20, help="documents reranked per query")
    parser.add_argument("--rerank-batch", type=int, default=8, help="rerank training batch")
    parser.add_argument("--rerank-negatives", type=int, default=3)
    parser.add_argument("--rerank-loss", choices=("listwise", "bce"), default="listwise")
    parser.add_argument("--learning-rate", type=float, default=3e-4, help="rerank lr")
    parser.add_argument("--repeats", type=int, default=3, help="latency repeats (median)")
    parser.add_argument("--threads", type=int, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a smoke run (see the docstring)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.embed_steps, args.queries, args.top_k = 4, 4, 8, 10
        args.rerank_batch, args.repeats = 2, 1
    if args.steps > 100:
        parser.error("--steps: the issue's (c) trains at most 100 steps")

    import torch

    from mongars_llm import UnifiedLLMRuntime

    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model or real_model_dir(args.models_dir)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-rerank-"))
    train_path, heldout_path = _retrieval_data.write(work / "data", seed=args.seed)
    heldout = [json.loads(line) for line in heldout_path.read_text().splitlines()]
    report: dict[str, Any] = {
        "model": str(model),
        "steps": args.steps,
        "embed_steps": 0 if args.embed_adapter else args.embed_steps,
        "rerank_loss": args.rerank_loss,
        "top_k": args.top_k,
        "threads": torch.get_num_threads(),
    }
    embed_adapter = args.embed_adapter or train(
        "contrastive", model, train_path, work, max_steps=args.embed_steps, seed=args.seed
    )
    rerank_adapter = train(
        "rerank",
        model,
        train_path,
        work,
        max_steps=args.steps,
        batch_size=args.rerank_batch,
        rerank_negatives=args.rerank_negatives,
        rerank_loss=args.rerank_loss,
        learning_rate=args.learning_rate,
        max_seq_len=256,
        seed=args.seed,
    )

    rt = UnifiedLLMRuntime.from_pretrained(model, device="cpu", dtype=torch.float32)
    rt.generate(CHAT, max_new_tokens=8, temperature=0)
    chat_alone = rss_mib()
    chat_before = rt.generate(CHAT, max_new_tokens=16, temperature=0).text
    rt.load_adapter("embed", embed_adapter, use="embed")
    rt.load_adapter("rerank", rerank_adapter, use="rerank")
    report["mrr"] = pipelines(rt, heldout, args)
    report["queries"] = args.queries or len(heldout)
    report["latency"] = latency(rt, heldout, args.repeats)
    everything = rss_mib()
    report["memory"] = {
        "chat_alone_mib": round(chat_alone, 1),
        "chat_embed_rerank_mib": round(everything, 1),
        "ratio": round(everything / chat_alone, 3),
        "chat_unchanged": rt.generate(CHAT, max_new_tokens=16, temperature=0).text == chat_before,
    }
    rt.close()
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"SmolLM2-135M, {report['queries']} held-out queries, embed top {args.top_k} reranked; "
        f"rerank adapter {args.steps} steps ({args.rerank_loss}), embed adapter "
        + (f"{report['embed_steps']} steps" if report["embed_steps"] else "reused")
    )
    print(
        f"{'configuration':28} {'embed MRR@10':>13} {'+rerank MRR@10':>15} {'R@1':>6} {'nDCG@10':>8}"
    )
    for label, row in report["mrr"].items():
        print(
            f"{label:28} {row['embed']['mrr@10']:>13.4f} {row['rerank']['mrr@10']:>15.4f} "
            f"{row['rerank']['recall@1']:>6.3f} {row['rerank']['ndcg@10']:>8.4f}"
        )
    lat = report["latency"]
    print(
        f"latency 1 query x 20 docs: rerank {lat['rerank_1x20_s']:.3f} s, embed the 20 docs "
        f"{lat['embed_20_s']:.3f} s; docs/s at batch 32: rerank "
        f"{lat['rerank_docs_per_s_b32']}, embed {lat['embed_docs_per_s_b32']}"
    )
    mem = report["memory"]
    print(
        f"resident memory: chat alone {mem['chat_alone_mib']} MiB, chat + embed + rerank "
        f"adapters {mem['chat_embed_rerank_mib']} MiB ({mem['ratio']}x); chat unchanged: "
        f"{mem['chat_unchanged']}"
    )


if __name__ == "__main__":
    main()
