"""The ``mongars-llm`` command line.

Each command group lives in its own module exposing ``register(subparsers)``;
handlers return an exit code: 0 all ok, 1 a failure at run time (e.g. a role
failed to provision), 2 a usage or configuration error.

This is the top floor: it may import every layer below (provisioning, runtime,
training, server), and nothing in the library imports it. Application code that
only the commands use lives here too, in private modules: ``_demo`` (the whole
lifecycle of ``mongars-llm demo``) and ``_doctor`` (the machine report of
``mongars-llm doctor``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from .._version import __version__
from ..errors import ConfigError, MissingExtraError, MongarsError

__all__ = ["main"]

# modules under mongars_llm.cli that register a command group (each `register(subparsers)`)
_COMMAND_MODULES = (
    "provision",
    "models",
    "manifest",
    "adapters",
    "bundle",
    "export",
    "chat",
    "embed",
    "rerank",
    "serve",
    "ps",
    "demo",
    "doctor",
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _log_level(value: str) -> str:
    """``--log-level`` in any case; anything else is a usage error (exit 2), not a traceback."""
    if value.lower() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"invalid log level {value!r} (choose from {', '.join(LOG_LEVELS)})"
        )
    return value.upper()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mongars-llm",
        description="Configure, provision, run, fine-tune and serve your own open-weight LLM.",
    )
    parser.add_argument("--version", action="version", version=f"mongars-llm {__version__}")
    parser.add_argument(
        "--log-level",
        default="WARNING",
        type=_log_level,
        metavar="{" + ",".join(LOG_LEVELS) + "}",
        help="log level for mongars_llm logs on stderr (default: warning)",
    )
    parser.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"{__name__}.{name}":  # that command group is not built yet
                continue
            raise
        module.register(subparsers)
    return parser


def _one_line(err: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in item['loc']) or err.title}: {item['msg']}"
        for item in err.errors(include_url=False)
    )


def main(argv: Sequence[str] | None = None) -> int:
    from ..logging import configure_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    configure_logging(args.log_level, json_format=args.log_json)
    try:
        return int(args.handler(args) or 0)
    except (ConfigError, MissingExtraError) as err:
        print(f"mongars-llm: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except MongarsError as err:
        print(f"mongars-llm: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except ValidationError as err:  # a settings class without SettingsErrorsMixin
        print(f"mongars-llm: error: invalid configuration: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("mongars-llm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`| head -c 1`): stop quietly, as the Python docs advise
        # (signal-handling notes): point stdout at devnull so the exit flush cannot fail
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED
