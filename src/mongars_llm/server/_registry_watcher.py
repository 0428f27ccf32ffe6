"""Follow the adapter registry: the ``promoted`` version goes live, candidates wait.

A :class:`RegistryWatcher` polls the registry manifest (one small JSON read)
and, when its ``revision`` moved, makes the runtime match it without a restart:

* the **promoted** version is loaded with ``use="all"`` (``use="embed"`` for an
  adapter trained with an embedding objective, ``use="rerank"`` for a rerank
  adapter, so chat never sees either): requests
  that name no adapter get it (``mongars-llm adapters promote VERSION`` puts a
  version live). The new version is loaded for explicit use first, then the
  two versions swap their ``use`` in one step: a call resolves either the old
  live version or the new one, never both, never neither;
* the **newest** version usable for chat, the newest usable for embeddings and
  the newest usable for reranking (``latest``, usually fresh ``candidate``\\ s) are loaded *on first use*, with
  ``use="explicit"``: only requests that name them use them (``role:latest``,
  ``role:<name>-v<version>``), so a newly trained adapter never changes the
  answers of clients that did not ask for it, and costs no memory until asked for;
* versions that are neither any more are unloaded; calls that already chose
  them keep them until they finish (the runtime frees them afterwards).

Every load reads the files through :meth:`AdapterRegistry.verify` (recorded
digests, paths confined to the adapter folder) and the runtime's fit check
(rank, shapes, target modules), also when a version that is already loaded is
promoted: that is a ``use`` swap, never a reload of unchecked files. A version
that fails is recorded with its error (``GET /readyz`` lists it) and retried
once the registry entry or its files change; a failed promotion keeps the
previous live version. With nothing promoted, requests that name no adapter
get the base weights (or the manifest's own adapters).

Aliases, per route: ``role:latest`` (the newest version *for that route*: a chat
request never gets an embedding adapter), ``role:promoted``, ``role:<name>``
(the live version when it has that name, else the newest of that name);
``role:base`` bypasses every adapter. A name whose adapter is for the other
route is a 400 that says which route to use.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ..logging import log_event
from ._errors import APIError

if TYPE_CHECKING:
    from ..registry import RegistryEntry
    from ._runtime_api import RuntimeAPI

__all__ = ["AdapterKind", "RegistryWatcher", "runtime_adapter_name"]

logger = logging.getLogger("mongars_llm.server")

#: runtime ``use`` of the live (promoted) version and of a version loaded for explicit use
LIVE_USE, EXPLICIT_USE = "all", "explicit"

#: which route a request comes from: chat/completions ("chat"), embeddings ("embed")
#: or rerank ("rerank")
AdapterKind = Literal["chat", "embed", "rerank"]
_KINDS: tuple[AdapterKind, ...] = ("chat", "embed", "rerank")
#: registry ``use`` values each route may run
_USABLE: dict[AdapterKind, tuple[str, ...]] = {
    "chat": ("all", "generate"),
    "embed": ("all", "embed"),
    "rerank": ("all", "rerank"),
}
_ROUTES: dict[AdapterKind, str] = {
    "chat": "POST /v1/chat/completions or /v1/completions",
    "embed": "POST /v1/embeddings",
    "rerank": "POST /v1/rerank",
}
#: how an error names an adapter of each registry ``use``, and the route it serves
_WHAT: dict[str, tuple[str, AdapterKind]] = {
    "embed": ("an embedding adapter", "embed"),
    "rerank": ("a rerank adapter", "rerank"),
}


def _live_use(entry: Any) -> str:
    """The runtime ``use`` of a promoted version: its own ``embed`` or ``rerank`` stays
    out of chat."""
    use = getattr(entry, "use", "all")
    return use if use in ("embed", "rerank") else LIVE_USE


def runtime_adapter_name(name: str, version: str) -> str:
    """The name a registry version is loaded under in the runtime (``name-v3``)."""
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "adapter"
    return f"{safe}-v{version}"


@dataclass(frozen=True)
class _Failure:
    """A version that failed to load: retried once ``signature`` changes."""

    signature: str
    error: str


class RegistryWatcher:
    """Poll ``registry_path`` every ``poll_s`` seconds in a daemon thread.

    ``current_version`` is the live (promoted and loaded) version;
    :meth:`resolve` maps a request's adapter name to a runtime adapter name
    and :meth:`ensure_loaded` loads a candidate on its first use;
    :meth:`status` is what ``/readyz`` shows.
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
        self.current_version: str | None = None
        self._live: RegistryEntry | None = None
        self._promoted: str | None = None  # what the registry promotes (maybe not loaded)
        self._latest: dict[AdapterKind, RegistryEntry | None] = dict.fromkeys(_KINDS)
        self._alive: list[RegistryEntry] = []  # non-retired entries of the last read
        self._aliases: dict[AdapterKind, dict[str, str]] = {kind: {} for kind in _KINDS}
        self._selectable: dict[str, RegistryEntry] = {}  # runtime name -> entry
        self._loaded: dict[str, tuple[str, str]] = {}  # version -> (runtime name, use)
        self._failed: dict[str, _Failure] = {}
        self._revision: int | None = None
        self._poll_error: str | None = None
        self._status: dict[str, Any] = self._build_status()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()

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

    # ------------------------------------------------------------------ requests
    @property
    def aliases(self) -> dict[str, str]:
        """Every request name the registry provides (both routes) → runtime name."""
        return {**self._aliases["rerank"], **self._aliases["embed"], **self._aliases["chat"]}

    def names(self) -> list[str]:
        """Names requests may use: the aliases and the runtime names of selectable versions
        (a version that failed to load is left out until it loads)."""
        failed = self._failed
        usable = [n for n, e in self._selectable.items() if e.version not in failed]
        return list(dict.fromkeys([*self.aliases, *usable]))

    def resolve(self, name: str, kind: AdapterKind = "chat") -> str:
        """A request's adapter name → the runtime's name (aliases resolved).

        A name the registry does not provide comes back unchanged (a runtime
        adapter of the manifest). A version whose ``use`` does not fit the route
        is a 400 naming the right route.
        """
        aliases, selectable = self._aliases, self._selectable
        target = aliases[kind].get(name)
        if target is None and name in selectable:
            target = name
        for other in _KINDS:
            if target is None and other != kind:
                target = aliases[other].get(name)
        entry = selectable.get(target) if target is not None else None
        if target is None or entry is None:
            return name
        if entry.use not in _USABLE[kind]:
            what, right = _WHAT.get(entry.use, ("a chat adapter", "chat"))
            raise APIError(
                400,
                f"adapter {name!r} is registry version {entry.version} ({entry.name}), "
                f"{what} (use={entry.use!r}); it serves {_ROUTES[right]}, not "
                f"{_ROUTES[kind]}. Send it there, or name a {kind} adapter "
                f"(role:latest picks the newest one for this route)",
                code="adapter_wrong_use",
                param="model",
            )
        return target

    def is_selectable(self, runtime_name: str) -> bool:
        """A registry version requests may name (loaded or loaded on first use)."""
        return runtime_name in self._selectable

    def ensure_loaded(self, runtime_name: str) -> None:
        """Load a selectable version on its first use (verified and fit-checked).

        A version that fails is a 500 ``adapter_load_failed`` with its error; it is
        tried again only once its entry or its files changed.
        """
        entry = self._selectable.get(runtime_name)
        if entry is None or entry.version in self._loaded:
            return
        with self._lock:
            entry = self._selectable.get(runtime_name)
            if entry is None or entry.version in self._loaded:
                return
            loaded = self._load(entry)
            self._status = self._build_status()
        if not loaded:
            failure = self._failed.get(entry.version)
            detail = failure.error if failure is not None else "see the server log"
            raise APIError(
                500,
                f"adapter {runtime_name!r} (registry version {entry.version}) could not be "
                f"loaded: {detail}. Fix the registry entry or its files (the server retries "
                "once they change), or name another adapter; GET /readyz lists failed versions",
                code="adapter_load_failed",
                param="model",
            )

    def status(self) -> dict[str, Any]:
        """The registry as this server follows it (``/readyz``'s ``registry``)."""
        return self._status

    # ------------------------------------------------------------------ polling
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception as err:  # keep watching: the next poll may succeed
                log_event(logger, "adapter_registry_poll_failed", logging.WARNING, error=str(err))
            self._stop.wait(self.poll_s)

    def poll_once(self) -> bool:
        """Match the runtime to the registry if it changed; True when the live version moved.

        A version that failed to load is retried when its entry or files changed.
        """
        with self._lock:
            try:
                changed = self._poll()
            except Exception as err:
                self._poll_error = str(err)
                self._status = self._build_status()
                raise
            self._poll_error = None
            self._status = self._build_status()
            return changed

    def _poll(self) -> bool:
        manifest = self.registry.read()
        if manifest.revision == self._revision and not self._retry_due():
            return False
        entries = {entry.version: entry for entry in manifest.entries}
        # a dangling pointer (a hand edit) fails this poll and leaves what is loaded alone
        live = self._pointed(entries, manifest.promoted, "promoted")
        self._pointed(entries, manifest.latest, "latest")
        self._revision = manifest.revision
        self._promoted = manifest.promoted
        self._alive = [entry for entry in manifest.entries if entry.status != "retired"]
        for kind in _KINDS:
            self._latest[kind] = next(
                (e for e in reversed(self._alive) if e.use in _USABLE[kind]), None
            )
        moved = False
        if live is not None and live.version != self.current_version:
            moved = self._go_live(live)
        elif live is None and self.current_version is not None:
            self._demote_live()  # nothing promoted any more: requests get the base weights
            moved = True
        elif live is not None:
            self._live = live
        if self._live is not None and self._live.version not in {e.version for e in self._alive}:
            self._demote_live()  # the live version was retired (a failed promotion kept it)
            moved = True
        self._publish()
        for version in [v for v in self._loaded if v not in self._wanted()]:
            self._unload(version)  # calls that chose it keep it until they finish
        alive = {entry.version for entry in self._alive}
        for version in [v for v in self._failed if v not in alive]:
            del self._failed[version]
        return moved

    def _demote_live(self) -> None:
        """The live version stops being the default (it stays loaded while selectable)."""
        old = self.current_version
        if old is not None and old in self._loaded:
            name = self._loaded[old][0]
            try:
                self.runtime.set_adapter_uses({name: EXPLICIT_USE})
                self._loaded[old] = (name, EXPLICIT_USE)
            except Exception as err:  # not loaded any more: nothing is live either way
                log_event(logger, "adapter_demote_failed", logging.WARNING, error=str(err))
        self._live, self.current_version = None, None

    def _go_live(self, entry: RegistryEntry) -> bool:
        """Load ``entry`` (verified) for explicit use, then swap the uses in one step.

        A version already loaded is verified again (its files or its manifest entry
        may have changed since): a promotion never trusts an earlier check.
        """
        if entry.version in self._loaded:
            if not self._check(entry):
                return False
        elif not self._load(entry):
            return False  # a failed promotion keeps the previous live version
        name = self._loaded[entry.version][0]
        uses = {name: _live_use(entry)}
        old = self.current_version
        if old is not None and old in self._loaded and old != entry.version:
            uses[self._loaded[old][0]] = EXPLICIT_USE
        try:
            self.runtime.set_adapter_uses(uses)
        except Exception as err:
            log_event(logger, "adapter_promote_failed", logging.ERROR, error=str(err))
            return False
        for runtime_name, use in uses.items():
            version = next(v for v, (n, _) in self._loaded.items() if n == runtime_name)
            self._loaded[version] = (runtime_name, use)
        self._live, self.current_version = entry, entry.version
        log_event(
            logger,
            "adapter_live",
            version=entry.version,
            name=entry.name,
            runtime_name=name,
            previous=old,
        )
        return True

    def _wanted(self) -> set[str]:
        """Versions kept loaded: the live one and the selectable candidates."""
        return {entry.version for entry in self._selectable.values()}

    def _retry_due(self) -> bool:
        """The promoted version failed to load and its entry or files changed since
        (candidates are retried by the next request that names them)."""
        failure = self._failed.get(self._promoted or "")
        entry = next((e for e in self._alive if e.version == self._promoted), None)
        return (
            failure is not None
            and entry is not None
            and (self._signature(entry) != failure.signature)
        )

    # ----------------------------------------------------------------- internals
    def _pointed(
        self, entries: dict[str, RegistryEntry], version: str | None, pointer: str
    ) -> RegistryEntry | None:
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

    def _signature(self, entry: RegistryEntry) -> str:
        """Changes when the entry or any file of its adapter folder changes."""
        digest = hashlib.sha256(entry.model_dump_json().encode())
        root = entry.resolve_path(self.registry.path)
        try:
            files = sorted(root.rglob("*")) if root.is_dir() else [root]
            for file in files[:1000]:
                stat = file.stat()
                digest.update(f"{file}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        except OSError as err:
            digest.update(str(err).encode())
        return digest.hexdigest()

    def _check(self, entry: RegistryEntry) -> bool:
        """Verify a loaded version's files again; record a failure with its error."""
        if not self.verify:
            return True
        signature = self._signature(entry)
        failure = self._failed.get(entry.version)
        if failure is not None and failure.signature == signature:
            return False
        try:
            self.registry.verify(entry)
        except Exception as err:
            self._fail(entry, signature, err)
            return False
        self._failed.pop(entry.version, None)
        return True

    def _fail(self, entry: RegistryEntry, signature: str, err: BaseException) -> None:
        self._failed[entry.version] = _Failure(signature, str(err))
        log_event(
            logger,
            "adapter_load_failed",
            logging.ERROR,
            version=entry.version,
            name=entry.name,
            error=str(err),
        )

    def _load(self, entry: RegistryEntry) -> bool:
        """Verify and load ``entry`` for explicit use; record a failure with its error."""
        version = entry.version
        failure = self._failed.get(version)
        signature = self._signature(entry)
        if failure is not None and failure.signature == signature:
            return False  # nothing changed since it failed
        name = runtime_adapter_name(entry.name, version)
        try:
            path = (
                self.registry.verify(entry)
                if self.verify
                else entry.resolve_path(self.registry.path)
            )
            self.runtime.load_adapter(name, str(path), use=EXPLICIT_USE)
        except Exception as err:
            self._loaded.pop(version, None)
            self._fail(entry, signature, err)
            return False
        self._failed.pop(version, None)
        self._loaded[version] = (name, EXPLICIT_USE)
        log_event(
            logger,
            "adapter_loaded",
            version=version,
            name=entry.name,
            runtime_name=name,
            status=entry.status,
            use=entry.use,
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

    def _publish(self) -> None:
        """Recompute what requests can name: the live version and the newest per route."""
        live = self._live
        selectable: dict[str, RegistryEntry] = {}
        aliases: dict[AdapterKind, dict[str, str]] = {kind: {} for kind in _KINDS}
        for kind in _KINDS:
            newest = self._latest[kind]
            if newest is not None:
                name = runtime_adapter_name(newest.name, newest.version)
                selectable[name] = newest
                aliases[kind].update({"latest": name, newest.name: name})
            if live is not None:
                name = runtime_adapter_name(live.name, live.version)
                selectable[name] = live
                aliases[kind].update({"promoted": name, live.name: name})
        self._selectable, self._aliases = selectable, aliases

    def _build_status(self) -> dict[str, Any]:
        loaded = {version: name for version, (name, _) in self._loaded.items()}
        names = {entry.version: entry.name for entry in self._alive}
        failed = [
            {"version": version, "name": names.get(version), "error": failure.error}
            for version, failure in self._failed.items()
        ]
        return {
            "path": str(self.registry.path),
            "revision": self._revision,
            "promoted": self._promoted,
            "live": self.current_version,
            "in_sync": self._promoted == self.current_version
            and not self._failed
            and self._poll_error is None,
            "registered": [
                {
                    "version": entry.version,
                    "name": entry.name,
                    "status": entry.status,
                    "use": entry.use,
                    "runtime_name": runtime_adapter_name(entry.name, entry.version),
                    "selectable": runtime_adapter_name(entry.name, entry.version)
                    in self._selectable,
                    "loaded": entry.version in loaded,
                }
                for entry in self._alive
            ],
            "failed": failed,
            "error": self._poll_error,
        }
