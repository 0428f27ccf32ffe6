"""``mongars-llm manifest validate|schema``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ._output import command_group, examples, print_json

EXIT_OK, EXIT_USAGE = 0, 2


def _problem_dict(problem: Any) -> dict[str, Any]:
    return {
        "json_path": problem.json_path,
        "message": problem.reason,
        "expected": problem.expected,
        "text": str(problem),
    }


def _path_warnings(manifest: Any) -> list[dict[str, str]]:
    """Local paths that do not exist (yet): worth a note, not an error."""
    from ..manifest import format_json_path

    notes = []
    for profile_name, profile in manifest.profiles.items():
        for role, entry in profile.models.items():
            loc: list[Any] = ["profiles", profile_name, "models", role]
            if entry.provider == "local" and entry.name.startswith("pkg://"):
                from ..errors import ProvisionError
                from ..provisioning.local import package_file

                try:
                    package_file(entry.name)
                except ProvisionError as err:
                    notes.append(
                        {"json_path": format_json_path([*loc, "name"]), "message": str(err)}
                    )
            elif entry.provider == "local" and not manifest.resolve_path(entry.name).exists():
                notes.append(
                    {
                        "json_path": format_json_path([*loc, "name"]),
                        "message": f"local model path {manifest.resolve_path(entry.name)} "
                        "does not exist (yet)",
                    }
                )
            for index, adapter in enumerate(entry.adapters):
                source = adapter.source
                if source and "://" not in source and not manifest.resolve_path(source).exists():
                    notes.append(
                        {
                            "json_path": format_json_path([*loc, "adapters", index, "source"]),
                            "message": f"adapter source {manifest.resolve_path(source)} "
                            "does not exist (yet)",
                        }
                    )
    return notes


def _validate(args: argparse.Namespace) -> int:
    from ..errors import ManifestError
    from ..manifest import (
        BUILTIN_SOURCE,
        builtin_manifest,
        manifest_problems,
        parse_manifest,
        read_manifest_document,
    )
    from ..settings import get_settings

    path = args.path or args.manifest
    if path is None:
        settings = get_settings()
        configured = Path(settings.llm_models_path).expanduser()
        if configured.is_file() or "llm_models_path" in settings.model_fields_set:
            path = configured
    manifest = None
    problems: list[ManifestError] = []
    if path is None:
        source = BUILTIN_SOURCE
        manifest = builtin_manifest()
    else:
        path = Path(path).expanduser()
        source = str(path).replace("\x00", "\\x00")  # never a raw NUL on the terminal
        try:
            data = read_manifest_document(path)
        except ManifestError as err:
            problems = [err]
        else:
            problems = manifest_problems(data, source=path)
            if not problems:
                manifest = parse_manifest(data, source=path, base_dir=path.resolve().parent)
    warnings = _path_warnings(manifest) if manifest is not None else []

    if args.json:
        print_json(
            {
                "manifest": source,
                "valid": not problems,
                "profiles": (
                    {name: list(p.models) for name, p in manifest.profiles.items()}
                    if manifest is not None
                    else {}
                ),
                "problems": [_problem_dict(p) for p in problems],
                "warnings": warnings,
            }
        )
        return EXIT_USAGE if problems else EXIT_OK
    if problems:
        count = len(problems)
        print(
            f"mongars-llm: {source} is not a valid manifest "
            f"({count} problem{'s' if count > 1 else ''}):",
            file=sys.stderr,
        )
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_USAGE
    assert manifest is not None
    for note in warnings:
        print(f"warning: {source}: {note['json_path']}: {note['message']}", file=sys.stderr)
    summary = "; ".join(
        f"{name} ({', '.join(profile.models)})" for name, profile in manifest.profiles.items()
    )
    print(f"{source}: valid. Profiles: {summary}")
    return EXIT_OK


def _schema(args: argparse.Namespace) -> int:
    from ..manifest import manifest_json_schema

    schema = manifest_json_schema()
    if args.output is None:
        print_json(schema)
        return EXIT_OK
    from .._fs import atomic_write_bytes

    output = Path(args.output).expanduser()
    atomic_write_bytes(output, (json.dumps(schema, indent=2) + "\n").encode())
    print(f"wrote the manifest JSON Schema to {output}", file=sys.stderr)
    return EXIT_OK


def register(subparsers: argparse._SubParsersAction) -> None:
    commands = command_group(
        subparsers,
        "manifest",
        help="validate a model manifest or export its JSON Schema",
        description="Validate a model manifest (JSON or YAML) or export its JSON Schema.",
        **examples(
            "mongars-llm manifest validate configs/llm_models.yaml",
            "mongars-llm manifest schema -o configs/llm_models.schema.json",
        ),
    )

    validate = commands.add_parser(
        "validate",
        help="check a manifest; exit 0 when valid, 2 when not",
        description="Check a manifest file. With no PATH: the configured manifest "
        "(MONGARS_LLM_MODELS_PATH) if it exists, else the built-in one. Problems go to "
        "stderr with the file, the JSON path and a suggestion.",
        **examples(
            "mongars-llm manifest validate                 the configured (or built-in) manifest",
            "mongars-llm manifest validate my.yaml --json",
        ),
    )
    validate.add_argument("path", nargs="?", metavar="PATH", help="manifest file to check")
    validate.add_argument("--manifest", metavar="PATH", help="same as PATH")
    validate.add_argument("--json", action="store_true", help="print one JSON document")
    validate.set_defaults(handler=_validate)

    schema = commands.add_parser(
        "schema",
        help="print the manifest's JSON Schema (for editors and CI)",
        description="Print the JSON Schema of manifest files, or write it to --output.",
        **examples("mongars-llm manifest schema > llm_models.schema.json"),
    )
    schema.add_argument("--output", "-o", metavar="FILE", help="write the schema to FILE")
    schema.set_defaults(handler=_schema)
