"""``keep_alive``: LoRA adapters unload after an idle time and load again on next use.

As Ollama unloads a model ``keep_alive`` after its last request (5 minutes by
default), the server unloads an *adapter* that no request used for
``MONGARS_SERVER_KEEP_ALIVE_S`` seconds (300 by default): its LoRA layers are
freed, its folder and ``use`` are remembered, and the next request that needs it
(naming it, or relying on it as a default adapter) loads it again before it
runs, in a worker thread. A request may set its own keep-alive (Ollama's
``keep_alive``: ``"10m"``, ``3600``, ``0`` to unload right after the request,
a negative value to keep it loaded). The base weights are shared by every role
and stay loaded while the server runs; adapters that the registry watcher
manages follow the registry instead.

One daemon thread waits for the next expiry and exits when nothing is pending;
an adapter that a request touched again after it was picked is kept. A call
already running keeps its adapters until it ends (the runtime pins them).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..logging import log_event
from ._errors import APIError

__all__ = ["START_GRACE_S", "KeepAlive", "Resident", "parse_keep_alive"]

#: how long a request that starts keeps its adapters at least, until the runtime pins them
START_GRACE_S = 5.0

logger = logging.getLogger("mongars_llm.server")

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: Any, *, param: str = "keep_alive") -> float | None:
    """Ollama's ``keep_alive`` in seconds: a number of seconds, or a Go duration
    (``"5m"``, ``"1h30m"``, ``"-1"``); ``None`` when absent. A negative value means
    "keep loaded"; anything else is a 400 naming ``param``."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise _bad(param, value)
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise _bad(param, value)
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(text)
        except ValueError:
            pass
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        parts = _DURATION.findall(body)
        if parts and "".join(n + u for n, u in parts) == body:
            return sign * sum(float(n) * _UNIT_S[u] for n, u in parts)
    raise _bad(param, value)


def _bad(param: str, value: Any) -> APIError:
    return APIError(
        400,
        f"{param}={value!r} is not a duration: send seconds (300), a duration such as "
        "'5m' or '1h30m', 0 to unload right after the request, or -1 to keep it loaded",
        code="invalid_value",
        param=param,
    )


@dataclass(frozen=True)
class Resident:
    """A loaded adapter and when it unloads (``None``: it does not expire)."""

    name: str
    use: str
    expires_at: dt.datetime | None


