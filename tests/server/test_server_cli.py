"""``mongars-llm serve`` as a user runs it: a subprocess on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from mongars_llm.cli import main

text_string_to_metric_families = pytest.importorskip(
    "prometheus_client.parser"
).text_string_to_metric_families


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.serve
@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_serve_command_serves_embeddings_only(
    tiny_model_dir: Path, tmp_path: Path, workers: int
) -> None:
    port = _free_port()
    env = {**os.environ, "MONGARS_CACHE_DIR": str(tmp_path), "MONGARS_ADMIN_TOKEN": "cli-secret-1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "mongars_llm", "serve", "--model", str(tiny_model_dir),
         "--port", str(port), "--embeddings-only", "--device", "cpu", "--no-quantize-4bit",
         "--workers", str(workers)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read().decode()  # type: ignore[union-attr]
            try:
                ready = httpx.get(f"{url}/readyz", timeout=2)
                if ready.status_code == 200:
                    assert ready.json()["model"] == str(tiny_model_dir)
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "mongars-llm serve never became ready"
            time.sleep(0.2)
        # with several workers a request may reach one still loading: retry on 503
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=5)
        model = str(tiny_model_dir)
        for _ in range(4 * workers):  # the flags reach every worker process
            assert len(client.embeddings.create(model=model, input=["a", "b"]).data) == 2
            with pytest.raises(openai.NotFoundError):
                client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "x"}]
                )
        # /metrics sums the workers' counters (prometheus_client's multiprocess mode)
        scraped = httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer cli-secret-1"})
        assert scraped.status_code == 200, scraped.text
        embedded = sum(
            sample.value
            for family in text_string_to_metric_families(scraped.text)
            for sample in family.samples
            if sample.name == "mongars_requests_total"
            and sample.labels.get("route") == "/v1/embeddings"
            and sample.labels.get("status") == "200"
        )
        assert embedded == 4 * workers, scraped.text
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0].decode()
        print(output)  # shown by pytest when the test fails
    assert "cli-secret-1" not in output
    assert output.count("Started server process") == workers, output


def test_serve_rejects_bad_flags(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["serve", "--port", "0"]) == 2
    assert main(["serve", "--ray", "--workers", "2"]) == 2
    assert "--replicas" in capsys.readouterr().err


def test_no_metrics_reaches_every_worker_as_a_setting() -> None:
    import argparse

    from mongars_llm.cli.serve import _environment, register
    from mongars_llm.server import ServerConfig

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    off = parser.parse_args(["serve", "--no-metrics"])
    assert _environment(off)["MONGARS_SERVER_METRICS"] == "false"
    assert "MONGARS_SERVER_METRICS" not in _environment(parser.parse_args(["serve"]))
    assert ServerConfig.model_validate({"MONGARS_SERVER_METRICS": "false"}).metrics is False


def test_serve_engine_flag_reaches_every_worker_as_a_setting(tmp_path: Path) -> None:
    """``serve --engine`` becomes ``MONGARS_MODEL__ENGINE`` (what each worker reads);
    ``--model`` takes a ``.gguf`` file; a bad engine is a usage error."""
    from mongars_llm.cli import build_parser
    from mongars_llm.cli.serve import _environment

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    args = build_parser().parse_args(["serve", "--engine", "llama.cpp", "--model", str(gguf)])
    env = _environment(args)
    assert env["MONGARS_MODEL__ENGINE"] == "llama.cpp"
    assert env["MONGARS_UNIFIED_MODEL_DIR"] == str(gguf.resolve())
    assert "MONGARS_MODEL__ENGINE" not in _environment(build_parser().parse_args(["serve"]))
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", "--engine", "vllm"])
    assert exited.value.code == 2
