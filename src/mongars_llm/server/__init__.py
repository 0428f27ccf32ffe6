"""The HTTP server (``[serve]`` extra): admin API and OpenAI-compatible API.

>>> from mongars_llm.server import create_app
>>> app = create_app()            # loads the shared runtime in the background

``mongars_llm.server.ray`` (``[ray]`` extra) deploys the same app on Ray Serve.
Names are imported lazily so that importing this package needs neither
FastAPI nor torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY: dict[str, str] = {
    "create_app": "mongars_llm.server._app",
    "ServerConfig": "mongars_llm.server._config",
    "BackgroundServer": "mongars_llm.server._background",
    "serve_in_background": "mongars_llm.server._background",
    "RegistryWatcher": "mongars_llm.server._registry_watcher",
    # used by ``mongars-llm serve`` before it starts the server
    "check_credentials": "mongars_llm.server._auth",
    "uvicorn_options": "mongars_llm.server._http",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:
    from ._app import create_app as create_app
    from ._auth import check_credentials as check_credentials
    from ._background import BackgroundServer as BackgroundServer
    from ._background import serve_in_background as serve_in_background
    from ._config import ServerConfig as ServerConfig
    from ._http import uvicorn_options as uvicorn_options
    from ._registry_watcher import RegistryWatcher as RegistryWatcher


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mongars_llm.server' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
