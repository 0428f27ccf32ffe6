"""``mongars-llm doctor``."""

from __future__ import annotations

import argparse

from .._fs import human_bytes
from ._output import examples, print_json


def _run(args: argparse.Namespace) -> int:
    from ._doctor import diagnose

    report = diagnose()
    if args.json:
        print_json(report)
        return 0
    print(f"Python          {report['python']}  ({report['platform']})")
    for name, version in report["packages"].items():
        print(f"{name + ' ':<16}{version or 'not installed'}")
    cuda = report["cuda"]
    if cuda["available"]:
        for device in cuda["devices"]:
            print(
                f"cuda:{device['index']:<11}{device['name']}, {device['memory_gib']} GiB, "
                f"bf16={'yes' if device['bf16'] else 'no'}"
            )
    else:
        print(f"CUDA            no ({cuda['reason']})")
    cpu = report["cpu"]
    flags = ", ".join(cpu["bf16_flags"]) or "none"
    print(f"CPU             {cpu['cores']} cores, bf16 acceleration: {flags}")
    print(f"CPU threads     {cpu['threads']['why']}")
    q = report["quantization_4bit"]
    print(f"4-bit NF4       {'possible' if q['possible'] else 'not possible'} ({q['why']})")
    engine = report["engine"]
    print(f"GGUF engine     {engine['gguf']} ({engine['why']})")
    cache = report["cache"]
    print(f"cache dir       {cache['cache_dir']}  {human_bytes(cache['cache_dir_bytes'])}")
    print(f"models dir      {cache['models_dir']}  {human_bytes(cache['models_dir_bytes'])}")
    print("settings:")
    for key, value in report["settings"].items():
        if isinstance(value, dict):
            for sub, subvalue in value.items():
                print(f"  {key}.{sub} = {subvalue}")
        else:
            print(f"  {key} = {value}")
    profile = report["profile"]
    print(f"profile         {profile['active']}  ({', '.join(profile['models'])})")
    if profile["reason"]:
        print(f"                {profile['reason']}")
    print(f"recommendation: {report['recommendation']}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "doctor",
        help="report versions, devices, precision and cache sizes",
        description="What this machine can run: package versions, CUDA devices, CPU bf16 "
        "support, 4-bit quantisation, cache sizes, the settings in effect, the profile a "
        "bare command uses, and a recommendation (docs/doctor.md).",
        **examples("mongars-llm doctor", "mongars-llm doctor --json | jq .recommendation"),
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.set_defaults(handler=_run)
