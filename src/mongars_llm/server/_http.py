"""uvicorn's HTTP protocols with bounds on what a client may do before its request exists.

:class:`~._limits.LimitsMiddleware` sees a request only once its line and
headers have been read whole, and uvicorn reads them without a size or time
limit: one 200 MB header was buffered (in time quadratic in its size, with
httptools) before the middleware could answer 431, blocking every client for
minutes, and connections trickling a byte every few seconds were never closed
(with 256 file descriptors, ~260 of them locked every client out).
:class:`GuardedHttpToolsProtocol` and :class:`GuardedH11Protocol` add, per
connection, before the request reaches the app:

* a **size bound** on the request head (line + headers): past
  :attr:`HeadLimits.max_head_bytes` (``max_header_bytes`` plus room for the
  request line and the separators) or ``max_headers`` lines, the answer is 431
  and the connection is closed, after reading at most one more socket read;
* a **time bound**: the head must arrive within ``header_timeout_s`` of the
  connection's opening or of its previous response, else 408 and the
  connection is closed (an idle connection that sent nothing is closed
  quietly);
* a **connection cap**: beyond ``max_connections`` open connections a new one
  is answered 503 and closed at once, so a flood cannot exhaust the file
  descriptors the server needs.

:func:`uvicorn_options` gives the keyword arguments for ``uvicorn.Config`` /
``uvicorn.run`` (the protocol, bound to a :class:`~._config.ServerConfig`); the
CLI, ``serve --workers`` and :func:`~._background.serve_in_background` use it.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from typing import Any

from ..logging import log_event
from ._config import ServerConfig
from ._errors import error_body

__all__ = ["HeadLimits", "uvicorn_options"]

logger = logging.getLogger("mongars_llm.server")

#: how long a refused connection still reads (and drops) what the client sends
_LINGER_S = 2.0
#: room for the request line (method, URL, version) on top of the header bytes
_REQUEST_LINE_BYTES = 8 * 1024


@dataclass(frozen=True)
class HeadLimits:
    """The bounds of one server's request heads (picklable: ``--workers`` sends it)."""

    max_header_bytes: int
    max_headers: int
    timeout_s: float
    max_connections: int

    @classmethod
    def from_config(cls, config: ServerConfig) -> HeadLimits:
        return cls(
            max_header_bytes=config.max_header_bytes,
            max_headers=config.max_headers,
            timeout_s=config.header_timeout_s,
            max_connections=config.max_connections,
        )

    @property
    def max_head_bytes(self) -> int:
        """Raw bytes of a head whose headers are within ``max_header_bytes``: the
        names and values, ``": "`` and CRLF per header, and the request line."""
        return self.max_header_bytes + 4 * self.max_headers + _REQUEST_LINE_BYTES


