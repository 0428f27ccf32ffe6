"""Fixtures for the server tests: a tiny real checkpoint, its runtime, a manifest
whose roles point at it, and a uvicorn server on 127.0.0.1 driven over HTTP."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from serving_support import make_settings

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
