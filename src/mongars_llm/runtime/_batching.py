"""Micro-batching of concurrent calls and the adapter "mode gate".

:class:`MicroBatcher` runs one worker thread: it takes the first waiting
request, keeps collecting for ``wait_s`` seconds (or until ``max_size`` items),
groups what it got by a compatibility key and hands each group to the handler
in one call. Callers wait on a :class:`concurrent.futures.Future`, which an
asyncio caller awaits with :func:`asyncio.wrap_future` without blocking its loop.

:class:`ModeGate` lets many calls share the model while they need the same
adapter configuration and makes a call that needs another one wait until they
are done, so that switching adapters never changes the weights under a running
forward pass.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

__all__ = ["BatchStats", "MicroBatcher", "ModeGate", "Pending"]

logger = logging.getLogger(__name__)

T = TypeVar("T", bound="Pending")


@dataclass
class Pending:
    """A queued request: subclasses add the payload; ``future`` gets the result."""

    future: Future[Any] = field(default_factory=Future, init=False)

    def size(self) -> int:
        return 1

    def key(self) -> Hashable:
        return None


@dataclass
class BatchStats:
    """What the batcher did (for tests, benchmarks and ``rt.stats()``)."""

    batches: int = 0
    requests: int = 0
    items: int = 0
    largest_batch: int = 0
    sizes: collections.deque[int] = field(default_factory=lambda: collections.deque(maxlen=256))

    def to_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "requests": self.requests,
            "items": self.items,
            "largest_batch": self.largest_batch,
        }


_STOP = object()


class MicroBatcher(Generic[T]):
    """Coalesce concurrent requests into batches handled on one worker thread."""

    def __init__(
        self,
        name: str,
        handler: Callable[[list[T]], None],
        *,
        max_size: int,
        wait_s: float,
    ) -> None:
        self.name = name
        self._handler = handler
        self.max_size = max(1, int(max_size))
        self.wait_s = max(0.0, float(wait_s))
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.stats = BatchStats()

    def submit(self, item: T) -> Future[Any]:
        """Queue ``item``; its future completes when its batch has run."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"the {self.name} batcher is closed")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"mongars-{self.name}-batcher", daemon=True
                )
                self._thread.start()
        self._queue.put(item)
        return item.future

    def close(self, timeout: float | None = 5.0) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        self._queue.put(_STOP)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # -- worker -----------------------------------------------------------------
    def _collect(self, first: T) -> tuple[list[T], bool]:
        batch, size, stop = [first], first.size(), False
        deadline = time.monotonic() + self.wait_s
        while size < self.max_size:
            remaining = deadline - time.monotonic()
            try:
                item = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if item is _STOP:
                stop = True
                break
            batch.append(item)
            size += item.size()
        return batch, stop

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                break
            batch, stop = self._collect(first)
            groups: dict[Hashable, list[T]] = {}
            for item in batch:
                groups.setdefault(item.key(), []).append(item)
            for group in groups.values():
                self._run_group(group)
            if stop:
                break
        # fail whatever is still queued after close()
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP and not item.future.done():
                item.future.set_exception(RuntimeError(f"the {self.name} batcher was closed"))

    def _run_group(self, group: list[T]) -> None:
        items = sum(item.size() for item in group)
        stats = self.stats
        stats.batches += 1
        stats.requests += len(group)
        stats.items += items
        stats.largest_batch = max(stats.largest_batch, len(group))
        stats.sizes.append(len(group))
        try:
            self._handler(group)
        except BaseException as err:  # the handler failed as a whole
            logger.debug("%s batch failed: %r", self.name, err)
            for item in group:
                if not item.future.done():
                    item.future.set_exception(err)
        for item in group:  # a handler that forgot one must not hang its caller
            if not item.future.done():
                item.future.set_exception(RuntimeError(f"{self.name} request was not handled"))


class ModeGate:
    """Shared access per mode; a different mode waits until the holders leave.

    ``switch(mode)`` is called (under the gate) when the mode changes. A caller
    that asks for the current mode while another mode is waiting queues behind
    it, so neither kind of call starves the other.
    """

    def __init__(self, switch: Callable[[Hashable], None], initial: Hashable = ()) -> None:
        self._switch = switch
        self._mode: Hashable = initial
        self._holders = 0
        self._waiting: collections.Counter[Hashable] = collections.Counter()
        self._cond = threading.Condition()

    @property
    def mode(self) -> Hashable:
        return self._mode

    def _others_waiting(self, mode: Hashable) -> bool:
        return any(count for other, count in self._waiting.items() if other != mode)

    @contextlib.contextmanager
    def hold(self, mode: Hashable) -> Iterator[None]:
        with self._cond:
            if not (self._holders == 0 or (mode == self._mode and not self._others_waiting(mode))):
                self._waiting[mode] += 1
                try:
                    while not (
                        self._holders == 0
                        or (mode == self._mode and not self._others_waiting(mode))
                    ):
                        self._cond.wait()
                finally:
                    self._waiting[mode] -= 1
                    if not self._waiting[mode]:
                        del self._waiting[mode]
            if mode != self._mode:
                self._switch(mode)
                self._mode = mode
            self._holders += 1
        try:
            yield
        finally:
            with self._cond:
                self._holders -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Sole access (adapter loading/unloading); the mode is left as it is."""
        token = object()
        with self._cond:
            self._waiting[token] += 1
            try:
                while self._holders:
                    self._cond.wait()
            finally:
                del self._waiting[token]
            self._holders += 1
        try:
            yield
        finally:
            with self._cond:
                self._holders -= 1
                self._mode = object()  # the adapters changed: switch again on next use
                self._cond.notify_all()
