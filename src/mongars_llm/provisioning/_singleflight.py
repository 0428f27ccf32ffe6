"""Single-flight: concurrent callers with the same key share one execution.

Threads wait on a :class:`concurrent.futures.Future`; the async API runs its work
in threads too, so threads and asyncio tasks share the same map.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Generic, TypeVar

__all__ = ["SingleFlight"]

T = TypeVar("T")


class SingleFlight(Generic[T]):
    """Run ``fn`` once per key at a time; callers arriving meanwhile get its result."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[Hashable, Future[T]] = {}

    def do(self, key: Hashable, fn: Callable[[], T]) -> tuple[T, bool]:
        """``(result, shared)``: ``shared`` is True when another caller did the work."""
        with self._lock:
            future = self._flights.get(key)
            leader = future is None
            if future is None:
                future = Future()
                self._flights[key] = future
        if not leader:
            return future.result(), True
        try:
            result = fn()
        except BaseException as err:
            future.set_exception(err)
            raise
        else:
            future.set_result(result)
            return result, False
        finally:
            with self._lock:
                self._flights.pop(key, None)

    def in_flight(self) -> int:
        with self._lock:
            return len(self._flights)
