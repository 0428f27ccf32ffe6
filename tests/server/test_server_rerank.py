"""``POST /v1/rerank`` (and ``/v2/rerank``, ``/rerank``), driven with the official
``cohere`` client and with httpx for the Jina shape and the error cases."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from serving_support import lora_compatibility, make_lora_adapter, make_settings

from mongars_llm.registry import AdapterRegistry
from mongars_llm.settings import ModelSettings, Settings

pytestmark = pytest.mark.serve

API_KEY = "sk-rerank-5d1e0b"
QUERY = "where is Paris?"
DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France.",
    "def add(a, b):\n    return a + b\n",
]


@pytest.fixture(scope="module")
def rerank_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mongars_llm.testing import RERANK_CORPUS_LINE, TINY_CORPUS, build_tiny_model

    return build_tiny_model(
        tmp_path_factory.mktemp("tiny-rerank") / "llama",
        corpus=[*TINY_CORPUS, RERANK_CORPUS_LINE],
    )


@pytest.fixture(scope="module")
def rerank_settings(tmp_path_factory: pytest.TempPathFactory, rerank_model_dir: Path) -> Settings:
    folder = tmp_path_factory.mktemp("rerank-server")
    manifest = {
        "profiles": {
            "default": {"models": {"general": {"name": str(rerank_model_dir), "provider": "local"}}}
        }
    }
    path = folder / "llm_models.json"
    path.write_text(json.dumps(manifest))
    model = ModelSettings(device="cpu", dtype="float32", max_new_tokens=8, max_input_tokens=256)
    return make_settings(folder, rerank_model_dir, path, model=model, api_key=SecretStr(API_KEY))


@pytest.fixture(scope="module")
def rerank_runtime(rerank_settings: Settings, rerank_model_dir: Path) -> Iterator[Any]:
    from mongars_llm.runtime import UnifiedLLMRuntime

    runtime = UnifiedLLMRuntime.from_pretrained(
        rerank_model_dir, device="cpu", dtype="float32", settings=rerank_settings
    )
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def rerank_server(
    serve: Callable[..., AbstractContextManager[Any]],
    rerank_settings: Settings,
    rerank_runtime: Any,
) -> Iterator[Any]:
    from mongars_llm.manager import ModelManager
    from mongars_llm.server import ServerConfig, create_app

    app = create_app(
        rerank_settings,
        rerank_runtime,
        ModelManager(settings=rerank_settings),
        config=ServerConfig(max_embedding_inputs=8, max_input_chars=5000, registry_poll_s=0.1),
    )
    with serve(app) as server:
        yield server


@pytest.fixture
def http(rerank_server: Any) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=rerank_server.url, headers=headers, timeout=120) as client:
        yield client


def test_the_cohere_client_reranks_as_the_runtime_does(
    rerank_server: Any, rerank_runtime: Any
) -> None:
    import cohere

    client = cohere.ClientV2(base_url=rerank_server.url, api_key=API_KEY)
    response = client.rerank(model="general", query=QUERY, documents=DOCS, top_n=2)
    expected = rerank_runtime.rerank(QUERY, DOCS, top_n=2)
    assert [r.index for r in response.results] == [r.index for r in expected]
    for got, want in zip(response.results, expected, strict=True):
        assert got.relevance_score == pytest.approx(want.score, abs=1e-5)
    assert response.id
    assert response.meta is not None and response.meta.billed_units is not None
    everything = client.rerank(model="general", query=QUERY, documents=DOCS)
    assert sorted(r.index for r in everything.results) == [0, 1, 2]
    scores = [r.relevance_score for r in everything.results]
    assert scores == sorted(scores, reverse=True)


def test_the_cohere_client_needs_the_api_key(rerank_server: Any) -> None:
    import cohere

    client = cohere.ClientV2(base_url=rerank_server.url, api_key="wrong")
    with pytest.raises(cohere.errors.UnauthorizedError):
        client.rerank(model="general", query=QUERY, documents=DOCS)


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/v2/rerank"])
def test_jina_shape_with_documents_returned(http: httpx.Client, path: str) -> None:
    body = {
        "model": "general",
        "query": QUERY,
        "documents": [DOCS[0], {"text": DOCS[1]}],
        "return_documents": True,
    }
    response = http.post(path, json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["model"] == "general"
    assert {r["index"] for r in data["results"]} == {0, 1}
    for result in data["results"]:
        assert result["document"] == {"text": DOCS[result["index"]]}
        assert 0.0 < result["relevance_score"] < 1.0
    assert data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] > 0
    plain = http.post(path, json={**body, "return_documents": False}).json()
    assert all("document" not in r for r in plain["results"])


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"documents": []}, 422, "documents"),
        ({"documents": ["a"] * 9}, 413, "documents"),
        ({"documents": ["x" * 5001]}, 413, "documents[0]"),
        ({"query": "q" * 5001}, 413, "query"),
        ({"query": "  "}, 422, "query"),
        ({"query": "where " * 150}, 413, "query"),  # fits the chars, not the prompt
        ({"top_n": 0}, 422, "top_n"),
        ({"top_n": "2"}, 422, "top_n"),
        ({"documents": [3]}, 422, "documents"),
        ({"model": "nope"}, 404, "model"),
        ({"model": "general:nope"}, 404, "adapter"),
    ],
)
def test_bad_requests_are_clear_errors(
    http: httpx.Client, body: dict[str, Any], status: int, param: str
) -> None:
    request = {"model": "general", "query": QUERY, "documents": DOCS, **body}
    response = http.post("/v1/rerank", json=request)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] is not None and error["param"].startswith(param), error
    assert error["message"]


def test_top_n_past_the_list_returns_all_and_long_documents_are_cut(http: httpx.Client) -> None:
    long = "Paris is the capital of France. " * 150  # 4800 chars: past the prompt's room
    response = http.post(
        "/v1/rerank",
        json={"model": "general", "query": QUERY, "documents": [long, "no"], "top_n": 10},
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 2
    capped = http.post(
        "/v1/rerank",
        json={
            "model": "general",
            "query": QUERY,
            "documents": [long, "no"],
            "max_tokens_per_doc": 4,
        },
    )
    assert capped.json()["usage"]["total_tokens"] < response.json()["usage"]["total_tokens"]


def _model_ids(http: httpx.Client) -> list[str]:
    return [m["id"] for m in http.get("/v1/models").json()["data"]]


def test_a_registered_rerank_adapter_serves_rerank_only(
    http: httpx.Client, rerank_settings: Settings, rerank_model_dir: Path, tmp_path: Path
) -> None:
    registry = AdapterRegistry(rerank_settings.llm_adapter_registry_path)
    adapter = make_lora_adapter(rerank_model_dir, tmp_path / "judge", seed=5)
    registry.register(
        adapter,
        name="judge",
        compatibility=lora_compatibility(rerank_model_dir),
        use="rerank",
        objective="rerank",
    )
    deadline = time.monotonic() + 60
    while "general:judge-v1" not in _model_ids(http):
        assert time.monotonic() < deadline, _model_ids(http)
        time.sleep(0.1)
    request = {"query": QUERY, "documents": DOCS}
    base = http.post("/v1/rerank", json={"model": "general", **request}).json()
    tuned = http.post("/v1/rerank", json={"model": "general:judge-v1", **request})
    assert tuned.status_code == 200, tuned.text
    latest = http.post("/v1/rerank", json={"model": "general:latest", **request}).json()
    assert latest["results"] == tuned.json()["results"]
    scores = {r["index"]: r["relevance_score"] for r in base["results"]}
    tuned_scores = {r["index"]: r["relevance_score"] for r in tuned.json()["results"]}
    assert tuned_scores != pytest.approx(scores, abs=1e-4)
    chat = http.post(
        "/v1/chat/completions",
        json={"model": "general:judge-v1", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert chat.status_code == 400, chat.text
    error = chat.json()["error"]
    assert error["code"] == "adapter_wrong_use"
    assert "rerank adapter" in error["message"] and "/v1/rerank" in error["message"]
    embed = http.post("/v1/embeddings", json={"model": "general:judge-v1", "input": "x"})
    assert embed.status_code == 400, embed.text
