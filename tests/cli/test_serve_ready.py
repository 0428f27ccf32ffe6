"""``mongars-llm serve`` says when it is ready, at the default log level (issue 19)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

pytest.importorskip("uvicorn")
pytestmark = pytest.mark.serve


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_serve_prints_ready_on_its_url_once_the_model_is_loaded(tmp_path: Path) -> None:
    from mongars_llm.testing import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny", hidden_size=32)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MONGARS_")}
    env.update(OMP_NUM_THREADS="1", MONGARS_MODEL__DEVICE="cpu", PYTHONUNBUFFERED="1")
    server = subprocess.Popen(
        [sys.executable, "-m", "mongars_llm", "serve", "--model", str(model), "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert server.stderr is not None
        for line in server.stderr:
            lines.append(line)
            if "ready on" in line:
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        # loading takes seconds on a quiet machine; the bound is for a very busy one
        assert ready.wait(timeout=600), "".join(lines)
        line = next(line for line in lines if "ready on" in line)
        assert line.startswith(f"mongars-llm: ready on http://127.0.0.1:{port} (model ")
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=30).status_code == 200
        # the event that triggers it is not printed as a log line at the default level
        assert not any("INFO mongars_llm" in line for line in lines), "".join(lines)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        reader.join(timeout=10)
