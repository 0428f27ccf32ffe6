"""Ray Serve on loopback: two replicas of the same app follow the adapter registry."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.serve, pytest.mark.slow]


#: generous bounds for a slow or loaded machine: every wait ends as soon as its
#: condition holds, so a fast machine never waits this long
START_TIMEOUT_S = 600.0
FOLLOW_TIMEOUT_S = 300.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    ray = pytest.importorskip("ray")
    from ray import serve

    from mongars_llm.server.ray import init_ray

    assert init_ray(num_cpus=2, log_to_driver=False), "a local cluster was expected"
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


def _ray_processes() -> list[Any]:
    """This process's Ray daemons and workers (GCS, raylet, agents, actors)."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            name, command = proc.name(), " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if name in ("gcs_server", "raylet") or command.startswith("ray::") or "/ray/" in command:
            found.append(proc)
    return found


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%", 1)[0])
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or address).is_loopback


def _check_ray_listens_on_loopback_only() -> None:
    import psutil

    listening: list[tuple[str, str, int]] = []
    names: set[str] = set()
    for proc in _ray_processes():
        try:
            command = " ".join(proc.cmdline())[:80]
            connections = proc.net_connections(kind="inet")
        except psutil.Error:
            continue
        names.add(proc.name())
        listening += [
            (command, c.laddr.ip, c.laddr.port)
            for c in connections
            if c.status == psutil.CONN_LISTEN
        ]
    assert {"gcs_server", "raylet"} <= names, names  # the check saw the cluster
    assert listening, "no Ray process listens at all: the check looked at the wrong processes"
    exposed = [item for item in listening if not _is_loopback(item[1])]
    assert not exposed, f"Ray processes listen beyond 127.0.0.1: {exposed}"


def _check_serve_controller_timeouts() -> None:
    from mongars_llm.server.ray import SERVE_TIMEOUTS

    controllers = [
        p for p in _ray_processes() if " ".join(p.cmdline()).startswith("ray::ServeController")
    ]
    assert controllers, "no Serve controller process found"
    environment = controllers[0].environ()
    for key, value in SERVE_TIMEOUTS.items():
        assert environment.get(key) == value, (key, environment.get(key))


def _models_by_replica(url: str, attempts: int = 24) -> dict[str, set[str]]:
    seen: dict[str, set[str]] = {}
    with httpx.Client(timeout=60) as http:
        for _ in range(attempts):
            response = http.get(f"{url}/v1/models")
            response.raise_for_status()
            replica = response.headers["x-mongars-replica"]
            seen[replica] = {m["id"] for m in response.json()["data"]}
    return seen


def _wait_for_replicas(
    url: str, condition: Callable[[set[str]], bool], what: str
) -> dict[str, set[str]]:
    """Until both replicas list model ids that satisfy ``condition``."""
    deadline = time.monotonic() + FOLLOW_TIMEOUT_S
    seen: dict[str, set[str]] = {}
    while True:
        try:
            seen = _models_by_replica(url, attempts=16)
        except httpx.HTTPError as err:  # a replica restarting on a loaded machine
            seen = {"error": {repr(err)}}
        if len(seen) == 2 and all(condition(ids) for ids in seen.values()):
            return seen
        assert time.monotonic() < deadline, f"replicas did not {what}: {seen}"
        time.sleep(0.5)


