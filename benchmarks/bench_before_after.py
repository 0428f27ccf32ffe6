"""The runtime of two source trees on the same workloads: is a change any slower?

Run::

    git worktree add ../before <commit>        # the tree to compare against
    python benchmarks/bench_before_after.py --before ../before/src

Each side runs in fresh processes (``PYTHONPATH`` = that tree's ``src``), in
ABBA order repeated ``--rounds`` times so that both see the same load on a
shared machine, on one ~51M-parameter Llama built locally (random weights,
real tokenizer; the same model as ``bench_runtime.py``), fp32, one torch
thread. Workloads: ``embed`` of 200 mixed-length texts, 16 concurrent
``aembed`` callers of 8 texts, ``generate`` of 32 greedy tokens for 4 prompts
one by one, and ``generate_batch`` of 8 prompts. It prints the median seconds
of each side and the ratio after/before (below 1.00 is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_runtime import MODEL_CONFIG, make_texts  # noqa: E402

CHILD = r"""
import asyncio, json, sys, time
sys.path.insert(0, sys.argv[2])
from bench_runtime import make_texts
from mongars_llm.runtime import UnifiedLLMRuntime
from mongars_llm.settings import Settings

settings = Settings(model={"quantize_4bit": False, "cpu_threads": 1}, _env_file=None)
rt = UnifiedLLMRuntime.from_pretrained(sys.argv[1], settings=settings, dtype="float32")
texts = make_texts(200)
prompts = [[{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}] for i in range(8)]
rt.embed(texts[:8]); rt.generate(prompts[0], max_new_tokens=4, temperature=0)  # warm-up
out = {}
t = time.perf_counter(); rt.embed(texts); out["embed_200"] = time.perf_counter() - t

async def callers():
    await asyncio.gather(*(rt.aembed(texts[i * 8:(i + 1) * 8]) for i in range(16)))
t = time.perf_counter(); asyncio.run(callers()); out["aembed_16x8"] = time.perf_counter() - t
t = time.perf_counter()
for p in prompts[:4]:
    rt.generate(p, max_new_tokens=32, temperature=0)
out["generate_4x32"] = time.perf_counter() - t
t = time.perf_counter()
rt.generate_batch(prompts, max_new_tokens=32, temperature=0)
out["generate_batch_8x32"] = time.perf_counter() - t
rt.close()
print(json.dumps(out))
"""


def build_model(path: Path) -> Path:
    if not (path / "config.json").is_file():
        from mongars_llm.testing import build_tiny_model

        build_tiny_model(path, **MODEL_CONFIG)  # type: ignore[arg-type]
    return path


def run_side(src: Path, model: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(model), str(HERE)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{src}: the workload failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="src folder of the old tree")
    parser.add_argument("--after", type=Path, default=HERE.parent / "src", help="src folder")
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds (4 runs each)")
    parser.add_argument("--model", type=Path, help="reuse/build the bench model here")
    args = parser.parse_args()
    make_texts(1)  # the texts import cleanly before anything is timed
    model = build_model(args.model or Path(tempfile.mkdtemp(prefix="mongars-ab-")) / "model")
    sides = {"before": args.before.resolve(), "after": args.after.resolve()}
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for _ in range(args.rounds):
        for side in ("before", "after", "after", "before"):
            runs[side].append(run_side(sides[side], model))
    print(f"# bench_before_after: {args.rounds} ABBA rounds, medians of {2 * args.rounds} runs")
    print(f"# before = {sides['before']}\n# after  = {sides['after']}")
    print(f"{'workload':<22}{'before s':>10}{'after s':>10}{'after/before':>14}")
    for key in runs["before"][0]:
        before = statistics.median(r[key] for r in runs["before"])
        after = statistics.median(r[key] for r in runs["after"])
        print(f"{key:<22}{before:>10.3f}{after:>10.3f}{after / before:>13.2f}x")


if __name__ == "__main__":
    main()
