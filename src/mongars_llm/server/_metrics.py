"""``GET /metrics``: the server's Prometheus metrics (text format, ``prometheus_client``).

One :class:`Metrics` per app, on its own :class:`~prometheus_client.CollectorRegistry`
(never the process-global one: two apps in one process, as in the tests or
under Ray, count separately). It is on by default, as in vLLM and TEI;
``mongars-llm serve --no-metrics`` or ``MONGARS_SERVER_METRICS=false`` turns it
off (the route then answers 404). When ``MONGARS_ADMIN_TOKEN`` or
``MONGARS_API_KEY`` is set, a scrape must send one of them as
``Authorization: Bearer ...`` (Prometheus' ``authorization`` scrape setting).

What is counted, as requests finish (:class:`MetricsMiddleware`, outermost, so
401s and the limits' 413/429/503 count too):

* ``mongars_requests_total{route,method,status}`` and
  ``mongars_request_duration_seconds{route}`` (a histogram; a streamed answer
  counts until its last byte). ``route`` is the route's path template
  (``/v1/chat/completions``, ``/api/v1/adapters/{name}``), or ``unmatched``;
* ``mongars_prompt_tokens_total{endpoint}`` and
  ``mongars_completion_tokens_total{endpoint}`` (tokens in and out; the routes
  call :meth:`Metrics.generated` and :meth:`Metrics.embedded`);
* ``mongars_embedding_texts_total`` (texts embedded);

and what is read at scrape time (:class:`_StateCollector`):

* ``mongars_queue_depth`` and ``mongars_running_requests`` (admission control),
  ``mongars_rejected_requests_total``;
* ``mongars_batches_total{kind}``, ``mongars_batch_requests_total{kind}``,
  ``mongars_batch_items_total{kind}`` and ``mongars_batch_size_max{kind}``:
  the runtime's micro-batches (``kind``: ``embed``, ``generate``); the mean
  batch size is ``items / batches``;
* ``mongars_loaded_adapters`` and ``mongars_adapter_loaded{adapter}`` (1 per
  resident adapter), ``mongars_model_loaded`` and
  ``mongars_model_load_seconds`` (when this app loaded the model itself).

Several processes: under ``serve --workers N`` each worker is its own
process, and a scrape reaches whichever worker accepts it; ``serve`` therefore
points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh folder (unless it is set) and
the counters and histograms above are summed over the workers by
prometheus_client's multiprocess mode, while the scrape-time gauges describe
the worker that answered. Under Ray (:mod:`.ray`) each replica answers for
itself.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from .._extras import require

require("prometheus_client", "serve", feature="the /metrics route")

from fastapi import APIRouter, Request, Response  # noqa: E402
from prometheus_client import (  # noqa: E402
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily  # noqa: E402

from ._auth import bearer_token, tokens_match  # noqa: E402
from ._errors import APIError  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Iterator

    from fastapi import FastAPI

    from ._state import ServerState

__all__ = [
    "CONTENT_TYPE_LATEST",
    "Metrics",
    "MetricsMiddleware",
    "metrics_router",
    "render_metrics",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: request latency buckets (seconds): from a health check to a long generation
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
#: the environment variable of prometheus_client's multiprocess mode
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    """The metrics of one app (see the module doc)."""

    def __init__(self, state: ServerState) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter(
            "mongars_requests",
            "HTTP requests answered, by route template, method and status code.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "mongars_request_duration_seconds",
            "Time from a request's arrival to its answer's last byte, by route template.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "mongars_prompt_tokens",
            "Tokens read: prompts of generations, inputs of embeddings.",
            ["endpoint"],
            registry=registry,
        )
        self.completion_tokens = Counter(
            "mongars_completion_tokens",
            "Tokens generated.",
            ["endpoint"],
            registry=registry,
        )
        self.embedding_texts = Counter(
            "mongars_embedding_texts", "Texts embedded.", registry=registry
        )
        registry.register(_StateCollector(state))
        self._state = state

    # -- what the routes report -------------------------------------------------
    def generated(self, endpoint: str, prompt_tokens: int, completion_tokens: int) -> None:
        """One generation's usage (``endpoint``: ``chat``, ``completion``, ...)."""
        self.prompt_tokens.labels(endpoint=endpoint).inc(max(0, int(prompt_tokens)))
        self.completion_tokens.labels(endpoint=endpoint).inc(max(0, int(completion_tokens)))

    def embedded(self, texts: int, tokens: int, endpoint: str = "embeddings") -> None:
        """One embeddings request: how many texts, how many tokens."""
        self.embedding_texts.inc(max(0, int(texts)))
        self.prompt_tokens.labels(endpoint=endpoint).inc(max(0, int(tokens)))

    async def count_stream(
        self, events: AsyncIterator[str], stream: Any, endpoint: str
    ) -> AsyncIterator[str]:
        """``events`` unchanged; the stream's usage is counted once it ended."""
        async for event in events:
            yield event
        try:
            usage = stream.result.usage
        except Exception:  # a failed stream reported its error in the events
            return
        self.generated(endpoint, usage.prompt_tokens, usage.completion_tokens)

    # -- the scrape ----------------------------------------------------------------
    def render(self) -> bytes:
        """The text exposition of this app's metrics (summed over the worker processes
        in multiprocess mode)."""
        folder = os.environ.get(MULTIPROC_ENV)
        if not folder or not os.path.isdir(folder):
            return bytes(generate_latest(self.registry))
        from prometheus_client import multiprocess

        combined = CollectorRegistry()
        multiprocess.MultiProcessCollector(combined, path=folder)  # type: ignore[no-untyped-call]
        scraped = CollectorRegistry()
        scraped.register(_StateCollector(self._state))
        return bytes(generate_latest(combined)) + bytes(generate_latest(scraped))


