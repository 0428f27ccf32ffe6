"""A server that follows the adapter registry: only a promoted version goes live.

A freshly trained adapter is registered as a ``candidate``; it must not change
the answers of clients that name no adapter until someone promotes it
(``mongars-llm adapters promote VERSION``). Real server (uvicorn on loopback),
real registry written by the registry API, real LoRA adapters.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from serving_support import chat_reply, lora_compatibility, make_lora_adapter, vector_of

from mongars_llm.cli import main
from mongars_llm.registry import AdapterRegistry, digest_tree

pytestmark = pytest.mark.serve

#: how long a change in the registry may take to reach the server: generous, because
#: waiting ends as soon as it arrives (the server polls every 0.1 s)
FOLLOW_TIMEOUT_S = 120.0


def _wait_for(http: httpx.Client, condition: Callable[[set[str]], bool]) -> set[str]:
    deadline = time.monotonic() + FOLLOW_TIMEOUT_S
    while True:
        ids = {card["id"] for card in http.get("/v1/models").json()["data"]}
        if condition(ids):
            return ids
        assert time.monotonic() < deadline, f"the server did not follow the registry: {ids}"
        time.sleep(0.05)


def _promote(registry: AdapterRegistry, version: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["adapters", "promote", version, "--registry-path", str(registry.path)])
    assert code == 0, capsys.readouterr().err
    assert f"adapter version {version} (support) is now promoted" in capsys.readouterr().out


def test_candidates_wait_for_promotion_and_promoted_versions_go_live(
    tiny_model_dir: Path,
    adapters: list[Path],
    adapter_registry: AdapterRegistry,
    registry_server: Any,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = adapter_registry
    compatibility = lora_compatibility(tiny_model_dir)
    first = registry.register(adapters[0], name="support", compatibility=compatibility)
    assert first.status == "candidate"
    with registry_server() as (http, _):
        # a candidate is loaded for requests that name it, and only for them
        _wait_for(http, lambda ids: "embedding:support-v1" in ids)
        base = vector_of(http, "embedding:base")
        v1 = vector_of(http, "embedding:support-v1")
        assert not np.allclose(v1, base)
        np.testing.assert_allclose(vector_of(http, "embedding:latest"), v1, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(vector_of(http, "embedding"), base, rtol=1e-5, atol=1e-6)
        assert "embedding:promoted" not in _wait_for(http, lambda ids: True)

        # promoted: it goes live for every request that names no adapter
        _promote(registry, "1", capsys)
        _wait_for(http, lambda ids: "embedding:promoted" in ids)
        np.testing.assert_allclose(vector_of(http, "embedding"), v1, rtol=1e-5, atol=1e-6)

        # a newer candidate does not replace the live version
        registry.register(adapters[1], name="support", compatibility=compatibility)
        _wait_for(http, lambda ids: "embedding:support-v2" in ids)
        v2 = vector_of(http, "embedding:support-v2")
        assert not np.allclose(v2, v1)
        np.testing.assert_allclose(vector_of(http, "embedding"), v1, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(vector_of(http, "embedding:promoted"), v1, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(vector_of(http, "embedding:latest"), v2, rtol=1e-5, atol=1e-6)
        chat = http.post(
            "/v1/chat/completions",
            json={
                "model": "general:latest",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2,
            },
        )
        assert chat.status_code == 200, chat.text

        # promoting it swaps the live version; the old one is unloaded
        _promote(registry, "2", capsys)
        ids = _wait_for(http, lambda ids: "embedding:support-v1" not in ids)
        assert "embedding:support-v2" in ids
        np.testing.assert_allclose(vector_of(http, "embedding"), v2, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(vector_of(http, "embedding:base"), base, rtol=1e-5, atol=1e-6)

        # retiring the live version takes requests back to the base weights
        registry.retire("2")
        _wait_for(http, lambda ids: "embedding:support-v2" not in ids)
        np.testing.assert_allclose(vector_of(http, "embedding"), base, rtol=1e-5, atol=1e-6)

        # a promoted version whose files fail their digests never goes live
        _promote(registry, "1", capsys)
        _wait_for(http, lambda ids: "embedding:promoted" in ids)
        digests = digest_tree(adapters[1])
        digests["adapter_model.safetensors"] = "0" * 64  # not what is on disk
        bad = registry.register(
            adapters[1], name="support", compatibility=compatibility, sha256=digests
        )
        _promote(registry, bad.version, capsys)
        deadline = time.monotonic() + FOLLOW_TIMEOUT_S
        while not any(getattr(r, "event", None) == "adapter_load_failed" for r in caplog.records):
            assert time.monotonic() < deadline, "the server never tried the tampered version"
            time.sleep(0.05)
        ids = {card["id"] for card in http.get("/v1/models").json()["data"]}
        assert f"embedding:support-v{bad.version}" not in ids
        np.testing.assert_allclose(vector_of(http, "embedding"), v1, rtol=1e-5, atol=1e-6)


def test_a_promoted_embedding_adapter_goes_live_for_embeddings_only(
    tmp_path: Path,
    tiny_model_dir: Path,
    adapter_registry: AdapterRegistry,
    registry_server: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    registry = adapter_registry
    adapter = make_lora_adapter(tiny_model_dir, tmp_path / "embed", seed=3)
    registry.register(
        adapter,
        name="support",
        compatibility=lora_compatibility(tiny_model_dir),
        use="embed",
        objective="contrastive",
    )
    with registry_server() as (http, _):
        _wait_for(http, lambda ids: "embedding:support-v1" in ids)
        base_vector, base_reply = (
            vector_of(http, "embedding:base"),
            chat_reply(http, "general:base"),
        )
        assert not np.allclose(vector_of(http, "embedding:support-v1"), base_vector)
        # an embedding adapter named in a chat request: a 400 that names the right route
        wrong = http.post(
            "/v1/chat/completions",
            json={"model": "general:support-v1", "messages": [{"role": "user", "content": "x"}]},
        )
        assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "adapter_wrong_use"
        assert "/v1/embeddings" in wrong.json()["error"]["message"]
        _promote(registry, "1", capsys)
        _wait_for(http, lambda ids: "embedding:promoted" in ids)
        live = vector_of(http, "embedding")
        assert not np.allclose(live, base_vector)  # embeddings use the live adapter
        assert chat_reply(http, "general") == base_reply  # chat never sees an embedding adapter
