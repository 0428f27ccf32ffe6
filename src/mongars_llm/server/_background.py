"""Run an app with uvicorn in a background thread (tests, benchmarks, the demo)."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from .._extras import require

__all__ = ["BackgroundServer", "serve_in_background"]


@dataclasses.dataclass
class BackgroundServer:
    """A running server: ``url`` is ``http://host:port`` (no trailing slash)."""

    url: str
    host: str
    port: int
    server: Any


@contextlib.contextmanager
def serve_in_background(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    log_level: str = "warning",
    startup_timeout: float = 60.0,
) -> Iterator[BackgroundServer]:
    """Serve ``app`` on ``host:port`` (port 0: a free one) until the block exits.

    The lifespan runs (startup before the block, shutdown after it); the
    server stops by itself when the block exits, even on an exception. Request
    heads are bounded as by ``mongars-llm serve`` (:mod:`._http`), per the
    app's :class:`~._config.ServerConfig` when it is one of ours.
    """
    uvicorn = require("uvicorn", "serve", feature="the HTTP server")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    from ._http import uvicorn_options

    state = getattr(getattr(app, "state", None), "mongars", None)
    config = uvicorn.Config(
        app,
        log_level=log_level,
        lifespan="on",
        timeout_graceful_shutdown=5,
        **uvicorn_options(getattr(state, "config", None)),
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="mongars-uvicorn", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"the server did not start on {host}:{bound_port}")
        time.sleep(0.01)
    try:
        yield BackgroundServer(
            url=f"http://{host}:{bound_port}", host=host, port=bound_port, server=server
        )
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
