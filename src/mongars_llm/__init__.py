"""mongars-llm: your own open-weight LLM, end to end.

The public API is imported lazily (PEP 562) so that ``import mongars_llm`` stays
fast and never imports torch; heavy modules load on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "Settings": "mongars_llm.settings",
    "ModelSettings": "mongars_llm.settings",
    "get_settings": "mongars_llm.settings",
    "MongarsError": "mongars_llm.errors",
    "ConfigError": "mongars_llm.errors",
    "ManifestError": "mongars_llm.errors",
    "UnknownProfileError": "mongars_llm.errors",
    "UnknownRoleError": "mongars_llm.errors",
    "MissingExtraError": "mongars_llm.errors",
    "ProvisionError": "mongars_llm.errors",
    "ProvisionLockTimeout": "mongars_llm.errors",
    "LLMRuntimeError": "mongars_llm.errors",
    "ModelLoadError": "mongars_llm.errors",
    "InvalidInputError": "mongars_llm.errors",
    "InputTooLongError": "mongars_llm.errors",
    "AdapterNotFoundError": "mongars_llm.errors",
    "UnsupportedError": "mongars_llm.errors",
    "GenerationError": "mongars_llm.errors",
    "EmbeddingError": "mongars_llm.errors",
    "RuntimeClosedError": "mongars_llm.errors",
    "DatasetError": "mongars_llm.errors",
    "RegistryError": "mongars_llm.errors",
    "BundleError": "mongars_llm.errors",
    "ModelManager": "mongars_llm.manager",
    "provision": "mongars_llm.provisioning",
    "UnifiedLLMRuntime": "mongars_llm.runtime",
    "build_bundle": "mongars_llm.training",
    "export_wrapper": "mongars_llm.export",
}

__all__ = sorted([*_LAZY, "__version__"])

if TYPE_CHECKING:  # a mirror of _LAZY for IDEs and type checkers
    from .errors import (
        AdapterNotFoundError,
        BundleError,
        ConfigError,
        DatasetError,
        EmbeddingError,
        GenerationError,
        InputTooLongError,
        InvalidInputError,
        LLMRuntimeError,
        ManifestError,
        MissingExtraError,
        ModelLoadError,
        MongarsError,
        ProvisionError,
        ProvisionLockTimeout,
        RegistryError,
        RuntimeClosedError,
        UnknownProfileError,
        UnknownRoleError,
        UnsupportedError,
    )
    from .export import export_wrapper
    from .manager import ModelManager
    from .provisioning import provision
    from .runtime import UnifiedLLMRuntime
    from .settings import ModelSettings, Settings, get_settings
    from .training import build_bundle


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mongars_llm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
