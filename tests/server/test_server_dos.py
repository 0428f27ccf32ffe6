"""Denial of service: what one client (or a model file) can make the server do.

Each test is a finding of the adversarial run of issue 19: a huge or slow
request head, a flood of connections, an 8 MB embeddings request of inputs far
over the token limit, prompts prepared on the event loop, and a chat template
that loops. Each is measured by a behaviour, never by the machine's speed:
the server answers *before* the rest arrives, answers /healthz *while* the
work runs, or tokenises a bounded number of characters.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import httpx
import pytest

from mongars_llm.server import ServerConfig, create_app

pytestmark = pytest.mark.serve

MESSAGES = [{"role": "user", "content": "Hello there"}]


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def _status_and_error(data: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)["error"]


# ----------------------------------------------------------------- request heads


def test_a_huge_header_is_refused_before_the_rest_of_it_arrives(
    serve: Any, server_settings: Any, runtime: Any, manager: Any
) -> None:
    """1 MiB of one header, then the client waits: 431 at once (it used to be read to
    its end, 50-200 MB, in time quadratic in its size, blocking every client)."""
    with serve(create_app(server_settings, runtime, manager)) as server:
        with socket.create_connection((server.host, server.port), timeout=30) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * (1 << 20))
            status, error = _status_and_error(_read_until_closed(sock))  # no more is sent
        assert status == 431
        assert error["code"] == "headers_too_large"
        assert "MONGARS_SERVER_MAX_HEADER_BYTES" in error["message"]
        assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_a_head_of_too_many_lines_is_refused_before_it_ends(
    serve: Any, server_settings: Any, runtime: Any, manager: Any
) -> None:
    config = ServerConfig(max_headers=20)
    with serve(create_app(server_settings, runtime, manager, config=config)) as server:
        with socket.create_connection((server.host, server.port), timeout=30) as sock:
            lines = "".join(f"X-H{i}: v\r\n" for i in range(50))
            sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: t\r\n{lines}".encode())
            status, error = _status_and_error(_read_until_closed(sock))
        assert status == 431
        assert error["code"] == "too_many_headers"
        assert "MONGARS_SERVER_MAX_HEADERS" in error["message"]


def test_slow_heads_get_408_and_silent_connections_are_closed(
    serve: Any, server_settings: Any, runtime: Any, manager: Any
) -> None:
    """Slow-loris on the head: 20 clients trickle a byte every 0.2 s, 10 send nothing.
    Every one is closed after header_timeout_s (they used to be kept for ever)."""
    config = ServerConfig(header_timeout_s=1.0)
    with serve(create_app(server_settings, runtime, manager, config=config)) as server:
        trickling = [socket.create_connection((server.host, server.port)) for _ in range(20)]
        silent = [socket.create_connection((server.host, server.port)) for _ in range(10)]
        request = b"GET /healthz HTTP/1.1\r\nHost: t\r\n"
        answers: dict[socket.socket, bytes] = {}
        try:
            deadline = time.monotonic() + 30
            sent = 0
            while len(answers) < 30 and time.monotonic() < deadline:
                for sock in trickling:
                    if sock not in answers and sent < len(request):
                        with suppress(OSError):
                            sock.send(request[sent : sent + 1])
                sent += 1
                readable, _, _ = select.select(
                    [s for s in trickling + silent if s not in answers], [], [], 0.2
                )
                for sock in readable:
                    answers[sock] = _read_until_closed(sock)
            assert len(answers) == 30, f"{30 - len(answers)} connections were never closed"
            for sock in trickling:
                status, error = _status_and_error(answers[sock])
                assert status == 408
                assert error["code"] == "request_timeout"
                assert "MONGARS_SERVER_HEADER_TIMEOUT_S" in error["message"]
            assert all(answers[sock] == b"" for sock in silent)
        finally:
            for sock in trickling + silent:
                sock.close()
        assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_connections_beyond_the_cap_are_answered_503_at_once(
    serve: Any, server_settings: Any, runtime: Any, manager: Any
) -> None:
    config = ServerConfig(max_connections=4, header_timeout_s=60)
    with serve(create_app(server_settings, runtime, manager, config=config)) as server:
        held = [socket.create_connection((server.host, server.port)) for _ in range(4)]
        try:
            with socket.create_connection((server.host, server.port), timeout=30) as extra:
                status, error = _status_and_error(_read_until_closed(extra))
            assert status == 503
            assert error["code"] == "too_many_connections"
            assert "MONGARS_SERVER_MAX_CONNECTIONS" in error["message"]
        finally:
            for sock in held:
                sock.close()
        for _ in range(50):  # the server notices the closed connections
            try:
                if httpx.get(f"{server.url}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            pytest.fail("the server did not accept connections again")


# ----------------------------------------------------------------- tokenising


def test_embedding_inputs_far_over_the_limit_are_refused_without_tokenising_them(
    live_server: Any, runtime: Any, tokenised_characters: Any
) -> None:
    """40 inputs of 200,000 characters (8 MB): the 413 used to come after 17-33 s of
    tokenising all of them, holding a gigabyte; now after a few thousand characters."""
    body = {"model": "embedding", "input": ["ab cd " * 33_333] * 40}
    with tokenised_characters(runtime.tokenizer) as seen:
        response = httpx.post(f"{live_server.url}/v1/embeddings", json=body, timeout=300)
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "input_too_long"
    assert error["param"] == "input[0]"
    assert "MONGARS_MODEL__MAX_INPUT_TOKENS" in error["message"]
    assert sum(seen) < 100_000  # of 8,000,000 characters
    ok = httpx.post(
        f"{live_server.url}/v1/embeddings", json={"model": "embedding", "input": "a short text"}
    )
    assert ok.status_code == 200


def test_an_input_just_over_the_limit_is_still_counted_exactly(live_server: Any) -> None:
    text = "word " * 300  # a few hundred tokens: over the 256 of these tests, no prefix needed
    response = httpx.post(
        f"{live_server.url}/v1/embeddings", json={"model": "embedding", "input": text}
    )
    assert response.status_code == 413, response.text
    assert "tokens, more than the limit of 256" in response.json()["error"]["message"]


def test_prompts_are_prepared_off_the_event_loop(live_server: Any, runtime: Any) -> None:
    """While a chat prompt is being tokenised (held here on an event), /healthz answers:
    30 prompts of 200,000 characters used to stall it for 5.9 s."""
    marker = "hold-this-prompt"
    entered, release = threading.Event(), threading.Event()
    cls = type(runtime.tokenizer)
    original = cls.__call__

    def holding(self: Any, text: Any = None, *args: Any, **kwargs: Any) -> Any:
        if isinstance(text, str) and marker in text:
            entered.set()
            release.wait(60)
        return original(self, text, *args, **kwargs)

    cls.__call__ = holding
    outcome: dict[str, Any] = {}

    def chat() -> None:
        outcome["response"] = httpx.post(
            f"{live_server.url}/v1/chat/completions",
            json={"model": "general", "messages": [{"role": "user", "content": marker}]},
            timeout=120,
        )

    thread = threading.Thread(target=chat)
    try:
        thread.start()
        assert entered.wait(60), "the prompt was never tokenised"
        health = httpx.get(f"{live_server.url}/healthz", timeout=10)
        assert health.status_code == 200
    finally:
        release.set()
        cls.__call__ = original
        thread.join(120)
    assert outcome["response"].status_code == 200, outcome["response"].text


def test_a_chat_prompt_far_over_the_limit_is_refused_after_a_prefix(
    live_server: Any, runtime: Any, tokenised_characters: Any
) -> None:
    content = "ab cd " * 33_000  # 198,000 characters, under MONGARS_SERVER_MAX_INPUT_CHARS
    with tokenised_characters(runtime.tokenizer) as seen:
        response = httpx.post(
            f"{live_server.url}/v1/chat/completions",
            json={"model": "general", "messages": [{"role": "user", "content": content}]},
            timeout=120,
        )
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "input_too_long"
    assert sum(seen) < 50_000


# ----------------------------------------------------------------- chat templates

#: 9 million iterations, 9 million characters: seconds of work, megabytes over the cap
LOOP_TEMPLATE = "{% for i in range(3000) %}{% for j in range(3000) %}x{% endfor %}{% endfor %}"


def test_a_chat_template_that_loops_never_blocks_the_server(
    serve: Any, server_settings: Any, manager: Any, tiny_model_dir: Path
) -> None:
    from mongars_llm.runtime import UnifiedLLMRuntime

    runtime = UnifiedLLMRuntime.from_pretrained(
        tiny_model_dir, device="cpu", dtype="float32", settings=server_settings
    )
    runtime.tokenizer.chat_template = LOOP_TEMPLATE  # changed after the load-time check
    try:
        with serve(create_app(server_settings, runtime, manager)) as server:
            outcome: dict[str, Any] = {}

            def chat() -> None:
                outcome["response"] = httpx.post(
                    f"{server.url}/v1/chat/completions",
                    json={"model": "general", "messages": MESSAGES},
                    timeout=120,
                )

            thread = threading.Thread(target=chat)
            thread.start()
            answered = 0
            while thread.is_alive():
                assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
                answered += 1
                time.sleep(0.05)
            thread.join()
        response = outcome["response"]
        assert response.status_code == 500, response.text
        message = response.json()["error"]["message"]
        assert message.startswith("the model's chat template is broken: ")
        assert "fix:" in message
    finally:
        runtime.close()
