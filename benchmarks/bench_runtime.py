"""Benchmarks of UnifiedLLMRuntime against the set-ups users would otherwise glue together.

Run: ``python benchmarks/bench_runtime.py`` (or ``nox -s bench``); ``--quick`` for a
smaller run. Every ratio compares numbers measured in this same run, on a
~50M-parameter Llama built locally (random weights, real tokenizer):

* peak RSS after ``generate`` + ``embed`` (each set-up in a fresh subprocess):
  the runtime vs the causal LM alone (target <= 1.15x) vs the two-model set-up
  (``AutoModelForCausalLM`` + a separate ``AutoModel`` encoder, as llm2vec users do);
* embedding throughput on 1,000 mixed-length texts vs a plain transformers loop
  (batches of 32 in input order, mean pooling) at the same precision;
* 16 concurrent ``aembed`` callers vs the same calls one by one;
* 8 concurrent ``agenerate`` callers vs the same calls one by one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def build_model(path: Path) -> Path:
    from mongars_llm.testing import build_tiny_model

    if (path / "config.json").exists():
        return path
    return build_tiny_model(
        path,
        hidden_size=768,
        num_layers=8,
        num_heads=12,
        num_kv_heads=4,
        intermediate_size=2048,
        max_position_embeddings=1024,
        seed=0,
    )


def make_texts(n: int, seed: int = 0, max_words: int = 64) -> list[str]:
    from mongars_llm.testing import TINY_CORPUS

    words = " ".join(TINY_CORPUS).split()
    rng = random.Random(seed)
    return [" ".join(rng.choices(words, k=rng.randint(4, max_words))) for _ in range(n)]


# --------------------------------------------------------------------- memory
def _peak_rss_mb() -> float:
    """Peak RSS of this process (VmHWM; ru_maxrss would carry the parent's over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child_memory(kind: str, model_dir: str) -> None:
    """Runs in a fresh process: load one set-up, generate + embed, print peak RSS."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    texts = make_texts(8, seed=1)
    if kind == "baseline":
        pass
    elif kind == "runtime":
        from mongars_llm.runtime import UnifiedLLMRuntime
        from mongars_llm.settings import Settings

        rt = UnifiedLLMRuntime.from_pretrained(
            model_dir, settings=Settings(model={"quantize_4bit": False}, _env_file=None)
        )
        rt.generate("The quick brown fox", temperature=0, max_new_tokens=16)
        rt.embed(texts)
    else:
        tok = AutoTokenizer.from_pretrained(model_dir)
        lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        with torch.inference_mode():
            ids = tok("The quick brown fox", return_tensors="pt")
            lm.generate(**ids, max_new_tokens=16, do_sample=False)
            batch = tok(texts, padding=True, return_tensors="pt")
            if kind == "two_models":  # a second copy as the encoder, as llm2vec users do
                encoder = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
                encoder(**batch)
            else:  # the causal LM alone, its own decoder used for the same forward pass
                lm.model(**batch)
    print(json.dumps({"peak_rss_mb": _peak_rss_mb()}))


def measure_memory(model_dir: Path) -> dict[str, float]:
    out = {}
    for kind in ("baseline", "causal_lm", "runtime", "two_models"):
        proc = subprocess.run(
            [sys.executable, str(HERE), "--child", kind, "--model", str(model_dir)],
            capture_output=True,
            text=True,
            check=True,
        )
        out[kind] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    return out


# ----------------------------------------------------------------- throughput
def plain_loop(model_dir: Path, texts: list[str], batch_size: int = 32) -> tuple[float, object]:
    """What a user writes with plain transformers: fixed batches, mean pooling."""
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the unused lm_head of the checkpoint is expected
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    started = time.perf_counter()
    vectors = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tok(texts[start : start + batch_size], padding=True, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
            vectors.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return time.perf_counter() - started, np.vstack(vectors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 texts instead of 1,000")
    parser.add_argument("--model", type=Path, help="reuse/build the bench model here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_memory(args.child, str(args.model))
        return

    import numpy as np
    import torch

    from mongars_llm.runtime import UnifiedLLMRuntime, cpu_supports_bf16
    from mongars_llm.settings import Settings

    workdir = Path(tempfile.mkdtemp(prefix="mongars-bench-"))
    model_dir = build_model(args.model or workdir / "model")
    n_texts = 200 if args.quick else 1000
    print(
        f"# bench_runtime: torch {torch.__version__}, {os.cpu_count()} CPU(s), "
        f"native bf16: {cpu_supports_bf16()}, quick={args.quick}"
    )

    memory = measure_memory(model_dir)
    base = memory["baseline"]
    print("\n## peak RSS after generate + embed (fresh process each)")
    for kind, mb in memory.items():
        print(f"{kind:>12}: {mb:8.1f} MB  (model part {mb - base:7.1f} MB)")
    print(
        f"runtime / causal LM alone : {memory['runtime'] / memory['causal_lm']:.3f}x "
        f"(model part {(memory['runtime'] - base) / (memory['causal_lm'] - base):.3f}x)"
    )
    print(
        f"runtime / two-model set-up: {memory['runtime'] / memory['two_models']:.3f}x "
        f"(model part {(memory['runtime'] - base) / (memory['two_models'] - base):.3f}x)"
    )

    settings = Settings(model={"quantize_4bit": False}, _env_file=None)  # type: ignore[call-arg]
    rt = UnifiedLLMRuntime.from_pretrained(model_dir, settings=settings)
    params = sum(p.numel() for p in rt.model.parameters())
    print(f"\nmodel: {params / 1e6:.1f}M parameters, runtime dtype {rt.dtype}")
    texts = make_texts(n_texts)
    rt.embed(texts[:8])  # warm-up
    started = time.perf_counter()
    ours = rt.embed(texts)
    t_rt = time.perf_counter() - started
    t_plain, theirs = plain_loop(model_dir, texts)
    cos = (ours * theirs).sum(1)
    print(f"\n## embedding throughput, {n_texts} mixed-length texts, fp32")
    print(f"runtime.embed : {n_texts / t_rt:8.1f} texts/s ({t_rt:.1f} s)")
    print(f"plain loop    : {n_texts / t_plain:8.1f} texts/s ({t_plain:.1f} s)")
    print(f"ratio         : {t_plain / t_rt:.2f}x")
    print(f"(min cosine vs the plain loop {cos.min():.4f}: LLM2Vec mean pooling leaves BOS out)")

    async def concurrency() -> tuple[float, float, float, float]:
        # one short query per caller, as a server sees them
        calls = [" ".join(t.split()[:12]) for t in texts[:16]]
        started = time.perf_counter()
        for c in calls:
            await rt.aembed(c)
        seq = time.perf_counter() - started
        started = time.perf_counter()
        await asyncio.gather(*(rt.aembed(c) for c in calls))
        conc = time.perf_counter() - started
        prompts = [[{"role": "user", "content": t[:80]}] for t in texts[:8]]
        started = time.perf_counter()
        for p in prompts:
            await rt.agenerate(p, temperature=0, max_new_tokens=24)
        gseq = time.perf_counter() - started
        started = time.perf_counter()
        await asyncio.gather(*(rt.agenerate(p, temperature=0, max_new_tokens=24) for p in prompts))
        gconc = time.perf_counter() - started
        return seq, conc, gseq, gconc

    seq, conc, gseq, gconc = asyncio.run(concurrency())
    print("\n## concurrency (micro-batching)")
    print(f"16 aembed  : sequential {seq:.2f} s, concurrent {conc:.2f} s -> {seq / conc:.2f}x")
    print(f" 8 agenerate: sequential {gseq:.2f} s, concurrent {gconc:.2f} s -> {gseq / gconc:.2f}x")
    print(f"\nbatches: {rt.stats()}")
    assert np.isfinite(ours).all()
    rt.close()


if __name__ == "__main__":
    main()
