"""Multi-process training overhead: 2 processes x 1 thread vs 1 process x 2 threads.

(1 process x 1 thread is run too: on a shared 2-core machine two intra-op threads
can be far slower than one, which the 2x1 / 1x2 ratio alone would hide.)

Both sides run ``build_bundle`` on the same data, LoRA config, seed and *global*
batch (one process: ``batch_size=B``; two processes: ``B/2`` each), on CPU with
gloo over 127.0.0.1. tokens/s is the bundle's own metric: non-padding tokens
over the optimizer loop's time (model loading and process start excluded). On a
2-core machine the ratio measures the overhead of running under DDP, not a
speed-up (both sides use the same two cores).

The communication cost per step is measured apart: two gloo processes
all-reduce a float32 tensor as large as the adapter's trainable parameters
(DDP's gradient sync) plus the two scalar all-reduces the loop adds per step
(label tokens, loss), ``--comm-iters`` times; the median is reported.

    python benchmarks/bench_distributed.py                # defaults below
    python benchmarks/bench_distributed.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "product_qa.jsonl"


def _train(base: Path, out: Path, args: argparse.Namespace, processes: int, threads: int) -> dict:
    """One ``build_bundle`` in a fresh interpreter (its own thread settings)."""
    script = f"""
import json, torch
from mongars_llm.training import build_bundle
torch.set_num_threads({threads})
result = build_bundle(
    dataset_path={str(DATA)!r}, base_model={str(base)!r}, output_dir={str(out)!r},
    registry_path={str(out / "registry")!r}, run_name="p{processes}t{threads}",
    batch_size={args.batch_size // processes}, num_processes={processes},
    max_steps={args.steps}, lora_r=16, lora_alpha=32, lora_dropout=0.0,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], eval_fraction=0.0,
    max_seq_len=512, progress=False, register_adapter=False, seed=0,
)
m = result.metrics
print(json.dumps({{k: m[k] for k in ("tokens_per_second", "train_seconds", "tokens_seen",
    "steps", "world_size", "global_batch_size", "train_loss")}}))
"""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    report: dict = json.loads(done.stdout.strip().splitlines()[-1])
    report["wall_seconds"] = round(time.perf_counter() - started, 2)
    report["seconds_per_step"] = round(report["train_seconds"] / report["steps"], 4)
    return report


def _comm_worker(rank: int, port: int, numel: int, iters: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    grads = torch.randn(numel)
    scalar = torch.zeros(1, dtype=torch.float64)
    times = []
    for i in range(iters + 10):
        t0 = time.perf_counter()
        dist.all_reduce(scalar)  # label tokens
        dist.all_reduce(grads)  # DDP's gradient sync (one bucket at LoRA sizes)
        dist.all_reduce(scalar)  # loss for the log
        if i >= 10:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def _comm(numel: int, iters: int) -> dict:
    import torch.multiprocessing as mp

    from mongars_llm.training._distributed import _free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "times.json")
        mp.spawn(_comm_worker, args=(_free_port(), numel, iters, out), nprocs=2, join=True)
        times = json.loads(Path(out).read_text())
    return {
        "trainable_params": numel,
        "bytes_per_step": numel * 4 + 16,
        "median_ms": round(statistics.median(times) * 1000, 3),
        "p95_ms": round(sorted(times)[int(0.95 * (len(times) - 1))] * 1000, 3),
    }


def _trainable_params(base: Path) -> int:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base))
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    trainable, _ = get_peft_model(model, lora).get_nb_trainable_parameters()
    return int(trainable)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch (even)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--comm-iters", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from mongars_llm.testing import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base = build_tiny_model(
            tmp / "base", hidden_size=args.hidden, num_layers=args.layers, num_heads=4
        )
        runs: dict[str, list[dict]] = {"1x2": [], "2x1": [], "1x1": []}
        for repeat in range(args.repeats):  # alternate the sides: the machine is shared
            runs["1x2"].append(_train(base, tmp / f"a{repeat}", args, processes=1, threads=2))
            runs["2x1"].append(_train(base, tmp / f"b{repeat}", args, processes=2, threads=1))
            runs["1x1"].append(_train(base, tmp / f"c{repeat}", args, processes=1, threads=1))
        best = {k: max(v, key=lambda r: r["tokens_per_second"]) for k, v in runs.items()}
        comm = _comm(_trainable_params(base), args.comm_iters)
    ratio = best["2x1"]["tokens_per_second"] / best["1x2"]["tokens_per_second"]
    report = {
        "model": {"hidden": args.hidden, "layers": args.layers},
        "global_batch": args.batch_size,
        "steps": args.steps,
        "one_process_two_threads": best["1x2"],
        "two_processes_one_thread": best["2x1"],
        "one_process_one_thread": best["1x1"],
        "tokens_per_second_ratio_2x1_over_1x2": round(ratio, 3),
        "tokens_per_second_ratio_2x1_over_1x1": round(
            best["2x1"]["tokens_per_second"] / best["1x1"]["tokens_per_second"], 3
        ),
        "communication_per_step": comm,
        "communication_share_of_2x1_step": round(
            comm["median_ms"] / 1000 / best["2x1"]["seconds_per_step"], 4
        ),
        "cpu_count": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        a, b = best["1x2"], best["2x1"]
        print(
            f"1 process x 2 threads : {a['tokens_per_second']:>9.1f} tokens/s "
            f"({a['seconds_per_step'] * 1000:.1f} ms/step, wall {a['wall_seconds']} s)"
        )
        print(
            f"2 processes x 1 thread: {b['tokens_per_second']:>9.1f} tokens/s "
            f"({b['seconds_per_step'] * 1000:.1f} ms/step, wall {b['wall_seconds']} s)"
        )
        c = best["1x1"]
        print(
            f"1 process x 1 thread  : {c['tokens_per_second']:>9.1f} tokens/s "
            f"({c['seconds_per_step'] * 1000:.1f} ms/step, wall {c['wall_seconds']} s)"
        )
        print(f"ratio 2x1 / 1x2       : {ratio:.3f}")
        print(
            f"communication per step: {comm['median_ms']} ms median, {comm['p95_ms']} ms p95 "
            f"({comm['bytes_per_step']} bytes; "
            f"{report['communication_share_of_2x1_step']:.1%} of a 2x1 step)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
