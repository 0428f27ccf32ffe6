"""Async twins never block the loop; concurrent callers are micro-batched."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .conftest import runtime_settings

#: the filling runtime's batch wait window: a minute, for calls queued within microseconds
FILL_WAIT_MS = 60_000.0
TEXTS = [f"text number {i}: the quick brown fox jumps over the lazy dog" for i in range(6)]


async def test_aembed_does_not_block_the_event_loop(runtime: Any, tiny_model_dir: Path) -> None:
    """While an ``aembed`` call waits for its batch, the loop keeps serving other tasks.

    The filling runtime holds the first call's batch until one more text arrives, and
    only a running loop can send it: an ``aembed`` that blocked its loop would hold the
    batch for the whole wait window, then run alone, and fail below (never flaky: no
    assertion depends on how fast the machine is)."""
    texts = ["word " * 400] * 3
    expected = runtime.embed([*texts, "one more"], bidirectional=True)
    with filling_runtime(tiny_model_dir, len(texts) + 1) as rt:
        first = asyncio.ensure_future(rt.aembed(texts, bidirectional=True))
        ticks_while_pending = 0
        for _ in range(5):  # the loop runs other work while the first call waits
            await asyncio.sleep(0.01)
            ticks_while_pending += not first.done()
        second = await rt.aembed(["one more"], bidirectional=True)
        vectors = await first
        stats = rt.stats()["embed"]
    assert ticks_while_pending == 5
    # the two calls ran as one batch, and gave what a blocking call gives
    assert (stats["requests"], stats["batches"]) == (2, 1)
    np.testing.assert_allclose(np.vstack([vectors, second]), expected, rtol=1e-4, atol=1e-5)


@contextlib.contextmanager
def filling_runtime(tiny_model_dir: Path, callers: int) -> Iterator[Any]:
    """A runtime whose micro-batches wait for ``callers`` requests.

    Its batch wait window is far longer than any machine needs to queue a handful of
    calls, and its largest batch is ``callers``: the worker runs the batch the moment the
    last caller has queued, and never before. So coalescing is asserted without a race,
    however slow or busy the machine (a runtime that served callers one at a time would
    make the test slow, then fail: never flaky).
    """
    from mongars_llm.runtime import UnifiedLLMRuntime

    settings = runtime_settings(max_batch_size=callers, batch_wait_ms=FILL_WAIT_MS)
    with UnifiedLLMRuntime.from_pretrained(tiny_model_dir, settings=settings) as rt:
        yield rt


async def test_concurrent_aembed_callers_are_coalesced(
    runtime: Any, tiny_model_dir: Path, events: Any
) -> None:
    expected = [runtime.embed(t) for t in TEXTS]
    events.events.clear()
    with filling_runtime(tiny_model_dir, len(TEXTS)) as rt:
        results = await asyncio.gather(*(rt.aembed(t) for t in TEXTS))
        stats = rt.stats()["embed"]
    for got, want in zip(results, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # six callers, one forward batch
    assert (stats["requests"], stats["batches"], stats["largest_batch"]) == (6, 1, 6)
    assert [e["requests"] for e in events.named("llm_embed")] == [len(TEXTS)]


async def test_concurrent_agenerate_callers_are_coalesced(
    runtime: Any, tiny_model_dir: Path, events: Any
) -> None:
    prompts = [f"Numbers: {i}" for i in range(5)]
    expected = [runtime.generate(p, temperature=0, max_new_tokens=5) for p in prompts]
    events.events.clear()
    with filling_runtime(tiny_model_dir, len(prompts)) as rt:
        results = await asyncio.gather(
            *(rt.agenerate(p, temperature=0, max_new_tokens=5) for p in prompts)
        )
        stats = rt.stats()["generate"]
    assert [r.text for r in results] == [e.text for e in expected]
    # five callers, one model.generate call
    assert (stats["requests"], stats["batches"], stats["largest_batch"]) == (5, 1, 5)
    assert [e["batch_size"] for e in events.named("llm_generate")] == [len(prompts)]


async def test_astream_yields_deltas_and_a_result(runtime: Any) -> None:
    messages = [{"role": "user", "content": "The quick brown fox"}]
    expected = runtime.generate(messages, temperature=0, max_new_tokens=20)
    stream = runtime.astream(messages, temperature=0, max_new_tokens=20)
    deltas = [delta async for delta in stream]
    assert len(deltas) > 1
    assert "".join(deltas) == expected.text
    assert stream.result == expected
