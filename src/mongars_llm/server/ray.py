"""Ray Serve deployment of the same FastAPI app (``[ray]`` extra).

>>> from ray import serve
>>> from mongars_llm.server.ray import build_deployment
>>> serve.run(build_deployment(num_replicas=2))          # doctest: +SKIP

Each replica loads the runtime once, serves the app built by
:func:`~mongars_llm.server.create_app` (``@serve.ingress``), batches embedding
requests with ``@serve.batch`` and watches the adapter registry: a new
``latest`` version is verified and loaded into the running replica without a
restart (``model="general:latest"`` then uses it). Responses carry the
``X-Mongars-Replica`` header so that clients and tests can tell replicas apart.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, cast

from .._extras import require
from ..logging import log_event
from ..settings import Settings, get_settings

ray = require("ray", "ray", feature="the Ray Serve deployment")
serve = require("ray.serve", "ray", feature="the Ray Serve deployment")

__all__ = ["MongarsDeployment", "build_deployment", "run"]

logger = logging.getLogger("mongars_llm.server")

REPLICA_HEADER = "x-mongars-replica"


@dataclass
class DeploymentOptions:
    """What every replica needs besides the settings (picklable)."""

    embeddings_only: bool = False
    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.005
    registry_poll_s: float = 2.0
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class _EmbedCall:
    texts: list[str]
    kwargs: dict[str, Any]

    def key(self) -> tuple[Any, ...]:
        return tuple(sorted(self.kwargs.items()))


class _ReplicaHeader:
    """Pure ASGI middleware adding ``X-Mongars-Replica`` to every response."""

    def __init__(self, app: Any, *, replica: str) -> None:
        self.app = app
        self.replica = replica.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [
                        *message.get("headers", []),
                        (REPLICA_HEADER.encode(), self.replica),
                    ],
                }
            await send(message)

        await self.app(scope, receive, send_with_header)


def _load_runtime(settings: Settings) -> Any:
    from ..runtime import UnifiedLLMRuntime

    return UnifiedLLMRuntime.shared(settings)


@serve.deployment(max_ongoing_requests=128, health_check_period_s=5)
@serve.ingress()
class MongarsDeployment:
    """One replica: the runtime, the batched embedder and the registry watcher."""

    async def __init__(  # type: ignore[misc]  # Ray awaits an async constructor
        self, settings: Settings, options: DeploymentOptions
    ) -> None:
        from ._adapters import RegistryWatcher

        self.settings = settings
        self.deploy_options = options
        self.runtime = await asyncio.to_thread(_load_runtime, settings)
        self._embed_batch.set_max_batch_size(options.max_batch_size)
        self._embed_batch.set_batch_wait_timeout_s(options.batch_wait_timeout_s)
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a replica (unit use)
            self.replica = "local"
        self.watcher = RegistryWatcher(
            self.runtime,
            settings.llm_adapter_registry_path,
            poll_s=options.registry_poll_s,
        )
        try:
            await asyncio.to_thread(self.watcher.poll_once)  # the current latest, before traffic
        except Exception as err:
            log_event(logger, "adapter_registry_poll_failed", logging.WARNING, error=str(err))
        self.watcher.start()
        log_event(
            logger,
            "ray_replica_ready",
            replica=self.replica,
            model=getattr(self.runtime, "model_id", None),
            adapter_version=self.watcher.current_version,
        )

    def __serve_build_asgi_app__(self) -> Any:
        from ._app import create_app
        from ._config import ServerConfig

        config = ServerConfig(**self.deploy_options.config)
        app = create_app(
            self.settings,
            self.runtime,
            embeddings_only=self.deploy_options.embeddings_only,
            config=config,
            embed_fn=self.embed,
        )
        app.state.mongars.watcher = self.watcher
        app.add_middleware(_ReplicaHeader, replica=self.replica)
        return app

    async def embed(self, texts: list[str], **kwargs: Any) -> Any:
        """One request's texts, batched with other requests by ``@serve.batch``."""
        result = await self._embed_batch(_EmbedCall(list(texts), kwargs))
        if isinstance(result, BaseException):
            raise result
        return result

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _embed_batch(self, calls: list[_EmbedCall]) -> list[Any]:
        # calls with the same options share one runtime.embed; others run separately
        groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
        for index, call in enumerate(calls):
            groups[call.key()].append(index)
        results: list[Any] = [None] * len(calls)
        for indices in groups.values():
            kwargs = calls[indices[0]].kwargs
            texts = [text for i in indices for text in calls[i].texts]
            try:
                vectors = await asyncio.to_thread(self.runtime.embed, texts, **kwargs)
            except Exception as err:  # only the requests of this group fail
                for i in indices:
                    results[i] = err
                continue
            start = 0
            for i in indices:
                count = len(calls[i].texts)
                results[i] = vectors[start : start + count]
                start += count
        return results

    def __del__(self) -> None:
        watcher = getattr(self, "watcher", None)
        if watcher is not None:
            watcher.stop(timeout=1.0)


def build_deployment(
    settings: Settings | None = None,
    *,
    num_replicas: int = 2,
    ray_actor_options: dict[str, Any] | None = None,
    embeddings_only: bool = False,
    max_batch_size: int | None = None,
    batch_wait_timeout_s: float | None = None,
    registry_poll_s: float = 2.0,
    max_ongoing_requests: int = 128,
    server_config: dict[str, Any] | None = None,
    name: str = "mongars-llm",
) -> Any:
    """A bound Ray Serve application (pass it to ``serve.run``).

    ``max_batch_size``/``batch_wait_timeout_s`` of ``@serve.batch`` default to
    ``settings.model.max_batch_size``/``batch_wait_ms``; ``registry_poll_s`` is
    how often replicas look for a new adapter version; ``server_config`` holds
    :class:`~mongars_llm.server.ServerConfig` fields (limits) for the app.
    """
    settings = settings if settings is not None else get_settings()
    options = DeploymentOptions(
        embeddings_only=embeddings_only,
        max_batch_size=max_batch_size or settings.model.max_batch_size,
        batch_wait_timeout_s=(
            batch_wait_timeout_s
            if batch_wait_timeout_s is not None
            else settings.model.batch_wait_ms / 1000.0
        ),
        registry_poll_s=registry_poll_s,
        config=dict(server_config or {}),
    )
    deployment = cast(Any, MongarsDeployment).options(
        name=name,
        num_replicas=num_replicas,
        ray_actor_options=ray_actor_options if ray_actor_options is not None else {"num_cpus": 0.5},
        max_ongoing_requests=max_ongoing_requests,
    )
    return deployment.bind(settings, options)


def run(
    settings: Settings | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    blocking: bool = True,
    **deployment_kwargs: Any,
) -> Any:
    """Start (or join, with ``RAY_ADDRESS``) a Ray cluster, deploy, and serve HTTP on
    ``host:port``; with ``blocking`` it runs until interrupted (``mongars-llm serve --ray``)."""
    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    app = build_deployment(settings, **deployment_kwargs)
    try:
        return serve.run(app, name="mongars-llm", route_prefix="/", blocking=blocking)
    finally:
        if blocking:
            serve.shutdown()
