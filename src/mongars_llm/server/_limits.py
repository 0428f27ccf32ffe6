"""Admission control: a bounded queue in front of the inference routes.

At most ``max_concurrency`` inference requests run at once (the runtime batches
them together); up to ``max_queue`` more wait for a slot, in arrival order. A
request that finds the queue full, or waits longer than ``queue_timeout_s``, is
answered at once with 503 and ``Retry-After`` — the server never piles up work
it cannot finish. A slot is held until the response (a stream too) is fully sent.

Before a request may queue for a slot, the middleware has:

* refused oversized headers (431: more than ``max_headers`` fields or
  ``max_header_bytes`` bytes);
* checked the API key (401), so unauthenticated requests never hold a slot;
* read the whole body within ``body_timeout_s`` (408 and the connection closed
  for a client that stalls — slow bodies can no longer hold the slots) and
  within ``max_body_bytes`` (413: at once when ``Content-Length`` says so, else
  as soon as the body passes the limit, chunked or longer than declared).

The app then receives the body from memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ..logging import log_event
from ._config import ServerConfig
from ._errors import APIError, error_body

__all__ = ["AdmissionController", "LimitsMiddleware", "Overloaded"]

logger = logging.getLogger("mongars_llm.server")

Scope = dict[str, Any]

#: sent with every answer given before the body was read: the connection cannot be reused
_CLOSE = (b"connection", b"close")


class Overloaded(Exception):
    """No slot is free and the queue is full (or the wait timed out)."""


class _BodyRefused(Exception):
    """The body was not received in time (408) or is too large (413)."""

    def __init__(self, status: int, message: str, *, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


class _Disconnected(Exception):
    """The client went away while its body was read."""


class AdmissionController:
    """Counts running requests and queues the next ones (one event loop)."""

    def __init__(self, *, max_concurrency: int, max_queue: int, queue_timeout_s: float) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.active = 0
        self.rejected = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        if self.active < self.max_concurrency and not self._waiters:
            self.active += 1
            return
        if len(self._waiters) >= self.max_queue:
            self.rejected += 1
            raise Overloaded("queue full")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.queue_timeout_s)
        except (asyncio.TimeoutError, asyncio.CancelledError) as err:
            if waiter.done() and not waiter.cancelled():
                self._release_slot()  # the slot arrived just as we gave up: pass it on
            else:
                waiter.cancel()
                self._discard(waiter)
            if isinstance(err, asyncio.CancelledError):
                raise
            self.rejected += 1
            raise Overloaded("queue wait timed out") from None

    def release(self) -> None:
        self._release_slot()

    def _release_slot(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # hand the slot over: `active` stays the same
                return
        self.active -= 1

    def _discard(self, waiter: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)


class LimitsMiddleware:
    """Pure ASGI middleware: header, body and time limits, then admission for inference."""

    def __init__(
        self,
        app: Any,
        *,
        controller: AdmissionController,
        guarded_paths: frozenset[str],
        config: ServerConfig,
        authenticate: Callable[[str | None], APIError | None],
    ) -> None:
        self.app = app
        self.controller = controller
        self.guarded_paths = guarded_paths
        self.config = config
        self.authenticate = authenticate

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not await self._headers_within_limits(scope, send):
            return
        limit = self.config.max_body_bytes
        length = _content_length(scope)
        if length is not None and length > limit:
            await _send_error(
                send,
                413,
                f"request body of {length} bytes is larger than the limit of "
                f"{limit} bytes (MONGARS_SERVER_MAX_BODY_BYTES)",
                code="request_too_large",
                close=True,
            )
            return
        guarded = scope["path"] in self.guarded_paths and scope.get("method") == "POST"
        if guarded:
            error = self.authenticate(_header(scope, b"authorization"))
            if error is not None:
                await _send_error(
                    send,
                    error.status,
                    error.message,
                    code=error.code,
                    type=error.type,
                    headers=[(k.lower().encode(), v.encode()) for k, v in error.headers.items()],
                    close=True,
                )
                return
        try:
            body = await self._read_body(scope, receive)
        except _Disconnected:
            return
        except _BodyRefused as refused:
            await _send_error(send, refused.status, refused.message, code=refused.code, close=True)
            return
        receive = _replay(body, receive)
        if not guarded:
            await self.app(scope, receive, send)
            return
        try:
            await self.controller.acquire()
        except Overloaded as err:
            log_event(
                logger,
                "server_overloaded",
                logging.WARNING,
                path=scope["path"],
                reason=str(err),
                active=self.controller.active,
                waiting=self.controller.waiting,
            )
            retry_after = self.config.retry_after_s
            await _send_error(
                send,
                503,
                "the server is overloaded: too many requests are queued; retry after "
                f"{retry_after} s",
                code="overloaded",
                type="overloaded_error",
                headers=[(b"retry-after", str(retry_after).encode())],
            )
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.controller.release()

    async def _headers_within_limits(self, scope: Scope, send: Any) -> bool:
        """False (after answering 431) when the request's headers are over the limits."""
        headers = scope.get("headers") or ()
        if len(headers) > self.config.max_headers:
            await _send_error(
                send,
                431,
                f"the request has {len(headers)} header fields, more than the limit of "
                f"{self.config.max_headers} (MONGARS_SERVER_MAX_HEADERS)",
                code="too_many_headers",
                close=True,
            )
            return False
        size = sum(len(name) + len(value) for name, value in headers)
        if size > self.config.max_header_bytes:
            await _send_error(
                send,
                431,
                f"the request headers hold {size} bytes, more than the limit of "
                f"{self.config.max_header_bytes} bytes (MONGARS_SERVER_MAX_HEADER_BYTES)",
                code="headers_too_large",
                close=True,
            )
            return False
        return True

    async def _read_body(self, scope: Scope, receive: Any) -> bytes:
        """The whole body, received within ``body_timeout_s`` and ``max_body_bytes``."""
        limit = self.config.max_body_bytes
        timeout = self.config.body_timeout_s
        started = time.monotonic()
        chunks: list[bytes] = []
        received = 0
        while True:
            remaining = started + timeout - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                message = await asyncio.wait_for(receive(), remaining)
            except TimeoutError:
                log_event(
                    logger,
                    "server_body_timeout",
                    logging.WARNING,
                    path=scope["path"],
                    received=received,
                    seconds=timeout,
                )
                raise _BodyRefused(
                    408,
                    f"the request body was not received within {timeout:g} s "
                    f"(MONGARS_SERVER_BODY_TIMEOUT_S; {received} bytes arrived); "
                    "send the whole body at once",
                    code="request_timeout",
                ) from None
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > limit:
                raise _BodyRefused(
                    413,
                    f"request body is larger than the limit of {limit} bytes "
                    "(MONGARS_SERVER_MAX_BODY_BYTES)",
                    code="request_too_large",
                )
            if chunk:
                chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Any) -> Any:
    """A ``receive`` that hands the app the body already read, then the real messages
    (a disconnect, watched by streaming responses)."""
    pending = True

    async def replay() -> Any:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_error(
    send: Any,
    status: int,
    message: str,
    *,
    code: str | None,
    type: str = "invalid_request_error",
    headers: list[tuple[bytes, bytes]] | None = None,
    close: bool = False,
) -> None:
    """Answer from the middleware; ``close`` for answers given before the body was
    read (the server then closes the connection instead of reading on)."""
    body = json.dumps(error_body(message, type=type, code=code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
                *([_CLOSE] if close else []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
