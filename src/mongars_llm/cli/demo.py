"""``mongars-llm demo``."""

from __future__ import annotations

import argparse
import json
import sys

from ._output import print_json


def _run(args: argparse.Namespace) -> int:
    from ..demo import DemoStep, run_demo

    def show(step: DemoStep) -> None:
        mark = "ok " if step.ok else "FAIL"
        print(f"[{mark}] {step.name:<36} {step.seconds:6.1f}s", flush=True)
        if step.ok:
            for key, value in step.detail.items():
                text = value if isinstance(value, str) else json.dumps(value, default=str)
                print(f"        {key}: {text}", flush=True)
        else:
            print(f"        {step.error}", flush=True)

    report = run_demo(args.workdir, keep=args.keep, on_step=None if args.json else show)
    if args.json:
        print_json(report.to_dict())
    else:
        verdict = "all steps passed" if report.ok else "a step failed"
        print(
            f"\n{verdict} in {report.seconds:.1f}s (work folder: {report.workdir}"
            f"{'' if args.keep or args.workdir else ', removed'})"
        )
    if not report.ok:
        print("mongars-llm: demo failed", file=sys.stderr)
    return 0 if report.ok else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="run the whole lifecycle offline on a tiny model built on the spot"
    )
    parser.add_argument("--workdir", help="keep everything in this folder (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    parser.add_argument("--json", action="store_true", help="print one JSON report")
    parser.set_defaults(handler=_run)
