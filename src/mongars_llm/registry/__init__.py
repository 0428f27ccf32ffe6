"""Adapter registry: versioned, immutable LoRA adapters with ``latest``/``promoted`` pointers.

The registry is a directory holding ``manifest.json`` (schema in
docs/training.md). Updates are atomic and serialised by a file lock; readers
(the runtime, serving replicas, provisioning) need no lock. No torch here.
"""

from __future__ import annotations

from ._models import (
    ADAPTER_NAME_PATTERN,
    MANIFEST_SCHEMA_VERSION,
    AdapterCompatibility,
    RegistryEntry,
    RegistryManifest,
    Status,
    is_safe_adapter_name,
)
from ._registry import MANIFEST_NAME, AdapterRegistry, default_registry_path, digest_tree

__all__ = [
    "ADAPTER_NAME_PATTERN",
    "MANIFEST_NAME",
    "MANIFEST_SCHEMA_VERSION",
    "AdapterCompatibility",
    "AdapterRegistry",
    "RegistryEntry",
    "RegistryManifest",
    "Status",
    "default_registry_path",
    "digest_tree",
    "is_safe_adapter_name",
]
