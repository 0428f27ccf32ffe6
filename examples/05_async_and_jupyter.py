"""Part 5 — asyncio: concurrent calls, streaming, and the sync API inside a running loop.

What it shows:

1. ``aembed``/``agenerate`` never block the event loop; many concurrent calls
   gathered with ``asyncio.gather`` are coalesced into micro-batches on the model,
2. ``astream`` yields text deltas with ``async for``,
3. the *synchronous* ``generate``/``embed`` also work when called from inside a
   running event loop, which is where every Jupyter cell runs (there,
   ``asyncio.run`` fails but the sync API does not),
4. ``await asyncio.to_thread(rt.generate, ...)`` when a loop must stay responsive.

Offline, about 10 s on a laptop CPU::

    python examples/05_async_and_jupyter.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


async def concurrent_calls(rt: Any) -> None:
    questions = [f"Question {i}: what does mongars-llm do?" for i in range(8)]

    # Eight embedding calls and four chat calls at once: the runtime batches
    # them behind the scenes, the loop stays free meanwhile.
    ticks = 0

    async def heartbeat() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    beat = asyncio.create_task(heartbeat())
    started = time.perf_counter()
    vectors, replies = await asyncio.gather(
        asyncio.gather(*(rt.aembed([q]) for q in questions)),
        asyncio.gather(
            *(rt.agenerate(q, temperature=0.0, max_new_tokens=8) for q in questions[:4])
        ),
    )
    beat.cancel()
    seconds = time.perf_counter() - started
    print(f"gathered {len(vectors)} aembed + {len(replies)} agenerate calls in {seconds:.2f}s")
    print(f"aembed shapes: {sorted({v.shape for v in vectors})}")
    print(f"agenerate finish reasons: {[r.finish_reason for r in replies]}")
    print(f"the event loop kept running meanwhile: {ticks} heartbeat tick(s)")
    stats = rt.stats()
    print(
        f"micro-batching: embed {stats['embed']['requests']} request(s) in "
        f"{stats['embed']['batches']} batch(es), largest {stats['embed']['largest_batch']}"
    )

    deltas = [delta async for delta in rt.astream("Tell me a story.", max_new_tokens=12)]
    print(f"astream: {len(deltas)} delta(s): {''.join(deltas)!r}")


async def like_a_jupyter_cell(rt: Any) -> None:
    """Code in a Jupyter cell runs while the kernel's event loop is running."""
    loop = asyncio.get_running_loop()
    print(f"inside a running event loop: {loop.is_running()}")

    # asyncio.run() is refused here ...
    probe = asyncio.sleep(0)
    try:
        asyncio.run(probe)
    except RuntimeError as err:
        probe.close()
        print(f"asyncio.run() inside the loop fails: {err}")

    # ... but the synchronous API works: it waits on a thread, not on this loop.
    reply = rt.generate("Hello from a running loop", temperature=0.0, max_new_tokens=8)
    vectors = rt.embed(["sync call", "inside a loop"])
    print(f"sync generate inside the loop: finish_reason={reply.finish_reason} text={reply.text!r}")
    print(f"sync embed inside the loop: shape={vectors.shape}")

    # To keep the loop responsive during a long call, hand it to a thread.
    reply = await asyncio.to_thread(rt.generate, "Hello again", temperature=0.0, max_new_tokens=8)
    print(f"asyncio.to_thread(rt.generate): finish_reason={reply.finish_reason}")


def run(workdir: Path) -> None:
    from mongars_llm import Settings
    from mongars_llm.runtime import UnifiedLLMRuntime
    from mongars_llm.testing import build_tiny_model

    model_dir = build_tiny_model(workdir / "tiny-chat", hidden_size=64)
    # A 20 ms batching window lets concurrent calls meet in one batch.
    settings = Settings(model={"batch_wait_ms": 20, "max_new_tokens": 32}, cache_dir=workdir)
    with UnifiedLLMRuntime.from_pretrained(model_dir, settings=settings) as rt:
        asyncio.run(concurrent_calls(rt))
        asyncio.run(like_a_jupyter_cell(rt))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir",
        type=Path,
        default=os.environ.get("MONGARS_EXAMPLES_DIR"),
        help="keep the files here instead of a temporary folder",
    )
    args = parser.parse_args(argv)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        run(args.workdir.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="mongars-example-") as tmp:
            run(Path(tmp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
