"""Benchmarks of UnifiedLLMRuntime against the set-ups users would otherwise glue together.

Run: ``python benchmarks/bench_runtime.py`` (or ``nox -s bench``); ``--quick`` for a
smaller run. Every ratio compares numbers measured in this same run, on a
~50M-parameter Llama built locally (random weights, real tokenizer):

* peak RSS after ``generate`` + ``embed`` (each set-up in a fresh subprocess):
  the runtime vs the causal LM alone (target <= 1.15x) vs the two-model set-up
  (``AutoModelForCausalLM`` + a separate ``AutoModel`` encoder, as llm2vec users do);
* embedding throughput on 1,000 mixed-length texts vs a plain transformers loop
  (batches of 32 in input order, mean pooling) at the same precision;
* the same texts vs llm2vec's own ``LLM2Vec.encode`` (llm2vec 0.2.3, fp32, mean
  pooling, causal, batches of 32) at the same torch threads (this process's,
  ``--threads``), run in its own venv since it pins
  transformers 4.44: create it with ``nox -s parity`` (``.nox/_llm2vec``) or point
  ``MONGARS_BENCH_LLM2VEC_VENV`` at a venv with ``llm2vec==0.2.3``. When it exists
  the bench model is written by that venv's transformers 4.44 (a transformers 5
  checkpoint does not load in 4.44; a 4.44 one loads in both), so every section
  runs on the one checkpoint. Each side embeds the whole list in one call, in
  ABBA order, so that both see the same load on a shared machine (this adds
  ~4.5 min on 2 cores; ``--llm2vec-texts N`` shortens it). Without the venv the
  comparison is skipped, with a line saying how to enable it;
* the runtime's default CPU dtype (bf16 only with AVX512-BF16/AMX) vs float32 vs
  bfloat16 forced, on 200 texts: throughput and min cosine vs float32;
* 16 concurrent ``aembed`` callers vs the same calls one by one, with packed
  batches (the default) and with padded ones (``embed_pack_tokens=0``);
* 8 concurrent ``agenerate`` callers vs the same calls one by one;
* threads: ``embed`` and decode (``generate``) with torch's default threads vs
  one thread, each in a fresh process (torch's thread count is process-wide, and
  a worker thread takes it when it starts), in ABBA order. The runtime leaves
  torch's threads alone unless ``settings.model.cpu_threads`` is set, so the
  default row is what a caller gets;
* the server (``mongars-llm serve --embeddings-only``, ``bench_server.py``'s set-up)
  with torch's default threads vs one thread, its 32 HTTP clients beside it on the
  same cores, ABBA.

``--only SECTION`` runs one section (``memory``, ``throughput``, ``llm2vec``,
``precision``, ``concurrency``, ``threads``, ``server-threads``).
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
from typing import Any

HERE = Path(__file__).resolve()
LLM2VEC_VENV_ENV = "MONGARS_BENCH_LLM2VEC_VENV"
LLM2VEC_HELPER = HERE.parent / "_llm2vec_bench.py"

# ~51M parameters; passed to mongars_llm.testing.build_tiny_model.
MODEL_CONFIG = {
    "hidden_size": 768,
    "num_layers": 8,
    "num_heads": 12,
    "num_kv_heads": 4,
    "intermediate_size": 2048,
    "max_position_embeddings": 1024,
    "seed": 0,
}


def llm2vec_python() -> Path | None:
    """The llm2vec venv's interpreter (``nox -s parity`` creates it), or None."""
    venv = Path(os.environ.get(LLM2VEC_VENV_ENV) or HERE.parent.parent / ".nox" / "_llm2vec")
    python = venv / "bin" / "python"
    return python if python.exists() else None


