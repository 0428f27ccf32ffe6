"""The runtime's engines: what runs a validated request on the weights.

``UnifiedLLMRuntime`` keeps one request path per kind of call — the
:class:`~._generator.Generator` (role defaults, validation, chat template,
prompt ids) and the :class:`~._embedder.Embedder` (options, pooling checks,
``(instruction, text)`` items) — and hands each prepared request to one
:class:`Engine`:

* :class:`TorchEngine`: the transformers model (CPU, CUDA, NF4), with the
  micro-batchers: compatible generations run as one ``model.generate`` call
  (:func:`~._decoding.run_generation`), embeddings as planned forward batches
  (:class:`~._embedder.TorchEmbedRunner`);
* :class:`LlamaCppRuntimeEngine`: a GGUF run as GGUF by
  :class:`~._llamacpp.LlamaCppEngine`, which batches continuously itself, so
  each request goes to it directly (no micro-batcher).

:func:`choose_engine` decides which one a load gets (``engine="auto"``: llama.cpp
for a GGUF on the CPU when ``llama_cpp`` is installed, torch otherwise) and says why;
the reason is in the load event and :meth:`UnifiedLLMRuntime.describe`.

Importing this module imports neither torch nor ``llama_cpp``.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ..errors import (
    AdapterNotFoundError,
    EmbeddingError,
    GenerationError,
    InvalidInputError,
    LLMRuntimeError,
    ModelLoadError,
    RuntimeClosedError,
    UnsupportedError,
)
from ..logging import log_event
from ._adapter_stack import AdapterStack, _Adapter
from ._batching import BatchStats, MicroBatcher, Pending
from ._params import SamplingParams

if TYPE_CHECKING:
    import numpy as np

    from ..settings import Settings
    from ._embedder import EmbedRequest, TorchEmbedRunner
    from ._llamacpp import LlamaCppEngine
    from ._llamacpp._engine import LoraAdapter
    from ._prompting import RowState, SamplingKey
    from ._reranker import RerankRequest, TorchRerankRunner
    from ._types import Generation, LoadedModel

__all__ = [
    "ENGINE_NAMES",
    "Engine",
    "EngineChoice",
    "LlamaCppAdapters",
    "LlamaCppRuntimeEngine",
    "NoAdapters",
    "TorchEngine",
    "check_engine_name",
    "choose_engine",
    "engine_device",
    "is_gguf_file",
]

logger = logging.getLogger("mongars_llm.runtime")

#: the values ``engine=`` (and ``settings.model.engine``) accept
ENGINE_NAMES: tuple[str, ...] = ("auto", "torch", "llama.cpp")

_T = TypeVar("_T")
_GGUF_MAGIC = b"GGUF"
#: device nodes of a GPU driver: NVIDIA (CUDA) and AMD (ROCm, which torch calls cuda)
_GPU_NODES = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd")


def check_engine_name(engine: Any) -> str:
    """``engine`` when it is one of :data:`ENGINE_NAMES` (``"llamacpp"`` and
    ``"llama_cpp"`` read as ``"llama.cpp"``), else ``InvalidInputError`` naming them."""
    if isinstance(engine, str):
        name = engine.strip().lower()
        if name in ("llamacpp", "llama_cpp", "llama-cpp"):
            name = "llama.cpp"
        if name in ENGINE_NAMES:
            return name
    raise InvalidInputError(
        f"unknown engine {engine!r}; choose one of: {', '.join(ENGINE_NAMES)}", param="engine"
    )


def is_gguf_file(path: str | Path) -> bool:
    """Whether ``path`` names a local GGUF file: a ``.gguf`` file, or a file that
    starts with the GGUF magic (an Ollama blob, ``blobs/sha256-<hex>``). The rest
    of the header is checked when it loads."""
    text = str(path)
    file = Path(text).expanduser()
    try:
        if not file.is_file():
            return False
        if text.lower().endswith(".gguf"):
            return True
        with file.open("rb") as handle:
            return handle.read(4) == _GGUF_MAGIC
    except OSError:
        return False


def engine_device(device: str | None, settings: Settings) -> str:
    """The device a load runs on, decided without importing torch where it cannot
    matter: ``auto`` (or unset) on a machine with no GPU driver (no NVIDIA or ROCm
    device node) is ``"cpu"``; anything else asks torch (``_loading``), which also
    checks an explicit ``cuda`` device."""
    wanted = device or settings.model.device
    if wanted == "cpu" or ((not wanted or wanted == "auto") and not _gpu_driver_present()):
        return "cpu"
    from ._loading import _resolve_device

    return _resolve_device(device, settings)


def _gpu_driver_present() -> bool:
    """Whether a GPU driver is visible (then torch may find CUDA/ROCm devices)."""
    return any(Path(p).exists() for p in _GPU_NODES)


def llama_cpp_installed() -> bool:
    """Whether the ``cpu`` extra (``llama_cpp``) can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("llama_cpp") is not None
    except (ImportError, ValueError):
        return False


