"""``mongars-llm provision``: put the weights of the active profile's roles on disk.

Exit codes: 0 every role ok, 1 a role failed (or a dry run does not fit on
disk), 2 a usage or configuration error (unknown role/profile, bad manifest,
missing lock file). ``--json`` prints exactly one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, MissingExtraError
from ._output import examples, print_json, print_table, terminal_safe

if TYPE_CHECKING:
    from ..provisioning import ProgressEvent

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _roles(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [name for value in values for name in value.split(",") if name.strip()]


#: what the "download" stage of each provider does, said when it starts
_FETCHING = {
    "huggingface": "downloading from the Hugging Face Hub",
    "ollama": "copying from the Ollama daemon's store",
    "local": "converting the GGUF file to a transformers folder (once; a minute or two "
    "on a small CPU)",
}


class _StartLines:
    """One line on stderr when a role starts and when its slow step starts, so the
    first run never waits in silence (the tables come at the end)."""

    def __init__(self) -> None:
        self.said: set[tuple[str, str]] = set()

    def __call__(self, event: ProgressEvent) -> None:
        if event.stage not in ("resolve", "download") or (event.role, event.stage) in self.said:
            return
        self.said.add((event.role, event.stage))
        if event.stage == "resolve":
            line = f"{event.role}: {event.provider} {event.model} ..."
        else:
            line = f"{event.role}: {_FETCHING.get(event.provider, 'fetching')} ..."
        print(terminal_safe(line, sys.stderr), file=sys.stderr, flush=True)


def _run(args: argparse.Namespace) -> int:
    from .._fs import human_bytes
    from ..provisioning import provision

    try:
        report = provision(
            _roles(args.roles),
            force=args.force,
            profile=args.profile,
            manifest=args.manifest,
            dry_run=args.dry_run,
            locked=args.locked,
            lock_path=args.lock_file,
            progress=None if args.json else _StartLines(),
            show_progress=not (args.json or args.no_progress),
        )
    except (ConfigError, MissingExtraError) as err:
        if not args.json:
            raise  # cli.main prints it and exits 2
        print_json({"ok": False, "error": str(err), "error_type": type(err).__name__})
        return EXIT_USAGE
    if args.json:
        print_json(report.to_dict())
        return EXIT_OK if report.ok else EXIT_FAILED

    rows: list[list[Any]] = []
    for entry in report:
        row = [
            entry.role,
            entry.provider,
            entry.model,
            entry.action,
            (entry.revision or "")[:12]
            if entry.revision and len(entry.revision) > 12
            else entry.revision,
            human_bytes(entry.bytes),
            f"{entry.seconds:.1f}s",
        ]
        if report.dry_run:
            plan = entry.plan
            row.append(
                f"{len(plan.files)} files, free {human_bytes(plan.free_bytes)}"
                if plan is not None and plan.files
                else ""
            )
        if args.verbose:
            row.append(entry.path or "")
        rows.append(row)
    headers = ["role", "provider", "model", "action", "revision", "size", "time"]
    headers += ["plan"] if report.dry_run else []
    print_table([*headers, *(["path"] if args.verbose else [])], rows)
    for entry in report:
        if entry.error and entry.action != "exists":
            print(f"{entry.role}: {entry.action}: {entry.error}")
        for adapter in entry.adapters:
            print(f"{entry.role}: adapter {adapter.name} -> {adapter.path}")
    if report.lock_file and not report.dry_run:
        print(f"lock file: {report.lock_file}")
    if report.dry_run:
        print("dry run: nothing was downloaded or written")
    return EXIT_OK if report.ok else EXIT_FAILED


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "provision",
        help="download and verify the models of the active profile's roles",
        description="Make sure every role of the active profile has its weights on disk "
        "(Hugging Face Hub, a local directory, or an Ollama daemon). Exit 0 when every "
        "role is ok, 1 when one failed, 2 on a usage or configuration error.",
        **examples(
            "mongars-llm provision                       every role of the active profile",
            "mongars-llm provision --profile small --roles general",
            "mongars-llm provision --dry-run             what would be downloaded, and its size",
            "mongars-llm provision --locked --json       the commits in mongars.lock.json",
            note="Models go to MONGARS_MODELS_DIR (default: <cache dir>/models); "
            "`mongars-llm doctor` shows where.",
        ),
    )
    parser.add_argument("--manifest", metavar="PATH", help="manifest file (JSON or YAML)")
    parser.add_argument("--profile", metavar="P", help="profile (default: the active one)")
    parser.add_argument(
        "--roles", nargs="+", metavar="R", help="roles to provision (default: all of them)"
    )
    parser.add_argument(
        "--force", action="store_true", help="bypass the cache and re-verify installed files"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="show the files and bytes each role would download and check free disk; write nothing",
    )
    parser.add_argument(
        "--locked",
        action="store_true",
        help="provision exactly the revisions recorded in mongars.lock.json",
    )
    parser.add_argument(
        "--lock-file", metavar="PATH", help="lock file (default: next to the manifest)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="add the folder of each install"
    )
    parser.set_defaults(handler=_run)
