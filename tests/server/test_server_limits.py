"""Bounded queue and body limits: overload is a 503 with Retry-After, never a crash."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from mongars_llm.server import ServerConfig, create_app
from mongars_llm.server._limits import AdmissionController, Overloaded

MESSAGES = [{"role": "user", "content": "Tell me a long story about a fox."}]


async def test_admission_queues_in_order_and_rejects_beyond_the_queue() -> None:
    gate = AdmissionController(max_concurrency=1, max_queue=2, queue_timeout_s=5)
    order: list[int] = []
    release = asyncio.Event()

    async def worker(i: int) -> None:
        await gate.acquire()
        try:
            order.append(i)
            await release.wait()
        finally:
            gate.release()

    tasks = [asyncio.create_task(worker(i)) for i in range(3)]
    await asyncio.sleep(0.01)
    assert (gate.active, gate.waiting) == (1, 2)
    with pytest.raises(Overloaded):
        await gate.acquire()
    release.set()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]
    assert (gate.active, gate.waiting, gate.rejected) == (0, 0, 1)


async def test_admission_wait_times_out_and_frees_its_place() -> None:
    gate = AdmissionController(max_concurrency=1, max_queue=4, queue_timeout_s=0.05)
    await gate.acquire()
    with pytest.raises(Overloaded):
        await gate.acquire()
    assert gate.waiting == 0
    gate.release()
    await gate.acquire()  # the slot is free again
    gate.release()
    assert gate.active == 0


@pytest.mark.serve
async def test_overload_gets_503_with_retry_after_and_the_server_survives(
    serve: Any, server_settings: Any, tiny_model_dir: Any, manager: Any
) -> None:
    from mongars_llm.runtime import UnifiedLLMRuntime

    config = ServerConfig(max_concurrency=1, max_queue=2, queue_timeout_s=60, retry_after_s=3)
    settings = server_settings.model_copy(
        update={"model": server_settings.model.model_copy(update={"max_new_tokens": 64})}
    )
    runtime = UnifiedLLMRuntime.from_pretrained(tiny_model_dir, settings=settings)
    app = create_app(settings, runtime, manager, config=config)
    # 64 greedy tokens keep the single slot busy for a while (~0.5-1 s on a laptop CPU)
    body = {"model": "general", "messages": MESSAGES, "max_tokens": 64, "temperature": 0}
    with serve(app) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:

            async def chat() -> httpx.Response:
                return await http.post("/v1/chat/completions", json=body)

            responses = await asyncio.gather(*(chat() for _ in range(12)))
            statuses = sorted(r.status_code for r in responses)
            ok = [r for r in responses if r.status_code == 200]
            rejected = [r for r in responses if r.status_code == 503]
            assert len(ok) + len(rejected) == 12, statuses
            assert len(ok) >= 3  # one running + two queued always get through
            assert rejected, statuses
            for r in rejected:
                assert r.headers["retry-after"] == "3"
                assert r.json()["error"]["code"] == "overloaded"
                assert r.json()["error"]["type"] == "overloaded_error"
            assert all(r.json()["choices"][0]["message"]["content"] is not None for r in ok)
            # still up, and the queue drained
            assert (await http.get("/healthz")).status_code == 200
            again = await chat()
            assert again.status_code == 200
            state = app.state.mongars
            assert (state.admission.active, state.admission.waiting) == (0, 0)
    runtime.close()


@pytest.mark.serve
def test_bodies_over_the_limit_are_413(
    serve: Any, server_settings: Any, runtime: Any, manager: Any
) -> None:
    config = ServerConfig(max_body_bytes=2048)
    with serve(create_app(server_settings, runtime, manager, config=config)) as server:
        response = httpx.post(
            f"{server.url}/v1/embeddings", json={"model": "embedding", "input": "x" * 5000}
        )
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"
        assert "MONGARS_SERVER_MAX_BODY_BYTES" in response.json()["error"]["message"]


@pytest.mark.serve
def test_chunked_bodies_over_the_limit_are_413(
    serve: Any, server_settings: Any, runtime: Any, manager: Any
) -> None:
    config = ServerConfig(max_body_bytes=2048)
    small = b'{"model": "embedding", "input": "a short text"}'
    big = b'{"model": "embedding", "input": "' + b"x" * 5000 + b'"}'

    def chunked(body: bytes) -> Any:  # no Content-Length: Transfer-Encoding: chunked
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]

    with serve(create_app(server_settings, runtime, manager, config=config)) as server:
        url = f"{server.url}/v1/embeddings"
        headers = {"content-type": "application/json"}
        response = httpx.post(url, content=chunked(big), headers=headers)
        assert response.status_code == 413, response.text
        assert response.json()["error"]["code"] == "request_too_large"
        assert "MONGARS_SERVER_MAX_BODY_BYTES" in response.json()["error"]["message"]
        ok = httpx.post(url, content=chunked(small), headers=headers)
        assert ok.status_code == 200 and len(ok.json()["data"]) == 1