@dataclass(frozen=True)
class EngineChoice:
    """The engine a load uses (``"torch"`` or ``"llama.cpp"``) and why."""

    name: str
    reason: str


def choose_engine(
    requested: str, *, source: str | Path, device: str | None, gguf: bool | None = None
) -> EngineChoice:
    """The engine for ``source`` on ``device`` (``None``: not decided yet, read as
    "cpu unless CUDA is asked for"). ``requested`` is checked by
    :func:`check_engine_name`; an explicit choice is kept as asked (its errors come when
    it loads), ``auto`` picks llama.cpp for a GGUF on the CPU with the extra installed."""
    requested = check_engine_name(requested)
    gguf = is_gguf_file(source) if gguf is None else gguf
    if requested != "auto":
        return EngineChoice(requested, f'engine="{requested}" was asked for')
    if not gguf:
        return EngineChoice("torch", "auto: the source is not a GGUF file")
    on_cpu = device is None or str(device) == "cpu"
    if not on_cpu:
        return EngineChoice("torch", f"auto: the device is {device}, llama.cpp runs here on CPUs")
    if not llama_cpp_installed():
        return EngineChoice(
            "torch",
            'auto: llama-cpp-python is not installed (pip install "mongars-llm[cpu]" for '
            "the faster CPU engine)",
        )
    return EngineChoice("llama.cpp", "auto: a GGUF file on the CPU, llama-cpp-python installed")


class Engine(Protocol):
    """What the runtime's request paths need from the thing that runs the model."""

    #: ``"torch"`` or ``"llama.cpp"``
    name: str
    #: why this engine was chosen (:func:`choose_engine`)
    reason: str

    def submit_generation(self, row: RowState, sampling: SamplingKey) -> Future[Generation]:
        """Run one prepared generation (prompt ids, limits, stops, stream)."""
        ...

    def submit_embedding(self, request: EmbedRequest) -> Future[np.ndarray]:
        """Embed one validated request; the future gets ``(n, hidden)`` float32."""
        ...

    def submit_rerank(self, request: RerankRequest) -> Future[list[float]]:
        """Score one validated rerank request; the future gets one score per document."""
        ...

    def stats(self) -> dict[str, Any]:
        """Batching counters (``{"generate": ..., "embed": ...}``)."""
        ...

    def describe(self) -> dict[str, Any]:
        """What the engine runs and how (for the load event, ``describe``, doctor)."""
        ...

    def close(self) -> None:
        """Stop the workers; queued requests fail with ``RuntimeClosedError``."""
        ...


# ----------------------------------------------------------------------- torch
@dataclass
class _GenerateRequest(Pending):
    row: RowState
    sampling: SamplingKey

    def key(self) -> Any:
        return self.sampling