class KeepAlive:
    """The idle timers of the adapters of one runtime.

    ``skip(name)`` says which adapters are not ours to unload (the registry
    watcher's). :meth:`prepare` runs before a request resolves its model: it
    loads the adapters the request needs that were unloaded, and pushes their
    timers forward. :meth:`touch` sets their timers after the request (its own
    ``keep_alive`` if it sent one).
    """

    def __init__(self, default_s: float, *, skip: Callable[[str], bool] | None = None) -> None:
        self.default_s = default_s
        self._skip = skip or (lambda _: False)
        self._cond = threading.Condition()
        #: adapter -> monotonic deadline; absent while loaded without expiry
        self._deadlines: dict[str, float] = {}
        #: unloaded for idleness: adapter -> (path, use), to load it again
        self._parked: dict[str, tuple[str, str]] = {}
        #: loading/unloading one adapter at a time, and never a stale decision
        self._swap = threading.Lock()
        self._runtime: Any = None
        self._thread: threading.Thread | None = None
        self._stopped = False

    # ----------------------------------------------------------------- requests
    def wanted(self, runtime: Any, names: Iterable[str], kind: str) -> list[str]:
        """The adapters a request uses: the ones it names (``names``: candidates taken
        from its model and adapter fields), else the defaults of ``kind``
        (``chat``/``embed``), loaded or parked."""
        named = [n for n in names if n]
        loaded = list(getattr(runtime, "adapter_names", []) or [])
        with self._cond:
            parked = dict(self._parked)
        chosen = [n for n in named if n in loaded or n in parked]
        if named:
            return chosen
        use = "generate" if kind == "chat" else "embed"
        defaults = [n for n in loaded if _use_of(runtime, n) in ("all", use)]
        defaults += [n for n, (_, u) in parked.items() if u in ("all", use)]
        return defaults

    def prepare(self, runtime: Any, names: list[str]) -> list[str]:
        """Load again the parked adapters among ``names`` (blocking: call it in a worker
        thread) and keep all of them loaded for now; returns those it loaded."""
        self._runtime = runtime
        names = [n for n in names if not self._skip(n)]
        if not names:
            return []
        reloaded: list[str] = []
        with self._swap:
            with self._cond:
                for name in names:
                    if name in self._deadlines:
                        self._deadlines[name] = max(
                            self._deadlines[name], time.monotonic() + START_GRACE_S
                        )
                parked = [(n, self._parked[n]) for n in names if n in self._parked]
            for name, (path, use) in parked:
                started = time.perf_counter()
                runtime.load_adapter(name, path, use=use)
                with self._cond:
                    self._parked.pop(name, None)
                reloaded.append(name)
                log_event(
                    logger,
                    "adapter_reloaded",
                    name=name,
                    seconds=round(time.perf_counter() - started, 3),
                )
        return reloaded

    def touch(
        self,
        runtime: Any,
        names: Iterable[str],
        keep_alive_s: float | None,
        *,
        at_least: float = 0.0,
    ) -> None:
        """Start the idle timer of ``names`` (``keep_alive_s``, else the default): a
        negative value keeps them loaded, 0 unloads them as soon as the timer runs.
        ``at_least``: a request starting now keeps them that long in any case (it
        has not reached the runtime yet, which then keeps them until it ends)."""
        self._runtime = runtime
        seconds = self.default_s if keep_alive_s is None else keep_alive_s
        if seconds >= 0:
            seconds = max(seconds, at_least)
        with self._cond:
            for name in names:
                if self._skip(name) or name in self._parked:
                    continue
                if seconds < 0:
                    self._deadlines.pop(name, None)
                else:
                    self._deadlines[name] = time.monotonic() + seconds
            self._wake()

    def track(self, runtime: Any) -> None:
        """Start the timers of the adapters loaded at start-up (idle from now on)."""
        names = [n for n in getattr(runtime, "adapter_names", []) or [] if n not in self._deadlines]
        self.touch(runtime, names, None)

    # ----------------------------------------------------------------- queries
    def resident(self, runtime: Any) -> list[Resident]:
        """The loaded adapters, with when each unloads."""
        now_mono, now = time.monotonic(), dt.datetime.now(dt.UTC)
        with self._cond:
            deadlines = dict(self._deadlines)
        out = []
        for name in list(getattr(runtime, "adapter_names", []) or []):
            deadline = deadlines.get(name)
            expires = (
                now + dt.timedelta(seconds=max(0.0, deadline - now_mono))
                if deadline is not None
                else None
            )
            out.append(Resident(name=name, use=_use_of(runtime, name) or "all", expires_at=expires))
        return out

    @property
    def parked(self) -> list[str]:
        """Adapters unloaded for idleness (loaded again on their next use)."""
        with self._cond:
            return list(self._parked)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    # ----------------------------------------------------------------- the timer
    def _wake(self) -> None:
        """Under ``_cond``: run the timer thread (started when needed)."""
        if self._stopped or not self._deadlines:
            return
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._run, name="mongars-keep-alive", daemon=True
            )
            self._thread.start()
        self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stopped or not self._deadlines:
                    self._thread = None
                    return
                now = time.monotonic()
                due = [n for n, t in self._deadlines.items() if t <= now]
                if not due:
                    self._cond.wait(min(self._deadlines.values()) - now)
                    continue
            for name in due:
                self._unload(name)

    def _unload(self, name: str) -> None:
        runtime = self._runtime
        with self._swap:
            with self._cond:
                deadline = self._deadlines.get(name)
                if deadline is None or deadline > time.monotonic():
                    return  # touched again since it was picked
                del self._deadlines[name]
            if runtime is None or getattr(runtime, "closed", False):
                return
            try:
                path = str(runtime.adapter_path(name))
                use = str(runtime.adapter_use(name))
                with self._cond:  # listed as selectable before it leaves the runtime
                    self._parked[name] = (path, use)
                runtime.unload_adapter(name)
            except Exception as err:  # already gone, or a runtime without adapter paths
                with self._cond:
                    self._parked.pop(name, None)
                log_event(
                    logger, "adapter_idle_unload_failed", logging.WARNING, name=name, error=str(err)
                )
                return
        log_event(logger, "adapter_idle_unloaded", name=name)


def _use_of(runtime: Any, name: str) -> str | None:
    getter = getattr(runtime, "adapter_use", None)
    if getter is None:
        return "all"
    try:
        return str(getter(name))
    except Exception:
        return None