def render_metrics(state: ServerState) -> bytes:
    """``GET /metrics``'s body (``state.metrics`` must be set)."""
    assert state.metrics is not None
    return state.metrics.render()


class _StateCollector:
    """Values read when scraped: admission, micro-batching, adapters, model load."""

    def __init__(self, state: ServerState) -> None:
        self._state = state

    def describe(self) -> list[Any]:
        return []  # names are only known at collect time; nothing to check up front

    def collect(self) -> Iterator[Any]:
        state = self._state
        admission = state.admission
        yield GaugeMetricFamily(
            "mongars_queue_depth", "Requests waiting for a slot.", value=admission.waiting
        )
        yield GaugeMetricFamily(
            "mongars_running_requests", "Inference requests holding a slot.", value=admission.active
        )
        yield CounterMetricFamily(
            "mongars_rejected_requests",
            "Requests refused because the queue was full or the wait timed out.",
            value=admission.rejected,
        )
        runtime = state.runtime
        yield GaugeMetricFamily(
            "mongars_model_loaded", "1 once the model is loaded.", value=int(runtime is not None)
        )
        if state.load_seconds is not None:
            yield GaugeMetricFamily(
                "mongars_model_load_seconds",
                "Seconds this server took to load the model.",
                value=state.load_seconds,
            )
        if runtime is None:
            return
        names = list(runtime.adapter_names)
        yield GaugeMetricFamily(
            "mongars_loaded_adapters", "LoRA adapters resident on the model.", value=len(names)
        )
        resident = GaugeMetricFamily(
            "mongars_adapter_loaded", "1 for each resident LoRA adapter.", labels=["adapter"]
        )
        for name in names:
            resident.add_metric([name], 1)
        yield resident
        stats_of = getattr(runtime, "stats", None)
        stats = stats_of() if callable(stats_of) else {}
        families = {
            "batches": CounterMetricFamily(
                "mongars_batches", "Micro-batches the runtime ran.", labels=["kind"]
            ),
            "requests": CounterMetricFamily(
                "mongars_batch_requests", "Calls those batches held.", labels=["kind"]
            ),
            "items": CounterMetricFamily(
                "mongars_batch_items",
                "Items (texts, sequences) those batches held; items / batches is the mean "
                "batch size.",
                labels=["kind"],
            ),
        }
        largest = GaugeMetricFamily(
            "mongars_batch_size_max", "Largest micro-batch so far.", labels=["kind"]
        )
        for kind, counters in sorted(stats.items()):
            if not isinstance(counters, dict):
                continue
            for key, family in families.items():
                family.add_metric([kind], float(counters.get(key, 0)))
            largest.add_metric([kind], float(counters.get("largest_batch", 0)))
        yield from families.values()
        yield largest


class MetricsMiddleware:
    """Pure ASGI middleware: counts each HTTP request by route template and status,
    and times it until the answer's last byte."""

    def __init__(self, app: ASGIApp, metrics: Metrics, fastapi_app: FastAPI) -> None:
        self.app = app
        self.metrics = metrics
        self._fastapi_app = fastapi_app
        self._static: frozenset[str] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def counted_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counted_send)
        finally:
            route = self._route(scope)
            self.metrics.requests.labels(
                route=route, method=str(scope.get("method", "")), status=str(status)
            ).inc()
            self.metrics.latency.labels(route=route).observe(time.perf_counter() - started)

    def _route(self, scope: Scope) -> str:
        """The matched route's path template; a static path a middleware answered
        before routing; else ``unmatched`` (no label per unknown URL)."""
        matched = scope.get("route")
        path = getattr(matched, "path", None)
        if isinstance(path, str):
            return path
        if self._static is None:
            self._static = frozenset(
                p
                for p in (getattr(r, "path", None) for r in self._fastapi_app.routes)
                if isinstance(p, str) and "{" not in p
            )
        raw = str(scope.get("path", ""))
        return raw if raw in self._static else "unmatched"


def metrics_router() -> APIRouter:
    """``GET /metrics``: open while no credential is configured; otherwise the admin
    token or the API key, as a bearer token (401 without, 403 with a wrong one)."""
    router = APIRouter(tags=["metrics"])

    @router.get(
        "/metrics",
        response_class=Response,
        responses={
            200: {
                "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
                "description": "Prometheus text exposition format",
            }
        },
        summary="Prometheus metrics",
    )
    async def metrics(request: Request) -> Response:
        state: ServerState = request.app.state.mongars
        _check_scrape(request, state)
        return Response(render_metrics(state), media_type=CONTENT_TYPE_LATEST)

    return router


def _check_scrape(request: Request, state: ServerState) -> None:
    """A scrape needs the admin token or the API key once either is configured."""
    expected = [
        secret
        for secret in (state.settings.admin_token, state.settings.api_key)
        if secret is not None and secret.get_secret_value()
    ]
    if not expected:
        return
    given = bearer_token(request)
    if given is None:
        raise APIError(
            401,
            "missing token: /metrics needs 'Authorization: Bearer <admin token or API key>'",
            code="missing_token",
            headers={"WWW-Authenticate": 'Bearer realm="mongars-metrics"'},
        )
    if not any(tokens_match(given, secret) for secret in expected):
        raise APIError(403, "the token is not valid for /metrics", code="invalid_token")