class TorchEngine:
    """The transformers model with three micro-batchers: generations that share their
    :class:`~._decoding.SamplingKey` run as one ``model.generate``; embeddings that
    share their :class:`~._embedder.EmbedParams` as planned forward batches; rerank
    requests that share their :class:`~._reranker.RerankParams` as forward batches
    that read two logits per document (:class:`~._reranker.TorchRerankRunner`)."""

    name = "torch"

    def __init__(
        self, loaded: LoadedModel, *, embed_runner: TorchEmbedRunner, reason: str = ""
    ) -> None:
        self.reason = reason or "torch"
        self._loaded = loaded
        settings = loaded.settings.model
        wait_s = settings.batch_wait_ms / 1000.0
        self._generate: MicroBatcher[_GenerateRequest] = MicroBatcher(
            "generate", self._run_generation, max_size=settings.max_batch_size, wait_s=wait_s
        )
        self._runner = embed_runner
        self._embed = MicroBatcher(
            "embed", embed_runner.run_batch, max_size=settings.max_batch_size, wait_s=wait_s
        )
        self._rerank_runner: TorchRerankRunner | None = None
        self._closed = False
        self._rerank_lock = threading.Lock()
        self._rerank: MicroBatcher[Any] | None = None

    def submit_generation(self, row: RowState, sampling: SamplingKey) -> Future[Generation]:
        return self._generate.submit(_GenerateRequest(row=row, sampling=sampling))

    def submit_embedding(self, request: EmbedRequest) -> Future[np.ndarray]:
        from ._embedder import queued_embedding

        return self._embed.submit(queued_embedding(request))

    def submit_rerank(self, request: RerankRequest) -> Future[list[float]]:
        from ._reranker import TorchRerankRunner, queued_rerank

        with self._rerank_lock:  # made on first use: a runtime that never reranks has none
            if self._rerank is None:
                if self._closed:
                    raise RuntimeClosedError("this runtime is closed; build or fetch a new one")
                settings = self._loaded.settings.model
                self._rerank_runner = TorchRerankRunner(self._loaded)
                self._rerank = MicroBatcher(
                    "rerank",
                    self._rerank_runner.run_batch,
                    max_size=max(settings.max_batch_size, 1),
                    wait_s=settings.batch_wait_ms / 1000.0,
                )
            batcher = self._rerank
        return batcher.submit(queued_rerank(request))

    @property
    def generate_stats(self) -> BatchStats:
        return self._generate.stats

    @property
    def embed_stats(self) -> BatchStats:
        return self._embed.stats

    def stats(self) -> dict[str, Any]:
        stats = {"embed": self._embed.stats.to_dict(), "generate": self._generate.stats.to_dict()}
        if self._rerank is not None:
            stats["rerank"] = self._rerank.stats.to_dict()
        return stats

    def describe(self) -> dict[str, Any]:
        loaded = self._loaded
        return {
            "engine": self.name,
            "engine_reason": self.reason,
            "device": loaded.device,
            "dtype": loaded.dtype_name,
            "quantization": loaded.quantization,
        }

    def close(self) -> None:
        with self._rerank_lock:
            self._closed = True
            rerank = self._rerank
        if rerank is not None:
            rerank.close()
        self._embed.close()
        self._generate.close()

    def _run_generation(self, requests: list[_GenerateRequest]) -> None:
        """One ``model.generate`` call for a micro-batch (the batcher caps its size)."""
        import torch

        from ._decoding import run_generation

        loaded = self._loaded
        key = requests[0].sampling
        started = time.perf_counter()
        try:
            with loaded.adapters.active(key.mode), torch.inference_mode():
                results = run_generation(
                    loaded.model,
                    loaded.tokenizer,
                    [r.row for r in requests],
                    key,
                    device=loaded.device,
                    lock=loaded.tokenizer_lock,
                )
        except Exception as err:
            error = GenerationError.wrap(err, "generation failed")
            for request in requests:
                if request.row.stream is not None:
                    request.row.stream._finish(None, error)
                request.future.set_exception(error)
            return
        seconds = time.perf_counter() - started
        for request, result in zip(requests, results, strict=True):
            if request.row.stream is not None:
                request.row.stream._finish(result)
            request.future.set_result(result)
        log_event(
            logger,
            "llm_generate",
            batch_size=len(requests),
            prompt_tokens=sum(r.usage.prompt_tokens for r in results),
            completion_tokens=sum(r.usage.completion_tokens for r in results),
            adapters=",".join(key.mode) or None,
            sampling=key.do_sample,
            engine=self.name,
            device=loaded.device,
            dtype=loaded.dtype_name,
            quantization=loaded.quantization,
            seconds=round(seconds, 4),
        )


# ------------------------------------------------------------------- llama.cpp
def _count(stats: BatchStats, items: int) -> None:
    """Count a request the engine batches itself (its batches are not counted here)."""
    stats.requests += 1
    stats.items += items


class NoAdapters:
    """The adapter stack of an engine that runs no adapters yet (llama.cpp): the base
    model for every call; loading or naming an adapter is ``UnsupportedError``."""

    names: list[str] = []

    def __init__(self, engine_name: str) -> None:
        self._engine = engine_name

    def _refuse(self) -> UnsupportedError:
        return UnsupportedError(
            f"LoRA adapters are not supported by the {self._engine} engine yet; load the "
            'model with engine="torch" to use adapters'
        )

    def load(self, name: str, path: Any, *, use: str = "all") -> None:
        raise self._refuse()

    def unload(self, name: str) -> None:
        raise self._refuse()

    def set_uses(self, uses: Any) -> None:
        raise self._refuse()

    def use_of(self, name: str) -> str:
        raise KeyError(name)

    def path_of(self, name: str) -> str:
        raise KeyError(name)

    def resolve(self, adapter: Any, use: str, *, among: Any = None) -> tuple[str, ...]:
        if adapter is None or adapter == () or adapter == []:
            return ()
        raise self._refuse()

    def submit_pinned(self, mode: Any, submit: Callable[[], _T]) -> _T:
        return submit()


