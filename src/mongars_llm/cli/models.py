"""``mongars-llm models list|show|rm``: profiles, roles, resolved parameters, installs.

``models list --installed`` lists what provisioning put in the models dir, with
sizes; ``models rm ROLE|MODEL`` deletes an install (asking first in a terminal).
Exit codes: 0 ok, 1 a run-time failure (nothing installed matches, a running
download holds the lock), 2 a usage or configuration error (a path outside the
models dir, no confirmation).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, MongarsError
from ._output import command_group, examples, print_json, print_table

if TYPE_CHECKING:
    from ..manager import ModelManager
    from ..provisioning import InstalledModel

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _manager(args: argparse.Namespace) -> ModelManager:
    from ..manager import ModelManager

    return ModelManager(args.manifest, profile=args.profile)


def _list(args: argparse.Namespace) -> int:
    if args.installed:
        return _json_errors(args, _list_installed)
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


def _json_errors(args: argparse.Namespace, run: Any) -> int:
    """With ``--json``, an error is one JSON document on stdout too (as ``provision``)."""
    try:
        return int(run(args))
    except MongarsError as err:
        if not args.json:
            raise  # cli.main prints one line and exits 1 or 2
        print_json({"ok": False, "error": str(err), "error_type": type(err).__name__})
        return EXIT_USAGE if isinstance(err, ConfigError) else EXIT_FAILED


def _revision(value: str | None) -> str:
    return (value or "")[:12]


def _list_installed(args: argparse.Namespace) -> int:
    from .._fs import human_bytes
    from ..provisioning import installed_models

    manager = _manager(args)
    models = installed_models(manager=manager)
    models_dir = str(manager.settings.resolved_models_dir)
    total = sum(model.bytes for model in models)
    if args.json:
        print_json(
            {
                "models_dir": models_dir,
                "active_profile": manager.profile_name,
                "models": [model.to_dict() for model in models],
                "bytes": total,
            }
        )
        return EXIT_OK
    if not models:
        print(f"nothing installed in {models_dir}")
        return EXIT_OK
    rows = [
        [
            model.name,
            _revision(model.revision),
            model.provider,
            ",".join(model.roles) or "-",
            human_bytes(model.bytes),
            *([model.path] if args.verbose else []),
        ]
        for model in models
    ]
    headers = ["model", "revision", "provider", "roles", "size"]
    print_table([*headers, *(["path"] if args.verbose else [])], rows)
    print(
        f"{len(models)} installed, {human_bytes(total)} in {models_dir} "
        f"(roles of profile {manager.profile_name!r})"
    )
    return EXIT_OK


def _confirmed(models: list[InstalledModel], total: str) -> bool:
    """Ask on the terminal; without one, ``--yes`` is required."""
    if not sys.stdin.isatty():
        raise ConfigError(
            "refusing to delete without confirmation: stdin is not a terminal; pass --yes"
        )
    sys.stderr.write(f"remove {len(models)} install(s), {total}? [y/N] ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def _rm(args: argparse.Namespace) -> int:
    from .._fs import human_bytes
    from ..provisioning import find_installed, remove_installed

    manager = _manager(args)
    chosen: dict[str, InstalledModel] = {}
    for target in args.targets:  # every name is checked before anything is deleted
        for model in find_installed(target, manager=manager):
            chosen.setdefault(str(model.path), model)
    models = list(chosen.values())
    total = human_bytes(sum(model.bytes for model in models))
    if not args.json:
        for model in models:
            print(f"{model.label} ({model.provider}, {human_bytes(model.bytes)}): {model.path}")
    _check_shared(args, manager.profile_name, models)
    if args.dry_run:
        if args.json:
            print_json({"dry_run": True, "removed": [m.to_dict() for m in models]})
        return EXIT_OK
    if not args.yes and not _confirmed(models, total):
        print("mongars-llm: nothing removed (not confirmed)", file=sys.stderr)
        return EXIT_FAILED
    removed = remove_installed(models, settings=manager.settings)
    if args.json:
        print_json(
            {
                "dry_run": False,
                "removed": [model.to_dict() for model in removed],
                "bytes": sum(model.bytes for model in removed),
            }
        )
    else:
        print(f"removed {len(removed)} install(s), {total}; `mongars-llm provision` reinstalls")
    return EXIT_OK


def _check_shared(args: argparse.Namespace, profile: str, models: list[InstalledModel]) -> None:
    """Say which other roles use an install; removing it for one role while others
    share it needs ``--force`` (they would be provisioned again on their next use)."""
    named = set(args.targets)
    for model in models:
        others = [role for role in model.roles if role not in named]
        if not others:
            continue
        users = ", ".join(repr(role) for role in others)
        message = f"{model.label} is also used by role(s) {users} of profile {profile!r}"
        if named & set(model.roles) and not (args.force or args.dry_run):
            raise ConfigError(
                f"refusing to remove {model.label}: it is also used by role(s) {users} of "
                f"profile {profile!r}; name those roles too, or pass --force"
            )
        print(f"mongars-llm: note: {message}", file=sys.stderr)


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
    commands = command_group(
        subparsers,
        "models",
        help="list profiles and roles, show resolved parameters, list or remove installs",
        description="Inspect the manifest's profiles and the resolved roles of a profile; "
        "list the models installed in the models dir and remove them.",
        **examples(
            "mongars-llm models list",
            "mongars-llm models list --installed",
            "mongars-llm models show general --profile small",
            "mongars-llm models rm general --dry-run",
        ),
    )

    list_parser = commands.add_parser(
        "list",
        aliases=["ls"],
        help="profiles and their roles (the active profile is marked *), or --installed models",
        description="Profiles and their roles; with --profile only that profile. With "
        "--installed: every model installed in the models dir (MONGARS_MODELS_DIR) with its "
        "size on disk and the roles of the active profile that use it.",
        **examples(
            "mongars-llm models list",
            "mongars-llm models list --installed --json",
        ),
    )
    list_parser.add_argument(
        "--installed",
        action="store_true",
        help="list what provisioning installed in the models dir, with sizes",
    )
    list_parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="with --installed: add the folder of each install (--json always has it)",
    )
    _common(list_parser)
    list_parser.set_defaults(handler=_list)

    show = commands.add_parser(
        "show",
        help="resolved parameters of the active profile's roles",
        description="Resolved parameters of one role (or every role) of the active profile, "
        "after the bounds in settings.model are applied.",
        **examples(
            "mongars-llm models show",
            "mongars-llm models show general --profile small --json",
        ),
    )
    show.add_argument("role", nargs="?", metavar="ROLE", help="one role (default: all)")
    _common(show)
    show.set_defaults(handler=_show)

    rm = commands.add_parser(
        "rm",
        help="delete an installed model from the models dir",
        description="Delete installed models from the models dir (MONGARS_MODELS_DIR), like "
        "`ollama rm`: a role of the active profile (the install it uses), an installed model "
        "name (every revision; NAME@REV for one), or a folder under the models dir. Local "
        "folders that roles use in place are never deleted. Asks first in a terminal; "
        "`mongars-llm provision` installs it again.",
        **examples(
            "mongars-llm models rm general --dry-run",
            "mongars-llm models rm general --yes",
        ),
    )
    rm.add_argument(
        "targets", nargs="+", metavar="ROLE|MODEL", help="role, model name or installed folder"
    )
    rm.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    rm.add_argument(
        "-f",
        "--force",
        action="store_true",
        help="remove a role's install even when other roles share it",
    )
    rm.add_argument("--dry-run", action="store_true", help="show what would be removed")
    _common(rm)
    rm.set_defaults(handler=lambda args: _json_errors(args, _rm))
