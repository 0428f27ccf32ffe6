"""``mongars-llm adapters list|show|promote|retire``: the adapter registry."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._output import command_group, examples, print_json, print_table

EXIT_OK, EXIT_USAGE = 0, 2


def _registry(args: argparse.Namespace):  # -> AdapterRegistry
    from ..registry import AdapterRegistry, default_registry_path

    return AdapterRegistry(args.registry_path or default_registry_path())


def _list(args: argparse.Namespace) -> int:
    registry = _registry(args)
    manifest = registry.read()
    entries = [e for e in manifest.entries if args.status is None or e.status == args.status]
    if args.json:
        print_json(
            {
                "registry": str(registry.path),
                "latest": manifest.latest,
                "promoted": manifest.promoted,
                "revision": manifest.revision,
                "entries": [e.model_dump(mode="json") for e in entries],
            }
        )
        return EXIT_OK
    if not entries:
        print(f"no adapters in {registry.path}")
        return EXIT_OK
    rows = []
    for entry in entries:
        marks = ",".join(
            m
            for m, v in (("latest", manifest.latest), ("promoted", manifest.promoted))
            if v == entry.version
        )
        loss = entry.metrics.get("eval_loss")
        rows.append(
            [
                entry.version,
                entry.name,
                entry.status,
                marks,
                entry.base_model,
                f"{loss:.4f}" if isinstance(loss, (int, float)) else "",
                entry.created_at,
            ]
        )
    print_table(
        ["version", "name", "status", "pointer", "base model", "eval loss", "created"], rows
    )
    return EXIT_OK


def _show(args: argparse.Namespace) -> int:
    registry = _registry(args)
    entry = registry.latest() if args.version == "latest" else registry.get(args.version)
    if entry is None:
        print(f"no adapters in {registry.path}", file=sys.stderr)
        return 1
    print_json(
        {**entry.model_dump(mode="json"), "resolved_path": str(registry.adapter_path(entry))}
    )
    return EXIT_OK


def _set_status(args: argparse.Namespace) -> int:
    registry = _registry(args)
    entry = (
        registry.promote(args.version)
        if args.action == "promote"
        else registry.retire(args.version)
    )
    if args.json:
        print_json(entry.model_dump(mode="json"))
    else:
        print(f"adapter version {entry.version} ({entry.name}) is now {entry.status}")
    return EXIT_OK


def register(subparsers: argparse._SubParsersAction) -> None:
    commands = command_group(
        subparsers,
        "adapters",
        help="list and manage the adapter registry",
        description="The adapter registry (MONGARS_LLM_ADAPTER_REGISTRY_PATH, else the user "
        "data dir's encoders/, e.g. ~/.local/share/mongars-llm/encoders).",
        **examples(
            "mongars-llm adapters list                     every version, newest last",
            "mongars-llm adapters list --status promoted --json",
            "mongars-llm adapters show latest",
            "mongars-llm adapters promote 3                serve version 3 by default",
            "mongars-llm adapters retire 2 --registry-path ./registry",
        ),
    )

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--registry-path", type=Path, help="registry directory (default from settings)"
        )
        sub.add_argument("--json", action="store_true", help="print one JSON document")

    listing = commands.add_parser(
        "list",
        help="registered adapter versions",
        **examples("mongars-llm adapters list --status candidate --json"),
    )
    common(listing)
    listing.add_argument(
        "--status",
        choices=["candidate", "promoted", "retired"],
        help="only versions with this status (default: all)",
    )
    listing.set_defaults(handler=_list)

    show = commands.add_parser(
        "show",
        help="one entry as JSON ('latest' for the newest)",
        **examples("mongars-llm adapters show latest", "mongars-llm adapters show 3"),
    )
    common(show)
    show.add_argument("version", metavar="VERSION")
    show.set_defaults(handler=_show)

    for action, text in (("promote", "mark a version promoted"), ("retire", "retire a version")):
        sub = commands.add_parser(action, help=text, **examples(f"mongars-llm adapters {action} 3"))
        common(sub)
        sub.add_argument("version", metavar="VERSION")
        sub.set_defaults(handler=_set_status, action=action)
