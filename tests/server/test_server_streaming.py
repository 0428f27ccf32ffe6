"""Runtime failures of chat and text completions, streamed or not, as a client sees them.

Both endpoints share one streamer, so each case runs on both. A failure before
the first delta is still an HTTP answer: the fallback reply when one is
configured (marked as such), else the structured error; a client error is
never a fallback. A failure after the first delta arrives inside the 200
stream as an OpenAI error event, then ``[DONE]``.

Nothing makes the real runtime fail on demand, so :class:`FailingRuntime`
wraps it and raises at a chosen delta (fault injection; all else is real).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from serving_support import MAX_NEW_TOKENS

from mongars_llm.errors import (
    AdapterNotFoundError,
    GenerationError,
    InputTooLongError,
    InvalidInputError,
    LLMRuntimeError,
    ModelLoadError,
    RuntimeClosedError,
    UnsupportedError,
)
from mongars_llm.server import create_app

pytestmark = pytest.mark.serve

FALLBACK = "The assistant is unavailable right now."
MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]
PROMPT = "The quick brown fox"
REQUESTS = {
    "/v1/chat/completions": {"model": "general", "messages": MESSAGES},
    "/v1/completions": {"model": "general", "prompt": PROMPT},
}
ENDPOINTS = list(REQUESTS)


class FailingRuntime:
    """The real runtime, except that a generation raises ``error`` after ``after``
    deltas (``None``: never); ``agenerate`` raises it at once."""

    def __init__(self, runtime: Any) -> None:
        self._runtime = runtime
        self.error: BaseException | None = None
        self.after = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runtime, name)

    async def agenerate(self, prompt: Any, /, **kwargs: Any) -> Any:
        if self.error is not None:
            raise self.error
        return await self._runtime.agenerate(prompt, **kwargs)

    def astream(self, prompt: Any, /, **kwargs: Any) -> Any:
        if self.error is None:
            return self._runtime.astream(prompt, **kwargs)
        return _FailingStream(self._runtime.astream(prompt, **kwargs), self.after, self.error)


class _FailingStream:
    def __init__(self, stream: Any, after: int, error: BaseException) -> None:
        self._stream, self._after, self._error = stream, after, error

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[str]:
        inner = self._stream.__aiter__()
        try:
            sent = 0
            async for delta in inner:
                if sent == self._after:
                    break
                yield delta
                sent += 1
        finally:
            await inner.aclose()
        raise self._error  # at the chosen delta, or at the end of a shorter reply

    @property
    def result(self) -> Any:
        return self._stream.result


@pytest.fixture(scope="module")
def failing(runtime: Any) -> FailingRuntime:
    return FailingRuntime(runtime)


@pytest.fixture
def fail(failing: FailingRuntime) -> Iterator[FailingRuntime]:
    """Set ``.error`` and ``.after`` on the yielded runtime; reset after the test."""
    yield failing
    failing.error, failing.after = None, 0


@pytest.fixture(scope="module")
def servers(
    serve: Any, server_settings: Any, manager: Any, failing: FailingRuntime
) -> Iterator[dict[str, Any]]:
    """Two servers on the failing runtime: with and without ``fallback_reply``."""
    settings = server_settings.model_copy(update={"fallback_reply": FALLBACK})
    with (
        serve(create_app(settings, failing, manager)) as with_fallback,
        serve(create_app(server_settings, failing, manager)) as without,
    ):
        yield {"fallback": with_fallback, "plain": without}


def post(server: Any, path: str, **fields: Any) -> httpx.Response:
    body = {**REQUESTS[path], "max_tokens": MAX_NEW_TOKENS, "temperature": 0, **fields}
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


def events(response: httpx.Response) -> list[Any]:
    """The ``data:`` payloads of a stream, JSON-decoded (``[DONE]`` kept as text)."""
    assert response.headers["content-type"].startswith("text/event-stream")
    raw = [e for e in response.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in raw), raw
    data = [e[len("data: ") :] for e in raw]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


def text_of(chunk: dict[str, Any]) -> str:
    choice = chunk["choices"][0]
    return str(choice["delta"].get("content") or "" if "delta" in choice else choice["text"])


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            LLMRuntimeError("the forward pass failed: out of memory", code="generation_failed"),
            {
                "message": "the forward pass failed: out of memory",
                "type": "server_error",
                "param": None,
                "code": "generation_failed",
            },
        ),
        (
            RuntimeError("device-side assert at 0xdeadbeef"),
            {
                "message": "generation failed; the server log has the details",
                "type": "server_error",
                "param": None,
                "code": "internal_error",
            },
        ),
    ],
)
def test_a_failure_mid_stream_is_an_error_event_then_done(
    servers: dict[str, Any],
    fail: FailingRuntime,
    path: str,
    error: BaseException,
    expected: dict[str, Any],
) -> None:
    fail.error, fail.after = error, 1
    response = post(servers["fallback"], path, stream=True)
    # the headers went out with the first delta: a 200, and never the fallback
    assert response.status_code == 200
    assert "x-mongars-fallback" not in response.headers
    received = events(response)
    assert received[-1] == "[DONE]"
    assert received[-2] == {"error": expected}
    chunks = received[:-2]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)
    assert all(c["system_fingerprint"] is None for c in chunks)
    assert "".join(text_of(c) for c in chunks)  # the text sent before the failure
    assert "0xdeadbeef" not in response.text


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize("include_usage", [False, True])
def test_a_failure_before_the_first_delta_streams_the_fallback(
    servers: dict[str, Any], fail: FailingRuntime, path: str, include_usage: bool
) -> None:
    fail.error = LLMRuntimeError("the forward pass failed", code="generation_failed")
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    response = post(servers["fallback"], path, stream=True, **options)
    assert response.status_code == 200
    assert response.headers["x-mongars-fallback"] == "generation_failed"
    assert response.headers["cache-control"] == "no-store"
    received = events(response)
    assert received[-1] == "[DONE]"
    chunks = received[:-1]
    assert all(c["system_fingerprint"] == "mongars-fallback" for c in chunks)
    if include_usage:
        usage = chunks.pop()
        assert usage["choices"] == []
        assert usage["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert "".join(text_of(c) for c in chunks) == FALLBACK
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "stop"


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize("stream", [False, True])
def test_without_a_fallback_reply_the_failure_is_a_structured_500(
    servers: dict[str, Any], fail: FailingRuntime, path: str, stream: bool
) -> None:
    fail.error = LLMRuntimeError("the forward pass failed", code="generation_failed")
    response = post(servers["plain"], path, stream=stream)
    assert response.status_code == 500
    assert response.json() == {
        "error": {
            "message": "the forward pass failed",
            "type": "server_error",
            "param": None,
            "code": "generation_failed",
        }
    }


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("error", "status"),
    [
        (InvalidInputError, 400),
        (InputTooLongError, 413),
        (AdapterNotFoundError, 404),
        (UnsupportedError, 400),
    ],
)
def test_client_errors_from_the_runtime_are_never_the_fallback(
    servers: dict[str, Any],
    fail: FailingRuntime,
    path: str,
    stream: bool,
    error: type[LLMRuntimeError],
    status: int,
) -> None:
    fail.error = error(f"the input is refused ({error.default_code})")
    response = post(servers["fallback"], path, stream=stream)
    assert response.status_code == status == error.http_status
    assert "x-mongars-fallback" not in response.headers
    assert response.json()["error"]["code"] == error.default_code


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("error", [ModelLoadError, GenerationError, RuntimeClosedError])
def test_server_errors_from_the_runtime_answer_their_class_status(
    servers: dict[str, Any], fail: FailingRuntime, stream: bool, error: type[LLMRuntimeError]
) -> None:
    fail.error = error(f"the server failed ({error.default_code})")
    response = post(servers["plain"], "/v1/chat/completions", stream=stream)
    assert response.status_code == error.http_status
    assert response.json()["error"] == {
        "message": f"the server failed ({error.default_code})",
        "type": "server_error",
        "param": None,
        "code": error.default_code,
    }
    assert ("retry-after" in response.headers) == (error.http_status == 503)
    fallback = post(servers["fallback"], "/v1/chat/completions", stream=stream)
    assert fallback.status_code == 200
    assert fallback.headers["x-mongars-fallback"] == error.default_code


def test_a_failed_completion_of_several_prompts_falls_back_for_each(
    servers: dict[str, Any], fail: FailingRuntime
) -> None:
    fail.error = LLMRuntimeError("the forward pass failed", code="generation_failed")
    response = post(servers["fallback"], "/v1/completions", prompt=["one", "two", "three"])
    assert response.status_code == 200
    assert response.headers["x-mongars-fallback"] == "generation_failed"
    body = response.json()
    assert body["system_fingerprint"] == "mongars-fallback"
    assert [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]] == [
        (0, FALLBACK, "stop"),
        (1, FALLBACK, "stop"),
        (2, FALLBACK, "stop"),
    ]
    assert body["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def test_the_runtime_has_every_member_the_server_uses(runtime: Any) -> None:
    from mongars_llm.server._runtime_api import RuntimeAPI

    assert isinstance(runtime, RuntimeAPI)
