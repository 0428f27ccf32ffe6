"""Ray Serve deployment of the same FastAPI app (``[ray]`` extra).

>>> from ray import serve
>>> from mongars_llm.server.ray import build_deployment
>>> serve.run(build_deployment(num_replicas=2))          # doctest: +SKIP

Each replica loads the runtime once, serves the app built by
:func:`~mongars_llm.server.create_app` (``@serve.ingress``), batches embedding
requests with ``@serve.batch`` and watches the adapter registry without a
restart: the ``promoted`` version is the default adapter, the newest version
answers requests that name it (``model="general:latest"``). Responses carry the
``X-Mongars-Replica`` header so that clients and tests can tell replicas apart.

:func:`init_ray` joins the cluster in ``RAY_ADDRESS`` or starts a local one
whose every process listens on 127.0.0.1 only, with Ray Serve's proxy
readiness and health-check timeouts raised for slow machines
(:data:`SERVE_TIMEOUTS`); :func:`start_serve` starts Serve, retrying while a
slow proxy is restarted, and :func:`wait_for_http` waits, within a generous
bound, until the proxy routes traffic; :func:`run` does it all.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import logging
import os
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from .._extras import require
from ..logging import log_event
from ..settings import Settings, get_settings

ray = require("ray", "ray", feature="the Ray Serve deployment")
serve = require("ray.serve", "ray", feature="the Ray Serve deployment")

__all__ = [
    "SERVE_TIMEOUTS",
    "MongarsDeployment",
    "build_deployment",
    "init_ray",
    "run",
    "start_serve",
    "wait_for_http",
]

logger = logging.getLogger("mongars_llm.server")

REPLICA_HEADER = "x-mongars-replica"

#: Ray Serve's controller gives a new HTTP proxy 5 s to report ready and each
#: health check 10 s, then kills the proxy (``serve.start`` fails with
#: ``ActorDiedError``): a loaded machine needs longer. The controller reads these
#: when it starts, so they must be in the environment before Ray starts; values
#: already set there win. On a cluster started with ``ray start``, export them
#: on every node before ``ray start``.
SERVE_TIMEOUTS: Mapping[str, str] = {
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
    "RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S": "10",
}

#: Ray's switch for single-machine mode (what it uses on macOS and Windows): the
#: node registers at, and every Ray process listens on, 127.0.0.1 only.
_LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK = "127.0.0.1"


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


def _pin_replica_grpc_to_loopback() -> None:
    """Bind this replica's inter-deployment gRPC server to 127.0.0.1 on a loopback node.

    Ray Serve starts that server on ``[::]:0`` (every interface; not
    configurable) right after the replica's constructor. On a node registered
    at 127.0.0.1 (:func:`init_ray`'s local cluster) no other machine can be a
    caller, so the wildcard only exposes the replica to the network.
    """
    try:
        from ray.serve._private import replica as replica_module

        node_ip = ray.util.get_node_ip_address()
    except Exception:  # outside a replica, or another Ray layout: leave Ray as it is
        return
    original = getattr(replica_module, "add_port_to_grpc_server", None)
    if node_ip != LOOPBACK or original is None or getattr(original, "_mongars_loopback", False):
        return

    def add_port(server: Any, address: str) -> Any:
        if address.startswith("[::]:"):
            address = f"{LOOPBACK}:{address.rsplit(':', 1)[1]}"
        return original(server, address)

    add_port._mongars_loopback = True  # type: ignore[attr-defined]
    replica_module.add_port_to_grpc_server = add_port


def _load_runtime(settings: Settings) -> Any:
    from ..runtime import UnifiedLLMRuntime

    return UnifiedLLMRuntime.shared(settings)


# health checks get a minute: on a loaded machine a busy replica answers late, not never
@serve.deployment(max_ongoing_requests=128, health_check_period_s=5, health_check_timeout_s=60)
@serve.ingress()
class MongarsDeployment:
    """One replica: the runtime, the batched embedder and the registry watcher."""

    async def __init__(  # type: ignore[misc]  # Ray awaits an async constructor
        self, settings: Settings, options: DeploymentOptions
    ) -> None:
        from ._registry_watcher import RegistryWatcher

        _pin_replica_grpc_to_loopback()
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
            await asyncio.to_thread(self.watcher.poll_once)  # the registry's state, before traffic
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

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)  # type: ignore[untyped-decorator]
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


def init_ray(address: str | None = None, **init_kwargs: Any) -> bool:
    """Connect this process to Ray; True when it started a local cluster.

    ``address`` (default: ``RAY_ADDRESS``) joins an existing cluster, for
    example one started with ``ray start --head --node-ip-address=<ip>``.
    Without one a local single-node cluster starts with every Ray process
    listening on 127.0.0.1 only (Ray would otherwise register the node at, and
    bind its services to, the machine's network address). ``init_kwargs`` go
    to ``ray.init`` (``num_cpus=2``, ...). Either way :data:`SERVE_TIMEOUTS`
    are put in the environment first (existing values win). Nothing happens
    when Ray is already initialised.
    """
    for key, value in SERVE_TIMEOUTS.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, **init_kwargs)
        return False
    init_kwargs.setdefault("include_dashboard", False)
    with _loopback_only():
        ray.init(_node_ip_address=LOOPBACK, **init_kwargs)
    log_event(logger, "ray_local_cluster_started", node_ip_address=LOOPBACK)
    return True


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """Ray's single-machine mode while a local cluster starts.

    Ray reads the switch when it is imported (so the module constant is set
    too) and turns ``_node_ip_address="127.0.0.1"`` into the network address
    unless it is off; the processes it starts inherit the environment.
    """
    saved_env = os.environ.get(_LOOPBACK_SWITCH)
    os.environ[_LOOPBACK_SWITCH] = "0"
    constants: Any = None
    with contextlib.suppress(ImportError):
        constants = importlib.import_module("ray._private.ray_constants")
    saved_constant = getattr(constants, "ENABLE_RAY_CLUSTER", None)
    if saved_constant is not None:
        constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if saved_constant is not None:
            constants.ENABLE_RAY_CLUSTER = saved_constant
        if saved_env is None:
            os.environ.pop(_LOOPBACK_SWITCH, None)
        else:
            os.environ[_LOOPBACK_SWITCH] = saved_env


def start_serve(*, host: str = LOOPBACK, port: int = 8000, timeout_s: float = 600.0) -> None:
    """Start Ray Serve (controller and HTTP proxy on ``host:port``), within ``timeout_s``.

    ``serve.start`` waits a fixed 60 s for the proxy, and on a loaded machine
    the controller may restart a proxy that is slow to come up, which
    ``serve.start`` reports as an ``ActorDiedError``: this retries it until
    ``timeout_s`` has passed (then the last error is raised). The proxy
    answers HTTP once an application is deployed: :func:`wait_for_http`.
    """
    kwargs: dict[str, Any] = {"http_options": {"host": host, "port": port}}
    if "controller_options" in inspect.signature(serve.start).parameters:
        # reaches the controller even on a cluster that was started elsewhere
        kwargs["controller_options"] = {"runtime_env": {"env_vars": dict(SERVE_TIMEOUTS)}}
    deadline = time.monotonic() + timeout_s
    attempt = 0
    while True:
        attempt += 1
        try:
            serve.start(**kwargs)
            return
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, TimeoutError) as err:
            if time.monotonic() >= deadline:
                raise
            log_event(
                logger,
                "ray_serve_start_retry",
                logging.WARNING,
                attempt=attempt,
                error=f"{type(err).__name__}: {err}"[:500],
            )
            time.sleep(min(2.0 * attempt, 10.0))


def wait_for_http(*, host: str = LOOPBACK, port: int = 8000, timeout_s: float = 600.0) -> None:
    """Poll Serve's HTTP proxy (``/-/healthz``) until it routes traffic to a deployed app.

    :class:`TimeoutError` past ``timeout_s``, naming the last answer and the fix.
    """
    import urllib.error
    import urllib.request

    target = LOOPBACK if host in ("0.0.0.0", "::", "") else host
    url = f"http://{'[' + target + ']' if ':' in target else target}:{port}/-/healthz"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never HTTP_PROXY
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with opener.open(url, timeout=10) as response:
                if response.status == 200:
                    return
                problem = f"HTTP {response.status}"
        except urllib.error.HTTPError as err:  # 503 until routes and replicas are known
            problem = f"HTTP {err.code}: {err.read(200).decode(errors='replace')}"
        except (urllib.error.URLError, OSError) as err:
            problem = str(err)
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"Ray Serve's HTTP proxy on {host}:{port} did not answer GET /-/healthz with "
                f"200 within {timeout_s:g} s (last: {problem}); on a loaded machine raise the "
                "bound (run(start_timeout_s=...)); the Serve logs are under "
                "/tmp/ray/session_latest/logs/serve/"
            )
        time.sleep(0.5)


def run(
    settings: Settings | None = None,
    *,
    host: str = LOOPBACK,
    port: int = 8000,
    blocking: bool = True,
    start_timeout_s: float = 600.0,
    **deployment_kwargs: Any,
) -> Any:
    """Join the cluster in ``RAY_ADDRESS`` or start a local one on 127.0.0.1
    (:func:`init_ray`), deploy, and serve HTTP on ``host:port``, returning once
    the proxy answers (within ``start_timeout_s`` in all); with ``blocking`` it
    then runs until interrupted (``mongars-llm serve --ray``)."""
    init_ray()
    started = time.monotonic()
    start_serve(host=host, port=port, timeout_s=start_timeout_s)
    app = build_deployment(settings, **deployment_kwargs)
    try:
        handle = serve.run(app, name="mongars-llm", route_prefix="/")
        remaining = max(start_timeout_s - (time.monotonic() - started), 30.0)
        wait_for_http(host=host, port=port, timeout_s=remaining)
        log_event(logger, "ray_serve_ready", host=host, port=port)
        if not blocking:
            return handle
        while True:  # as serve.run(blocking=True): until Ctrl-C
            time.sleep(10)
    finally:
        if blocking:
            serve.shutdown()