def build_model(path: Path, l2v_python: Path | None = None) -> Path:
    """Build the bench model; with transformers 4.44 (llm2vec's venv) when given."""
    import mongars_llm.testing
    from mongars_llm.testing import build_tiny_model

    if (path / "config.json").exists():
        return path
    if l2v_python is not None:
        proc = subprocess.run(
            [
                str(l2v_python),
                str(LLM2VEC_HELPER),
                "build",
                str(mongars_llm.testing.__file__),
                str(path),
                json.dumps(MODEL_CONFIG),
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode == 0:
            return path
        print(f"# building the model with {l2v_python} failed:\n{proc.stderr[-2000:]}")
        print("# falling back to this venv's transformers (the llm2vec comparison will skip)")
    return build_tiny_model(path, **MODEL_CONFIG)  # type: ignore[arg-type]


def checkpoint_transformers(model_dir: Path) -> str:
    """The transformers version that wrote the checkpoint ('' if not recorded)."""
    config = json.loads((model_dir / "config.json").read_text())
    return str(config.get("transformers_version", ""))


def make_texts(n: int, seed: int = 0, max_words: int = 64) -> list[str]:
    from mongars_llm.testing import TINY_CORPUS

    words = " ".join(TINY_CORPUS).split()
    rng = random.Random(seed)
    return [" ".join(rng.choices(words, k=rng.randint(4, max_words))) for _ in range(n)]


# -------------------------------------------------------------------- llm2vec
def compare_llm2vec(
    rt: object, model_dir: Path, texts: list[str], l2v_python: Path | None, *, order: str = "ABBA"
) -> None:
    """``rt.embed`` vs ``LLM2Vec.encode`` on the same checkpoint, texts and precision.

    llm2vec runs in a worker process in its venv, loaded and warmed up once. Each
    pass embeds the whole list in one call, as users call either API (both sort by
    length inside the call); passes run in ``order`` (A = runtime, B = llm2vec),
    ABBA by default, so that a drift in the load from other jobs on a shared
    machine falls on both sides alike; the times of each side are summed.
    """
    import numpy as np
    import torch

    threads = torch.get_num_threads()
    print(
        f"\n## embedding throughput vs llm2vec, {len(texts)} mixed-length texts, fp32, "
        f"{threads} torch thread(s) on both sides"
    )
    if l2v_python is None:
        print(
            "skipped: no llm2vec venv (create it with `nox -s parity`, or set "
            f"{LLM2VEC_VENV_ENV} to a venv with llm2vec==0.2.3 and transformers==4.44.2)"
        )
        return
    written_by = checkpoint_transformers(model_dir)
    if not written_by.startswith("4."):
        print(
            f"skipped: {model_dir} was written by transformers {written_by or '?'}, which "
            "llm2vec's transformers 4.44 cannot load; build it afresh (a new --model path)"
        )
        return
    workdir = Path(tempfile.mkdtemp(prefix="mongars-bench-l2v-"))
    (workdir / "texts.json").write_text(json.dumps(texts))
    batch_size = rt.settings.model.max_batch_size  # type: ignore[attr-defined]
    worker = subprocess.Popen(
        [
            str(l2v_python),
            str(LLM2VEC_HELPER),
            "encode",
            str(model_dir),
            str(workdir / "texts.json"),
            str(workdir / "vectors.npy"),
            str(batch_size),
            str(rt.max_length),  # type: ignore[attr-defined]
            str(threads),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert worker.stdin is not None and worker.stdout is not None

    def reply() -> dict:
        line = worker.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"the llm2vec worker exited with {worker.wait()}")
        return json.loads(line)

    try:
        reply()  # loaded and warmed up
        ours, t_rt, t_l2v = None, [], []
        for side in order:
            if side == "A":
                started = time.perf_counter()
                ours = rt.embed(texts)  # type: ignore[attr-defined]
                t_rt.append(time.perf_counter() - started)
            else:
                worker.stdin.write(f"0 {len(texts)}\n")
                worker.stdin.flush()
                t_l2v.append(reply()["seconds"])
        worker.stdin.write("\n")
        worker.stdin.flush()
        meta = reply()
    finally:
        worker.stdin.close()
        worker.wait(timeout=60)
    n = len(texts)
    theirs = np.load(workdir / "vectors.npy")[:n]  # the first llm2vec pass
    theirs = theirs / np.linalg.norm(theirs, axis=1, keepdims=True)
    cos = (ours * theirs).sum(1)
    print(
        f"llm2vec {meta['llm2vec']} on transformers {meta['transformers']}, torch "
        f"{meta['torch']} ({meta['threads']} threads): {meta['model_class']}, "
        f"{meta['attn_implementation']}, {meta['dtype']}, batch size {batch_size}; "
        f"checkpoint written by transformers {written_by}"
    )
    for name, times in (("runtime.embed ", t_rt), ("LLM2Vec.encode", t_l2v)):
        passes = ", ".join(f"{t:.1f}" for t in times)
        print(
            f"{name} : {len(times) * n / sum(times):8.1f} texts/s "
            f"({sum(times) / len(times):.1f} s per pass; passes {passes} s)"
        )
    print(
        f"ratio          : {sum(t_l2v) / len(t_l2v) / (sum(t_rt) / len(t_rt)):.2f}x "
        f"({order}, {threads} thread(s) each)"
    )
    print(f"min cosine vs LLM2Vec.encode: {cos.min():.6f}")


# --------------------------------------------------------------------- memory
def compare_precision(model_dir: Path, texts: list[str]) -> None:
    """The runtime's default CPU dtype, float32 and bfloat16 on the same texts."""
    from mongars_llm.runtime import UnifiedLLMRuntime
    from mongars_llm.settings import Settings

    results = {}
    for dtype in ("auto", "float32", "bfloat16"):
        settings = Settings(model={"quantize_4bit": False, "dtype": dtype}, _env_file=None)  # type: ignore[call-arg]
        with UnifiedLLMRuntime.from_pretrained(model_dir, settings=settings) as runtime:
            runtime.embed(texts[:8])  # warm-up
            started = time.perf_counter()
            vectors = runtime.embed(texts)
            results[dtype] = (time.perf_counter() - started, vectors, str(runtime.dtype))
    base_s, base_vectors, _ = results["float32"]
    print(f"\n## precision, {len(texts)} texts (runtime.embed)")
    for dtype, (seconds, vectors, actual) in results.items():
        cos = (vectors * base_vectors).sum(1).min()
        print(
            f"{dtype:>8} ({actual.removeprefix('torch.')}): {len(texts) / seconds:6.1f} texts/s, "
            f"{base_s / seconds:.2f}x float32, min cosine vs float32 {cos:.6f}"
        )


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


# -------------------------------------------------------------------- threads
def child_threads(threads: str, model_dir: str, n_texts: int, new_tokens: int) -> None:
    """Runs in a fresh process: embed ``n_texts`` and decode ``new_tokens`` tokens with
    torch's default threads (``threads == "default"``) or ``torch.set_num_threads``."""
    import torch

    if threads != "default":
        torch.set_num_threads(int(threads))
    from mongars_llm.runtime import UnifiedLLMRuntime
    from mongars_llm.settings import Settings

    texts = make_texts(n_texts, seed=2)
    settings = Settings(model={"quantize_4bit": False, "dtype": "float32"}, _env_file=None)  # type: ignore[call-arg]
    with UnifiedLLMRuntime.from_pretrained(model_dir, settings=settings) as rt:
        prompt = "The quick brown fox jumps over the lazy dog"
        rt.embed(texts[:8])  # warm-up
        rt.generate(prompt, temperature=0, max_new_tokens=4)
        started = time.perf_counter()
        rt.embed(texts)
        embed_s = time.perf_counter() - started
        started = time.perf_counter()
        reply = rt.generate(prompt, temperature=0, max_new_tokens=new_tokens)
        decode_s = time.perf_counter() - started
    result = {
        "threads": torch.get_num_threads(),
        "embed_s": embed_s,
        "texts": n_texts,
        "decode_s": decode_s,
        "new_tokens": reply.usage.completion_tokens,
    }
    print(json.dumps(result))


def compare_threads(model_dir: Path, *, n_texts: int, new_tokens: int, rounds: int) -> None:
    """``embed`` and decode with torch's default threads vs one thread, ABBA, fresh processes."""
    from statistics import median

    def run(threads: str) -> dict[str, Any]:
        proc = subprocess.run(
            [
                sys.executable,
                str(HERE),
                "--child",
                f"threads:{threads}",
                "--model",
                str(model_dir),
                "--threads-texts",
                str(n_texts),
                "--threads-tokens",
                str(new_tokens),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        return dict(json.loads(proc.stdout.strip().splitlines()[-1]))

    results: dict[str, list[dict[str, Any]]] = {"default": [], "1": []}
    for _ in range(rounds):
        for threads in ("default", "1", "1", "default"):
            results[threads].append(run(threads))
    default_threads = results["default"][0]["threads"]
    print(
        f"\n## torch's default threads ({default_threads}) vs 1 thread, fresh process each, "
        f"{rounds}x ABBA, medians"
    )
    rows = {}
    for threads, runs in results.items():
        embed = median(r["texts"] / r["embed_s"] for r in runs)
        decode = median(r["new_tokens"] / r["decode_s"] for r in runs)
        rows[threads] = (embed, decode)
        embeds = ", ".join(f"{r['texts'] / r['embed_s']:.1f}" for r in runs)
        decodes = ", ".join(f"{r['new_tokens'] / r['decode_s']:.1f}" for r in runs)
        label = f"torch default ({default_threads})" if threads == "default" else "1 thread"
        print(
            f"{label:>18}: embed {embed:6.1f} texts/s ({embeds}); "
            f"decode {decode:6.1f} tok/s ({decodes})"
        )
    (e_default, d_default), (e_one, d_one) = rows["default"], rows["1"]
    print(
        f"1 thread / torch default: embed {e_one / e_default:.2f}x, decode {d_one / d_default:.2f}x "
        f"({n_texts} texts; {new_tokens} new tokens, greedy)"
    )


def compare_server_threads(*, clients: int, requests: int) -> None:
    """``mongars-llm serve --embeddings-only`` with torch's default threads vs one thread,
    its HTTP clients beside it on the same cores (``bench_server.py``'s server and
    clients, micro-batched), ABBA, a fresh server each run."""
    from statistics import mean

    import bench_server  # this folder's; its model, server start-up and clients

    from mongars_llm.testing import build_tiny_model

    runs: dict[str, list[float]] = {"default": [], "1": []}
    saved = {k: os.environ.pop(k, None) for k in ("MONGARS_MODEL__CPU_THREADS", "OMP_NUM_THREADS")}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = build_tiny_model(
                Path(tmp) / "m", hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4
            )
            for threads in ("default", "1", "1", "default"):
                os.environ.pop("MONGARS_MODEL__CPU_THREADS", None)
                if threads != "default":
                    os.environ["MONGARS_MODEL__CPU_THREADS"] = threads
                process, url = bench_server._start_server(model_dir, 32, 5.0)
                try:
                    import httpx

                    model_id = httpx.get(f"{url}/readyz").json()["model"]
                    result = asyncio.run(bench_server._drive(url, model_id, clients, requests, 3))
                    runs[threads].append(result["rps"])
                finally:
                    process.terminate()
                    process.wait(30)
    finally:
        os.environ.pop("MONGARS_MODEL__CPU_THREADS", None)
        os.environ.update({k: v for k, v in saved.items() if v is not None})
    print(
        f"\n## server threads, clients beside the server: {clients} clients x {requests} "
        "requests, micro-batched, ABBA"
    )
    for threads, rps in runs.items():
        label = "torch default" if threads == "default" else "1 thread"
        print(f"{label:>14}: {mean(rps):6.1f} requests/s (runs {rps})")
    print(f"1 thread / torch default: {mean(runs['1']) / mean(runs['default']):.2f}x")


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


def measure_concurrency(rt: Any, model_dir: Path, texts: list[str], *, rounds: int) -> None:
    """16 ``aembed`` and 8 ``agenerate`` callers at once vs the same calls one by one.

    One short query per caller, as a server sees them. The embedding calls run
    in ``rounds`` interleaved rounds (one by one, concurrent packed, concurrent
    padded) and the medians are compared, so that load on a shared machine
    falls on every side alike. One by one, a single text is never packed.
    """
    from statistics import median

    from mongars_llm.runtime import UnifiedLLMRuntime
    from mongars_llm.settings import Settings

    queries = [" ".join(t.split()[:12]) for t in texts[:16]]
    prompts = [[{"role": "user", "content": t[:80]}] for t in texts[:8]]
    settings = Settings(model={"quantize_4bit": False, "embed_pack_tokens": 0}, _env_file=None)  # type: ignore[call-arg]
    padded_rt = UnifiedLLMRuntime.from_pretrained(model_dir, settings=settings)

    async def one_by_one() -> float:
        started = time.perf_counter()
        for q in queries:
            await rt.aembed(q)
        return time.perf_counter() - started

    async def together(runtime: Any) -> float:
        started = time.perf_counter()
        await asyncio.gather(*(runtime.aembed(q) for q in queries))
        return time.perf_counter() - started

    padded_rt.embed(queries)  # warm-up
    times: dict[str, list[float]] = {"one by one": [], "packed": [], "padded": []}
    for _ in range(rounds):
        times["one by one"].append(asyncio.run(one_by_one()))
        times["packed"].append(asyncio.run(together(rt)))
        times["padded"].append(asyncio.run(together(padded_rt)))
    padded_rt.close()
    seq = median(times["one by one"])
    print(f"\n## concurrency (micro-batching), medians of {rounds} interleaved rounds")
    print(f"16 aembed one by one         : {seq:.3f} s")
    for label in ("packed", "padded"):
        conc = median(times[label])
        print(f"16 aembed concurrent, {label}: {conc:.3f} s -> {seq / conc:.2f}x")

    async def generate_calls() -> tuple[float, float]:
        started = time.perf_counter()
        for p in prompts:
            await rt.agenerate(p, temperature=0, max_new_tokens=24)
        seq = time.perf_counter() - started
        started = time.perf_counter()
        await asyncio.gather(*(rt.agenerate(p, temperature=0, max_new_tokens=24) for p in prompts))
        return seq, time.perf_counter() - started

    gseq, gconc = asyncio.run(generate_calls())
    print(f" 8 agenerate: sequential {gseq:.2f} s, concurrent {gconc:.2f} s -> {gseq / gconc:.2f}x")


SECTIONS = (
    "memory",
    "throughput",
    "llm2vec",
    "precision",
    "concurrency",
    "threads",
    "server-threads",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 texts instead of 1,000")
    parser.add_argument("--model", type=Path, help="reuse/build the bench model here")
    parser.add_argument(
        "--llm2vec-texts",
        type=int,
        metavar="N",
        help="texts for the llm2vec comparison (the first N; default: all of them)",
    )
    parser.add_argument(
        "--rounds", type=int, default=7, help="interleaved rounds of the aembed concurrency test"
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads of this process, the llm2vec worker's too (default: torch's)",
    )
    parser.add_argument(
        "--max-words", type=int, default=64, help="longest text, in words (texts have 4 to N)"
    )
    parser.add_argument("--only", choices=SECTIONS, action="append", help="run these sections")
    parser.add_argument(
        "--threads-texts", type=int, default=200, help="texts of the threads section"
    )
    parser.add_argument(
        "--threads-tokens", type=int, default=32, help="new tokens of the threads section"
    )
    parser.add_argument(
        "--threads-rounds", type=int, default=1, help="ABBA rounds of the threads section"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child.startswith("threads:"):
            child_threads(
                args.child.split(":", 1)[1],
                str(args.model),
                args.threads_texts,
                args.threads_tokens,
            )
        else:
            child_memory(args.child, str(args.model))
        return

    import numpy as np
    import torch

    from mongars_llm.runtime import UnifiedLLMRuntime, cpu_supports_bf16
    from mongars_llm.settings import Settings

    if args.threads:
        torch.set_num_threads(args.threads)
    sections = set(args.only or SECTIONS)
    workdir = Path(tempfile.mkdtemp(prefix="mongars-bench-"))
    l2v_python = llm2vec_python()
    model_dir = build_model(args.model or workdir / "model", l2v_python)
    n_texts = 200 if args.quick else 1000
    print(
        f"# bench_runtime: torch {torch.__version__}, {os.cpu_count()} CPU(s), "
        f"{torch.get_num_threads()} torch thread(s), native bf16: {cpu_supports_bf16()}, "
        f"quick={args.quick}, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"# model {model_dir}, written by transformers {checkpoint_transformers(model_dir)}")

    if "memory" in sections:
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

    texts = make_texts(n_texts, max_words=args.max_words)
    if sections & {"throughput", "llm2vec", "concurrency"}:
        settings = Settings(model={"quantize_4bit": False, "dtype": "float32"}, _env_file=None)  # type: ignore[call-arg]
        rt = UnifiedLLMRuntime.from_pretrained(model_dir, settings=settings)
        params = sum(p.numel() for p in rt.model.parameters())
        print(f"\nmodel: {params / 1e6:.1f}M parameters, runtime dtype {rt.dtype}")
        rt.embed(texts[:8])  # warm-up
        if "throughput" in sections:
            started = time.perf_counter()
            ours = rt.embed(texts)
            t_rt = time.perf_counter() - started
            assert np.isfinite(ours).all()
            t_plain, theirs = plain_loop(model_dir, texts)
            cos = (ours * theirs).sum(1)
            print(f"\n## embedding throughput, {n_texts} mixed-length texts, fp32")
            print(f"runtime.embed : {n_texts / t_rt:8.1f} texts/s ({t_rt:.1f} s)")
            print(f"plain loop    : {n_texts / t_plain:8.1f} texts/s ({t_plain:.1f} s)")
            print(f"ratio         : {t_plain / t_rt:.2f}x")
            print(
                f"(min cosine vs the plain loop {cos.min():.4f}: "
                "LLM2Vec mean pooling leaves BOS out)"
            )
        if "llm2vec" in sections:
            compare_llm2vec(rt, model_dir, texts[: args.llm2vec_texts or n_texts], l2v_python)
        if "concurrency" in sections:
            measure_concurrency(rt, model_dir, texts, rounds=args.rounds)
        print(f"\nbatches: {rt.stats()}")
        rt.close()
    if "precision" in sections:
        compare_precision(model_dir, texts[:200])
    if "threads" in sections:
        compare_threads(
            model_dir,
            n_texts=args.threads_texts,
            new_tokens=args.threads_tokens,
            rounds=args.threads_rounds,
        )
    if "server-threads" in sections:
        compare_server_threads(clients=32, requests=4)


if __name__ == "__main__":
    main()
