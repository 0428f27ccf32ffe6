"""Admission control: a bounded queue in front of the inference routes.

At most ``max_concurrency`` inference requests run at once (the runtime batches
them together); up to ``max_queue`` more wait for a slot, in arrival order. A
request that finds the queue full, or waits longer than ``queue_timeout_s``, is
answered at once with 503 and ``Retry-After`` — the server never piles up work
it cannot finish. A slot is held until the response (a stream too) is fully sent.

The middleware also rejects bodies larger than ``max_body_bytes`` with 413:
at once when ``Content-Length`` says so, and while the body is read when it
comes without one (``Transfer-Encoding: chunked``) or is longer than declared.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from typing import Any

from starlette.exceptions import HTTPException

from ..logging import log_event
from ._errors import error_body

__all__ = ["AdmissionController", "BodyTooLarge", "LimitsMiddleware", "Overloaded"]

logger = logging.getLogger("mongars_llm.server")

Scope = dict[str, Any]


class Overloaded(Exception):
    """No slot is free and the queue is full (or the wait timed out)."""


class BodyTooLarge(HTTPException):
    """The request body went past ``max_body_bytes`` while it was read (413).

    An ``HTTPException`` so that FastAPI's body parsing lets it through to the
    app's error handler instead of turning it into a 400.
    """

    code = "request_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            f"request body is larger than the limit of {limit} bytes "
            "(MONGARS_SERVER_MAX_BODY_BYTES)",
        )


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
    """Pure ASGI middleware: body size limit and admission for inference paths."""

    def __init__(
        self,
        app: Any,
        *,
        controller: AdmissionController,
        guarded_paths: frozenset[str],
        max_body_bytes: int,
        retry_after_s: int,
    ) -> None:
        self.app = app
        self.controller = controller
        self.guarded_paths = guarded_paths
        self.max_body_bytes = max_body_bytes
        self.retry_after_s = retry_after_s

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _content_length(scope)
        if length is not None and length > self.max_body_bytes:
            await _send_error(
                send,
                413,
                f"request body of {length} bytes is larger than the limit of "
                f"{self.max_body_bytes} bytes (MONGARS_SERVER_MAX_BODY_BYTES)",
                code="request_too_large",
            )
            return
        receive = self._limit_body(receive)
        if scope["path"] not in self.guarded_paths or scope.get("method") != "POST":
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
            await _send_error(
                send,
                503,
                "the server is overloaded: too many requests are queued; retry after "
                f"{self.retry_after_s} s",
                code="overloaded",
                type="overloaded_error",
                headers=[(b"retry-after", str(self.retry_after_s).encode())],
            )
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.controller.release()

    def _limit_body(self, receive: Any) -> Any:
        """``receive`` raising :class:`BodyTooLarge` past the limit, whatever the headers say."""
        received = 0
        limit = self.max_body_bytes

        async def limited_receive() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        return limited_receive


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
    code: str,
    type: str = "invalid_request_error",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = json.dumps(error_body(message, type=type, code=code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
