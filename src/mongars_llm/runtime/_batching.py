"""Micro-batching of concurrent calls (standard library only).

:class:`MicroBatcher` runs one worker thread: it takes the first waiting
request, keeps collecting for ``wait_s`` seconds (or until ``max_size`` items),
groups what it got by a compatibility key and hands each group to the handler
in one call, so a group never holds more than ``max_size`` items. Callers wait
on a :class:`concurrent.futures.Future`, which an asyncio caller awaits with
:func:`asyncio.wrap_future` without blocking its loop. A request submitted to,
or still queued in, a closed batcher fails with
:class:`~mongars_llm.errors.RuntimeClosedError`.

Batchers still open when the interpreter exits are closed by an ``atexit``
hook: their worker threads are daemons, and a daemon thread still inside
torch when Python finalises aborts the process ("terminate called without an
active exception") after a script that never called ``rt.close()``.
"""

from __future__ import annotations

import atexit
import collections
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ..errors import LLMRuntimeError, MongarsError, RuntimeClosedError

__all__ = ["BatchStats", "MicroBatcher", "Pending"]

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
_OPEN: weakref.WeakSet[MicroBatcher[Any]] = weakref.WeakSet()


@atexit.register
def _close_open_batchers() -> None:
    """Stop every worker thread before the interpreter finalises (see the module doc)."""
    for batcher in list(_OPEN):
        batcher.close(timeout=30.0)


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
                raise RuntimeClosedError(
                    f"the {self.name} batcher is closed (the runtime was closed); "
                    "build or fetch a new runtime"
                )
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"mongars-{self.name}-batcher", daemon=True
                )
                self._thread.start()
                _OPEN.add(self)
        self._queue.put(item)
        return item.future

    def close(self, timeout: float | None = 5.0) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            _OPEN.discard(self)
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
                item.future.set_exception(
                    RuntimeClosedError(
                        f"the {self.name} batcher was closed before this request ran"
                    )
                )

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
            error = (
                err
                if isinstance(err, MongarsError) or not isinstance(err, Exception)
                else LLMRuntimeError.wrap(err, f"the {self.name} batch failed")
            )
            for item in group:
                if not item.future.done():
                    item.future.set_exception(error)
        for item in group:  # a handler that forgot one must not hang its caller
            if not item.future.done():
                item.future.set_exception(
                    LLMRuntimeError(f"the {self.name} batch handler did not answer this request")
                )
