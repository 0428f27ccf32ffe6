"""Ray Serve on loopback: two replicas of the same app follow the adapter registry."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.serve, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _make_adapter(base: Path, out: Path, seed: int) -> Path:
    """A real LoRA adapter (peft format) with non-zero weights for the tiny model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    ray = pytest.importorskip("ray")
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


def _models_by_replica(url: str, attempts: int = 24) -> dict[str, set[str]]:
    seen: dict[str, set[str]] = {}
    with httpx.Client(timeout=30) as http:
        for _ in range(attempts):
            response = http.get(f"{url}/v1/models")
            response.raise_for_status()
            replica = response.headers["x-mongars-replica"]
            seen[replica] = {m["id"] for m in response.json()["data"]}
    return seen


def test_replicas_serve_and_pick_up_new_adapter_versions(
    ray_cluster: None,
    tmp_path: Path,
    tiny_model_dir: Path,
    manifest_path: Path,
    runtime: Any,
) -> None:
    from ray import serve
    from serving_support import make_settings

    from mongars_llm.registry import AdapterRegistry
    from mongars_llm.server.ray import build_deployment

    registry = AdapterRegistry(tmp_path / "registry")
    compatibility = {
        "base_model": str(tiny_model_dir),
        "r": 4,
        "target_modules": ["q_proj", "v_proj"],
    }
    registry.register(
        _make_adapter(tiny_model_dir, tmp_path / "a1", seed=1),
        name="support",
        compatibility=compatibility,
    )
    settings = make_settings(tmp_path, tiny_model_dir, manifest_path)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_deployment(
        settings,
        num_replicas=2,
        ray_actor_options={"num_cpus": 0.5},
        registry_poll_s=0.5,
        max_batch_size=8,
        batch_wait_timeout_s=0.02,
    )
    started = time.monotonic()
    serve.run(app, name="mongars-llm", route_prefix="/")
    url = f"http://127.0.0.1:{port}"

    # both replicas are up and already hold the registry's latest version (v1)
    seen = _models_by_replica(url)
    assert len(seen) == 2, seen
    for ids in seen.values():
        assert {
            "general",
            "embedding",
            "general:support-v1",
            "general:latest",
            "general:base",
        } <= ids

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

    # requests that name no adapter get the registry's newest version
    base, v1 = embedding("embedding:base"), embedding("embedding")
    assert not np.allclose(base, v1)
    np.testing.assert_allclose(embedding("embedding:latest"), v1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(embedding("embedding:support-v1"), v1, rtol=1e-5, atol=1e-6)

    # a new version in the registry reaches every replica without a restart
    registry.register(
        _make_adapter(tiny_model_dir, tmp_path / "a2", seed=2),
        name="support",
        compatibility=compatibility,
    )
    deadline = time.monotonic() + 60
    while True:
        seen = _models_by_replica(url, attempts=16)
        if len(seen) == 2 and all("general:support-v2" in ids for ids in seen.values()):
            break
        assert time.monotonic() < deadline, f"replicas did not load v2: {seen}"
        time.sleep(0.5)
    ready = httpx.get(f"{url}/readyz").json()
    assert "support-v2" in ready["adapters"]
    assert "general:support-v1" not in set().union(*seen.values())  # the old one is unloaded
    v2 = embedding("embedding")
    assert not np.allclose(v2, v1) and not np.allclose(v2, base)
    np.testing.assert_allclose(embedding("embedding:base"), base, rtol=1e-5, atol=1e-6)
    assert time.monotonic() - started < 120
