"""The admin API: bearer-token auth on every route, provisioning as background jobs."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from serving_support import ADMIN_TOKEN, SlowOllama, make_settings

from mongars_llm.server import create_app

pytestmark = pytest.mark.serve

ROUTES = [
    ("GET", "/api/v1/models", None),
    ("POST", "/api/v1/models/provision", {"roles": ["general"]}),
    ("GET", "/api/v1/models/provision", None),
    ("GET", "/api/v1/models/provision/{job}", None),
    ("GET", "/api/v1/models/provision/{job}/events", None),
]


def _call(
    base: str, method: str, path: str, body: Any, job: str, token: str | None
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.request(
        method, base + path.format(job=job), json=body, headers=headers, timeout=30
    )


def _wait(base: str, job: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    while True:
        state = httpx.get(f"{base}/api/v1/models/provision/{job}", headers=headers).json()
        if state["status"] in ("succeeded", "failed"):
            return state
        assert time.monotonic() < deadline, state
        time.sleep(0.05)


@pytest.fixture(scope="module")
def finished_job(live_server: Any) -> str:
    response = _call(live_server.url, "POST", "/api/v1/models/provision", {}, "", ADMIN_TOKEN)
    assert response.status_code == 202
    job = response.json()["id"]
    _wait(live_server.url, job)
    return job


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_every_admin_route_checks_the_bearer_token(
    live_server: Any, finished_job: str, method: str, path: str, body: Any
) -> None:
    base = live_server.url
    missing = _call(base, method, path, body, finished_job, None)
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "missing_token"
    assert missing.headers["www-authenticate"].startswith("Bearer")
    wrong = _call(base, method, path, body, finished_job, ADMIN_TOKEN[:-1] + "x")
    assert wrong.status_code == 403
    assert wrong.json()["error"]["code"] == "invalid_token"
    right = _call(base, method, path, body, finished_job, ADMIN_TOKEN)
    assert right.status_code in (200, 202), right.text
    for response in (missing, wrong, right):
        assert ADMIN_TOKEN not in response.text


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_admin_routes_refuse_when_no_token_is_configured(
    serve: Any,
    tmp_path: Path,
    tiny_model_dir: Path,
    manifest_path: Path,
    runtime: Any,
    method: str,
    path: str,
    body: Any,
) -> None:
    settings = make_settings(tmp_path, tiny_model_dir, manifest_path, admin_token=None)
    with serve(create_app(settings, runtime)) as server:
        for token in (None, "anything"):
            response = _call(server.url, method, path, body, "prov-x", token)
            assert response.status_code == 403
            assert response.json()["error"]["code"] == "admin_disabled"
            assert "MONGARS_ADMIN_TOKEN" in response.json()["error"]["message"]


def test_models_payload_is_the_manager_description(live_server: Any, manager: Any) -> None:
    response = _call(live_server.url, "GET", "/api/v1/models", None, "", ADMIN_TOKEN)
    assert response.json() == json.loads(json.dumps(manager.describe()))


def test_provision_job_reports_each_role(live_server: Any, tiny_model_dir: Path) -> None:
    base = live_server.url
    started = _call(
        base, "POST", "/api/v1/models/provision", {"roles": ["general"]}, "", ADMIN_TOKEN
    )
    assert started.status_code == 202
    job = started.json()
    assert started.headers["location"] == f"/api/v1/models/provision/{job['id']}"
    assert job["status"] in ("queued", "running", "succeeded")
    done = _wait(base, job["id"])
    assert done["status"] == "succeeded"
    (entry,) = done["report"]["entries"]
    assert entry["role"] == "general"
    assert entry["action"] == "exists"
    assert Path(entry["path"]) == tiny_model_dir
    unknown = _call(base, "POST", "/api/v1/models/provision", {"roles": ["ghost"]}, "", ADMIN_TOKEN)
    assert unknown.status_code == 422
    assert "ghost" in unknown.json()["error"]["message"]
    assert "general" in unknown.json()["error"]["message"]
    no_job = _call(base, "GET", "/api/v1/models/provision/{job}", None, "prov-nope", ADMIN_TOKEN)
    assert no_job.status_code == 404


def test_a_long_download_does_not_block_other_admin_calls(
    serve: Any, tmp_path: Path, tiny_model_dir: Path, runtime: Any
) -> None:
    manifest = tmp_path / "llm_models.json"
    manifest.write_text(
        json.dumps(
            {
                "profiles": {
                    "default": {
                        "models": {
                            "general": {"name": str(tiny_model_dir), "provider": "local"},
                            "chat": {"name": "tinyllama:1b", "provider": "ollama"},
                        }
                    }
                }
            }
        )
    )
    with SlowOllama(steps=8, delay=0.25) as ollama:
        settings = make_settings(tmp_path, tiny_model_dir, manifest, ollama_host=ollama.url)
        with serve(create_app(settings, runtime)) as server:
            auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            started = time.monotonic()
            job = httpx.post(
                f"{server.url}/api/v1/models/provision", json={"roles": ["chat"]}, headers=auth
            )
            assert job.status_code == 202
            assert time.monotonic() - started < 1.0  # the pull takes ~2 s
            job_id = job.json()["id"]
            assert ollama.pull_started.wait(10)
            t0 = time.monotonic()
            models = httpx.get(f"{server.url}/api/v1/models", headers=auth)
            assert models.status_code == 200
            assert time.monotonic() - t0 < 1.0
            running = httpx.get(f"{server.url}/api/v1/models/provision/{job_id}", headers=auth)
            assert running.json()["status"] == "running"
            # follow the job as server-sent events until it is done
            events: list[tuple[str, dict[str, Any]]] = []
            with httpx.stream(
                "GET",
                f"{server.url}/api/v1/models/provision/{job_id}/events",
                headers=auth,
                timeout=30,
            ) as stream:
                for block in stream.iter_text():
                    for event in block.split("\n\n"):
                        if event.strip():
                            name, data = event.split("\n", 1)
                            events.append((name.removeprefix("event: "), json.loads(data[6:])))
            kinds = [name for name, _ in events]
            assert kinds[-1] == "done"
            progress = [data for name, data in events if name == "progress"]
            downloads = [e for e in progress if e.get("stage") == "download"]
            assert len(downloads) >= 2
            assert downloads[-1]["completed"] == downloads[-1]["total"] == 1000
            final = events[-1][1]
            assert final["status"] == "succeeded"
            assert final["report"]["entries"][0]["action"] == "installed"


def test_the_admin_token_never_reaches_logs(
    serve: Any,
    server_settings: Any,
    runtime: Any,
    manager: Any,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    app = create_app(server_settings, runtime, manager)
    with serve(app, log_level="debug") as server:
        for token in (ADMIN_TOKEN, ADMIN_TOKEN + "-wrong", None):
            for method, path, body in ROUTES[:3]:
                _call(server.url, method, path, body, "", token)
        job = _call(server.url, "POST", "/api/v1/models/provision", {}, "", ADMIN_TOKEN).json()
        _wait(server.url, job["id"])
    out, err = capfd.readouterr()
    assert "/api/v1/models" in caplog.text + out + err  # the requests were logged...
    assert ADMIN_TOKEN not in caplog.text
    assert ADMIN_TOKEN not in out + err  # ...but never the token


def test_provision_force_is_a_strict_boolean(live_server: Any) -> None:
    for force in ("yes", "true", 1):
        response = _call(
            live_server.url,
            "POST",
            "/api/v1/models/provision",
            {"roles": ["general"], "force": force},
            "",
            ADMIN_TOKEN,
        )
        assert response.status_code == 422, (force, response.text)
        assert response.json()["error"]["param"] == "force"


@pytest.mark.parametrize(
    ("name", "env", "value"),
    [
        ("admin_token", "MONGARS_ADMIN_TOKEN", "   "),
        ("admin_token", "MONGARS_ADMIN_TOKEN", "\t\n"),
        ("admin_token", "MONGARS_ADMIN_TOKEN", "real-token\n"),
        ("api_key", "MONGARS_API_KEY", "  "),
    ],
)
def test_credentials_nobody_could_send_are_refused_at_start_up(
    server_settings: Any, runtime: Any, name: str, env: str, value: str
) -> None:
    from pydantic import SecretStr

    from mongars_llm.errors import ConfigError

    settings = server_settings.model_copy(update={name: SecretStr(value)})
    with pytest.raises(ConfigError, match=env) as info:
        create_app(settings, runtime)
    assert value.strip() not in str(info.value) or not value.strip()  # never echoed
    # an empty value is "not set": the admin API is off, the API is open
    create_app(server_settings.model_copy(update={name: SecretStr("")}), runtime)


@pytest.mark.slow
def test_serve_refuses_a_whitespace_admin_token(tiny_model_dir: Path, tmp_path: Path) -> None:
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MONGARS_CACHE_DIR": str(tmp_path), "MONGARS_ADMIN_TOKEN": "   "}
    result = subprocess.run(  # without the check it would serve until the timeout
        [sys.executable, "-m", "mongars_llm", "serve", "--model", str(tiny_model_dir),
         "--port", str(port), "--device", "cpu"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "MONGARS_ADMIN_TOKEN is only whitespace" in result.stderr
    assert "Traceback" not in result.stderr
