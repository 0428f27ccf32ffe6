"""Attacks on registry promotion, on a real server following a real registry.

Swapped weights and hand-edited manifests never go live (a promotion checks the
digests again); a version that failed is retried once its files are fixed and
``/readyz`` shows the divergence meanwhile; candidates load on first use, after a
rank/shape check; ``role:latest`` in a chat request never picks an embedding
adapter; and greedy replies are never torn while versions are promoted and retired.
"""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from serving_support import chat_reply, chat_response, lora_compatibility, vector_of

from mongars_llm.registry import AdapterRegistry

pytestmark = pytest.mark.serve

#: how long a registry change may take to reach the server: waiting ends when it arrives
FOLLOW_TIMEOUT_S = 120.0
WEIGHTS = "adapter_model.safetensors"


def _register(registry: AdapterRegistry, folder: Path, **kwargs: Any) -> str:
    kwargs.setdefault("name", "support")
    return registry.register(
        folder, compatibility=lora_compatibility(Path(registry.path)), **kwargs
    ).version


def _listed(http: httpx.Client, model: str) -> None:
    """Wait until the server follows the registry up to ``model`` (a new version)."""
    ids = lambda: {card["id"] for card in http.get("/v1/models").json()["data"]}  # noqa: E731
    _wait(f"listed {model}", lambda: model in ids())


def _registry_status(http: httpx.Client) -> dict[str, Any]:
    ready = http.get("/readyz")
    assert ready.status_code == 200, ready.text
    return dict(ready.json().get("registry") or {})


def _wait(what: str, condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + FOLLOW_TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, f"the server never {what}"
        time.sleep(0.05)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.allclose(a, b, rtol=1e-5, atol=1e-6))


def _failed_versions(http: httpx.Client) -> set[str]:
    return {f["version"] for f in _registry_status(http).get("failed", [])}


def test_promoting_a_loaded_version_whose_weights_were_swapped_never_serves_them(
    registry_server: Any, adapters: list[Path], tmp_path: Path
) -> None:
    good = tmp_path / "good.safetensors"
    shutil.copy(adapters[0] / WEIGHTS, good)
    with registry_server() as (http, registry):
        v1 = _register(registry, adapters[0])
        _listed(http, "embedding:support-v1")
        base = vector_of(http, "embedding:base")
        v1_vector = vector_of(http, "embedding:support-v1")  # loads (and checks) v1
        swapped_vector = None
        # the files change on disk after the server loaded them: another adapter's weights
        folder = registry.adapter_path(v1)
        shutil.copy(adapters[1] / WEIGHTS, folder / WEIGHTS)
        registry.promote(v1)

        def settled() -> bool:
            nonlocal swapped_vector
            live = vector_of(http, "embedding")
            if not _same(live, base):
                swapped_vector = live  # it went live: with the swapped weights or not
                return True
            return v1 in _failed_versions(http)

        _wait("settled the promotion", settled)
        assert swapped_vector is None, "a promotion put files that fail their digests live"
        status = _registry_status(http)
        assert status["promoted"] == v1 and status["live"] is None and not status["in_sync"]
        failure = next(f for f in status["failed"] if f["version"] == v1)
        assert WEIGHTS in failure["error"] and "recorded" in failure["error"]
        # the verified weights loaded before the swap still answer requests that name them
        assert _same(vector_of(http, "embedding:support-v1"), v1_vector)

        # a hand-added checksum key outside the adapter folder is checked at promotion too
        shutil.copy(good, folder / WEIGHTS)  # the right weights again
        _wait(
            "took the fixed version live",
            lambda: _same(vector_of(http, "embedding"), v1_vector),
        )
        v2 = _register(registry, adapters[1])
        _listed(http, "embedding:support-v2")
        assert not _same(vector_of(http, "embedding:support-v2"), v1_vector)  # v2 loaded
        manifest_file = registry.manifest_path
        manifest = json.loads(manifest_file.read_text())
        for entry in manifest["entries"]:
            if entry["version"] == v2:
                entry["sha256"]["../../etc/hostname"] = "0" * 64
        manifest_file.write_text(json.dumps(manifest))
        registry.promote(v2)
        _wait("refused the tampered entry", lambda: v2 in _failed_versions(http))
        assert "'../../etc/hostname'" in next(
            f["error"] for f in _registry_status(http)["failed"] if f["version"] == v2
        )
        assert _same(vector_of(http, "embedding"), v1_vector)  # the previous live version


