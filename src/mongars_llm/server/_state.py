"""What one app instance holds: settings, the runtime (loaded lazily), the model
manager, the admission controller, provisioning jobs and the registry watcher."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ..errors import ModelLoadError, UnknownRoleError
from ..logging import log_event
from ..settings import Settings
from ._config import ServerConfig
from ._errors import APIError
from ._jobs import JobStore
from ._keep_alive import START_GRACE_S, KeepAlive
from ._limits import AdmissionController

if TYPE_CHECKING:
    import numpy as np

    from ..manifest import ResolvedRole
    from ._metrics import Metrics
    from ._registry_watcher import AdapterKind, RegistryWatcher
    from ._runtime_api import RuntimeAPI

__all__ = ["BASE_ADAPTER", "EmbedFn", "ServerState"]

logger = logging.getLogger("mongars_llm.server")

#: the adapter name that selects the bare base weights (``model="general:base"``)
BASE_ADAPTER = "base"

#: embed(texts, instruction=, adapter=, normalize=, pooling=) -> float32 (n, hidden)
EmbedFn = Callable[..., Awaitable["np.ndarray"]]


class ServerState:
    """Shared by every route through ``request.app.state.mongars``."""

    def __init__(
        self,
        settings: Settings,
        config: ServerConfig,
        *,
        runtime: RuntimeAPI | None,
        manager: Any | None,
        embeddings_only: bool,
        embed_fn: EmbedFn | None,
    ) -> None:
        self.settings = settings
        self.config = config
        self.runtime = runtime
        self.embeddings_only = embeddings_only
        self.embed_fn = embed_fn
        self.load_error: BaseException | None = None
        #: seconds this app took to load the runtime (None: it was given one)
        self.load_seconds: float | None = None
        #: the /metrics counters (:mod:`._metrics`), None when metrics are off
        self.metrics: Metrics | None = None
        self.loading = runtime is None
        self.started_at = time.time()
        self.admission = AdmissionController(
            max_concurrency=config.max_concurrency,
            max_queue=config.max_queue,
            queue_timeout_s=config.queue_timeout_s,
        )
        self.jobs = JobStore(self._provision)
        self.watcher: RegistryWatcher | None = None
        self.keep_alive = KeepAlive(config.keep_alive_s, skip=self._registry_owned)
        self._manager = manager
        self._manager_lock = threading.Lock()
        self._load_thread: threading.Thread | None = None

    # ------------------------------------------------------------------ manager
    @property
    def manager(self) -> Any:
        """The :class:`~mongars_llm.manager.ModelManager` (built on first use)."""
        if self._manager is None:
            with self._manager_lock:
                if self._manager is None:
                    from ..manager import ModelManager

                    self._manager = ModelManager(settings=self.settings)
        return self._manager

    def _provision(self, roles: list[str] | None, *, force: bool, progress: Any) -> Any:
        from ..provisioning import provision

        return provision(
            roles, force=force, manager=self.manager, progress=progress, show_progress=False
        )

    # ------------------------------------------------------------------ runtime
    def start_loading(self) -> None:
        """Load the shared runtime in a background thread (readiness flips when done)."""
        if self.runtime is not None:
            self.keep_alive.track(self.runtime)
        if self.runtime is not None or self._load_thread is not None:
            return
        self.loading = True
        self._load_thread = threading.Thread(
            target=self._load, name="mongars-runtime-loader", daemon=True
        )
        self._load_thread.start()

    def _load(self) -> None:
        started = time.perf_counter()
        try:
            from ..runtime import UnifiedLLMRuntime

            runtime = UnifiedLLMRuntime.shared(self.settings)
        except BaseException as err:  # recorded and reported by /readyz and every route
            self.load_error = err
            self.loading = False
            log_event(logger, "server_load_failed", logging.ERROR, error=str(err))
            return
        self.load_seconds = time.perf_counter() - started
        self.runtime = runtime
        self.loading = False
        self.keep_alive.track(runtime)
        log_event(
            logger,
            "server_ready",
            model=runtime.model_id,
            engine=getattr(runtime, "engine", None),
            seconds=round(time.perf_counter() - started, 3),
        )
        self.start_watcher()

    def wait_until_loaded(self, timeout: float | None = None) -> bool:
        if self._load_thread is not None:
            self._load_thread.join(timeout)
        return self.runtime is not None

    def require_runtime(self) -> RuntimeAPI:
        """The runtime, or a 503 saying it is still loading / failed to load."""
        if self.runtime is not None:
            return self.runtime
        retry = {"Retry-After": str(self.config.retry_after_s)}
        if self.load_error is not None:
            raise ModelLoadError(f"the model failed to load: {self.load_error}") from None
        raise APIError(
            503,
            "the model is still loading; retry shortly (GET /readyz says when it is ready)",
            code="model_loading",
            type="server_error",
            headers=retry,
        )

    def start_watcher(self) -> None:
        poll = self.config.registry_poll_s
        if poll is None or self.runtime is None or self.watcher is not None:
            return
        from ._registry_watcher import RegistryWatcher

        self.watcher = RegistryWatcher(
            self.runtime, self.settings.llm_adapter_registry_path, poll_s=poll
        )
        self.watcher.start()

    def shutdown(self) -> None:
        self.keep_alive.stop()
        if self.watcher is not None:
            self.watcher.stop()

    # ------------------------------------------------------------------ models
    def role_names(self) -> list[str]:
        try:
            return list(self.manager.role_names)
        except Exception as err:  # a broken manifest must not take /v1/models down
            log_event(logger, "server_manifest_unavailable", logging.WARNING, error=str(err))
            return []

    def adapter_names(self) -> list[str]:
        """Adapters selectable by requests: the runtime's plus the registry's (its aliases
        and the versions loaded on first use)."""
        runtime = self.runtime
        names = list(runtime.adapter_names) if runtime is not None else []
        if self.watcher is not None:
            names.extend(name for name in self.watcher.names() if name not in names)
        if names:
            names.insert(0, BASE_ADAPTER)
        return names

    async def select_model(
        self, model: str, adapter: str | None, *, kind: AdapterKind
    ) -> tuple[str | None, str | tuple[()] | None]:
        """:meth:`resolve_model`, then load a registry candidate on its first use (in a
        worker thread: the event loop never waits for adapter files). An adapter that
        :attr:`keep_alive` unloaded for idleness is loaded again first."""
        await self.keep_alive_prepare(model, adapter, kind=kind)
        role, chosen = self.resolve_model(model, adapter, kind=kind)
        watcher = self.watcher
        if isinstance(chosen, str) and watcher is not None and watcher.is_selectable(chosen):
            await asyncio.to_thread(watcher.ensure_loaded, chosen)
        return role, chosen

    def request_adapters(self, model: str, adapter: str | None, *, kind: AdapterKind) -> list[str]:
        """The adapters a request for ``model`` (and ``adapter``) runs with, loaded or
        unloaded for idleness (the names :attr:`keep_alive` times)."""
        runtime = self.runtime
        if runtime is None:
            return []
        named = [adapter or "", model.split(":", 1)[1] if ":" in model else ""]
        if BASE_ADAPTER in named:
            return []
        return self.keep_alive.wanted(runtime, named, kind)

    async def keep_alive_prepare(
        self, model: str, adapter: str | None, *, kind: AdapterKind
    ) -> list[str]:
        """Load again the adapters of this request that idled out, and start their timers."""
        runtime = self.runtime
        names = self.request_adapters(model, adapter, kind=kind)
        if runtime is None or not names:
            return names
        self.keep_alive.touch(runtime, names, None, at_least=START_GRACE_S)
        if self.keep_alive.parked:
            await asyncio.to_thread(self.keep_alive.prepare, runtime, names)
            self.keep_alive.touch(runtime, names, None, at_least=START_GRACE_S)
        return names

    def _registry_owned(self, name: str) -> bool:
        watcher = self.watcher
        return watcher is not None and watcher.is_selectable(name)

    def resolve_model(
        self, model: str, adapter: str | None, *, kind: AdapterKind = "chat"
    ) -> tuple[str | None, str | tuple[()] | None]:
        """``model`` (a role, ``role:adapter`` or the checkpoint id) → (role, adapter).

        The adapter is ``None`` for the runtime's defaults, a runtime adapter
        name, or ``()`` for ``role:base`` (no adapter). Unknown names are a 404
        listing what is available (a 503 while the model loads: the checkpoint id
        is not known before); an adapter given both ways with different names is
        a 422; an adapter for the other route (``kind``: an embedding adapter in a
        chat request, or the reverse) is a 400 naming the route it serves.
        """
        runtime = self.runtime
        model_id = runtime.model_id if runtime is not None else None
        roles = self.role_names()
        base, suffix = model, None
        if model not in roles and model != model_id and ":" in model:
            base, suffix = model.split(":", 1)
        if base in roles:
            role: str | None = base
        elif model_id is not None and base == model_id:
            role = None
        else:
            configured = self.settings.unified_model_dir
            if runtime is None and (self.load_error is None or base == str(configured)):
                self.require_runtime()  # 503: still loading, or the load failed (says why)
            available = ", ".join([*roles, *([model_id] if model_id else [])]) or "(none)"
            raise APIError(
                404,
                f"The model {model!r} does not exist; available models: {available} "
                "(see GET /v1/models)",
                code="model_not_found",
                param="model",
            )
        if suffix is not None and adapter is not None and suffix != adapter:
            raise APIError(
                422,
                f"the adapter is given twice with different names ({suffix!r} in 'model', "
                f"{adapter!r} in 'adapter'); give it once",
                code="invalid_value",
                param="adapter",
            )
        chosen = suffix if suffix is not None else adapter
        if chosen is None:
            return role, None
        if chosen == BASE_ADAPTER:
            return role, ()  # an explicit empty selection: no adapter at all
        return role, self.resolve_adapter(chosen, kind=kind)

    def resolve_adapter(self, name: str, *, kind: AdapterKind = "chat") -> str:
        watcher = self.watcher
        resolved = watcher.resolve(name, kind) if watcher is not None else name
        runtime = self.runtime
        known = list(runtime.adapter_names) if runtime is not None else []
        if watcher is not None and watcher.is_selectable(resolved):
            return resolved  # a registry version: loaded now or on this first use
        if runtime is not None and resolved not in known:
            raise APIError(
                404,
                f"unknown adapter {name!r}; loaded adapters: {', '.join(self.adapter_names()) or '(none)'}",
                code="adapter_not_found",
                param="adapter",
            )
        return resolved

    def role_entry(self, role: str | None) -> ResolvedRole | None:
        """The resolved manifest entry of ``role`` (``None`` for the bare checkpoint)."""
        if role is None:
            return None
        try:
            entry: ResolvedRole = self.manager.role(role)
        except UnknownRoleError:
            return None
        return entry
