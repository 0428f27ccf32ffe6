"""Server load benchmark: concurrent embedding clients over HTTP, batched vs unbatched.

Starts ``mongars-llm serve`` in a subprocess on 127.0.0.1 — with the runtime's
micro-batching (``MONGARS_MODEL__MAX_BATCH_SIZE=32``) and with a batch size of
1, each twice in ABBA order — and drives each with N concurrent clients posting
``/v1/embeddings`` (one text per request, base64 like the official client).
Prints requests/s, p50/p99 latency and the throughput ratio (target >= 3x).

    python benchmarks/bench_server.py [--clients 32] [--requests 8] [--words 3] [--json]

Short inputs on a mid-size model are where micro-batching pays on a CPU: one
forward pass of 32 short texts costs little more than one of a single text.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

WORDS = [
    "the",
    "server",
    "answers",
    "chat",
    "completions",
    "and",
    "embedding",
    "requests",
    "over",
    "http",
    "while",
    "the",
    "runtime",
    "batches",
    "concurrent",
    "callers",
    "so",
    "that",
    "they",
    "share",
    "forward",
    "passes",
    "on",
    "one",
    "copy",
    "of",
    "the",
    "weights",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _text(i: int, words: int) -> str:
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(words))


def _start_server(
    model_dir: Path, batch_size: int, wait_ms: float
) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    env = {
        **os.environ,
        "MONGARS_MODEL__MAX_BATCH_SIZE": str(batch_size),
        "MONGARS_MODEL__BATCH_WAIT_MS": str(wait_ms),
        "MONGARS_MODEL__DEVICE": "cpu",
        "MONGARS_MODEL__DTYPE": "float32",
        "MONGARS_SERVER_MAX_CONCURRENCY": "128",
    }
    command = [
        sys.executable, "-m", "mongars_llm", "serve", "--model", str(model_dir),
        "--embeddings-only", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    # stderr to a file, not a pipe nobody reads: a full pipe would block the server
    log = tempfile.TemporaryFile()  # noqa: SIM115 (the child holds its own descriptor)
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited: {log.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("server did not become ready in 180 s")


async def _drive(url: str, model: str, clients: int, requests: int, words: int) -> dict[str, Any]:
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:

        async def one(i: int) -> None:
            body = {"model": model, "input": _text(i, words), "encoding_format": "base64"}
            started = time.perf_counter()
            response = await http.post("/v1/embeddings", json=body)
            latencies.append(time.perf_counter() - started)
            response.raise_for_status()

        async def client(c: int) -> None:
            for r in range(requests):
                await one(c * requests + r)

        await asyncio.gather(*(one(i) for i in range(clients)))  # warm-up
        latencies.clear()
        started = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    total = clients * requests
    return {
        "requests": total,
        "seconds": round(elapsed, 3),
        "rps": round(total / elapsed, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 1),
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=8, help="requests per client")
    parser.add_argument("--words", type=int, default=3, help="words per input text")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size of the test model")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)

    from mongars_llm.testing import build_tiny_model

    results: dict[str, Any] = {"clients": args.clients, "requests_per_client": args.requests}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(
            Path(tmp) / "bench-model", hidden_size=args.hidden, num_layers=args.layers,
            num_heads=8, num_kv_heads=4,
        )  # fmt: skip
        modes = {"batched": (32, 5.0), "batch_size_1": (1, 0.0)}
        runs: dict[str, list[dict[str, Any]]] = {label: [] for label in modes}
        # ABBA: both modes see the same drift in the load of a shared machine
        for label in ("batched", "batch_size_1", "batch_size_1", "batched"):
            batch_size, wait_ms = modes[label]
            process, url = _start_server(model_dir, batch_size, wait_ms)
            try:
                model_id = httpx.get(f"{url}/readyz").json()["model"]  # the checkpoint id
                runs[label].append(
                    asyncio.run(_drive(url, model_id, args.clients, args.requests, args.words))
                )
            finally:
                process.terminate()
                process.wait(30)
        for label, pair in runs.items():
            results[label] = {
                "requests": sum(r["requests"] for r in pair),
                "rps": round(statistics.mean(r["rps"] for r in pair), 1),
                "p50_ms": round(statistics.mean(r["p50_ms"] for r in pair), 1),
                "p99_ms": round(statistics.mean(r["p99_ms"] for r in pair), 1),
                "runs_rps": [r["rps"] for r in pair],
            }
    results["throughput_ratio"] = round(
        results["batched"]["rps"] / results["batch_size_1"]["rps"], 2
    )
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{args.clients} concurrent clients x {args.requests} requests, one text each "
          f"({args.words} words), hidden={args.hidden}, layers={args.layers}")  # fmt: skip
    print("each mode run twice in ABBA order; means of the two runs")
    print(f"{'mode':<14}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}   runs (req/s)")
    for label in ("batched", "batch_size_1"):
        r = results[label]
        print(f"{label:<14}{r['rps']:>10}{r['p50_ms']:>10}{r['p99_ms']:>10}   {r['runs_rps']}")
    print(f"throughput ratio batched / batch size 1: {results['throughput_ratio']}x (target >= 3x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