class _HeadGuard:
    """The bounds, as a mixin over uvicorn's protocol (``cycle`` is the request being
    served: a new one means its head was read whole)."""

    # provided by uvicorn's protocol classes
    transport: Any
    loop: Any
    cycle: Any
    connections: Any

    def __init__(self, *args: Any, limits: HeadLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._limits = limits
        self._head_timer: Any = None
        self._head_bytes: int | None = None  # None: no head is being read
        self._head_lines = 0
        self._head_cycle: Any = None
        self._refused = False

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        if len(self.connections) > self._limits.max_connections:
            self._refuse(
                503,
                f"the server has {self._limits.max_connections} connections open, its limit "
                "(MONGARS_SERVER_MAX_CONNECTIONS); retry later",
                code="too_many_connections",
                kind="overloaded_error",
            )
            return
        self._start_head()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering after an answer: what the client still sends is dropped
        reading_head = self._head_bytes is not None
        super().data_received(data)  # type: ignore[misc]
        if not reading_head or self._head_bytes is None or self.transport.is_closing():
            return
        if self.cycle is not self._head_cycle or self.transport.get_protocol() is not self:
            self._stop_head()  # the head is complete (or the connection was upgraded)
            return
        self._head_bytes += len(data)  # all of this chunk is head: it did not complete
        self._head_lines += data.count(b"\n")
        limits = self._limits
        if self._head_lines > limits.max_headers + 1:
            self._refuse(
                431,
                f"the request has more than {limits.max_headers} header fields, the limit "
                "(MONGARS_SERVER_MAX_HEADERS)",
                code="too_many_headers",
            )
        elif self._head_bytes > limits.max_head_bytes:
            self._refuse(
                431,
                f"the request line and headers passed {limits.max_head_bytes} bytes before "
                f"they ended: the headers may hold {limits.max_header_bytes} bytes "
                "(MONGARS_SERVER_MAX_HEADER_BYTES)",
                code="headers_too_large",
            )

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._start_head()  # waiting for the next request on this connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head()
        super().connection_lost(exc)  # type: ignore[misc]

    # ------------------------------------------------------------------ internals
    def _start_head(self) -> None:
        self._stop_head()
        self._head_bytes = 0
        self._head_lines = 0
        self._head_cycle = self.cycle
        self._head_timer = self.loop.call_later(self._limits.timeout_s, self._head_timeout)

    def _stop_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._head_bytes = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.transport.get_protocol() is not self:
            return
        if self.cycle is not self._head_cycle and not self.cycle.response_complete:
            return  # a request is being served: its body has its own timeout
        if not self._head_bytes:
            self.transport.close()  # idle: nothing to answer
            return
        timeout = self._limits.timeout_s
        self._refuse(
            408,
            f"the request line and headers were not received within {timeout:g} s "
            f"(MONGARS_SERVER_HEADER_TIMEOUT_S; {self._head_bytes} bytes arrived); "
            "send them at once",
            code="request_timeout",
        )

    def _refuse(
        self, status: int, message: str, *, code: str, kind: str = "invalid_request_error"
    ) -> None:
        """Answer before the app sees a request, and close the connection."""
        self._stop_head()
        peer = self.transport.get_extra_info("peername")
        log_event(
            logger,
            "server_request_head_refused",
            logging.WARNING,
            status=status,
            code=code,
            client=peer[0] if isinstance(peer, tuple) and peer else None,
        )
        body = json.dumps(error_body(message, type=kind, code=code)).encode()
        reason = {408: "Request Timeout", 431: "Request Header Fields Too Large"}.get(
            status, "Service Unavailable"
        )
        head = (
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head.encode("ascii") + body)
        # a lingering close: closing with unread bytes would reset the connection and
        # could destroy the answer before the client reads it; drop what it still sends
        self._refused = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(_LINGER_S, self.transport.close)


def _protocols() -> dict[str, type]:
    """The guarded protocols that can be built here (httptools is optional)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    found: dict[str, type] = {"h11": type("GuardedH11Protocol", (_HeadGuard, H11Protocol), {})}
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # uvicorn without its [standard] extra
        return found
    found["httptools"] = type("GuardedHttpToolsProtocol", (_HeadGuard, HttpToolsProtocol), {})
    return found


@functools.cache
def protocol_class(kind: str = "auto") -> type:
    """The guarded protocol for ``kind`` (``auto``: httptools when installed, as uvicorn)."""
    found = _protocols()
    if kind == "auto":
        kind = "httptools" if "httptools" in found else "h11"
    return found[kind]


def make_protocol(*args: Any, kind: str = "auto", limits: HeadLimits, **kwargs: Any) -> Any:
    """Build one connection's protocol (uvicorn calls it as its ``http`` class; a
    module-level function, so that ``serve --workers`` can send it to its workers)."""
    return protocol_class(kind)(*args, limits=limits, **kwargs)


def uvicorn_options(config: ServerConfig | None = None, *, kind: str = "auto") -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.Config``/``uvicorn.run`` that bound request heads
    per ``config`` (default: ``ServerConfig()`` from ``MONGARS_SERVER_*``)."""
    limits = HeadLimits.from_config(config if config is not None else ServerConfig())
    return {
        "http": functools.partial(make_protocol, kind=kind, limits=limits),
        # h11 must not refuse (400) before the guard does (431), one read later at most
        "h11_max_incomplete_event_size": limits.max_head_bytes + 1024 * 1024,
    }
