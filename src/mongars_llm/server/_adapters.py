"""Follow the adapter registry: the ``promoted`` version goes live, candidates wait.

A :class:`RegistryWatcher` polls the registry manifest (one small JSON read)
and, when its ``revision`` moved, makes the runtime match it without a restart:

* the **promoted** version is loaded with ``use="all"`` (``use="embed"`` for an
  adapter trained with an embedding objective, so chat never sees it): requests
  that name no adapter get it (``mongars-llm adapters promote VERSION`` puts a
  version live);
* the **newest** version (``latest``, usually a fresh ``candidate``) is loaded
  with ``use="explicit"``: only requests that name it use it (``role:latest``,
  ``role:<name>-v<version>``), so a newly trained adapter never changes the
  answers of clients that did not ask for it;
* versions that are neither any more are unloaded (the runtime lets calls in
  flight finish first). With nothing promoted, requests that name no adapter
  get the base weights (or the manifest's own adapters).

Every version is verified against its recorded digests before it loads; one
that fails is logged and skipped (a failed promotion keeps the previous live
version). Aliases: ``role:latest``, ``role:promoted``, ``role:<name>`` (the live
version when it has that name, else the newest of that name); ``role:base``
bypasses every adapter.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import TYPE_CHECKING, Any

from ..logging import log_event

if TYPE_CHECKING:
    from ._runtime_api import RuntimeAPI

__all__ = ["RegistryWatcher", "runtime_adapter_name"]

logger = logging.getLogger("mongars_llm.server")

#: runtime ``use`` of the live (promoted) version and of a version loaded for explicit use
LIVE_USE, EXPLICIT_USE = "all", "explicit"


def _live_use(entry: Any) -> str:
    """The runtime ``use`` of a promoted version: its own ``embed`` stays out of chat."""
    return "embed" if getattr(entry, "use", "all") == "embed" else LIVE_USE


def runtime_adapter_name(name: str, version: str) -> str:
    """The name a registry version is loaded under in the runtime (``name-v3``)."""
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "adapter"
    return f"{safe}-v{version}"


class RegistryWatcher:
    """Poll ``registry_path`` every ``poll_s`` seconds in a daemon thread.

    ``current_version`` is the live (promoted) version, ``latest_version`` the
    newest one loaded for explicit use; ``aliases`` maps request names to
    runtime adapter names.
    """

    def __init__(
        self,
        runtime: RuntimeAPI,
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
        self.latest_version: str | None = None
        self._loaded: dict[str, tuple[str, str]] = {}  # version -> (runtime name, use)
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
        """Match the runtime to the registry if it changed; True when an adapter was loaded."""
        with self._lock:
            manifest = self.registry.read()
            if manifest.revision == self._revision:
                return False
            entries = {entry.version: entry for entry in manifest.entries}
            # a dangling pointer (a hand edit) fails this poll and leaves what is loaded alone
            live = self._pointed(entries, manifest.promoted, "promoted")
            newest = self._pointed(entries, manifest.latest, "latest")
            self._revision = manifest.revision
            wanted: dict[str, tuple[Any, str]] = {}
            if newest is not None:
                wanted[newest.version] = (newest, EXPLICIT_USE)
            if live is not None:
                wanted[live.version] = (live, _live_use(live))
            loaded_any = False
            for entry, use in wanted.values():
                loaded_any |= self._load(entry, use)
            keep = {v for v in wanted if v in self._loaded}
            if live is not None and live.version not in keep and self.current_version:
                keep.add(self.current_version)  # a failed promotion keeps the live version
            for version in [v for v in self._loaded if v not in keep]:
                self._unload(version)
            self._publish(live, newest)
            return loaded_any

    # ----------------------------------------------------------------- internals
    def _pointed(self, entries: dict[str, Any], version: str | None, pointer: str) -> Any | None:
        if version is None:
            return None
        entry = entries.get(version)
        if entry is None:
            from ..errors import RegistryError

            raise RegistryError(
                f"{self.registry.manifest_path}: {pointer!r} names version {version!r}, which "
                f"is not among its entries; set {pointer!r} to a known version (or null); "
                "the server keeps the adapters it has loaded until then"
            )
        return entry

    def _load(self, entry: Any, use: str) -> bool:
        version = entry.version
        if version in self._failed or self._loaded.get(version, ("", ""))[1] == use:
            return False
        name = runtime_adapter_name(entry.name, version)
        try:
            if version not in self._loaded and self.verify:
                self.registry.verify(entry)
            # a version already loaded for explicit use is loaded again to change its use
            self.runtime.load_adapter(name, str(entry.resolve_path(self.registry.path)), use=use)
        except Exception as err:
            self._failed.add(version)
            self._loaded.pop(version, None)
            log_event(
                logger,
                "adapter_load_failed",
                logging.ERROR,
                version=version,
                name=entry.name,
                error=str(err),
            )
            return False
        self._loaded[version] = (name, use)
        log_event(
            logger,
            "adapter_loaded",
            version=version,
            name=entry.name,
            runtime_name=name,
            status=entry.status,
            default=use != EXPLICIT_USE,
            base_model=entry.base_model,
        )
        return True

    def _unload(self, version: str) -> None:
        name, _ = self._loaded.pop(version)
        try:
            self.runtime.unload_adapter(name)
        except Exception as err:
            log_event(logger, "adapter_unload_failed", logging.WARNING, name=name, error=str(err))
            return
        log_event(logger, "adapter_unloaded", runtime_name=name, version=version)

    def _publish(self, live: Any | None, newest: Any | None) -> None:
        """Recompute what requests can name from what is loaded now."""
        live_version = next(
            (v for v, (_, use) in self._loaded.items() if use != EXPLICIT_USE), None
        )
        aliases: dict[str, str] = {}
        if newest is not None and newest.version in self._loaded:
            name = self._loaded[newest.version][0]
            aliases.update({"latest": name, newest.name: name})
        if live_version is not None:
            name = self._loaded[live_version][0]
            live_name = live.name if live is not None and live.version == live_version else None
            aliases["promoted"] = name
            if live_name is not None:
                aliases[live_name] = name
        self.aliases = aliases
        self.current_version = live_version
        self.current_name = self._loaded[live_version][0] if live_version is not None else None
        self.latest_version = (
            newest.version if newest is not None and newest.version in self._loaded else None
        )
