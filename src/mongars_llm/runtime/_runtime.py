"""``UnifiedLLMRuntime``: one copy of the weights for chat and LLM2Vec embeddings.

The class is a thin typed facade. It owns the loaded model, tokenizer and
adapter stack (:mod:`._adapter_stack`) and hands each call to the component that
does the work:

- loading: :mod:`._loading` decides what loads (adapters, provisioned copies,
  LLM2Vec layouts) and how (device, dtype, 4-bit); :mod:`._engine` which engine
  runs it (torch, or llama.cpp for a GGUF file on the CPU) and why;
- ``generate``/``stream``/``agenerate``/``astream``/``count_tokens``: the
  :class:`~._generator.Generator`, from typed :class:`~._params.SamplingParams`;
- ``embed``/``aembed``: the :class:`~._embedder.Embedder`, from typed
  :class:`~._embedder.EmbedOptions`, over the LLM2Vec core (:mod:`._llm2vec`);
- ``rerank``/``arerank``: the :class:`~._reranker.Reranker` (the yes/no relevance
  prompt of :mod:`._rerank`, scored on the same weights);
- ``from_role``/``shared``/``ashared``/``reset_shared``: :mod:`._compose`, which
  reads the manifest (through the runtime's ``manager``) and provisions.

Failures are :class:`~mongars_llm.errors.LLMRuntimeError` subclasses with a
stable ``code``. This module imports neither torch nor transformers at import
time; they load with the model, so ``import mongars_llm.runtime`` is cheap.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ..errors import (
    AdapterNotFoundError,
    InvalidInputError,
    ModelLoadError,
    RuntimeClosedError,
    UnsupportedError,
)
from ..logging import log_event
from ._embedder import EmbedDefaults, Embedder, EmbedOptions, TorchEmbedRunner, known_pooling
from ._engine import (
    Engine,
    EngineChoice,
    LlamaCppAdapters,
    LlamaCppRuntimeEngine,
    TorchEngine,
    check_engine_name,
    choose_engine,
    engine_device,
    gguf_chat_template,
    is_gguf_file,
)
from ._generator import Generator
from ._llm2vec import DEFAULT_POOLING, Pooling
from ._params import RoleDefaults, SamplingKwargs, SamplingParams
from ._reranker import Reranker, RerankResults
from ._types import AsyncGenerationStream, Generation, GenerationStream, LoadedModel

if TYPE_CHECKING:
    from concurrent.futures import Future

    import numpy as np
    from typing_extensions import Unpack

    from ..manager import ModelManager
    from ..settings import Settings
    from ._adapter_stack import AdapterStack
    from ._compact import Precision
    from ._llamacpp import LlamaCppEngine

__all__ = ["AdapterSpecLike", "UnifiedLLMRuntime"]

logger = logging.getLogger("mongars_llm.runtime")

AdapterSpecLike = (
    Mapping[str, "str | Path"] | Iterable[tuple[str, "str | Path"] | tuple[str, "str | Path", str]]
)


class UnifiedLLMRuntime:
    """One decoder-only checkpoint, loaded once, serving ``generate`` and ``embed``.

    Build it with :meth:`from_pretrained` (a private instance), :meth:`from_role`
    (a manifest role, provisioned) or :meth:`shared` (the process-wide one).
    Embeddings run the causal LM's own decoder (``rt.model.model``) — the same
    parameter storage as generation — with LLM2Vec pooling and per-call
    causal/bidirectional attention. LoRA adapters are stacked on that one model
    and chosen per call.
    """

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
        pooling: str = DEFAULT_POOLING,
        bidirectional: bool = False,
        normalize: bool = True,
        max_length: int | None = None,
        batch_invariant: bool = False,
        instruction: str | None = None,
        prompt_model_id: str | None = None,
        llama: LlamaCppEngine | None = None,
        engine_reason: str = "",
    ) -> None:
        """``llama``: a loaded :class:`~._llamacpp.LlamaCppEngine` to run instead of a
        torch ``model`` (which is then ``None``); ``engine_reason`` says why this engine."""
        from types import SimpleNamespace

        known_pooling(pooling)  # before anything is built
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
        adapters: AdapterStack
        if llama is not None:
            config: Any = SimpleNamespace(
                hidden_size=llama.hidden_size,
                model_type=llama.architecture,
                max_position_embeddings=llama.n_ctx - 1,  # room for one new token
            )
            adapters = LlamaCppAdapters(llama, cache_dir=settings.cache_dir)
        else:
            from ._adapter_stack import AdapterStack

            config = (
                model.config.get_text_config()
                if hasattr(model.config, "get_text_config")
                else model.config
            )
            adapters = AdapterStack(model)
        self._config = config
        limit = settings.model.max_input_tokens
        positions = getattr(config, "max_position_embeddings", None)
        if positions:
            limit = min(limit, int(positions))
        self.max_length = min(max_length, limit) if max_length else limit
        self._adapters = adapters
        loaded = LoadedModel(
            model=model,
            tokenizer=tokenizer,
            tokenizer_lock=self._tokenizer_lock,
            adapters=self._adapters,
            settings=settings,
            config=config,
            max_length=self.max_length,
            device=device,
            dtype=dtype,
            quantization=quantization,
        )
        engine: Engine
        if llama is not None:
            engine = LlamaCppRuntimeEngine(
                llama,
                reason=engine_reason,
                max_length=self.max_length,
                tokenizer_lock=self._tokenizer_lock,
                adapters=adapters if isinstance(adapters, LlamaCppAdapters) else None,
            )
        else:
            runner = TorchEmbedRunner(loaded, prompt_model_id=self._prompt_model_id)
            engine = TorchEngine(loaded, embed_runner=runner, reason=engine_reason)
        self._engine = engine
        self._embedder = Embedder(
            loaded,
            prompt_model_id=self._prompt_model_id,
            engine=engine,
            defaults=EmbedDefaults(
                pooling=pooling,
                bidirectional=bidirectional,
                normalize=normalize,
                batch_invariant=batch_invariant,
                instruction=instruction,
            ),
        )
        self._generator = Generator(loaded, roles=self._role_defaults, engine=engine)
        self._reranker = Reranker(loaded, engine=engine)
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
        pooling: Pooling | None = DEFAULT_POOLING,
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
        engine: str | None = None,
        engine_reason: str | None = None,
    ) -> UnifiedLLMRuntime:
        """Load a checkpoint (directory, Hub id or ``.gguf`` file) once, with its adapters.

        ``engine`` (default ``settings.model.engine``, ``"auto"``) picks what runs it:
        ``"torch"`` (transformers; a ``.gguf`` file is converted once to a cached
        folder), ``"llama.cpp"`` (a ``.gguf`` file run as GGUF on the CPU; needs
        ``pip install "mongars-llm[cpu]"``; peft LoRA folders are converted once to
        GGUF LoRAs), or
        ``"auto"``: llama.cpp for a ``.gguf`` file on the CPU when llama-cpp-python is
        installed, torch otherwise. :meth:`describe` and the load event say which
        engine runs and why (``engine_reason``, when given, is that why: a caller that
        chose ``engine`` itself, like :meth:`from_role`, says on what grounds).

        A directory holding a LoRA adapter (``adapter_config.json``), such as a
        published LLM2Vec MNTP repo, loads as base model + that adapter
        (``use="embed"``, named ``"mntp"``); pass the supervised adapter in
        ``adapters`` with ``use="embed"``. ``llm2vec_config.json`` supplies the
        pooling mode and maximum length when ``pooling``/``max_length`` are
        ``None``; ``bidirectional=None`` means "on for an LLM2Vec layout".
        ``manager`` supplies the roles that ``generate(..., role=...)`` names.
        """
        from ..settings import get_settings

        settings = settings if settings is not None else get_settings()
        started = time.perf_counter()
        requested = check_engine_name(engine if engine is not None else settings.model.engine)
        gguf = _gguf_source(path_or_repo)
        resolved_device: str | None = None
        if gguf and requested != "torch":
            resolved_device = engine_device(device, settings)  # torch-free on a CPU host
        choice = choose_engine(requested, source=path_or_repo, device=resolved_device, gguf=gguf)
        if engine_reason:
            choice = EngineChoice(choice.name, engine_reason)
        if choice.name == "llama.cpp":
            return cls._from_gguf(
                Path(path_or_repo),
                reason=choice.reason,
                device=resolved_device,
                settings=settings,
                manager=manager,
                pooling=pooling,
                bidirectional=bidirectional,
                max_length=max_length,
                adapters=adapters,
                normalize=normalize,
                batch_invariant=batch_invariant,
                instruction=instruction,
                started=started,
            )
        try:
            from ._loading import load_causal_lm, plan_load, resolve_checkpoint, use_cpu_threads
        except ImportError as err:  # pragma: no cover - torch is a core dependency
            raise ModelLoadError(f"the runtime needs torch: {err}") from err

        source: str | Path = path_or_repo
        if gguf:
            source = _torch_copy_of_gguf(Path(path_or_repo), settings)
        checkpoint = resolve_checkpoint(
            source,
            settings=settings,
            adapters=adapters,
            revision=revision,
            trust_remote_code=trust_remote_code,
            pooling=pooling,
            max_length=max_length,
            bidirectional=bidirectional,
        )
        plan = plan_load(device=device, dtype=dtype, quantize_4bit=quantize_4bit, settings=settings)
        use_cpu_threads(plan, settings)
        token = settings.hf_token.get_secret_value() if settings.hf_token else None
        model, tokenizer = load_causal_lm(
            checkpoint.source,
            plan,
            trust_remote_code=trust_remote_code,
            revision=checkpoint.revision,
            token=token,
            tokenizer_source=checkpoint.tokenizer_source,
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
            pooling=checkpoint.pooling,
            bidirectional=checkpoint.bidirectional,
            normalize=normalize,
            max_length=checkpoint.max_length,
            batch_invariant=batch_invariant,
            instruction=instruction,
            prompt_model_id=checkpoint.prompt_model_id,
            engine_reason=choice.reason,
        )
        for name, adapter_path, use in checkpoint.adapters:
            runtime.load_adapter(name, adapter_path, use=use)
        log_event(
            logger,
            "llm_runtime_load",
            model=str(path_or_repo),
            path=checkpoint.source if checkpoint.source != str(path_or_repo) else None,
            engine="torch",
            engine_reason=choice.reason,
            device=plan.device,
            dtype=str(plan.dtype).removeprefix("torch."),
            quantization=plan.quantization,
            parameters=sum(p.numel() for p in model.parameters()),
            adapters=",".join(runtime.adapter_names) or None,
            pooling=checkpoint.pooling,
            bidirectional=checkpoint.bidirectional,
            notes="; ".join(plan.notes) or None,
            seconds=round(time.perf_counter() - started, 3),
        )
        return runtime

    @classmethod
    def _from_gguf(
        cls,
        path: Path,
        *,
        reason: str,
        device: str | None,
        settings: Settings,
        manager: ModelManager | None,
        pooling: Pooling | None,
        bidirectional: bool | None,
        max_length: int | None,
        adapters: AdapterSpecLike | None,
        normalize: bool,
        batch_invariant: bool,
        instruction: str | None,
        started: float,
    ) -> UnifiedLLMRuntime:
        """A ``.gguf`` file on the llama.cpp engine (:class:`~._llamacpp.LlamaCppEngine`)."""
        fallback = 'load it with engine="torch"'
        if device not in (None, "cpu"):
            raise UnsupportedError(
                f"the llama.cpp engine runs on the CPU here, not {device!r}; {fallback} "
                "or pass device='cpu'"
            )
        from ._adapter_stack import adapter_specs

        specs = adapter_specs(adapters)  # checked before anything loads
        if not is_gguf_file(path):
            raise ModelLoadError(f"{str(path)!r} is not a GGUF file; {fallback}")
        from ._llamacpp import LlamaCppEngine
        from ._prompting import check_tokenizer_template

        threads = settings.model.cpu_threads or None
        llama = LlamaCppEngine(path, n_threads=threads, prompt_model_id=str(path))
        try:
            view = llama.tokenizer
            view.chat_template = gguf_chat_template(llama.info.metadata)
            check_tokenizer_template(view, str(path))
            runtime = cls(
                model=None,
                tokenizer=view,
                model_id=str(path),
                device="cpu",
                dtype=None,
                quantization="gguf",
                settings=settings,
                manager=manager,
                pooling=pooling or DEFAULT_POOLING,
                bidirectional=bool(bidirectional),
                normalize=normalize,
                max_length=max_length,
                batch_invariant=batch_invariant,
                instruction=instruction,
                prompt_model_id=str(path),
                llama=llama,
                engine_reason=reason,
            )
            for name, adapter_path, use in specs:
                runtime.load_adapter(name, adapter_path, use=use)
        except BaseException:
            llama.close()
            raise
        described = runtime.describe()
        log_event(
            logger,
            "llm_runtime_load",
            model=str(path),
            engine="llama.cpp",
            engine_reason=reason,
            device="cpu",
            architecture=described.get("architecture"),
            tensor_types=",".join(sorted(map(str, described.get("tensor_types") or {}))) or None,
            n_ctx=described.get("n_ctx"),
            threads=described.get("n_threads"),
            pooling=runtime.pooling,
            bidirectional=runtime.bidirectional,
            seconds=round(time.perf_counter() - started, 3),
        )
        return runtime

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
        engine: str | None = None,
    ) -> UnifiedLLMRuntime:
        """Provision a manifest role (default ``general``, else the profile's first
        role) and load it with its adapters and embedding options; sampling
        defaults then come from that role. An unknown role is a ``ConfigError``
        listing the known ones. ``engine`` is as in :meth:`from_pretrained`: a role
        whose source is a GGUF (a local ``.gguf`` file, an Ollama model) runs as GGUF
        on llama.cpp when ``auto`` picks it, with nothing converted; the torch engine
        gets the provisioned transformers folder (converted once). (See
        :func:`._compose.runtime_for_role`.)"""
        from ._compose import runtime_for_role

        return runtime_for_role(
            role,
            settings=settings,
            manager=manager,
            device=device,
            quantize_4bit=quantize_4bit,
            show_progress=show_progress,
            engine=engine,
            runtime_cls=cls,
        )

    @classmethod
    def shared(cls, settings: Settings | None = None) -> UnifiedLLMRuntime:
        """The process-wide runtime, created once (thread-safe).

        It loads ``settings.unified_model_dir`` when set, else the active
        profile's role ``general`` (or its first role), provisioned first, with
        that role's adapters and embedding options. A failed load raises
        ``ModelLoadError`` (code ``load_failed``) and is retried on the next call.
        """
        from ._compose import shared_runtime

        return shared_runtime(settings, runtime_cls=cls)

    @classmethod
    async def ashared(cls, settings: Settings | None = None) -> UnifiedLLMRuntime:
        """:meth:`shared` without blocking the event loop (loading runs in a thread)."""
        from ._compose import ashared_runtime

        return await ashared_runtime(settings, runtime_cls=cls)

    @classmethod
    def reset_shared(cls) -> None:
        """Close and forget the process-wide runtime (for tests and reloads)."""
        from ._compose import reset_shared_runtime

        reset_shared_runtime()

    # --------------------------------------------------------------- properties
    @property
    def model(self) -> Any:
        """The one model object (a ``*ForCausalLM``; adapters are injected into it);
        ``None`` on the llama.cpp engine."""
        return self._model

    @property
    def engine(self) -> str:
        """The engine that runs the model: ``"torch"`` or ``"llama.cpp"``."""
        return self._engine.name

    @property
    def engine_reason(self) -> str:
        """Why :attr:`engine` was chosen (``engine="auto"``'s reasoning, or the request)."""
        return self._engine.reason

    def describe(self) -> dict[str, Any]:
        """What runs and how: the engine and why, device, precision, limits, adapters,
        embedding defaults (for ``doctor``, logs and support requests)."""
        return {
            "model": self.model_id,
            **self._engine.describe(),
            "max_length": self.max_length,
            "hidden_size": self.hidden_size,
            "adapters": self.adapter_names,
            "pooling": self.pooling,
            "bidirectional": self.bidirectional,
            "normalize": self.normalize,
        }

    @property
    def decoder(self) -> Any:
        """The causal LM's base model, whose hidden states embeddings pool."""
        if self._model is None:
            raise UnsupportedError(
                'the llama.cpp engine has no torch decoder; load the model with engine="torch"'
            )
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
        return self._engine.stats()

    def __repr__(self) -> str:
        return (
            f"UnifiedLLMRuntime(model_id={self.model_id!r}, engine={self.engine!r}, "
            f"device={self.device!r}, "
            f"dtype={str(self.dtype).removeprefix('torch.')}, quantization={self.quantization!r}, "
            f"adapters={self.adapter_names!r})"
        )

    # ----------------------------------------------------------------- adapters
    def load_adapter(self, name: str, path: str | Path, *, use: str = "all") -> None:
        """Add a LoRA adapter; ``use`` says which calls activate it by default:
        ``"all"``, ``"generate"``, ``"embed"``, ``"rerank"``, or ``"explicit"`` (only
        calls that name it).
        Calls in flight finish first. A local folder is checked against the model before
        anything is allocated (target modules, rank, tensor shapes: ``load_failed``)."""
        self._check_open()
        self._adapters.load(name, path, use=use)

    def unload_adapter(self, name: str) -> None:
        """Remove an adapter: new calls no longer see it; calls that already chose it
        (queued or running) keep it until they finish, then its layers are freed."""
        self._check_open()
        self._adapters.unload(name)

    def adapter_use(self, name: str) -> str:
        """The ``use`` of a loaded adapter (``all``, ``generate``, ``embed``, ``rerank``,
        ``explicit``)."""
        try:
            return self._adapters.use_of(name)
        except KeyError:
            raise AdapterNotFoundError(
                f"adapter {name!r} is not loaded; loaded adapters: "
                f"{', '.join(self.adapter_names) or '(none)'}"
            ) from None

    def adapter_path(self, name: str) -> str:
        """The folder (or Hub id) a loaded adapter was loaded from (to load it again)."""
        try:
            return self._adapters.path_of(name)
        except KeyError:
            raise AdapterNotFoundError(
                f"adapter {name!r} is not loaded; loaded adapters: "
                f"{', '.join(self.adapter_names) or '(none)'}"
            ) from None

    def set_adapter_uses(self, uses: Mapping[str, str]) -> None:
        """Change the ``use`` of loaded adapters in one step (``{"v2": "all", "v1":
        "explicit"}`` promotes v2 over v1): every call sees either the old defaults or the
        new ones, never both versions or neither."""
        self._check_open()
        self._adapters.set_uses(uses)

    # ---------------------------------------------------------------- utilities
    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran; every call then raises ``RuntimeClosedError``."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeClosedError("this runtime is closed; build or fetch a new one")

    def count_tokens(self, text_or_messages: Any) -> int:
        """Tokens the model reads for a prompt string or chat messages."""
        return self._generator.count_tokens(text_or_messages)

    def _role_defaults(self, role: str) -> RoleDefaults:
        """The defaults of a role a call names, read from the manifest through
        :attr:`manager` (:func:`._compose.role_defaults`)."""
        from ._compose import role_defaults

        return role_defaults(self, role)

    # --------------------------------------------------------------- generation
    def _submit(
        self,
        prompt_or_messages: Any,
        role: str | None,
        options: SamplingKwargs,
        stream: GenerationStream | None = None,
        *,
        defer: bool = False,
    ) -> Future[Generation]:
        """Queue one generation from ``role`` + sampling keyword arguments (an unknown
        name is a ``TypeError``, as for :meth:`generate`); ``defer``: prepare the
        prompt on a worker thread (the async API)."""
        params = SamplingParams.from_kwargs(options)
        self._check_open()
        return self._generator.submit(
            prompt_or_messages, params, role=role, stream=stream, defer=defer
        )

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
        A bad value raises ``InvalidInputError`` naming the argument.
        """
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            stop=stop,
            adapter=adapter,
            seed=seed,
            repetition_penalty=repetition_penalty,
        )
        self._check_open()
        future = self._generator.submit(prompt_or_messages, params, role=role)
        return cast(Generation, future.result())

    def generate_batch(
        self,
        prompts: Sequence[Any],
        *,
        role: str | None = None,
        **kwargs: Unpack[SamplingKwargs],
    ) -> list[Generation]:
        """:meth:`generate` for many prompts at once (batched on the model), in order."""
        if isinstance(prompts, str) or not prompts:
            raise InvalidInputError(
                "generate_batch needs a non-empty list of prompts or message lists",
                param="prompts",
            )
        futures = [self._submit(p, role, kwargs) for p in prompts]
        return [cast(Generation, f.result()) for f in futures]

    def stream(
        self,
        prompt_or_messages: Any,
        *,
        role: str | None = None,
        **kwargs: Unpack[SamplingKwargs],
    ) -> GenerationStream:
        """Like :meth:`generate` but returns a :class:`GenerationStream` of text deltas."""
        stream = GenerationStream()
        self._submit(prompt_or_messages, role, kwargs, stream)
        return stream

    async def agenerate(
        self,
        prompt_or_messages: Any,
        *,
        role: str | None = None,
        **kwargs: Unpack[SamplingKwargs],
    ) -> Generation:
        """:meth:`generate` without blocking the event loop (micro-batched with others)."""
        future = self._submit(prompt_or_messages, role, kwargs, defer=True)
        return cast(Generation, await asyncio.wrap_future(future))

    def astream(
        self,
        prompt_or_messages: Any,
        *,
        role: str | None = None,
        **kwargs: Unpack[SamplingKwargs],
    ) -> AsyncGenerationStream:
        """Async iterator of text deltas; ``.result`` holds the final Generation after it."""
        loop = asyncio.get_running_loop()
        stream = GenerationStream()
        self._submit(prompt_or_messages, role, kwargs, stream, defer=True)
        async_stream = AsyncGenerationStream(stream, loop)
        threading.Thread(target=async_stream._pump, name="mongars-astream", daemon=True).start()
        return async_stream

    # --------------------------------------------------------------- embeddings
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
        dimensions: int | None = None,
        precision: Precision = "float32",
        force_dimensions: bool = False,
        calibration: Any = None,
    ) -> np.ndarray:
        """Embed texts; returns float32 ``(n, hidden_size)`` in input order.

        ``texts`` is a string, a list of strings, or a list of
        ``[instruction, text]`` pairs (LLM2Vec style); ``instruction`` applies
        to plain strings. Instruction tokens are read but not pooled (llm2vec's
        rule: the last N tokens are pooled, N being the text's own token count).
        ``truncate=False`` raises ``InputTooLongError`` instead of cutting at
        ``max_length``. ``show_progress=True`` draws a progress bar on stderr
        (texts are then embedded in chunks of ``PROGRESS_CHUNK`` texts). See
        :class:`~._embedder.Embedder`.

        Compact vectors (:mod:`._compact`): ``dimensions=N`` keeps the first N
        components (re-normalised when ``normalize``); it is refused
        (``InvalidInputError``, ``param="dimensions"``) unless N is one of the
        truncations the call's embedding adapter was trained for
        (:meth:`trained_dimensions`, ``--matryoshka-dims``) or
        ``force_dimensions=True``. ``precision`` is ``"float32"`` (default),
        ``"int8"``/``"uint8"`` (255 buckets per dimension between the minima and
        maxima of ``calibration``: a ``(m, dim)`` array of float embeddings of
        representative texts, else of the call's own vectors) or
        ``"binary"``/``"ubinary"`` (sign bits packed 8 per byte), as
        sentence-transformers' ``quantize_embeddings``.
        """
        compact = self._check_compact(adapter, dimensions, precision, force_dimensions)
        options = EmbedOptions(
            instruction=instruction,
            normalize=normalize,
            pooling=pooling,
            batch_size=batch_size,
            adapter=adapter,
            bidirectional=bidirectional,
            truncate=truncate,
            batch_invariant=batch_invariant,
        )
        if show_progress and not isinstance(texts, str):
            vectors = self._embed_with_progress(list(texts), options)
        else:
            self._check_open()
            request = self._embedder.prepare(texts, options)
            vectors = self._embedder.submit(request).result()
        return self._compact(vectors, options, compact, calibration)

    #: texts per chunk when :meth:`embed` shows progress (one bar update per chunk)
    PROGRESS_CHUNK = 64

    def _embed_with_progress(self, texts: list[Any], options: EmbedOptions) -> np.ndarray:
        import numpy as np
        from tqdm.auto import tqdm

        kwargs = options.as_kwargs()
        if not texts:  # the usual "texts is empty" error
            return self.embed(texts, **kwargs)
        chunk = max(self.PROGRESS_CHUNK, options.batch_size or 0)
        parts = []
        with tqdm(total=len(texts), desc="Embedding", unit="text", file=sys.stderr) as bar:
            for start in range(0, len(texts), chunk):
                part = texts[start : start + chunk]
                parts.append(self.embed(part, **kwargs))
                bar.update(len(part))
        return np.concatenate(parts, axis=0)

    async def aembed(self, texts: Any, **kwargs: Any) -> np.ndarray:
        """:meth:`embed` without blocking the event loop (micro-batched with others);
        it takes the same compact-vector keywords (``dimensions``, ``precision``,
        ``force_dimensions``, ``calibration``)."""
        dimensions = kwargs.pop("dimensions", None)
        precision = kwargs.pop("precision", "float32")
        force_dimensions = bool(kwargs.pop("force_dimensions", False))
        calibration = kwargs.pop("calibration", None)
        options = EmbedOptions.from_kwargs(kwargs)
        compact = self._check_compact(options.adapter, dimensions, precision, force_dimensions)
        self._check_open()
        request = self._embedder.prepare(texts, options)
        vectors = await asyncio.wrap_future(self._embedder.submit(request))
        return self._compact(vectors, options, compact, calibration)

    # ------------------------------------------------------------ compact vectors
    def trained_dimensions(self, adapter: str | Sequence[str] | None = None) -> tuple[int, ...]:
        """The truncations (``dimensions=``) the embedding adapters of a call were
        trained for (``matryoshka_dims`` in their ``llm2vec_config.json``, written by
        ``--matryoshka-dims``), smallest first; ``()`` when none was. ``adapter`` is as
        for :meth:`embed` (``None``: the default embedding adapters; the last adapter
        that records truncations decides)."""
        from ._compact import MATRYOSHKA_KEY
        from ._llm2vec import EmbeddingConfig, EmbeddingInputError

        if adapter is None:
            names: tuple[str, ...] = self._adapters.defaults("embed")
        else:
            names = (adapter,) if isinstance(adapter, str) else tuple(adapter)
        trained: set[int] = set()
        for name in names:
            path = Path(self.adapter_path(name))
            if not path.is_dir():
                continue
            try:
                config = EmbeddingConfig.read(path)
            except EmbeddingInputError:
                continue  # loading the adapter reported it
            dims = config.extra.get(MATRYOSHKA_KEY) if config is not None else None
            if isinstance(dims, list):
                trained = {int(d) for d in dims if isinstance(d, int) and d > 0}
        return tuple(sorted(trained))

    def _check_compact(
        self, adapter: Any, dimensions: Any, precision: Any, force: bool
    ) -> tuple[int | None, str]:
        """The call's checked ``(dimensions, precision)``, before anything is embedded."""
        from ._compact import PRECISIONS, check_dimensions

        if precision not in PRECISIONS:
            raise InvalidInputError(
                f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}",
                param="precision",
            )
        if dimensions is not None and dimensions != self.hidden_size:
            where = f"adapter(s) {adapter!r}" if adapter else "this model and its adapters"
            dimensions = check_dimensions(
                dimensions,
                hidden_size=self.hidden_size,
                trained=() if force else self.trained_dimensions(adapter),
                force=bool(force),
                where=where,
            )
        return dimensions, str(precision)

    def _compact(
        self,
        vectors: np.ndarray,
        options: EmbedOptions,
        compact: tuple[int | None, str],
        calibration: Any,
    ) -> np.ndarray:
        """The float vectors of a call, cut to its ``dimensions`` and at its ``precision``."""
        import numpy as np

        from ._compact import quantize_embeddings, truncate_embeddings

        dimensions, precision = compact
        if dimensions is not None and dimensions < vectors.shape[-1]:
            normalize = (
                self._embedder.defaults.normalize
                if options.normalize is None
                else bool(options.normalize)
            )
            vectors = truncate_embeddings(vectors, dimensions, normalize=normalize)
            if calibration is not None:
                calibration = truncate_embeddings(
                    np.asarray(calibration, dtype=np.float32), dimensions, normalize=normalize
                )
        if precision == "float32":
            return vectors
        return quantize_embeddings(vectors, precision, calibration=calibration)

    # ------------------------------------------------------------------ rerank
    def rerank(
        self,
        query: str,
        documents: Sequence[str],
        *,
        top_n: int | None = None,
        instruction: str | None = None,
        adapter: str | Sequence[str] | None = None,
        batch_size: int | None = None,
        max_document_tokens: int | None = None,
    ) -> RerankResults:
        """Score each document's relevance to ``query`` with the loaded weights; the
        results are sorted by score (highest first, equal scores in input order).

        A score is ``sigmoid(logit("yes") - logit("no"))`` at the first answer
        position of the relevance prompt (:func:`~mongars_llm.runtime.rerank_messages`
        in the chat template), in ``(0, 1)`` and comparable across calls. ``top_n``
        keeps the best ``top_n`` (at most all of them); ``instruction`` replaces
        :data:`~mongars_llm.runtime.DEFAULT_RERANK_INSTRUCTION`; ``adapter`` names
        adapters (default: those loaded with ``use="rerank"`` or ``"all"``). A document
        longer than the prompt leaves room for (or than ``max_document_tokens``) is cut
        to fit, its first tokens kept; a query that leaves no room is
        ``InputTooLongError`` (``param="query"``). The result is a list of
        :class:`~mongars_llm.runtime.RerankResult` whose ``prompt_tokens`` counts the
        tokens read for every document. Torch engine only (``UnsupportedError`` on
        llama.cpp).
        """
        self._check_open()
        return self._reranker.rerank(
            query,
            documents,
            top_n=top_n,
            instruction=instruction,
            adapter=adapter,
            batch_size=batch_size,
            max_document_tokens=max_document_tokens,
        )

    async def arerank(
        self,
        query: str,
        documents: Sequence[str],
        *,
        top_n: int | None = None,
        instruction: str | None = None,
        adapter: str | Sequence[str] | None = None,
        batch_size: int | None = None,
        max_document_tokens: int | None = None,
    ) -> RerankResults:
        """:meth:`rerank` without blocking the event loop (micro-batched with others)."""
        self._check_open()
        return await self._reranker.arerank(
            query,
            documents,
            top_n=top_n,
            instruction=instruction,
            adapter=adapter,
            batch_size=batch_size,
            max_document_tokens=max_document_tokens,
        )

    # ------------------------------------------------------------------ closing
    def close(self) -> None:
        """Stop the batching workers and release the model (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._generator.close()
        self._engine.close()

    def __enter__(self) -> UnifiedLLMRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _gguf_source(path_or_repo: str | Path) -> bool:
    """Whether ``path_or_repo`` is a GGUF file: a ``.gguf`` file (``ModelLoadError``
    when its name says GGUF but no such file exists) or a file that starts with the
    GGUF magic (an Ollama blob)."""
    text = str(path_or_repo)
    if not text.lower().endswith(".gguf"):
        return is_gguf_file(text)  # a file with the GGUF magic (an Ollama blob)
    if not is_gguf_file(text):
        raise ModelLoadError(f"no GGUF file at {text!r}")
    return True


def _torch_copy_of_gguf(path: Path, settings: Settings) -> Path:
    """The transformers folder converted from ``path`` for the torch engine, made once
    under ``<cache_dir>/gguf-torch`` (keyed by the file's path, size and mtime)."""
    import hashlib

    from ..provisioning import convert_gguf

    source = path.expanduser().resolve()
    stat = source.stat()
    key = hashlib.sha256(f"{source}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    folder = Path(settings.cache_dir) / "gguf-torch" / f"{source.stem}-{key[:16]}"
    if not (folder / "config.json").is_file():
        logger.info("converting %s for the torch engine into %s (once)", source, folder)
        convert_gguf(source, folder)
    return folder
