"""Async twins never block the loop; concurrent callers are micro-batched."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

TEXTS = [f"text number {i}: the quick brown fox jumps over the lazy dog" for i in range(6)]


async def test_aembed_does_not_block_the_event_loop(runtime: Any) -> None:
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.005)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    before = ticks
    started = time.perf_counter()
    vectors = await runtime.aembed(["word " * 400] * 24, bidirectional=True)
    elapsed = time.perf_counter() - started
    stop.set()
    await task
    assert vectors.shape == (24, runtime.hidden_size)
    assert elapsed > 0.05
    # the ticker kept running: roughly one tick per 5 ms of embedding
    assert ticks - before >= max(3, int(elapsed / 0.005 * 0.3))


async def test_concurrent_aembed_callers_are_coalesced(runtime: Any, events: Any) -> None:
    expected = [runtime.embed(t) for t in TEXTS]
    largest = 0
    for _ in range(3):  # a busy CI machine may delay a caller past the wait window once
        events.events.clear()
        before = runtime.stats()["embed"]
        results = await asyncio.gather(*(runtime.aembed(t) for t in TEXTS))
        after = runtime.stats()["embed"]
        for got, want in zip(results, expected, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        assert after["requests"] - before["requests"] == len(TEXTS)
        largest = max(e["requests"] for e in events.named("llm_embed"))
        if largest > 1 and after["batches"] - before["batches"] < len(TEXTS):
            break
    assert largest > 1


async def test_concurrent_agenerate_callers_are_coalesced(runtime: Any, events: Any) -> None:
    prompts = [f"Numbers: {i}" for i in range(5)]
    expected = [runtime.generate(p, temperature=0, max_new_tokens=5) for p in prompts]
    largest = 0
    for _ in range(3):  # see above
        events.events.clear()
        results = await asyncio.gather(
            *(runtime.agenerate(p, temperature=0, max_new_tokens=5) for p in prompts)
        )
        assert [r.text for r in results] == [e.text for e in expected]
        largest = max(e["batch_size"] for e in events.named("llm_generate"))
        if largest > 1:
            break
    assert largest > 1


async def test_astream_yields_deltas_and_a_result(runtime: Any) -> None:
    messages = [{"role": "user", "content": "The quick brown fox"}]
    expected = runtime.generate(messages, temperature=0, max_new_tokens=20)
    stream = runtime.astream(messages, temperature=0, max_new_tokens=20)
    deltas = [delta async for delta in stream]
    assert len(deltas) > 1
    assert "".join(deltas) == expected.text
    assert stream.result == expected
