"""Bounded queue and body limits: overload is a 503 with Retry-After, never a crash."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

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


# --------------------------------------------------------------------- slow bodies, headers

API_KEY = "sk-limits-3b9f1c"


def _raw_exchange(host: str, port: int, request: bytes, *, timeout: float) -> tuple[int, bytes]:
    """Send ``request`` on a fresh socket; (status, body) once the server closes it."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(request)
        return _read_until_closed(sock)


def _read_until_closed(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.serve
def test_slow_bodies_get_408_and_never_hold_a_slot(
    serve: Any, server_settings: Any, runtime: Any, manager: Any
) -> None:
    """Slow-loris: 64 clients send 'Content-Length: 1000' and 9 bytes, then stall.

    Unauthenticated ones are refused at once; authenticated ones wait for their
    body without a slot and get 408 (connection closed) after body_timeout_s,
    while a real request with a 2-slot, 2-place queue is served at once.
    """
    settings = server_settings.model_copy(update={"api_key": SecretStr(API_KEY)})
    config = ServerConfig(max_concurrency=2, max_queue=2, queue_timeout_s=30, body_timeout_s=3)
    app = create_app(settings, runtime, manager, config=config)
    with serve(app) as server:
        stalled: list[tuple[socket.socket, bool]] = []
        try:
            for i in range(64):
                authenticated = i % 2 == 0
                auth = f"Authorization: Bearer {API_KEY}\r\n" if authenticated else ""
                sock = socket.create_connection((server.host, server.port), timeout=30)
                sock.sendall(
                    (
                        "POST /v1/embeddings HTTP/1.1\r\nHost: test\r\n"
                        f"Content-Type: application/json\r\n{auth}Content-Length: 1000\r\n\r\n"
                    ).encode()
                    + b'{"model":'  # 9 of the 1000 bytes promised
                )
                stalled.append((sock, authenticated))
            time.sleep(0.5)  # every stalled request has reached the server
            started = time.monotonic()
            response = httpx.post(
                f"{server.url}/v1/embeddings",
                json={"model": "embedding", "input": "a real request"},
                headers={"Authorization": f"Bearer {API_KEY}"},
                timeout=30,
            )
            assert response.status_code == 200, response.text
            assert time.monotonic() - started < config.body_timeout_s
            for sock, authenticated in stalled:
                status, body = _read_until_closed(sock)  # the server closes the connection
                error = json.loads(body)["error"]
                if authenticated:
                    assert status == 408, body
                    assert error["code"] == "request_timeout"
                    assert "MONGARS_SERVER_BODY_TIMEOUT_S" in error["message"]
                else:
                    assert status == 401, body
                    assert error["code"] == "missing_api_key"
            waited = time.monotonic() - started
            assert waited < config.body_timeout_s + 10
        finally:
            for sock, _ in stalled:
                sock.close()
        state = app.state.mongars
        assert (state.admission.active, state.admission.waiting, state.admission.rejected) == (
            0,
            0,
            0,
        )


@pytest.mark.serve
@pytest.mark.parametrize(
    ("headers", "code", "setting"),
    [
        pytest.param(
            "X-Big: " + "a" * (16 * 1024 * 1024) + "\r\n",
            "headers_too_large",
            "MONGARS_SERVER_MAX_HEADER_BYTES",
            id="one-16MB-header",
        ),
        pytest.param(
            "".join(f"X-H{i}: v\r\n" for i in range(20_000)),
            "too_many_headers",
            "MONGARS_SERVER_MAX_HEADERS",
            id="20000-headers",
        ),
    ],
)
def test_oversized_headers_are_refused_with_431(
    serve: Any,
    server_settings: Any,
    runtime: Any,
    manager: Any,
    headers: str,
    code: str,
    setting: str,
) -> None:
    with serve(create_app(server_settings, runtime, manager)) as server:
        for path in ("/healthz", "/v1/models"):
            request = f"GET {path} HTTP/1.1\r\nHost: test\r\n{headers}\r\n".encode()
            status, body = _raw_exchange(server.host, server.port, request, timeout=60)
            assert status == 431, body[:300]
            error = json.loads(body)["error"]
            assert error["code"] == code
            assert setting in error["message"]
        # ordinary requests are untouched
        assert httpx.get(f"{server.url}/healthz").status_code == 200