def test_replicas_serve_and_follow_promotions_on_loopback(
    ray_cluster: None,
    tmp_path: Path,
    tiny_model_dir: Path,
    manifest_path: Path,
    runtime: Any,
) -> None:
    from serving_support import lora_compatibility, make_lora_adapter, make_settings

    from mongars_llm.registry import AdapterRegistry
    from mongars_llm.server.ray import run

    registry = AdapterRegistry(tmp_path / "registry")
    compatibility = lora_compatibility(tiny_model_dir)
    registry.register(
        make_lora_adapter(tiny_model_dir, tmp_path / "a1", seed=1),
        name="support",
        compatibility=compatibility,
    )
    settings = make_settings(tmp_path, tiny_model_dir, manifest_path)
    port = _free_port()
    run(
        settings,
        host="127.0.0.1",
        port=port,
        blocking=False,
        start_timeout_s=START_TIMEOUT_S,
        num_replicas=2,
        ray_actor_options={"num_cpus": 0.5},
        registry_poll_s=0.5,
        max_batch_size=8,
        batch_wait_timeout_s=0.02,
    )
    url = f"http://127.0.0.1:{port}"

    # the local cluster listens on loopback only; Serve got the slow-machine timeouts
    _check_ray_listens_on_loopback_only()
    _check_serve_controller_timeouts()

    # both replicas are up and hold the registry's candidate v1 for explicit use only
    seen = _wait_for_replicas(url, lambda ids: "general:support-v1" in ids, "load v1")
    for ids in seen.values():
        assert {"general", "embedding", "general:latest", "general:base"} <= ids
        assert "general:promoted" not in ids

    # chat and batched embeddings work through the Ray proxy
    with httpx.Client(base_url=url, timeout=60) as http:
        chat = http.post(
            "/v1/chat/completions",
            json={
                "model": "general:base",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4,
                "temperature": 0,
            },
        )
        assert chat.status_code == 200, chat.text
        expected = runtime.generate(
            [{"role": "user", "content": "hi"}], role="general", max_new_tokens=4, temperature=0
        )
        assert chat.json()["choices"][0]["message"]["content"] == expected.text

    texts = [f"text number {i} about foxes" for i in range(8)]

    async def embed_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            return await asyncio.gather(
                *(
                    http.post(
                        "/v1/embeddings",
                        json={"model": "embedding:base", "input": t, "encoding_format": "float"},
                    )
                    for t in texts
                )
            )

    responses = asyncio.run(embed_all())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    got = np.array([r.json()["data"][0]["embedding"] for r in responses], dtype=np.float32)
    np.testing.assert_allclose(got, runtime.embed(texts), rtol=1e-4, atol=1e-5)

    def embedding(model: str) -> np.ndarray:
        response = httpx.post(
            f"{url}/v1/embeddings",
            json={"model": model, "input": "adapter check", "encoding_format": "float"},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        return np.array(response.json()["data"][0]["embedding"])

    def same(a: np.ndarray, b: np.ndarray) -> None:
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    # a candidate is used only by requests that name it
    base, v1 = embedding("embedding:base"), embedding("embedding:support-v1")
    assert not np.allclose(base, v1)
    same(embedding("embedding:latest"), v1)
    for _ in range(4):  # whichever replica answers
        same(embedding("embedding"), base)

    # promoted, it goes live on every replica without a restart
    registry.promote("1")
    _wait_for_replicas(url, lambda ids: "general:promoted" in ids, "put v1 live")
    for _ in range(4):
        same(embedding("embedding"), v1)

    # a newer candidate reaches every replica but does not replace the live version
    registry.register(
        make_lora_adapter(tiny_model_dir, tmp_path / "a2", seed=2),
        name="support",
        compatibility=compatibility,
    )
    _wait_for_replicas(url, lambda ids: "general:support-v2" in ids, "load v2")
    v2 = embedding("embedding:latest")
    assert not np.allclose(v2, v1) and not np.allclose(v2, base)
    for _ in range(4):
        same(embedding("embedding"), v1)

    # promoting it swaps the live version everywhere; the old one is unloaded
    registry.promote("2")
    seen = _wait_for_replicas(
        url, lambda ids: "general:support-v1" not in ids, "put v2 live and drop v1"
    )
    assert all("general:support-v2" in ids for ids in seen.values())
    ready = httpx.get(f"{url}/readyz").json()
    assert "support-v2" in ready["adapters"]
    for _ in range(4):
        same(embedding("embedding"), v2)
    same(embedding("embedding:base"), base)
