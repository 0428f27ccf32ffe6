"""Follow the adapter registry: load each new ``latest`` version without a restart.

A :class:`RegistryWatcher` polls the registry's ``revision`` counter (one small
JSON read), and when the newest version changed it verifies the files against
their recorded digests and loads the adapter into the running runtime
(``use="all"``: requests that name no adapter now get it), then unloads the
previous version (the runtime lets calls in flight finish first). The newest
version is also reachable explicitly as ``role:latest``, ``role:<name>`` and
``role:<name>-v<version>``; ``role:base`` bypasses every adapter.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

from ..logging import log_event

__all__ = ["RegistryWatcher", "runtime_adapter_name"]

logger = logging.getLogger("mongars_llm.server")


def runtime_adapter_name(name: str, version: str) -> str:
    """The name a registry version is loaded under in the runtime (``name-v3``)."""
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "adapter"
    return f"{safe}-v{version}"


class RegistryWatcher:
    """Poll ``registry_path`` every ``poll_s`` seconds in a daemon thread."""

    def __init__(
        self,
        runtime: Any,
        registry_path: Any,
        *,
        poll_s: float = 5.0,
        verify: bool = True,
    ) -> None:
        from ..registry import AdapterRegistry

        self.runtime = runtime
        self.registry = AdapterRegistry(registry_path)
        self.poll_s = poll_s
        self.verify = verify
        self.aliases: dict[str, str] = {}
        self.current_version: str | None = None
        self.current_name: str | None = None
        self._failed: set[str] = set()
        self._revision: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._loop, name="mongars-registry-watcher", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def resolve(self, name: str) -> str:
        """A request's adapter name → the runtime's name (aliases resolved)."""
        return self.aliases.get(name, name)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception as err:  # keep watching: the next poll may succeed
                log_event(logger, "adapter_registry_poll_failed", logging.WARNING, error=str(err))
            self._stop.wait(self.poll_s)

    def poll_once(self) -> bool:
        """Load the registry's newest version if it is new; True when one was loaded."""
        with self._lock:
            revision = self.registry.revision()
            if revision == self._revision:
                return False
            entry = self.registry.latest()
            self._revision = revision
            if entry is None:  # every version retired: back to the base weights
                if self.current_name is not None:
                    self.aliases = {}
                    old, self.current_name, self.current_version = self.current_name, None, None
                    self.runtime.unload_adapter(old)
                    log_event(logger, "adapter_unloaded", runtime_name=old, reason="no latest")
                return False
            if entry.version == self.current_version:
                return False
            if entry.version in self._failed:
                return False
            name = runtime_adapter_name(entry.name, entry.version)
            try:
                if self.verify:
                    self.registry.verify(entry)
                if name not in set(self.runtime.adapter_names):
                    self.runtime.load_adapter(name, str(entry.resolve_path(self.registry.path)))
            except Exception as err:
                self._failed.add(entry.version)
                log_event(
                    logger,
                    "adapter_load_failed",
                    logging.ERROR,
                    version=entry.version,
                    name=entry.name,
                    error=str(err),
                )
                return False
            previous, self.current_name = self.current_name, name
            self.current_version = entry.version
            self.aliases = {"latest": name, entry.name: name}
            if previous is not None and previous != name:
                try:
                    self.runtime.unload_adapter(previous)
                except Exception as err:
                    log_event(
                        logger,
                        "adapter_unload_failed",
                        logging.WARNING,
                        name=previous,
                        error=str(err),
                    )
            log_event(
                logger,
                "adapter_loaded",
                version=entry.version,
                name=entry.name,
                runtime_name=name,
                base_model=entry.base_model,
            )
            return True
