"""``GET /metrics``: scraped with prometheus_client's own parser after real requests
(the official ``openai`` client) on a loopback server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import httpx
import openai
import pytest
from serving_support import ADMIN_TOKEN

from mongars_llm.server import ServerConfig, create_app

pytestmark = pytest.mark.serve

parser = pytest.importorskip("prometheus_client.parser")

MESSAGES = [{"role": "user", "content": "Say hello."}]
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def scrape(http: httpx.Client, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """``{family name: family}`` of one scrape."""
    response = http.get("/metrics", headers=headers if headers is not None else ADMIN)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in parser.text_string_to_metric_families(response.text)}


def value(families: dict[str, Any], name: str, sample: str, **labels: str) -> float:
    """The value of ``sample`` (a sample name) with exactly these ``labels`` (0 when absent)."""
    family = families.get(name)
    for s in family.samples if family is not None else ():
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    return 0.0


@pytest.fixture
def metrics_server(
    serve: Callable[..., AbstractContextManager[Any]],
    server_settings: Any,
    runtime: Any,
    manager: Any,
) -> Iterator[tuple[httpx.Client, openai.OpenAI]]:
    app = create_app(server_settings, runtime, manager)  # an app (and registry) of its own
    with serve(app) as live, httpx.Client(base_url=live.url, timeout=120) as http:
        yield http, openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)


def test_metrics_count_real_requests(metrics_server: Any, runtime: Any) -> None:
    http, client = metrics_server
    before = scrape(http)
    assert value(before, "mongars_model_loaded", "mongars_model_loaded") == 1
    reply = client.chat.completions.create(
        model="general", messages=MESSAGES, max_tokens=4, temperature=0
    )
    streamed = list(
        client.chat.completions.create(
            model="general", messages=MESSAGES, max_tokens=4, temperature=0, stream=True
        )
    )
    assert streamed
    client.embeddings.create(model="embedding", input=["one text", "another text", "a third"])
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-role", input="x")
    after = scrape(http)

    def delta(name: str, sample: str, **labels: str) -> float:
        return value(after, name, sample, **labels) - value(before, name, sample, **labels)

    requests = "mongars_requests_total"
    chat = {"route": "/v1/chat/completions", "method": "POST", "status": "200"}
    assert delta("mongars_requests", requests, **chat) == 2
    embeddings = {"route": "/v1/embeddings", "method": "POST", "status": "200"}
    assert delta("mongars_requests", requests, **embeddings) == 1
    assert delta("mongars_requests", requests, route="/v1/embeddings", status="404") == 1
    assert delta("mongars_requests", requests, route="/metrics", status="200") == 1
    latency = "mongars_request_duration_seconds"
    assert delta(latency, f"{latency}_count", route="/v1/chat/completions") == 2
    assert delta(latency, f"{latency}_bucket", route="/v1/embeddings", le="+Inf") == 2
    # tokens in and out, by endpoint (the streamed reply is counted when it ends)
    usage = reply.usage
    assert usage is not None
    tokens_in = delta("mongars_prompt_tokens", "mongars_prompt_tokens_total", endpoint="chat")
    tokens_out = delta(
        "mongars_completion_tokens", "mongars_completion_tokens_total", endpoint="chat"
    )
    assert tokens_in == 2 * usage.prompt_tokens
    assert usage.completion_tokens <= tokens_out <= usage.completion_tokens + 4
    assert delta("mongars_embedding_texts", "mongars_embedding_texts_total") == 3
    assert delta("mongars_prompt_tokens", "mongars_prompt_tokens_total", endpoint="embeddings") > 0
    # the runtime's micro-batches, the admission queue, the adapters
    assert delta("mongars_batch_items", "mongars_batch_items_total", kind="embed") >= 3
    assert value(after, "mongars_queue_depth", "mongars_queue_depth") == 0
    assert value(after, "mongars_loaded_adapters", "mongars_loaded_adapters") == len(
        runtime.adapter_names
    )


def test_unknown_paths_share_one_label(metrics_server: Any) -> None:
    http, _ = metrics_server
    for path in ("/nope", "/nope/again"):
        assert http.get(path).status_code == 404
    families = scrape(http)
    routes = {s.labels["route"] for s in families["mongars_requests"].samples}
    assert "unmatched" in routes and "/nope" not in routes


def test_metrics_need_a_token_once_one_is_set(metrics_server: Any) -> None:
    http, _ = metrics_server
    missing = http.get("/metrics")
    assert missing.status_code == 401
    assert "Authorization: Bearer" in missing.json()["error"]["message"]
    assert http.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 403


def test_metrics_are_open_without_credentials_and_can_be_turned_off(
    serve: Callable[..., AbstractContextManager[Any]],
    server_settings: Any,
    runtime: Any,
    manager: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    open_settings = server_settings.model_copy(update={"admin_token": None, "api_key": None})
    with (
        serve(create_app(open_settings, runtime, manager)) as live,
        httpx.Client(base_url=live.url) as http,
    ):
        assert "mongars_requests" in scrape(http, headers={})
    monkeypatch.setenv("MONGARS_SERVER__METRICS", "false")
    assert ServerConfig().metrics is False
    with (
        serve(create_app(open_settings, runtime, manager)) as live,
        httpx.Client(base_url=live.url) as http,
    ):
        assert http.get("/metrics").status_code == 404
        assert http.get("/healthz").status_code == 200
    off = create_app(open_settings, runtime, manager, config=ServerConfig(metrics=False))
    assert off.state.mongars.metrics is None
