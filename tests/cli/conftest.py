"""CLI tests load in-process unless a test starts its own server: ``MONGARS_HOST`` points
at a closed loopback port, so a ``mongars-llm serve`` someone runs on this machine (on
the default port) is never used by them."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(autouse=True)
def _no_running_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("MONGARS_HOST", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.delenv("MONGARS_API_KEY", raising=False)
    yield
