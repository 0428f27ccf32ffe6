"""Which provider names a manifest may use.

The manifest sits below provisioning, so it never imports a provider: a name is
valid when it is built in (:data:`KNOWN_PROVIDERS`), declared in the
``mongars_llm.providers`` entry point group of an installed distribution (read
from metadata, nothing is imported), or registered at run time with
:func:`register_provider_name` (provisioning calls it when a plugin registers).
"""

from __future__ import annotations

import threading
from importlib.metadata import entry_points

__all__ = [
    "ENTRY_POINT_GROUP",
    "KNOWN_PROVIDERS",
    "is_known_provider",
    "known_providers",
    "register_provider_name",
    "unregister_provider_name",
]

ENTRY_POINT_GROUP = "mongars_llm.providers"
KNOWN_PROVIDERS: frozenset[str] = frozenset({"huggingface", "local", "ollama"})

_lock = threading.Lock()
_registered: set[str] = set()
_entry_point_names: frozenset[str] | None = None


def _entry_point_provider_names() -> frozenset[str]:
    global _entry_point_names
    with _lock:
        if _entry_point_names is None:
            try:
                names = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
            except Exception:  # broken metadata of an unrelated distribution
                names = set()
            _entry_point_names = frozenset(names)
        return _entry_point_names


def register_provider_name(name: str) -> None:
    """Make ``name`` a valid ``provider`` in manifests parsed from now on."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a provider name must be a non-empty string, not {name!r}")
    with _lock:
        _registered.add(name.strip())


def unregister_provider_name(name: str) -> None:
    """Forget a name added with :func:`register_provider_name` (built-ins stay)."""
    with _lock:
        _registered.discard(name.strip() if isinstance(name, str) else name)


def known_providers(*, refresh: bool = False) -> frozenset[str]:
    """Built-in names, entry point names and names registered at run time.

    Entry points are read once per process; ``refresh=True`` reads them again
    (after installing a plugin in a running process).
    """
    global _entry_point_names
    if refresh:
        with _lock:
            _entry_point_names = None
    names = _entry_point_provider_names()
    with _lock:
        return KNOWN_PROVIDERS | names | frozenset(_registered)


def is_known_provider(name: str) -> bool:
    """Whether ``name`` may appear as a role's ``provider``."""
    return name in known_providers()
