"""Fixtures for the server tests: a tiny real checkpoint, its runtime, a manifest
whose roles point at it, and a uvicorn server on 127.0.0.1 driven over HTTP; for the
registry tests, a server of its own following an adapter registry of its own."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from serving_support import make_lora_adapter, make_settings

from mongars_llm.registry import AdapterRegistry
from mongars_llm.settings import Settings


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mongars_llm.testing import build_tiny_model

    path = tmp_path_factory.mktemp("tiny-model") / "tiny-llama"
    build_tiny_model(path)
    return path


@pytest.fixture(scope="session")
def manifest_path(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("manifest")
    manifest = {
        "profiles": {
            "default": {
                "models": {
                    "general": {"name": str(tiny_model_dir), "provider": "local"},
                    "embedding": {
                        "name": str(tiny_model_dir),
                        "provider": "local",
                        "embedding": {"pooling": "mean", "normalize": True},
                    },
                }
            }
        }
    }
    path = folder / "llm_models.json"
    path.write_text(json.dumps(manifest))
    return path


@pytest.fixture(scope="session")
def server_settings(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, manifest_path: Path
) -> Settings:
    return make_settings(tmp_path_factory.mktemp("server"), tiny_model_dir, manifest_path)


@pytest.fixture(scope="session")
def runtime(server_settings: Settings, tiny_model_dir: Path) -> Any:
    from mongars_llm.runtime import UnifiedLLMRuntime

    return UnifiedLLMRuntime.from_pretrained(
        tiny_model_dir, device="cpu", dtype="float32", settings=server_settings
    )


@pytest.fixture(scope="session")
def manager(server_settings: Settings) -> Any:
    from mongars_llm.manager import ModelManager

    return ModelManager(settings=server_settings)


@pytest.fixture(scope="session")
def serve() -> Callable[..., AbstractContextManager[Any]]:
    """``with serve(app) as server:`` runs uvicorn on a free 127.0.0.1 port."""
    from mongars_llm.server import serve_in_background

    return serve_in_background


@pytest.fixture(scope="session")
def live_server(
    serve: Callable[..., AbstractContextManager[Any]],
    server_settings: Settings,
    runtime: Any,
    manager: Any,
) -> Iterator[Any]:
    from mongars_llm.server import create_app

    app = create_app(server_settings, runtime, manager)
    with serve(app) as server:
        yield server


@pytest.fixture
def client(live_server: Any) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def private_runtime(tiny_model_dir: Path, server_settings: Settings) -> Iterator[Any]:
    """A runtime of its own: the registry tests load and unload adapters in it."""
    from mongars_llm.runtime import UnifiedLLMRuntime

    runtime = UnifiedLLMRuntime.from_pretrained(
        tiny_model_dir, device="cpu", dtype="float32", settings=server_settings
    )
    try:
        yield runtime
    finally:
        runtime.close()


@pytest.fixture
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two real LoRA adapters of the tiny model (seeds 1 and 2: different weights)."""
    root = tmp_path_factory.mktemp("adapters")
    return [make_lora_adapter(tiny_model_dir, root / f"a{i}", seed=i) for i in (1, 2)]


@pytest.fixture
def registry_settings(tmp_path: Path, tiny_model_dir: Path, manifest_path: Path) -> Settings:
    """Server settings whose adapter registry is the test's own (under ``tmp_path``)."""
    return make_settings(tmp_path, tiny_model_dir, manifest_path)


@pytest.fixture
def adapter_registry(registry_settings: Settings) -> AdapterRegistry:
    """The (empty) registry that :func:`registry_server` follows."""
    return AdapterRegistry(registry_settings.llm_adapter_registry_path)


@pytest.fixture
def registry_server(
    registry_settings: Settings,
    adapter_registry: AdapterRegistry,
    manager: Any,
    private_runtime: Any,
    serve: Callable[..., AbstractContextManager[Any]],
) -> Callable[[], AbstractContextManager[tuple[httpx.Client, AdapterRegistry]]]:
    """``with registry_server() as (http, registry):`` a server on :func:`private_runtime`
    polling :func:`adapter_registry` every 0.1 s (what is registered before it starts is
    there when it starts)."""
    from mongars_llm.server import ServerConfig, create_app

    @contextmanager
    def run() -> Iterator[tuple[httpx.Client, AdapterRegistry]]:
        app = create_app(
            registry_settings, private_runtime, manager, config=ServerConfig(registry_poll_s=0.1)
        )
        with serve(app) as live, httpx.Client(base_url=live.url, timeout=120) as http:
            yield http, adapter_registry

    return run
