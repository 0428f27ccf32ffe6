"""Loading a runtime for the ``chat`` and ``embed`` commands: a role, or a checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..manager import ModelManager
    from ..runtime import UnifiedLLMRuntime

__all__ = ["add_runtime_arguments", "load_runtime", "pick_role"]


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """``--profile``, ``--manifest``, ``--model``, ``--device``, ``--quantize-4bit``."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--profile",
        metavar="NAME",
        help="manifest profile (default: LLM_MODELS_PROFILE, MONGARS_LLM_MODELS_PROFILE, "
        "then 'default')",
    )
    group.add_argument(
        "--manifest",
        type=Path,
        metavar="PATH",
        help="manifest file, JSON or YAML (default: MONGARS_LLM_MODELS_PATH if it exists, "
        "else the built-in)",
    )
    group.add_argument(
        "--model",
        metavar="DIR|ORG/NAME",
        help="load this checkpoint folder or Hub id instead of the role's model (a Hub id "
        "that `provision` installed is read from the models dir)",
    )
    group.add_argument(
        "--device", metavar="DEVICE", help="'cpu', 'cuda' or 'cuda:1' (default: cuda if any)"
    )
    group.add_argument(
        "--quantize-4bit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="4-bit NF4 on CUDA (default: MONGARS_MODEL__QUANTIZE_4BIT, on when CUDA is there)",
    )


def _manager(args: argparse.Namespace) -> ModelManager:
    from ..manager import ModelManager

    if args.manifest is not None and not args.manifest.expanduser().is_file():
        raise ConfigError(f"--manifest {args.manifest}: no such file")
    return ModelManager(args.manifest, profile=args.profile)


def pick_role(manager: ModelManager, role: str | None, preferred: tuple[str, ...]) -> str:
    """``role`` when it is one of the profile's, else the first of ``preferred`` there,
    else the profile's first role."""
    names = list(manager.role_names)
    if role is not None:
        if role not in names:
            raise ConfigError(
                f"unknown role {role!r} in profile {manager.profile_name!r}; "
                f"known roles: {', '.join(names) or '(none)'}"
            )
        return role
    for name in preferred:
        if name in names:
            return name
    if not names:
        raise ConfigError(f"profile {manager.profile_name!r} has no roles")
    return names[0]


def load_runtime(
    args: argparse.Namespace, role: str | None, preferred: tuple[str, ...]
) -> tuple[UnifiedLLMRuntime, str | None]:
    """The runtime for ``role`` (provisioned first) or ``--model``; and the role whose
    sampling defaults apply (``None`` for ``--model`` without an explicit role)."""
    from ..runtime import UnifiedLLMRuntime

    manager = _manager(args)
    if manager.profile_reason and not args.model:
        print(f"mongars-llm: {manager.profile_reason}", file=sys.stderr, flush=True)
    if args.model:
        if role is not None:
            pick_role(manager, role, preferred)
        print(f"loading {args.model} ...", file=sys.stderr, flush=True)
        runtime = UnifiedLLMRuntime.from_pretrained(
            args.model,
            settings=manager.settings,
            manager=manager,
            device=args.device,
            quantize_4bit=args.quantize_4bit,
        )
        return runtime, role
    chosen = pick_role(manager, role, preferred)
    entry = manager.profile.models[chosen]
    print(
        f"loading role {chosen!r} of profile {manager.profile_name!r} ({entry.name}) ...",
        file=sys.stderr,
        flush=True,
    )
    runtime = UnifiedLLMRuntime.from_role(
        chosen,
        manager=manager,
        device=args.device,
        quantize_4bit=args.quantize_4bit,
        show_progress=sys.stderr.isatty(),
    )
    return runtime, chosen
