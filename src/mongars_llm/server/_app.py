"""The application factory: ``create_app(settings, runtime, manager) -> FastAPI``."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from .._extras import require
from .._version import __version__
from ..settings import Settings, get_settings

require("fastapi", "serve", feature="the HTTP server")

from fastapi import APIRouter, FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402

from ._admin import build_admin_router  # noqa: E402
from ._auth import api_key_error, check_credentials  # noqa: E402
from ._config import ServerConfig  # noqa: E402
from ._errors import install_error_handlers  # noqa: E402
from ._limits import LimitsMiddleware  # noqa: E402
from ._ollama import OLLAMA_INFERENCE_PATHS, OllamaErrorMiddleware, build_ollama_router  # noqa: E402
from ._openai import RERANK_PATHS, build_openai_router  # noqa: E402
from ._state import EmbedFn, ServerState  # noqa: E402
from .protocol import HealthResponse, ReadyResponse  # noqa: E402

if TYPE_CHECKING:
    from ._runtime_api import RuntimeAPI

__all__ = ["create_app", "create_app_from_env"]

GUARDED_PATHS = (
    frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", *RERANK_PATHS})
    | OLLAMA_INFERENCE_PATHS
)

DESCRIPTION = """\
mongars-llm serves one open-weight checkpoint for chat, embeddings and reranking.

* **OpenAI-compatible API** (`/v1/...`): point the official `openai` client at
  `http://HOST:PORT/v1`. Model names are the roles of the active profile
  (`GET /v1/models`); `role:adapter` (or the `adapter` field) selects a LoRA adapter.
* **Ollama-compatible API** (`/api/chat`, `/api/generate`, `/api/embed`, `/api/tags`,
  `/api/ps`, `/api/show`, `/api/version`): point Ollama clients at `http://HOST:PORT`.
* **Rerank** (`POST /v1/rerank`, also `/v2/rerank` and `/rerank`): the Cohere v2 /
  Jina shape; point the official `cohere` client's `base_url` at `http://HOST:PORT`.
* **Admin API** (`/api/v1/...`): `Authorization: Bearer $MONGARS_ADMIN_TOKEN`.
* **Health**: `/healthz` (alive) and `/readyz` (model loaded).
* **Metrics**: `/metrics` (Prometheus text format; off with `serve --no-metrics`).

Errors are `{"error": {"message", "type", "param", "code"}}`.
"""


def create_app(
    settings: Settings | None = None,
    runtime: RuntimeAPI | None = None,
    manager: Any | None = None,
    *,
    embeddings_only: bool | None = None,
    config: ServerConfig | None = None,
    embed_fn: EmbedFn | None = None,
) -> FastAPI:
    """Build the HTTP app.

    ``runtime`` is a loaded :class:`~mongars_llm.runtime.UnifiedLLMRuntime`;
    when omitted, ``UnifiedLLMRuntime.shared(settings)`` loads in a background
    thread at startup and ``/readyz`` answers 503 until it is ready.
    ``manager`` defaults to a ``ModelManager(settings=settings)`` built on first
    use. ``embeddings_only`` (default: ``config.embeddings_only``) serves
    ``/v1/embeddings`` and ``/v1/models`` only. ``embed_fn`` replaces
    ``runtime.aembed`` (the Ray deployment passes its ``@serve.batch`` method).

    Raises :class:`~mongars_llm.errors.ConfigError` for an admin token or API key
    that no client could send (only whitespace, or whitespace around it).
    """
    settings = settings if settings is not None else get_settings()
    check_credentials(settings)
    config = config if config is not None else ServerConfig()
    only = config.embeddings_only if embeddings_only is None else embeddings_only
    state = ServerState(
        settings,
        config,
        runtime=runtime,
        manager=manager,
        embeddings_only=only,
        embed_fn=embed_fn,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.start_loading()
        state.start_watcher()
        try:
            yield
        finally:
            state.shutdown()

    app = FastAPI(
        title="mongars-llm",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.mongars = state
    install_error_handlers(app)
    app.include_router(_health_router())
    if config.metrics:
        from ._metrics import Metrics, MetricsMiddleware, metrics_router

        state.metrics = Metrics(state)
        app.include_router(metrics_router())
    app.include_router(build_admin_router())
    app.include_router(build_openai_router(embeddings_only=only))
    app.include_router(build_ollama_router(embeddings_only=only))
    app.add_middleware(
        LimitsMiddleware,
        controller=state.admission,
        guarded_paths=GUARDED_PATHS,
        config=config,
        authenticate=lambda header: api_key_error(header, state.settings.api_key),
    )
    app.add_middleware(OllamaErrorMiddleware)  # outermost: Ollama-shaped errors on /api/*
    if state.metrics is not None:  # around all: the limits' refusals are counted too
        app.add_middleware(MetricsMiddleware, metrics=state.metrics, fastapi_app=app)
    return app


def create_app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` (used by ``mongars-llm serve --workers N``):
    everything comes from ``MONGARS_*`` environment variables."""
    return create_app(get_settings())


def _health_router() -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/healthz", response_model=HealthResponse, summary="The process is alive")
    async def healthz() -> HealthResponse:
        return HealthResponse()

    @router.get(
        "/readyz",
        response_model=ReadyResponse,
        responses={503: {"model": ReadyResponse, "description": "Loading, or failed to load"}},
        summary="The model is loaded and requests can be served",
    )
    async def readyz(request: Request) -> Any:
        state: ServerState = request.app.state.mongars
        runtime = state.runtime
        if runtime is not None:
            return ReadyResponse(
                status="ready",
                model=runtime.model_id,
                embeddings_only=state.embeddings_only,
                adapters=state.adapter_names(),
                registry=state.watcher.status() if state.watcher is not None else None,
            )
        failed = state.load_error is not None
        body = ReadyResponse(
            status="failed" if failed else "loading",
            embeddings_only=state.embeddings_only,
            detail=f"the model failed to load: {state.load_error}" if failed else None,
        )
        return JSONResponse(
            body.model_dump(),
            status_code=503,
            headers={"Retry-After": str(state.config.retry_after_s)},
        )

    return router
