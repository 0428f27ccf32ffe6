"""``UnifiedLLMRuntime``: one copy of the weights for chat and LLM2Vec embeddings.

This module imports neither torch nor transformers at import time; they load
with the model (``from_pretrained``), so ``import mongars_llm.runtime`` is cheap.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import threading
import time
from collections.abc import Hashable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from ..errors import LLMRuntimeError
from ..logging import log_event
from ._batching import MicroBatcher, Pending
from ._types import AsyncGenerationStream, Generation, GenerationStream

if TYPE_CHECKING:
    import numpy as np

    from ..manager import ModelManager
    from ..settings import Settings
    from ._adapters import AdapterStack
    from ._embedding import EncodedText
    from ._generation import RowState, SamplingKey

__all__ = ["AdapterSpecLike", "UnifiedLLMRuntime"]

logger = logging.getLogger("mongars_llm.runtime")

AdapterSpecLike = (
    Mapping[str, "str | Path"] | Iterable[tuple[str, "str | Path"] | tuple[str, "str | Path", str]]
)
Pooling = Literal["mean", "weighted_mean", "eos_token", "last_token", "bos_token"]


def _adapter_triples(adapters: Any) -> list[tuple[str, str, str]]:
    """``{name: path}`` or ``[(name, path[, use])]`` (or objects with those attributes)."""
    if not adapters:
        return []
    if isinstance(adapters, Mapping):
        return [(str(name), str(path), "all") for name, path in adapters.items()]
    out = []
    for item in adapters:
        if isinstance(item, (tuple, list)) and len(item) in (2, 3):
            name, path = item[0], item[1]
            use = item[2] if len(item) == 3 else "all"
        elif hasattr(item, "name") and hasattr(item, "path"):
            name, path, use = item.name, item.path, getattr(item, "use", "all")
        else:
            raise LLMRuntimeError(
                f"adapter {item!r:.80} must be (name, path) or (name, path, use)",
                code="invalid_input",
            )
        out.append((str(name), str(path), str(use)))
    return out


@dataclass
class _EmbedRequest(Pending):
    items: list[tuple[str, str]]
    truncate: bool
    pooling: str
    bidirectional: bool
    normalize: bool
    mode: tuple[str, ...]
    batch_size: int
    batch_invariant: bool
    encoded: list[EncodedText] | None = None  # tokenised by the worker

    def size(self) -> int:
        return len(self.items)

    def key(self) -> Hashable:
        return (
            self.pooling,
            self.bidirectional,
            self.normalize,
            self.mode,
            self.batch_size,
            self.batch_invariant,
        )


@dataclass
class _GenerateRequest(Pending):
    row: RowState
    sampling: SamplingKey

    def key(self) -> Hashable:
        return self.sampling


class UnifiedLLMRuntime:
    """One decoder-only checkpoint, loaded once, serving ``generate`` and ``embed``.

    Build it with :meth:`from_pretrained` (a private instance) or
    :meth:`shared` (the process-wide one). Embeddings run the causal LM's own
    decoder (``rt.model.model``) — the same parameter storage as generation —
    with LLM2Vec pooling and per-call causal/bidirectional attention. LoRA
    adapters are stacked on that one model and chosen per call.
    """

    _shared: UnifiedLLMRuntime | None = None
    _shared_lock = threading.Lock()

    def __init__(
        self,
        *,
        model: Any,
        tokenizer: Any,
        model_id: str,
        device: str,
        dtype: Any,
        quantization: str | None,
        settings: Settings,
        manager: ModelManager | None = None,
        pooling: str = "mean",
        bidirectional: bool = False,
        normalize: bool = True,
        max_length: int | None = None,
        batch_invariant: bool = False,
        instruction: str | None = None,
        prompt_model_id: str | None = None,
    ) -> None:
        from ._adapters import AdapterStack
        from ._embedding import POOLING_MODES

        if pooling not in POOLING_MODES:
            raise LLMRuntimeError(
                f"unknown pooling {pooling!r}; use one of {', '.join(POOLING_MODES)}",
                code="invalid_input",
            )
        self._model = model
        self._tokenizer = tokenizer
        self._tokenizer_lock = threading.RLock()
        self.model_id = model_id
        self.device = device
        self.dtype = dtype
        self.quantization = quantization
        self.settings = settings
        self.manager = manager
        self.pooling = pooling
        self.bidirectional = bidirectional
        self.normalize = normalize
        self.batch_invariant = batch_invariant
        self.instruction = instruction
        self._prompt_model_id = prompt_model_id or model_id
        config = (
            model.config.get_text_config()
            if hasattr(model.config, "get_text_config")
            else model.config
        )
        self._config = config
        limit = settings.model.max_input_tokens
        positions = getattr(config, "max_position_embeddings", None)
        if positions:
            limit = min(limit, int(positions))
        self.max_length = min(max_length, limit) if max_length else limit
        self._adapters: AdapterStack = AdapterStack(model)
        wait_s = settings.model.batch_wait_ms / 1000.0
        self._embedder: MicroBatcher[_EmbedRequest] = MicroBatcher(
            "embed", self._run_embed_batch, max_size=settings.model.max_batch_size, wait_s=wait_s
        )
        self._generator: MicroBatcher[_GenerateRequest] = MicroBatcher(
            "generate",
            self._run_generate_batch,
            max_size=settings.model.max_batch_size,
            wait_s=wait_s,
        )
        self._closed = False

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | Path,
        *,
        device: str | None = None,
        dtype: Any = None,
        quantize_4bit: bool | None = None,
        pooling: Pooling | None = "mean",
        bidirectional: bool | None = False,
        max_length: int | None = None,
        adapters: AdapterSpecLike | None = None,
        settings: Settings | None = None,
        manager: ModelManager | None = None,
        normalize: bool = True,
        batch_invariant: bool = False,
        instruction: str | None = None,
        trust_remote_code: bool = False,
        revision: str | None = None,
    ) -> UnifiedLLMRuntime:
        """Load a checkpoint (directory or Hub id) once, with its adapters.

        A directory holding a LoRA adapter (``adapter_config.json``), such as a
        published LLM2Vec MNTP repo, loads as base model + that adapter
        (``use="embed"``, named ``"mntp"``); pass the supervised adapter in
        ``adapters`` with ``use="embed"``. ``llm2vec_config.json`` supplies the
        pooling mode and maximum length when ``pooling``/``max_length`` are
        ``None``; ``bidirectional=None`` means "on for an LLM2Vec layout".
        """
        from ..settings import get_settings

        settings = settings if settings is not None else get_settings()
        started = time.perf_counter()
        try:
            from ._loading import (
                detect_llm2vec_layout,
                load_causal_lm,
                plan_load,
                read_llm2vec_config,
            )
        except ImportError as err:  # pragma: no cover - torch is a core dependency
            raise LLMRuntimeError(f"the runtime needs torch: {err}", code="load_failed") from err

        from .._sources import check_model_source

        source = check_model_source(  # a missing folder is not a Hub id
            path_or_repo, error=lambda message: LLMRuntimeError(message, code="load_failed")
        )
        triples = _adapter_triples(adapters)
        prompt_model_id = source
        from ..provisioning._local_copy import provisioned_copy

        # weights `provision` installed are loaded from there, not fetched again
        local_copy = provisioned_copy(
            source, revision=revision, settings=settings, trust_remote_code=trust_remote_code
        )
        if local_copy is not None:
            source, revision = str(local_copy.path), None
        layout = detect_llm2vec_layout(source)
        tokenizer_source = None
        llm2vec_config: dict[str, Any] = {}
        if layout is not None:
            triples.insert(0, ("mntp", str(layout.adapter_dir), "embed"))
            llm2vec_config.update(layout.config)
            tokenizer_dir = layout.adapter_dir
            if (tokenizer_dir / "tokenizer_config.json").is_file():
                tokenizer_source = str(tokenizer_dir)
            config_path = tokenizer_dir / "config.json"
            if config_path.is_file():
                import json

                prompt_model_id = str(
                    json.loads(config_path.read_text(encoding="utf-8")).get("_name_or_path")
                    or layout.base
                )
            else:
                prompt_model_id = layout.base
            source = layout.base
            base_copy = provisioned_copy(source, settings=settings)
            if base_copy is not None:
                source = str(base_copy.path)
            if bidirectional is None:
                bidirectional = True
        for _, adapter_path, use in triples:
            if use == "embed" and Path(adapter_path).is_dir():
                llm2vec_config.update(read_llm2vec_config(adapter_path))
        pooling = pooling or llm2vec_config.get("pooling_mode") or "mean"
        max_length = max_length or llm2vec_config.get("max_length")

        plan = plan_load(device=device, dtype=dtype, quantize_4bit=quantize_4bit, settings=settings)
        if not plan.device.startswith("cuda"):
            import torch

            from ._loading import choose_cpu_threads

            threads, why = choose_cpu_threads(settings.model.cpu_threads)
            if threads is not None:
                torch.set_num_threads(threads)
            plan.notes.append(f"cpu threads: {why}")
        token = settings.hf_token.get_secret_value() if settings.hf_token else None
        model, tokenizer = load_causal_lm(
            source,
            plan,
            trust_remote_code=trust_remote_code,
            revision=revision,
            token=token,
            tokenizer_source=tokenizer_source,
        )
        runtime = cls(
            model=model,
            tokenizer=tokenizer,
            model_id=str(path_or_repo),
            device=plan.device,
            dtype=plan.dtype,
            quantization=plan.quantization,
            settings=settings,
            manager=manager,
            pooling=pooling,
            bidirectional=bool(bidirectional),
            normalize=normalize,
            max_length=max_length,
            batch_invariant=batch_invariant,
            instruction=instruction,
            prompt_model_id=prompt_model_id,
        )
        for name, adapter_path, use in triples:
            runtime.load_adapter(name, adapter_path, use=use)
        parameters = sum(p.numel() for p in model.parameters())
        log_event(
            logger,
            "llm_runtime_load",
            model=str(path_or_repo),
            path=source if source != str(path_or_repo) else None,  # a provisioned copy
            device=plan.device,
            dtype=str(plan.dtype).removeprefix("torch."),
            quantization=plan.quantization,
            parameters=parameters,
            adapters=",".join(runtime.adapter_names) or None,
            pooling=pooling,
            bidirectional=bool(bidirectional),
            notes="; ".join(plan.notes) or None,
            seconds=round(time.perf_counter() - started, 3),
        )
        return runtime

    @classmethod
    def shared(cls, settings: Settings | None = None) -> UnifiedLLMRuntime:
        """The process-wide runtime, created once (thread-safe).

        It loads ``settings.unified_model_dir`` when set, else the active
        profile's role ``general`` (or its first role), provisioned first, with
        that role's adapters and embedding options. A failed load raises
        ``LLMRuntimeError(code="load_failed")`` and is retried on the next call.
        """
        runtime = cls._shared
        if runtime is not None:
            return runtime
        with cls._shared_lock:
            if cls._shared is None:
                try:
                    cls._shared = cls._build_shared(settings)
                except LLMRuntimeError:
                    raise
                except Exception as err:
                    raise LLMRuntimeError(
                        f"could not load the shared runtime: {err}", code="load_failed"
                    ) from err
            return cls._shared

    @classmethod
    async def ashared(cls, settings: Settings | None = None) -> UnifiedLLMRuntime:
        """:meth:`shared` without blocking the event loop (loading runs in a thread)."""
        if cls._shared is not None:
            return cls._shared
        return await asyncio.to_thread(cls.shared, settings)

    @classmethod
    def reset_shared(cls) -> None:
        """Close and forget the process-wide runtime (for tests and reloads)."""
        with cls._shared_lock:
            runtime, cls._shared = cls._shared, None
        if runtime is not None:
            runtime.close()

    @classmethod
    def _build_shared(cls, settings: Settings | None) -> UnifiedLLMRuntime:
        from ..settings import get_settings

        settings = settings if settings is not None else get_settings()
        if settings.unified_model_dir is not None:
            return cls.from_pretrained(settings.unified_model_dir, settings=settings)
        return cls.from_role(settings=settings)

    @classmethod
    def from_role(
        cls,
        role: str | None = None,
        *,
        settings: Settings | None = None,
        manager: ModelManager | None = None,
        device: str | None = None,
        quantize_4bit: bool | None = None,
        show_progress: bool = True,
    ) -> UnifiedLLMRuntime:
        """Provision a manifest role (default ``general``, else the profile's first
        role) and load it with its adapters and embedding options; sampling
        defaults then come from that role. An unknown role is a ``ConfigError``
        listing the known ones."""
        from ..manager import ModelManager
        from ..provisioning import provision

        manager = manager if manager is not None else ModelManager(settings=settings)
        settings = manager.settings
        names = manager.role_names
        if not names:
            raise LLMRuntimeError(
                f"profile {manager.profile_name!r} has no roles to load", code="load_failed"
            )
        if role is None:
            role = "general" if "general" in names else names[0]
        report = provision([role], manager=manager, show_progress=show_progress)
        entry = report[role]
        if entry.ok and not entry.path:  # e.g. an Ollama model on a daemon we cannot read
            raise LLMRuntimeError(
                f"role {role!r} ({entry.provider} {entry.model}) has no local copy to load "
                f"({entry.verified or entry.action}); for Ollama, set OLLAMA_MODELS to the "
                "daemon's model store on this machine and provision again",
                code="load_failed",
            )
        if not entry.ok or not entry.path:
            raise LLMRuntimeError(
                f"role {role!r} ({entry.model}) could not be provisioned: "
                f"{entry.error or entry.action}; run `mongars-llm provision --roles {role}`",
                code="load_failed",
            )
        resolved = manager.role(role)
        embedding = dict(getattr(resolved, "embedding", {}) or {})
        adapters = [(a.name, a.path, a.use) for a in getattr(entry, "adapters", ())]
        return cls.from_pretrained(
            entry.path,
            settings=settings,
            manager=manager,
            device=device,
            quantize_4bit=quantize_4bit,
            adapters=adapters,
            pooling=embedding.get("pooling") or "mean",
            bidirectional=bool(embedding.get("bidirectional", False)),
            max_length=embedding.get("max_length"),
            normalize=bool(embedding.get("normalize", True)),
            instruction=embedding.get("instruction"),
            trust_remote_code=bool(getattr(resolved.entry, "trust_remote_code", False)),
            revision=entry.revision if entry.provider == "huggingface" else None,
        )

    # --------------------------------------------------------------- properties
    @property
    def model(self) -> Any:
        """The one model object (a ``*ForCausalLM``; adapters are injected into it)."""
        return self._model

    @property
    def decoder(self) -> Any:
        """The causal LM's base model, whose hidden states embeddings pool."""
        return (
            self._model.get_decoder() if hasattr(self._model, "get_decoder") else self._model.model
        )

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def hidden_size(self) -> int:
        return int(self._config.hidden_size)

    @property
    def adapter_names(self) -> list[str]:
        return self._adapters.names

    def stats(self) -> dict[str, Any]:
        """Micro-batching counters: batches run, requests and items they held."""
        return {
            "embed": self._embedder.stats.to_dict(),
            "generate": self._generator.stats.to_dict(),
        }

    def __repr__(self) -> str:
        return (
            f"UnifiedLLMRuntime(model_id={self.model_id!r}, device={self.device!r}, "
            f"dtype={str(self.dtype).removeprefix('torch.')}, quantization={self.quantization!r}, "
            f"adapters={self.adapter_names!r})"
        )

    # ----------------------------------------------------------------- adapters
    def load_adapter(self, name: str, path: str | Path, *, use: str = "all") -> None:
        """Add a LoRA adapter; ``use`` says which calls activate it by default:
        ``"all"``, ``"generate"``, ``"embed"``, or ``"explicit"`` (only calls that name it).
        Calls in flight finish first."""
        self._check_open()
        self._adapters.load(name, path, use=use)

    def unload_adapter(self, name: str) -> None:
        self._check_open()
        self._adapters.unload(name)

    # ---------------------------------------------------------------- utilities
    def _check_open(self) -> None:
        if self._closed:
            raise LLMRuntimeError("this runtime is closed", code="closed")

    def count_tokens(self, text_or_messages: Any) -> int:
        """Tokens the model reads for a prompt string or chat messages."""
        from ._generation import messages_to_prompt_ids

        with self._tokenizer_lock:
            if isinstance(text_or_messages, str):
                return len(self._tokenizer(text_or_messages, add_special_tokens=True)["input_ids"])
            return len(messages_to_prompt_ids(self._tokenizer, text_or_messages))

    def _role_defaults(self, role: str | None) -> tuple[dict[str, Any], tuple[str, ...] | None]:
        if role is None:
            return {}, None
        if self.manager is None:
            from ..manager import ModelManager

            self.manager = ModelManager(settings=self.settings)
        resolved = self.manager.role(role)
        parameters = dict(getattr(resolved, "parameters", {}) or {})
        entry = getattr(resolved, "entry", None)
        names = [a.name for a in getattr(entry, "adapters", ()) or ()]
        loaded = tuple(n for n in names if n in self._adapters.names)
        return parameters, (loaded if names else None)

    # --------------------------------------------------------------- generation
    def _prepare_generation(
        self,
        prompt_or_messages: Any,
        *,
        role: str | None,
        max_new_tokens: int | None,
        temperature: float | None,
        top_p: float | None,
        top_k: int | None,
        stop: str | Sequence[str] | None,
        adapter: str | Sequence[str] | None,
        seed: int | None,
        repetition_penalty: float | None,
        stream: GenerationStream | None,
    ) -> _GenerateRequest:
        from ._generation import RowState, SamplingKey, messages_to_prompt_ids

        self._check_open()
        defaults, role_adapters = self._role_defaults(role)

        def pick(value: Any, name: str) -> Any:
            return value if value is not None else defaults.get(name)

        bound = self.settings.model.max_new_tokens
        wanted = pick(max_new_tokens, "max_new_tokens")
        if wanted is None:
            wanted = bound
        if not isinstance(wanted, int) or isinstance(wanted, bool) or wanted < 1:
            raise LLMRuntimeError(
                f"max_new_tokens must be a positive integer, got {wanted!r}", code="invalid_input"
            )
        wanted = min(wanted, bound)
        temperature = pick(temperature, "temperature")
        top_p = pick(top_p, "top_p")
        top_k = pick(top_k, "top_k")
        seed = pick(seed, "seed")
        repetition_penalty = pick(repetition_penalty, "repetition_penalty")
        if temperature is not None and (not math.isfinite(temperature) or temperature < 0):
            raise LLMRuntimeError(
                f"temperature must be >= 0, got {temperature!r}", code="invalid_input"
            )
        if top_p is not None and not (0 < top_p <= 1):
            raise LLMRuntimeError(f"top_p must be in (0, 1], got {top_p!r}", code="invalid_input")
        if top_k is not None and top_k < 0:
            raise LLMRuntimeError(f"top_k must be >= 0, got {top_k!r}", code="invalid_input")
        stops = pick(stop, "stop") or ()
        stops = (stops,) if isinstance(stops, str) else tuple(stops)
        if any(not isinstance(s, str) or not s for s in stops):
            raise LLMRuntimeError("stop strings must be non-empty strings", code="invalid_input")
        if temperature is not None:
            do_sample = temperature > 0
        else:
            do_sample = bool(getattr(self._model.generation_config, "do_sample", False))
        if adapter is None and role_adapters is not None:
            mode = role_adapters
        else:
            mode = self._adapters.resolve(adapter, "generate")
        with self._tokenizer_lock:
            prompt_ids = messages_to_prompt_ids(self._tokenizer, prompt_or_messages)
        if len(prompt_ids) > self.max_length:
            raise LLMRuntimeError(
                f"the prompt has {len(prompt_ids)} tokens, more than the limit of "
                f"{self.max_length} (MONGARS_MODEL__MAX_INPUT_TOKENS / the model's context); "
                "shorten it",
                code="input_too_long",
            )
        row = RowState(prompt_ids=prompt_ids, max_new_tokens=wanted, stop=stops, stream=stream)
        key = SamplingKey(
            mode=mode,
            do_sample=do_sample,
            temperature=float(temperature) if do_sample and temperature is not None else None,
            top_p=top_p if do_sample else None,
            top_k=top_k if do_sample else None,
            repetition_penalty=repetition_penalty,
            seed=seed,
        )
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("llm_generate prompt=%r", prompt_or_messages)
        return _GenerateRequest(row=row, sampling=key)

    def _run_generate_batch(self, requests: list[_GenerateRequest]) -> None:
        import torch

        from ._generation import run_generation

        key = requests[0].sampling
        step = self.settings.model.max_batch_size
        for start in range(0, len(requests), step):
            chunk = requests[start : start + step]
            started = time.perf_counter()
            try:
                with self._adapters.active(key.mode), torch.inference_mode():
                    results = run_generation(
                        self._model,
                        self._tokenizer,
                        [r.row for r in chunk],
                        key,
                        device=self.device,
                        lock=self._tokenizer_lock,
                    )
            except Exception as err:
                error = _as_runtime_error(err, "generation failed", "generation_failed")
                for request in chunk:
                    if request.row.stream is not None:
                        request.row.stream._finish(None, error)
                    request.future.set_exception(error)
                continue
            seconds = time.perf_counter() - started
            for request, result in zip(chunk, results, strict=True):
                if request.row.stream is not None:
                    request.row.stream._finish(result)
                request.future.set_result(result)
            log_event(
                logger,
                "llm_generate",
                batch_size=len(chunk),
                prompt_tokens=sum(r.usage.prompt_tokens for r in results),
                completion_tokens=sum(r.usage.completion_tokens for r in results),
                adapters=",".join(key.mode) or None,
                sampling=key.do_sample,
                device=self.device,
                dtype=str(self.dtype).removeprefix("torch."),
                quantization=self.quantization,
                seconds=round(seconds, 4),
            )

    def _submit_generate(self, prompt_or_messages: Any, **kwargs: Any) -> Future[Any]:
        request = self._prepare_generation(prompt_or_messages, stream=None, **_gen_kwargs(kwargs))
        return self._generator.submit(request)

    def generate(
        self,
        prompt_or_messages: Any,
        *,
        role: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        stop: str | Sequence[str] | None = None,
        adapter: str | Sequence[str] | None = None,
        seed: int | None = None,
        repetition_penalty: float | None = None,
    ) -> Generation:
        """Generate a reply to a prompt string or chat messages (chat template applied).

        Arguments override the role's defaults (``role=``); ``temperature=0`` is
        greedy and deterministic; ``max_new_tokens`` is clamped to
        ``settings.model.max_new_tokens``. The text never contains the prompt.
        """
        future = self._submit_generate(
            prompt_or_messages,
            role=role,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            stop=stop,
            adapter=adapter,
            seed=seed,
            repetition_penalty=repetition_penalty,
        )
        return cast(Generation, future.result())

    def generate_batch(self, prompts: Sequence[Any], **kwargs: Any) -> list[Generation]:
        """:meth:`generate` for many prompts at once (batched on the model), in order."""
        if isinstance(prompts, str) or not prompts:
            raise LLMRuntimeError(
                "generate_batch needs a non-empty list of prompts or message lists",
                code="invalid_input",
            )
        futures = [self._submit_generate(p, **kwargs) for p in prompts]
        return [cast(Generation, f.result()) for f in futures]

    def stream(self, prompt_or_messages: Any, **kwargs: Any) -> GenerationStream:
        """Like :meth:`generate` but returns a :class:`GenerationStream` of text deltas."""
        stream = GenerationStream()
        request = self._prepare_generation(prompt_or_messages, stream=stream, **_gen_kwargs(kwargs))
        self._generator.submit(request)
        return stream

    async def agenerate(self, prompt_or_messages: Any, **kwargs: Any) -> Generation:
        """:meth:`generate` without blocking the event loop (micro-batched with others)."""
        future = self._submit_generate(prompt_or_messages, **kwargs)
        return cast(Generation, await asyncio.wrap_future(future))

    def astream(self, prompt_or_messages: Any, **kwargs: Any) -> AsyncGenerationStream:
        """Async iterator of text deltas; ``.result`` holds the final Generation after it."""
        loop = asyncio.get_running_loop()
        stream = self.stream(prompt_or_messages, **kwargs)
        async_stream = AsyncGenerationStream(stream, loop)
        threading.Thread(target=async_stream._pump, name="mongars-astream", daemon=True).start()
        return async_stream

    # --------------------------------------------------------------- embeddings
    def _prepare_embed(
        self,
        texts: Any,
        *,
        instruction: str | None,
        normalize: bool | None,
        pooling: str | None,
        batch_size: int | None,
        adapter: str | Sequence[str] | None,
        bidirectional: bool | None,
        truncate: bool,
        batch_invariant: bool | None,
    ) -> _EmbedRequest:
        from ._embedding import POOLING_MODES, normalise_inputs

        self._check_open()
        pooling = pooling or self.pooling
        if pooling not in POOLING_MODES:
            raise LLMRuntimeError(
                f"unknown pooling {pooling!r}; use one of {', '.join(POOLING_MODES)}",
                code="invalid_input",
            )
        if batch_size is not None and batch_size < 1:
            raise LLMRuntimeError(
                f"batch_size must be >= 1, got {batch_size!r}", code="invalid_input"
            )
        items = normalise_inputs(
            texts, instruction if instruction is not None else self.instruction
        )
        mode = self._adapters.resolve(adapter, "embed")
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("llm_embed texts=%r", items)
        return _EmbedRequest(
            items=items,
            truncate=truncate,
            pooling=pooling,
            bidirectional=self.bidirectional if bidirectional is None else bool(bidirectional),
            normalize=self.normalize if normalize is None else bool(normalize),
            mode=mode,
            batch_size=min(batch_size or self.settings.model.max_batch_size, 4096),
            batch_invariant=self.batch_invariant if batch_invariant is None else batch_invariant,
        )

    def _run_embed_batch(self, requests: list[_EmbedRequest]) -> None:
        import numpy as np
        import torch

        from ._embedding import (
            collate,
            collate_packed,
            encode_inputs,
            plan_chunks,
            plan_packed,
            pool,
            run_decoder,
            run_packed,
        )

        # Tokenise here, on the worker, so callers (and the event loop) only queue.
        ready = []
        for request in requests:
            try:
                with self._tokenizer_lock:
                    request.encoded = encode_inputs(
                        self._tokenizer,
                        request.items,
                        pooling=request.pooling,
                        max_length=self.max_length,
                        truncate=request.truncate,
                        model_type=str(getattr(self._config, "model_type", "")),
                        model_id=self._prompt_model_id,
                    )
            except Exception as err:
                request.future.set_exception(err)
                continue
            ready.append(request)
        if not ready:
            return
        requests = ready
        first = requests[0]
        encoded = [e for r in requests for e in (r.encoded or [])]
        lengths = [len(e) for e in encoded]
        pack_tokens = self._pack_tokens(first, lengths)
        if pack_tokens:
            plan = plan_packed(
                lengths,
                batch_size=first.batch_size,
                max_batch_tokens=self.settings.model.max_batch_tokens,
                row_tokens=pack_tokens,
            )
            if all(len(row) == 1 for rows in plan for row in rows):
                pack_tokens = 0  # nothing shares a row: the same batches, padded
        else:
            chunks = plan_chunks(
                lengths,
                batch_size=first.batch_size,
                max_batch_tokens=self.settings.model.max_batch_tokens,
                batch_invariant=first.batch_invariant,
            )
            plan = [[[i] for i in chunk] for chunk in chunks]
        started = time.perf_counter()
        out = np.empty((len(encoded), self.hidden_size), dtype=np.float32)
        padding_side = getattr(self._tokenizer, "padding_side", "right") or "right"
        eager = self._config._attn_implementation == "eager"
        pad_id = self._tokenizer.pad_token_id
        padded = 0
        try:
            with self._adapters.active(first.mode), torch.inference_mode():
                decoder = self.decoder
                for rows in plan:
                    texts = [i for row in rows for i in row]
                    if pack_tokens:
                        packed = collate_packed(
                            [[encoded[i] for i in row] for row in rows],
                            pad_id=pad_id,
                            bidirectional=first.bidirectional,
                            float_mask_dtype=self.dtype if eager else None,
                            device=self.device,
                        )
                        padded += packed.padded_tokens
                        hidden = run_packed(decoder, packed)
                        attention, pooled, ids = packed.valid, packed.pooled, packed.text_ids
                    else:
                        ids, attention, pooled = collate(
                            [encoded[i] for i in texts],
                            pad_id=pad_id,
                            padding_side=padding_side,
                            device=self.device,
                        )
                        padded += ids.numel()
                        hidden = run_decoder(
                            decoder, ids, attention, bidirectional=first.bidirectional
                        )
                    vectors = pool(
                        hidden,
                        attention,
                        pooled,
                        ids,
                        mode=first.pooling,
                        bos_token_id=self._tokenizer.bos_token_id,
                    )
                    if first.normalize:
                        vectors = torch.nn.functional.normalize(vectors, p=2, dim=-1)
                    out[texts] = vectors.cpu().numpy()
        except Exception as err:
            error = _as_runtime_error(err, "embedding failed", "embedding_failed")
            for request in requests:
                request.future.set_exception(error)
            return
        if not np.isfinite(out).all():
            error = LLMRuntimeError(
                "embedding produced non-finite values (NaN/inf); try dtype='float32'",
                code="embedding_failed",
            )
            for request in requests:
                request.future.set_exception(error)
            return
        offset = 0
        for request in requests:
            n = len(request.items)
            request.future.set_result(out[offset : offset + n].copy())
            offset += n
        log_event(
            logger,
            "llm_embed",
            requests=len(requests),
            batch_size=len(encoded),
            forward_batches=len(plan),
            packed=bool(pack_tokens),
            tokens=sum(lengths),
            padded_tokens=padded,
            pooling=first.pooling,
            bidirectional=first.bidirectional,
            adapters=",".join(first.mode) or None,
            device=self.device,
            dtype=str(self.dtype).removeprefix("torch."),
            quantization=self.quantization,
            seconds=round(time.perf_counter() - started, 4),
        )

    def _pack_tokens(self, request: _EmbedRequest, lengths: list[int]) -> int:
        """Row size for packing this batch, or 0 to pad each text to the longest."""
        rows = min(self.settings.model.embed_pack_tokens, self.settings.model.max_batch_tokens)
        if not rows or request.batch_invariant or request.batch_size < 2 or len(lengths) < 2:
            return 0
        if self._config._attn_implementation not in ("sdpa", "eager"):
            return 0  # flash/flex attention take no 4-D mask
        window = getattr(self._config, "sliding_window", None)
        if window and getattr(self._config, "use_sliding_window", True):
            if max(lengths) > window:
                return 0  # a custom mask would drop the window for this long text
            rows = min(rows, window)
        return rows

    def embed(
        self,
        texts: str | Sequence[str] | Sequence[Sequence[str]],
        *,
        instruction: str | None = None,
        normalize: bool | None = None,
        pooling: Pooling | None = None,
        batch_size: int | None = None,
        adapter: str | Sequence[str] | None = None,
        bidirectional: bool | None = None,
        truncate: bool = True,
        batch_invariant: bool | None = None,
        show_progress: bool = False,
    ) -> np.ndarray:
        """Embed texts; returns float32 ``(n, hidden_size)`` in input order.

        ``texts`` is a string, a list of strings, or a list of
        ``[instruction, text]`` pairs (LLM2Vec style); ``instruction`` applies
        to plain strings. Instruction tokens are read but not pooled.
        ``truncate=False`` raises ``input_too_long`` instead of cutting at
        ``max_length``. ``show_progress=True`` draws a progress bar on stderr
        (texts are then embedded in chunks of ``PROGRESS_CHUNK`` texts).
        """
        options: dict[str, Any] = {
            "instruction": instruction,
            "normalize": normalize,
            "pooling": pooling,
            "batch_size": batch_size,
            "adapter": adapter,
            "bidirectional": bidirectional,
            "truncate": truncate,
            "batch_invariant": batch_invariant,
        }
        if show_progress and not isinstance(texts, str):
            return self._embed_with_progress(list(texts), options)
        request = self._prepare_embed(
            texts,
            instruction=instruction,
            normalize=normalize,
            pooling=pooling,
            batch_size=batch_size,
            adapter=adapter,
            bidirectional=bidirectional,
            truncate=truncate,
            batch_invariant=batch_invariant,
        )
        return cast("np.ndarray", self._embedder.submit(request).result())

    #: texts per chunk when :meth:`embed` shows progress (one bar update per chunk)
    PROGRESS_CHUNK = 64

    def _embed_with_progress(self, texts: list[Any], options: dict[str, Any]) -> np.ndarray:
        import numpy as np
        from tqdm.auto import tqdm

        if not texts:  # the usual "texts is empty" error
            return self.embed(texts, **options)
        chunk = max(self.PROGRESS_CHUNK, options.get("batch_size") or 0)
        parts = []
        with tqdm(total=len(texts), desc="Embedding", unit="text", file=sys.stderr) as bar:
            for start in range(0, len(texts), chunk):
                part = texts[start : start + chunk]
                parts.append(self.embed(part, **options))
                bar.update(len(part))
        return np.concatenate(parts, axis=0)

    async def aembed(self, texts: Any, **kwargs: Any) -> np.ndarray:
        """:meth:`embed` without blocking the event loop (micro-batched with others)."""
        request = self._prepare_embed(texts, **_embed_kwargs(kwargs))
        return cast("np.ndarray", await asyncio.wrap_future(self._embedder.submit(request)))

    # ------------------------------------------------------------------ closing
    def close(self) -> None:
        """Stop the batching workers and release the model (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._embedder.close()
        self._generator.close()
        if type(self)._shared is self:
            type(self)._shared = None

    def __enter__(self) -> UnifiedLLMRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_GEN_KEYS = {
    "role": None,
    "max_new_tokens": None,
    "temperature": None,
    "top_p": None,
    "top_k": None,
    "stop": None,
    "adapter": None,
    "seed": None,
    "repetition_penalty": None,
}
_EMBED_KEYS = {
    "instruction": None,
    "normalize": None,
    "pooling": None,
    "batch_size": None,
    "adapter": None,
    "bidirectional": None,
    "truncate": True,
    "batch_invariant": None,
}


def _as_runtime_error(err: Exception, what: str, code: str) -> LLMRuntimeError:
    """``err`` itself if it is an :class:`LLMRuntimeError`, else one wrapping it."""
    if isinstance(err, LLMRuntimeError):
        return err
    error = LLMRuntimeError(f"{what}: {err}", code=code)
    error.__cause__ = err
    return error


def _gen_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    unknown = set(kwargs) - set(_GEN_KEYS)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    return {**_GEN_KEYS, **kwargs}


def _embed_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    unknown = set(kwargs) - set(_EMBED_KEYS)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    return {**_EMBED_KEYS, **kwargs}