class LlamaCppAdapters(AdapterStack):
    """The adapter stack of the llama.cpp runtime: the torch stack's API (names,
    ``use``, defaults, pinned resolution, unload while in use, ``set_uses``), over
    GGUF LoRAs.

    A peft folder is converted once to a GGUF LoRA (:func:`~._llamacpp._lora.gguf_lora`,
    cached beside it or under ``cache_dir``; what llama.cpp cannot run is refused
    there, naming the folder and ``engine="torch"``) and loaded by llama.cpp once.
    Nothing is switched model-wide: each call hands its resolved adapters to the
    engine (:meth:`handles`), which sets them for the decode steps of that call only,
    so calls with different adapters (or none) run side by side.
    """

    def __init__(self, engine: LlamaCppEngine, *, cache_dir: str | Path) -> None:
        super().__init__(None)
        self._llama = engine
        self._cache_dir = Path(cache_dir)
        self._handles: dict[str, LoraAdapter] = {}

    def handles(self, mode: tuple[str, ...]) -> tuple[LoraAdapter, ...]:
        """The loaded adapters of a resolved (so pinned) mode, in its order."""
        with self._lock:
            return tuple(self._handles[name] for name in mode)

    def load(self, name: str, path: str | Path, *, use: str = "all") -> None:
        """Convert (once) and load adapter ``name`` from a local peft folder. Calls that
        resolved an older adapter of this name finish on it; later calls get the new one."""
        from ._adapter_stack import _USES
        from ._llamacpp._lora import gguf_lora

        if use not in _USES:
            raise InvalidInputError(
                f"adapter use {use!r} is not one of {', '.join(_USES)}", param="use"
            )
        if not name or not isinstance(name, str):
            raise InvalidInputError("an adapter needs a non-empty name", param="name")
        try:
            lora = gguf_lora(path, self._llama.info, cache_dir=self._cache_dir)
            handle = self._llama.load_lora(lora)
        except LLMRuntimeError:
            raise
        except Exception as err:
            raise ModelLoadError(
                f"could not load adapter {name!r} from {str(path)!r} on the llama.cpp engine: "
                f'{err}; load the model with engine="torch" to use it'
            ) from err
        with self._lock:  # calls that resolved the old weights of this name finish on them
            while self._pins[name] > 0:
                self._lock.wait()
            old = self._handles.get(name)
            self._retiring.pop(name, None)
            self._handles[name] = handle
            self._adapters[name] = _Adapter(name, str(path), use)  # type: ignore[arg-type]
        if old is not None:
            self._llama.free_lora(old)
        logger.info("adapter %s loaded from %s as %s (use=%s)", name, path, lora.name, use)

    def unload(self, name: str) -> None:
        with self._lock:
            if name not in self._adapters:
                raise AdapterNotFoundError(
                    f"adapter {name!r} is not loaded; loaded adapters: "
                    f"{', '.join(self._adapters) or '(none)'}"
                )
            adapter = self._adapters.pop(name)
            if self._pins[name] > 0:
                self._retiring[name] = adapter  # freed when the last call holding it ends
                return
            handle = self._handles.pop(name, None)
        if handle is not None:
            self._llama.free_lora(handle)

    def _purge(self) -> None:
        with self._lock:
            free = [name for name in self._retiring if self._pins[name] <= 0]
            handles = [self._handles.pop(name) for name in free if name in self._handles]
            for name in free:
                del self._retiring[name]
        for handle in handles:
            self._llama.free_lora(handle)


def _sampling_params(row: RowState, key: SamplingKey) -> SamplingParams:
    """The llama.cpp engine's parameters for a prepared row (greedy unless sampling)."""
    return SamplingParams(
        max_new_tokens=row.max_new_tokens,
        temperature=key.temperature if key.do_sample else 0.0,
        top_p=key.top_p,
        top_k=key.top_k,
        stop=row.stop or None,
        seed=key.seed,
        repetition_penalty=key.repetition_penalty,
    )


