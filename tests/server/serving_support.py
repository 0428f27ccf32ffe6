"""Helpers shared by the server tests (constants, settings, a slow Ollama stand-in, LoRA
adapters, and what a server answers them: a vector, a greedy reply)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from pydantic import SecretStr

from mongars_llm.settings import ModelSettings, Settings

ADMIN_TOKEN = "adm-7f3c9e1b5d2a4680-secret"
MAX_NEW_TOKENS = 16


def make_settings(
    tmp: Path, tiny_model_dir: Path, manifest_path: Path, **overrides: Any
) -> Settings:
    model = overrides.pop("model", None) or ModelSettings(
        device="cpu", dtype="float32", max_new_tokens=MAX_NEW_TOKENS, max_input_tokens=256
    )
    values: dict[str, Any] = {
        "model": model,
        "llm_models_path": manifest_path,
        "llm_models_profile": "default",
        "unified_model_dir": tiny_model_dir,
        "llm_adapter_registry_path": tmp / "registry",
        "cache_dir": tmp / "cache",
        "admin_token": SecretStr(ADMIN_TOKEN),
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


# --------------------------------------------------------------------- ollama stub


class SlowOllama:
    """A loopback stand-in for the Ollama daemon whose ``/api/pull`` streams
    progress slowly (``steps`` lines, ``delay`` seconds apart)."""

    def __init__(self, *, steps: int = 8, delay: float = 0.25) -> None:
        self.steps = steps
        self.delay = delay
        self.pulled: set[str] = set()
        self.pull_started = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _json(self, payload: Any) -> None:
                body = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/api/tags":
                    models = [
                        {"name": name, "digest": "sha256:" + "ab" * 32, "size": 1000}
                        for name in sorted(owner.pulled)
                    ]
                    self._json({"models": models})
                else:
                    self.send_error(404)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                request = json.loads(self.rfile.read(length) or b"{}")
                name = request.get("model") or request.get("name")
                owner.pull_started.set()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.end_headers()
                total = 1000
                for step in range(1, owner.steps + 1):
                    line = {
                        "status": "pulling",
                        "digest": "sha256:layer",
                        "total": total,
                        "completed": total * step // owner.steps,
                    }
                    self.wfile.write((json.dumps(line) + "\n").encode())
                    self.wfile.flush()
                    time.sleep(owner.delay)
                owner.pulled.add(name)
                self.wfile.write(b'{"status": "success"}\n')
                self.wfile.flush()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> SlowOllama:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# --------------------------------------------------------------------- adapters


def make_lora_adapter(base: Path, out: Path, seed: int) -> Path:
    """A real LoRA adapter (peft format) with non-zero weights for the tiny model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(model, config).save_pretrained(out)
    return out


#: what the registry records for adapters made by :func:`make_lora_adapter`
def lora_compatibility(base: Path) -> dict[str, Any]:
    return {"base_model": str(base), "r": 4, "target_modules": ["q_proj", "v_proj"]}


def vector_of(http: httpx.Client, model: str) -> np.ndarray:
    """The vector the server at ``http`` gives ``model`` for one fixed text."""
    response = http.post(
        "/v1/embeddings",
        json={"model": model, "input": "which adapter answers?", "encoding_format": "float"},
    )
    assert response.status_code == 200, response.text
    return np.array(response.json()["data"][0]["embedding"])


def chat_response(http: httpx.Client, model: str) -> httpx.Response:
    """``model``'s greedy answer (8 tokens at most) to one fixed question."""
    return http.post(
        "/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": "which adapter answers?"}],
            "max_tokens": 8,
            "temperature": 0,
        },
    )


def chat_reply(http: httpx.Client, model: str) -> str:
    """The text of :func:`chat_response`, which must be a 200."""
    response = chat_response(http, model)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])
