"""GradCache (``mini_batch_size``): memory and time of one contrastive step, whole vs chunked.

Run: ``python benchmarks/bench_grad_cache.py [--batch-size 32] [--mini-batch-size 16]``
(or ``nox -s bench``). It needs SmolLM2-135M-Instruct (see bench_generation.py) or
``--model DIR``.

Each variant runs in its own process on the same weights (fp32, CPU, LoRA r=16 on
all linear layers, the product's defaults): one contrastive step of
``--batch-size`` pairs from the benchmark's retrieval set, each with a hard
negative (3 x batch texts embedded), through the trainer's own code. The peak
resident memory of the step is read from the kernel (``VmHWM``, reset after the
model has loaded, so loading does not count), with the step's time and loss.
Printed: the chunked/whole ratios of peak memory and time, and the loss and
gradient-norm difference (the same gradient, up to float rounding).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _peak_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS


def child(model_dir: str, data: str, batch_size: int, mini: int | None, threads: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from mongars_llm.training._config import load_bundle_config
    from mongars_llm.training._contrastive import backward_in_chunks, contrastive_batch
    from mongars_llm.training._model import build_peft_model
    from mongars_llm.training._pairs import PairExample
    from mongars_llm.training._records import load_tokenizer
    from mongars_llm.training._vectors import EmbeddingSpec, encode_texts

    torch.set_num_threads(threads)
    config = load_bundle_config(base_model=model_dir, objective="contrastive", lora_dropout=0.0)
    tokenizer = load_tokenizer(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = build_peft_model(base, config)
    model.train()
    spec = EmbeddingSpec.of(config, model)
    rows = [json.loads(line) for line in Path(data).read_text().splitlines()[:batch_size]]
    batch = [PairExample(line=i, **row) for i, row in enumerate(rows)]
    objective = contrastive_batch(batch, config, device="cpu")
    items = objective.items
    _reset_peak()
    before = _peak_kib()
    started = time.perf_counter()
    if mini:
        loss = backward_in_chunks(
            model, tokenizer, items, spec, objective.loss, chunk=mini, device="cpu"
        )
    else:
        loss = objective.loss(encode_texts(model, tokenizer, items, spec, device="cpu"))
        loss.backward()
    seconds = time.perf_counter() - started
    peak = _peak_kib()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    print(
        json.dumps(
            {
                "texts": len(items),
                "seconds": round(seconds, 3),
                "step_peak_mib": round((peak - before) / 1024, 1),
                "loss": float(loss.detach()),
                "grad_norm": norm,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a transformers folder (default: SmolLM2)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--mini-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", nargs=2, metavar=("MINI", "DATA"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mini = int(args.child[0]) or None
        child(str(args.model), args.child[1], args.batch_size, mini, args.threads)
        return

    import tempfile

    import _retrieval_data
    from bench_generation import real_model_dir

    model_dir = args.model or real_model_dir(None)
    train_path, _ = _retrieval_data.write(Path(tempfile.mkdtemp(prefix="bench-gc-")), seed=0)
    results: dict[str, Any] = {}
    for label, mini in (("whole", 0), ("chunked", args.mini_batch_size)):
        command = [sys.executable, __file__, "--model", str(model_dir)]
        command += ["--batch-size", str(args.batch_size), "--threads", str(args.threads)]
        command += ["--child", str(mini), str(train_path)]
        out = subprocess.run(command, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.exit(f"{label} step failed:\n{out.stderr[-2000:]}")
        results[label] = json.loads(out.stdout.strip().splitlines()[-1])
    whole, chunked = results["whole"], results["chunked"]
    print(
        f"GradCache, {model_dir.name}, one contrastive step of {args.batch_size} pairs "
        f"({whole['texts']} texts), {args.threads} thread(s)"
    )
    print("                  step peak MiB   seconds   loss")
    print(
        f"  whole batch     {whole['step_peak_mib']:>10.1f}   {whole['seconds']:>7.2f}   {whole['loss']:.5f}"
    )
    print(
        f"  chunks of {args.mini_batch_size:<4}  {chunked['step_peak_mib']:>10.1f}   "
        f"{chunked['seconds']:>7.2f}   {chunked['loss']:.5f}"
    )
    print(
        f"chunked/whole: memory {chunked['step_peak_mib'] / whole['step_peak_mib']:.2f}x, "
        f"time {chunked['seconds'] / whole['seconds']:.2f}x; gradient norm "
        f"{whole['grad_norm']:.6g} vs {chunked['grad_norm']:.6g} "
        f"(relative difference {abs(whole['grad_norm'] - chunked['grad_norm']) / whole['grad_norm']:.1e})"
    )


if __name__ == "__main__":
    main()