class LlamaCppRuntimeEngine:
    """:class:`~._llamacpp.LlamaCppEngine` behind the runtime's request paths.

    Generations go straight to the engine's continuous batcher. Embeddings are
    blocking calls on the engine (which runs them between chat steps on its own
    worker), so they are started from a small thread pool to return a future."""

    name = "llama.cpp"

    def __init__(
        self,
        engine: LlamaCppEngine,
        *,
        reason: str = "",
        max_length: int,
        tokenizer_lock: threading.RLock,
        adapters: LlamaCppAdapters | None = None,
    ) -> None:
        self.engine = engine
        self._adapters = adapters
        self._tokenizer_lock = tokenizer_lock
        self.reason = reason or "llama.cpp"
        self.max_length = max_length
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="mongars-llamacpp-embed")
        self._stats = {"generate": BatchStats(), "embed": BatchStats()}

    def submit_generation(self, row: RowState, sampling: SamplingKey) -> Future[Generation]:
        params = _sampling_params(row, sampling)
        future = self.engine.submit(
            row.prompt_ids, params, stream=row.stream, loras=self._loras(sampling.mode)
        )
        _count(self._stats["generate"], 1)
        return future

    def submit_embedding(self, request: EmbedRequest) -> Future[np.ndarray]:
        params = request.params
        items = [list(item) for item in request.items]
        loras = self._loras(params.adapters)

        def run() -> np.ndarray:
            started = time.perf_counter()
            try:
                vectors = self.engine.embed(
                    items,
                    pooling=params.pooling,
                    bidirectional=params.bidirectional,
                    normalize=params.normalize,
                    max_length=self.max_length,
                    truncate=request.truncate,
                    warn=False,  # the Embedder warned already, once
                    loras=loras,
                )
            except LLMRuntimeError:
                raise
            except Exception as err:
                raise EmbeddingError.wrap(err, "embedding failed") from err
            log_event(
                logger,
                "llm_embed",
                requests=1,
                batch_size=len(items),
                pooling=params.pooling,
                bidirectional=params.bidirectional,
                adapters=",".join(params.adapters) or None,
                engine=self.name,
                device="cpu",
                seconds=round(time.perf_counter() - started, 4),
            )
            return vectors

        try:
            future = self._pool.submit(run)
        except RuntimeError as err:  # closed meanwhile
            raise RuntimeClosedError("this runtime is closed; build or fetch a new one") from err
        _count(self._stats["embed"], len(items))
        return future

    def _loras(self, mode: tuple[str, ...]) -> tuple[LoraAdapter, ...]:
        """The llama.cpp adapters of a call's resolved mode (``()``: the base model)."""
        if not mode:
            return ()
        if self._adapters is None:
            raise UnsupportedError(
                'this llama.cpp runtime has no adapter stack; load the model with engine="torch"'
            )
        return self._adapters.handles(mode)

    def submit_rerank(self, request: RerankRequest) -> Future[list[float]]:
        raise UnsupportedError(
            "reranking is not supported by the llama.cpp engine yet; load the model with "
            'engine="torch" to rerank'
        )

    def stats(self) -> dict[str, Any]:
        return {k: v.to_dict() for k, v in self._stats.items()}

    def describe(self) -> dict[str, Any]:
        engine = self.engine
        return {
            "engine": self.name,
            "engine_reason": self.reason,
            "device": "cpu",
            "gguf": str(engine.path),
            "architecture": engine.architecture,
            "tensor_types": dict(engine.info.tensor_types),
            "n_ctx": engine.n_ctx,
            "n_batch": engine.n_batch,
            "n_threads": engine.n_threads,
            "max_sequences": engine.max_sequences,
        }

    def close(self) -> None:
        """Stop the engine; the request paths tokenise under ``tokenizer_lock``, so the
        vocabulary is marked closed under it before llama.cpp frees the model (a prompt
        being prepared meanwhile gets ``RuntimeClosedError``, never freed memory)."""
        self._pool.shutdown(wait=False)
        with self._tokenizer_lock:
            self.engine.tokenizer.closed = True
        self.engine.close()


def gguf_chat_template(metadata: dict[str, Any]) -> str | None:
    """The chat template a GGUF carries (``tokenizer.chat_template``), or None."""
    template = metadata.get("tokenizer.chat_template")
    return template if isinstance(template, str) and template.strip() else None