def test_a_version_that_failed_is_retried_once_fixed_and_readyz_shows_the_divergence(
    registry_server: Any, adapters: list[Path], tmp_path: Path
) -> None:
    good = tmp_path / "good.safetensors"
    shutil.copy(adapters[0] / WEIGHTS, good)
    with registry_server() as (http, registry):
        base = vector_of(http, "embedding:base")
        v1 = _register(registry, adapters[0])
        _listed(http, "embedding:support-v1")
        v1_vector = vector_of(http, "embedding:support-v1")
        shutil.copy(adapters[1] / WEIGHTS, adapters[0] / WEIGHTS)  # damaged on disk
        _register(registry, adapters[1], name="other")  # v2: v1 is no longer a candidate
        _wait("unloaded v1", lambda: "embedding:support-v1" not in http.get("/v1/models").text)
        registry.promote(v1)
        _wait("reported the failed promotion", lambda: v1 in _failed_versions(http))
        status = _registry_status(http)
        assert status["promoted"] == v1 and status["live"] is None and status["in_sync"] is False
        registered = {r["version"]: r for r in status["registered"]}
        assert registered[v1]["loaded"] is False and registered[v1]["status"] == "promoted"
        assert _same(vector_of(http, "embedding"), base)
        # the files are restored; the registry itself does not change: the server retries
        shutil.copy(good, adapters[0] / WEIGHTS)
        _wait("retried the fixed version", lambda: _registry_status(http)["live"] == v1)
        status = _registry_status(http)
        assert status["in_sync"] is True and status["failed"] == []
        assert _same(vector_of(http, "embedding"), v1_vector)


def test_candidates_load_on_first_use_after_a_rank_and_shape_check(
    registry_server: Any, adapters: list[Path], tmp_path: Path
) -> None:
    huge = tmp_path / "huge"
    shutil.copytree(adapters[0], huge)
    config = json.loads((huge / "adapter_config.json").read_text())
    (huge / "adapter_config.json").write_text(json.dumps({**config, "r": 1_000_000}))
    with registry_server() as (http, registry):
        v1 = _register(registry, huge)  # digests of the edited files: they verify
        _wait(
            "listed the candidate",
            lambda: v1 in {r["version"] for r in _registry_status(http)["registered"]},
        )
        registered = {r["version"]: r for r in _registry_status(http)["registered"]}
        assert registered[v1]["loaded"] is False  # nothing loads before a request names it
        response = http.post("/v1/embeddings", json={"model": "embedding:latest", "input": "hello"})
        assert response.status_code == 500, response.text
        error = response.json()["error"]
        assert error["code"] == "adapter_load_failed"
        assert "rank r=1000000" in error["message"] and "adapter_config.json" in error["message"]
        assert v1 in _failed_versions(http)
        # asking again gets the same clear error (from the record: the files did not change)
        again = http.post("/v1/embeddings", json={"model": "embedding:latest", "input": "x"})
        assert again.status_code == 500 and "rank r=1000000" in again.text
        v2 = _register(registry, adapters[1])
        _listed(http, "embedding:support-v2")
        assert not _same(vector_of(http, "embedding:latest"), vector_of(http, "embedding:base"))
        registered = {r["version"]: r for r in _registry_status(http)["registered"]}
        assert registered[v2]["loaded"] is True


def test_latest_in_a_chat_request_is_the_newest_chat_adapter(
    registry_server: Any, adapters: list[Path]
) -> None:
    with registry_server() as (http, registry):
        chat = _register(registry, adapters[0], name="helper")
        embed = _register(
            registry, adapters[1], name="finder", use="embed", objective="contrastive"
        )
        _listed(http, f"embedding:finder-v{embed}")
        helper_reply = chat_reply(http, f"general:helper-v{chat}")
        assert helper_reply != chat_reply(http, "general:base")
        assert chat_reply(http, "general:latest") == helper_reply  # not the newer embed adapter
        assert _same(
            vector_of(http, "embedding:latest"),
            vector_of(http, f"embedding:finder-v{embed}"),
        )
        for model in ("general:finder", f"general:finder-v{embed}"):
            wrong = chat_response(http, model)
            assert wrong.status_code == 400, wrong.text
            error = wrong.json()["error"]
            assert error["code"] == "adapter_wrong_use" and "use='embed'" in error["message"]
            assert "/v1/embeddings" in error["message"]


def test_greedy_replies_are_never_torn_while_versions_are_promoted_and_retired(
    registry_server: Any, adapters: list[Path]
) -> None:
    with registry_server() as (http, registry):
        v1 = _register(registry, adapters[0])
        _listed(http, f"general:support-v{v1}")
        expected = {chat_reply(http, "general:base"), chat_reply(http, "general:latest")}
        v2 = _register(registry, adapters[1], name="other")
        _listed(http, f"general:other-v{v2}")
        expected.add(chat_reply(http, f"general:other-v{v2}"))
        assert len(expected) == 3  # re-registered copies below answer as v1 and v2 do

        def v3() -> None:
            registry.promote(_register(registry, adapters[1], name="other"))

        actions: list[Callable[[], Any]] = [
            lambda: registry.promote(v1),
            lambda: registry.promote(v2),
            lambda: registry.retire(v2),
            lambda: registry.promote(v1),
            v3,
            lambda: registry.retire(v1),
        ]
        replies: list[str] = []
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            for action in actions:
                running = [pool.submit(chat_reply, http, "general") for _ in range(16)]
                action()
                replies.extend(f.result() for f in running)
        torn = [r for r in replies if r not in expected]
        assert not torn, f"{len(torn)} of {len(replies)} greedy replies match no adapter set"
