"""``mongars-llm demo``: the whole lifecycle, offline, on a tiny model built here.

Each step is timed and reported: build a tiny checkpoint, write a manifest,
provision it (``local`` provider), chat and embed through one runtime, validate
the example dataset and fine-tune a LoRA bundle, export the wrapper, read the
adapter back from the registry, and answer requests through the HTTP app
in-process. Nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["DemoReport", "DemoStep", "run_demo"]


@dataclass
class DemoStep:
    name: str
    ok: bool
    seconds: float
    detail: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class DemoReport:
    workdir: Path
    steps: list[DemoStep] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(step.ok for step in self.steps)

    @property
    def seconds(self) -> float:
        return sum(step.seconds for step in self.steps)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "workdir": str(self.workdir),
            "seconds": round(self.seconds, 2),
            "steps": [
                {
                    "name": s.name,
                    "ok": s.ok,
                    "seconds": round(s.seconds, 2),
                    "detail": s.detail,
                    "error": s.error,
                }
                for s in self.steps
            ],
        }


def example_dataset_path() -> Path:
    """The small curated dataset shipped with the package (also in examples/data/)."""
    return Path(str(resources.files("mongars_llm") / "_data" / "product_qa.jsonl"))


class _Demo:
    def __init__(self, workdir: Path, on_step: Callable[[DemoStep], None] | None) -> None:
        self.workdir = workdir
        self.report = DemoReport(workdir)
        self.on_step = on_step
        self.state: dict[str, Any] = {}

    def step(self, name: str, func: Callable[[], dict[str, Any]]) -> bool:
        start = time.perf_counter()
        try:
            detail = func()
            step = DemoStep(name, True, time.perf_counter() - start, detail)
        except Exception as err:  # the report says which step failed and why
            step = DemoStep(
                name, False, time.perf_counter() - start, error=f"{type(err).__name__}: {err}"
            )
        self.report.steps.append(step)
        if self.on_step is not None:
            self.on_step(step)
        return step.ok

    # -- the steps ---------------------------------------------------------------------

    def build_model(self) -> dict[str, Any]:
        from .testing import build_tiny_model

        path = build_tiny_model(
            self.workdir / "models" / "tiny-chat", hidden_size=64, initializer_range=0.2
        )
        self.state["model_dir"] = path
        return {"path": str(path), "files": sorted(p.name for p in path.iterdir())}

    def write_manifest(self) -> dict[str, Any]:
        from .manager import ModelManager

        manifest = {
            "profiles": {
                "demo": {
                    "description": "A tiny local model for the demo",
                    "models": {
                        "general": {
                            "name": "../models/tiny-chat",
                            "provider": "local",
                            "parameters": {"temperature": 0.0, "max_new_tokens": 16},
                        },
                        "embedding": {
                            "name": "../models/tiny-chat",
                            "provider": "local",
                            "embedding": {"pooling": "mean", "normalize": True},
                        },
                    },
                }
            }
        }
        path = self.workdir / "configs" / "llm_models.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(manifest, indent=2))
        manager = ModelManager(path, settings=self.state["settings"], profile="demo")
        self.state["manager"] = manager
        return {"manifest": str(path), "profile": "demo", "roles": manager.role_names}

    def provision(self) -> dict[str, Any]:
        report = self.state["manager"].ensure_models_installed()
        if not report.ok:
            raise RuntimeError(json.dumps(report.to_dict()))
        self.state["model_path"] = Path(report.entries[0].path)
        return {e.role: e.action for e in report.entries}

    def run_model(self) -> dict[str, Any]:
        from .runtime import UnifiedLLMRuntime

        runtime = UnifiedLLMRuntime.from_pretrained(
            self.state["model_path"], manager=self.state["manager"], settings=self.state["settings"]
        )
        self.state["runtime"] = runtime
        reply = runtime.generate(
            [{"role": "user", "content": "What does mongars-llm do?"}], role="general"
        )
        vectors = runtime.embed(
            ["LoRA adapters fine-tune a model.", "Adapters fine-tune models with LoRA.", "Paris"]
        )
        sims = vectors @ vectors.T
        return {
            "reply": reply.text,
            "finish_reason": reply.finish_reason,
            "usage": {
                "prompt_tokens": reply.usage.prompt_tokens,
                "completion_tokens": reply.usage.completion_tokens,
            },
            "embedding_shape": list(vectors.shape),
            "cosine(0,1)": round(float(sims[0, 1]), 4),
            "cosine(0,2)": round(float(sims[0, 2]), 4),
            # embeddings pool the causal LM's own decoder: one copy of the weights
            "one_copy_of_weights": runtime.decoder.get_input_embeddings().weight.data_ptr()
            == runtime.model.get_input_embeddings().weight.data_ptr(),
            "parameters": sum(p.numel() for p in runtime.model.parameters()),
        }

    def train(self) -> dict[str, Any]:
        from .training import build_bundle

        result = build_bundle(
            dataset_path=example_dataset_path(),
            base_model=str(self.state["model_path"]),
            output_dir=self.workdir / "runs",
            registry_path=self.workdir / "models" / "encoders",
            run_name="demo",
            max_steps=120,
            batch_size=4,
            learning_rate=1e-2,
            max_seq_len=256,
            seed=0,
            progress=False,
        )
        self.state["bundle"] = result
        summary = result.dataset_summary
        return {
            "run_dir": str(result.run_dir),
            "dataset": {
                "rows_valid": summary.rows_valid,
                "duplicate_ratio": summary.duplicate_ratio,
                "trainable_tokens": summary.trainable_tokens,
            },
            "metrics": {
                k: round(result.metrics[k], 3)
                for k in ("steps", "eval_loss_initial", "eval_loss", "tokens_per_second")
                if k in result.metrics
            },
            "registered_version": result.registry_entry.version if result.registry_entry else None,
        }

    def export(self) -> dict[str, Any]:
        from .export import export_wrapper

        wrapper = export_wrapper(self.state["bundle"].run_dir)
        return {"wrapper": str(wrapper), "files": sorted(p.name for p in Path(wrapper).iterdir())}

    def registry(self) -> dict[str, Any]:
        from .registry import AdapterRegistry

        registry = AdapterRegistry(self.workdir / "models" / "encoders")
        latest = registry.latest()
        if latest is None:
            raise RuntimeError("the bundle was not registered")
        runtime = self.state["runtime"]
        runtime.load_adapter("demo", registry.adapter_path(latest))
        tuned = runtime.generate("LoRA adapters", adapter="demo", max_new_tokens=8)
        return {"latest": latest.version, "status": latest.status, "tuned_reply": tuned.text}

    def serve(self) -> dict[str, Any]:
        from fastapi.testclient import TestClient

        from .server import create_app

        app = create_app(
            self.state["settings"], runtime=self.state["runtime"], manager=self.state["manager"]
        )
        with TestClient(app) as client:
            chat = client.post(
                "/v1/chat/completions",
                json={
                    "model": "general",
                    "messages": [{"role": "user", "content": "Hello!"}],
                    "max_tokens": 8,
                },
            )
            chat.raise_for_status()
            emb = client.post(
                "/v1/embeddings",
                json={"model": "embedding", "input": ["hello"], "encoding_format": "float"},
            )
            emb.raise_for_status()
        return {
            "chat_status": chat.status_code,
            "chat_reply": chat.json()["choices"][0]["message"]["content"],
            "embedding_dims": len(emb.json()["data"][0]["embedding"]),
        }


def run_demo(
    workdir: str | Path | None = None,
    *,
    keep: bool = False,
    on_step: Callable[[DemoStep], None] | None = None,
) -> DemoReport:
    """Run every step; later steps are skipped once one fails. With no ``workdir`` a
    temporary folder is used and removed afterwards unless ``keep``."""
    from transformers.utils import logging as hf_logging

    from .settings import Settings

    hf_logging.disable_progress_bar()  # the report is the progress display
    from .errors import ConfigError

    temporary = workdir is None
    root = Path(tempfile.mkdtemp(prefix="mongars-demo-")) if workdir is None else Path(workdir)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"demo work folder {root} is a file; pass a folder to --workdir")
    root.mkdir(parents=True, exist_ok=True)
    demo = _Demo(root, on_step)
    demo.state["settings"] = Settings(
        models_dir=root / "models" / "provisioned",
        cache_dir=root / "cache",
        llm_models_path=root / "configs" / "llm_models.json",
        llm_adapter_registry_path=root / "models" / "encoders",
    )
    steps = [
        ("build a tiny model", demo.build_model),
        ("write a manifest", demo.write_manifest),
        ("provision (local provider)", demo.provision),
        ("chat + embed with one runtime", demo.run_model),
        ("validate dataset + LoRA fine-tune", demo.train),
        ("export the wrapper", demo.export),
        ("registry -> runtime adapter", demo.registry),
        ("HTTP: OpenAI-compatible app", demo.serve),
    ]
    try:
        for name, func in steps:
            if not demo.step(name, func):
                break
    finally:
        runtime = demo.state.get("runtime")
        if runtime is not None:
            runtime.close()
        if temporary and not keep:
            shutil.rmtree(root, ignore_errors=True)
    return demo.report
