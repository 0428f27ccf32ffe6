"""``mongars-llm models list|show``: profiles, roles and resolved parameters."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from ._output import print_json, print_table

if TYPE_CHECKING:
    from ..manager import ModelManager

EXIT_OK, EXIT_USAGE = 0, 2


def _manager(args: argparse.Namespace) -> ModelManager:
    from ..manager import ModelManager

    return ModelManager(args.manifest, profile=args.profile)


def _list(args: argparse.Namespace) -> int:
    manager = _manager(args)
    names = [manager.profile_name] if args.profile else list(manager.manifest.profiles)
    profiles: list[dict[str, Any]] = []
    for name in names:
        profile = manager.manifest.profiles[name]
        profiles.append(
            {
                "name": name,
                "description": profile.description,
                "active": name == manager.profile_name,
                "roles": {
                    role: {
                        "name": entry.name,
                        "provider": entry.provider,
                        "revision": entry.revision,
                    }
                    for role, entry in profile.models.items()
                },
            }
        )
    if args.json:
        print_json(
            {
                "manifest": manager.manifest_source,
                "active_profile": manager.profile_name,
                "profiles": profiles,
            }
        )
        return EXIT_OK
    print(f"manifest: {manager.manifest_source}   active profile: {manager.profile_name}")
    rows = []
    for name in names:
        marker = "*" if name == manager.profile_name else ""
        for role, entry in manager.manifest.profiles[name].models.items():
            revision = f"@{entry.revision}" if entry.revision else ""
            rows.append([marker, name, role, entry.name + revision, entry.provider])
    print_table(["", "profile", "role", "model", "provider"], rows)
    return EXIT_OK


def _format(value: Any) -> str:
    if isinstance(value, (dict, list, bool)) or value is None:
        return json.dumps(value)
    return str(value)


def _show(args: argparse.Namespace) -> int:
    manager = _manager(args)
    if args.role:
        resolved = [manager.role(args.role)]
        if args.json:
            print_json(resolved[0].to_dict())
            return EXIT_OK
    else:
        if args.json:
            print_json(manager.describe())
            return EXIT_OK
        resolved = manager.roles()
    print(f"manifest: {manager.manifest_source}   profile: {manager.profile_name}")
    if manager.profile.description and not args.role:
        print(manager.profile.description)
    for role in resolved:
        data = role.to_dict()
        revision = f"@{data['revision']}" if data["revision"] else ""
        print(f"\n{role.role}: {data['name']}{revision} ({data['provider']})")
        if data["description"]:
            print(f"  {data['description']}")
        rows: list[list[str]] = [
            [f"  {key}", _format(value)] for key, value in data["parameters"].items()
        ]
        rows += [[f"  embedding.{key}", _format(value)] for key, value in data["embedding"].items()]
        rows.append(["  auto_download", _format(data["auto_download"])])
        rows.append(["  trust_remote_code", _format(data["trust_remote_code"])])
        for adapter in data["adapters"]:
            label = adapter["name"] + (f"=={adapter['version']}" if adapter.get("version") else "")
            rows.append(["  adapter", f"{label} (use: {adapter['use']})"])
        width = max(len(key) for key, _ in rows)
        for key, value in rows:
            print(f"{key.ljust(width)}  {value}")
    return EXIT_OK


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--manifest",
        metavar="PATH",
        help="manifest file (default: MONGARS_LLM_MODELS_PATH if it exists, else the built-in)",
    )
    parser.add_argument(
        "--profile",
        metavar="NAME",
        help="profile (default: LLM_MODELS_PROFILE, MONGARS_LLM_MODELS_PROFILE, then 'default')",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list profiles and roles, show resolved parameters",
        description="Inspect the manifest's profiles and the resolved roles of a profile.",
    )
    commands = parser.add_subparsers(dest="models_command", metavar="SUBCOMMAND")
    parser.set_defaults(handler=lambda _args: (parser.print_help(sys.stderr), EXIT_USAGE)[1])

    list_parser = commands.add_parser(
        "list",
        help="profiles and their roles (the active profile is marked *)",
        description="Profiles and their roles; with --profile only that profile.",
    )
    _common(list_parser)
    list_parser.set_defaults(handler=_list)

    show = commands.add_parser(
        "show",
        help="resolved parameters of the active profile's roles",
        description="Resolved parameters of one role (or every role) of the active profile, "
        "after the bounds in settings.model are applied.",
    )
    show.add_argument("role", nargs="?", metavar="ROLE", help="one role (default: all)")
    _common(show)
    show.set_defaults(handler=_show)
