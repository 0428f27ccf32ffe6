"""Types of the runtime (standard library only, cheap to import): the loaded model
its components share, and the results of calls."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ..errors import InvalidInputError

if TYPE_CHECKING:
    from ..settings import Settings
    from ._adapter_stack import AdapterStack

__all__ = ["AsyncGenerationStream", "Generation", "GenerationStream", "LoadedModel", "Usage"]

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class LoadedModel:
    """The one loaded model, as the :class:`~._generator.Generator` and the
    :class:`~._embedder.Embedder` share it: the weights, their tokenizer (used
    under ``tokenizer_lock``), the adapter stack, the text config, the input
    token limit and how the weights were loaded."""

    model: Any
    tokenizer: Any
    tokenizer_lock: threading.RLock
    adapters: AdapterStack
    settings: Settings
    config: Any
    max_length: int
    device: str
    dtype: Any
    quantization: str | None

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Usage:
    """Token counts of one call (OpenAI's ``usage`` object)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    def to_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass(frozen=True)
class Generation:
    """One generated reply: the new text only (never the prompt), why it stopped
    (``"stop"``: end of turn or a stop string, ``"length"``: ``max_new_tokens``)
    and its token usage."""

    text: str
    finish_reason: FinishReason
    usage: Usage


class _End:
    """Marks the end of a stream's deltas."""


_END = _End()


class GenerationStream:
    """Text deltas of one reply, produced while the model generates.

    Iterate to receive each delta as soon as its tokens are decoded; after the
    iteration :attr:`result` holds the final :class:`Generation` (the joined
    deltas are exactly ``result.text``). A failed generation raises its
    :class:`~mongars_llm.errors.LLMRuntimeError` from the iteration.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._result: Generation | None = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        self.cancelled = False

    # -- producer side (the generation worker) --------------------------------
    def _put(self, delta: str) -> None:
        if delta:
            self._queue.put(delta)

    def _finish(self, result: Generation | None, error: BaseException | None = None) -> None:
        self._result, self._error = result, error
        self._done.set()
        self._queue.put(_END)

    # -- consumer side ---------------------------------------------------------
    def __iter__(self) -> Iterator[str]:
        while True:
            item = self._queue.get()
            if item is _END:
                break
            yield item
        if self._error is not None:
            raise self._error

    def cancel(self) -> None:
        """Ask the worker to stop generating this reply (finish_reason ``"stop"``)."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def result(self) -> Generation:
        """The final generation, once the stream is finished (:attr:`done`).

        Asked for earlier, it raises :class:`~mongars_llm.errors.InvalidInputError`
        (a ``ValueError``, code ``invalid_input``): a call at the wrong time, like
        ``asyncio.Future.result()`` before the future is done. It does not wait,
        so that an event loop reading it is never blocked.
        """
        if not self._done.is_set():
            raise InvalidInputError(
                "the stream is not finished yet: iterate it to the end (or wait until "
                "stream.done) before reading stream.result",
                param="result",
            )
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


class AsyncGenerationStream:
    """The async twin of :class:`GenerationStream` (``async for delta in stream``)."""

    def __init__(self, stream: GenerationStream, loop: asyncio.AbstractEventLoop) -> None:
        self._stream = stream
        self._loop = loop
        self._queue: asyncio.Queue[Any] = asyncio.Queue()

    def _pump(self) -> None:
        """Runs in a thread: moves deltas from the sync stream onto the loop."""
        try:
            for delta in self._stream:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, delta)
        except BaseException as err:  # surfaced by __anext__
            self._loop.call_soon_threadsafe(self._queue.put_nowait, _Failure(err))
            return
        self._loop.call_soon_threadsafe(self._queue.put_nowait, _END)

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[str]:
        try:
            while True:
                item = await self._queue.get()
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.error
                yield item
        finally:
            if not self._stream.done:
                self._stream.cancel()

    def cancel(self) -> None:
        self._stream.cancel()

    @property
    def result(self) -> Generation:
        return self._stream.result


@dataclass
class _Failure:
    error: BaseException
