"""``mongars-llm serve``: the HTTP server (uvicorn), or a Ray Serve deployment."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ._output import examples
from ._runtime import add_engine_argument

__all__ = ["register"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve the admin API and the OpenAI-compatible API over HTTP",
        description="Serve chat and embeddings over HTTP (OpenAI-compatible API on /v1, "
        "admin API on /api/v1). Settings come from MONGARS_* environment variables; "
        "these flags override them.",
        **examples(
            "mongars-llm serve                             the active profile on 127.0.0.1:8000",
            "mongars-llm serve --profile small --port 9000",
            "mongars-llm serve --model ./checkpoint --embeddings-only --device cuda:1",
            "MONGARS_ADMIN_TOKEN=... mongars-llm serve --host 0.0.0.0 --workers 2",
            "mongars-llm serve --ray --replicas 4           (pip install 'mongars-llm[ray]')",
            note="With no profile chosen and no CUDA, the built-in small profile is served "
            "instead of the 8B default (see `mongars-llm doctor`). docs/serving.md has the API.",
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument(
        "--profile",
        help="manifest profile (default: LLM_MODELS_PROFILE, MONGARS_LLM_MODELS_PROFILE, then "
        "'default'; without CUDA the built-in manifest's small profile)",
    )
    parser.add_argument(
        "--manifest",
        type=Path,
        help="manifest file, JSON or YAML (default: MONGARS_LLM_MODELS_PATH if it exists, else "
        "the built-in)",
    )
    parser.add_argument(
        "--model",
        type=Path,
        help="checkpoint directory or .gguf file to serve (sets unified_model_dir)",
    )
    parser.add_argument(
        "--embeddings-only",
        action="store_true",
        help="serve /v1/embeddings and /v1/models only",
    )
    parser.add_argument(
        "--no-metrics",
        dest="metrics",
        action="store_false",
        help="do not serve Prometheus metrics at /metrics (on by default; "
        "MONGARS_SERVER_METRICS=false does the same)",
    )
    parser.add_argument("--device", help="pin the model to a device ('cpu', 'cuda', 'cuda:1')")
    parser.add_argument(
        "--quantize-4bit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="load in 4-bit NF4 when CUDA is available (default: from settings)",
    )
    add_engine_argument(parser)
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="uvicorn worker processes; each loads its own copy of the model (default: 1)",
    )
    parser.add_argument(
        "--ray", action="store_true", help="deploy on Ray Serve instead of a single process"
    )
    parser.add_argument(
        "--replicas", type=int, default=2, help="Ray Serve replicas (with --ray; default: 2)"
    )
    parser.add_argument(
        "--replica-cpus",
        type=float,
        default=1.0,
        help="CPUs reserved per Ray replica (with --ray; fractions allowed; default: 1)",
    )
    parser.set_defaults(handler=_serve)


def _environment(args: argparse.Namespace) -> dict[str, str]:
    """The MONGARS_* variables equivalent to the flags (for worker processes)."""
    env: dict[str, str] = {}
    if args.profile:
        env["MONGARS_LLM_MODELS_PROFILE"] = args.profile
    if args.manifest:
        env["MONGARS_LLM_MODELS_PATH"] = str(args.manifest.expanduser().resolve())
    if args.model:
        env["MONGARS_UNIFIED_MODEL_DIR"] = str(args.model.expanduser().resolve())
    if args.device:
        env["MONGARS_MODEL__DEVICE"] = args.device
    if args.quantize_4bit is not None:
        env["MONGARS_MODEL__QUANTIZE_4BIT"] = "true" if args.quantize_4bit else "false"
    if args.engine:
        env["MONGARS_MODEL__ENGINE"] = args.engine
    if args.embeddings_only:
        env["MONGARS_SERVER_EMBEDDINGS_ONLY"] = "true"
    if not getattr(args, "metrics", True):
        env["MONGARS_SERVER_METRICS"] = "false"
    return env


def _check(args: argparse.Namespace) -> None:
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port} is not a valid port (1-65535)")
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers} must be at least 1")
    if args.replicas < 1:
        raise ConfigError(f"--replicas {args.replicas} must be at least 1")
    if args.ray and args.workers != 1:
        raise ConfigError("--workers does not apply with --ray; use --replicas")
    if args.model is not None and not args.model.expanduser().exists():
        raise ConfigError(
            f"--model {args.model}: no such directory or file; give a checkpoint directory "
            "or a .gguf file"
        )
    if args.manifest is not None and not args.manifest.expanduser().is_file():
        raise ConfigError(f"--manifest {args.manifest}: no such file")


def _serve(args: argparse.Namespace) -> int:
    from .._extras import require

    _check(args)
    if args.ray:  # [ray] includes [serve]: one install command, named first
        require("ray.serve", "ray", feature="mongars-llm serve --ray")
    uvicorn = require("uvicorn", "serve", feature="mongars-llm serve")
    # flags become environment variables so that every worker/replica sees the same settings
    os.environ.update(_environment(args))
    from ..server import check_credentials
    from ..settings import get_settings

    settings = get_settings(reload=True)
    check_credentials(settings)  # refuse before any worker or replica starts
    if settings.unified_model_dir is None:  # say which model a bare `serve` will fetch
        from ..manager import ModelManager

        reason = ModelManager(settings=settings).profile_reason
        if reason:
            print(f"mongars-llm: {reason}", file=sys.stderr, flush=True)
    if args.ray:
        from ..server.ray import run as run_ray

        run_ray(
            settings,
            host=args.host,
            port=args.port,
            num_replicas=args.replicas,
            ray_actor_options={"num_cpus": args.replica_cpus},
            embeddings_only=args.embeddings_only,
        )
        return 0
    from ..server import uvicorn_options  # request heads bounded in size and time

    level = _uvicorn_log_level()
    if args.workers > 1:
        _multiprocess_metrics()
        uvicorn.run(
            "mongars_llm.server._app:create_app_from_env",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            log_level=level,
            **uvicorn_options(),
        )
        return 0
    from ..server import create_app

    _announce_ready(args.host, args.port)
    app = create_app(settings, embeddings_only=args.embeddings_only or None)
    limits = uvicorn_options(app.state.mongars.config)
    uvicorn.run(app, host=args.host, port=args.port, log_level=level, **limits)
    return 0


def _multiprocess_metrics() -> None:
    """Workers sum their /metrics counters through prometheus_client's multiprocess
    mode: a fresh folder in ``PROMETHEUS_MULTIPROC_DIR`` unless the caller set one
    (it must be empty at start; the caller then owns it)."""
    import tempfile

    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="mongars-metrics-")


def _uvicorn_log_level() -> str:
    import logging

    level = logging.getLogger("mongars_llm").getEffectiveLevel()
    return logging.getLevelName(min(level, logging.INFO)).lower()


class _ReadyLine(logging.Handler):
    """Prints ``ready on http://HOST:PORT`` on stderr when the model has loaded (the
    ``server_ready`` event), whatever the log level."""

    def __init__(self, url: str) -> None:
        super().__init__(logging.INFO)
        self.url = url

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "event", None) == "server_ready":
            fields = getattr(record, "fields", {})
            engine = f" on {fields['engine']}" if fields.get("engine") else ""
            print(
                f"mongars-llm: ready on {self.url} (model {fields.get('model')}{engine}, "
                f"loaded in {fields.get('seconds')} s; Ctrl+C stops)",
                file=sys.stderr,
                flush=True,
            )


def _announce_ready(host: str, port: int) -> None:
    """Let the ``server_ready`` event through to :class:`_ReadyLine` without showing the
    other INFO logs: the handlers of ``mongars_llm`` keep the level asked for."""
    parent = logging.getLogger("mongars_llm")
    for handler in parent.handlers:
        if handler.level == logging.NOTSET:
            handler.setLevel(parent.getEffectiveLevel())
    state_logger = logging.getLogger("mongars_llm.server")  # where server_ready is logged
    if state_logger.getEffectiveLevel() > logging.INFO:
        state_logger.setLevel(logging.INFO)
    shown = f"[{host}]" if ":" in host else host
    state_logger.addHandler(_ReadyLine(f"http://{shown}:{port}"))
