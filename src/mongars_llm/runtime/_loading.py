"""Loading a checkpoint once: what to load, device, dtype, 4-bit quantisation, threads.

:func:`resolve_checkpoint` decides *what* loads for ``from_pretrained``: the
adapter arguments (:func:`adapter_specs`), a provisioned local copy of a Hub
model, and LLM2Vec layouts (an MNTP adapter folder naming its base model, and
``llm2vec_config.json`` defaults), all in one place. :func:`plan_load` decides
*how* (device, dtype, quantisation), :func:`load_causal_lm` loads the model
and tokenizer, :func:`use_cpu_threads` sets torch's CPU threads when asked to.

Precision follows DESIGN §3: NF4/FP4 4-bit (bitsandbytes, all four ``bnb_4bit_*``
settings) when CUDA is present and enabled; otherwise bf16 on CPUs with native
bf16 arithmetic (AMX or AVX512-BF16), else fp32. fp16 is never used on a CPU.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InvalidInputError, LLMRuntimeError, ModelLoadError
from ..logging import log_event
from ._adapter_stack import AdapterSpec, adapter_specs  # torch-free: llama.cpp reads them too

if TYPE_CHECKING:
    from ..settings import Settings
    from ._llm2vec import EmbeddingConfig

__all__ = [
    "AdapterSpec",
    "Checkpoint",
    "LoadPlan",
    "QuantizationFallbackWarning",
    "adapter_specs",
    "choose_cpu_threads",
    "cpu_supports_bf16",
    "detect_llm2vec_layout",
    "load_causal_lm",
    "no_loading_bars",
    "plan_load",
    "quiet_loading_bars",
    "resolve_checkpoint",
    "use_cpu_threads",
]

logger = logging.getLogger("mongars_llm.runtime")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class QuantizationFallbackWarning(UserWarning):
    """4-bit loading was asked for but is impossible here (no CUDA); weights load unquantised."""


@functools.cache
def cpu_supports_bf16() -> bool:
    """True when the CPU computes bf16 natively (AMX-BF16 or AVX512-BF16).

    Without it, PyTorch emulates bf16 matmuls and they are slower than fp32.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    capability = str(getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()).upper()
    return "AMX" in capability or "BF16" in capability


def choose_cpu_threads(requested: int | None) -> tuple[int | None, str]:
    """Torch CPU threads for the model, and why: ``(None, why)`` leaves torch's setting alone.

    ``requested`` is ``settings.model.cpu_threads``. A number is set (torch's
    thread count is process-wide, so it applies to the whole process). Unset
    (or ``0``), the library leaves torch's thread count as it is: torch's
    default (one per core, or ``OMP_NUM_THREADS``), or whatever the caller set
    with ``torch.set_num_threads``. A library does not change process-wide
    state unless asked. ``mongars-llm serve`` keeps torch's default too:
    docs/performance.md#threads has the measurements, and when fewer threads
    serve more (clients on the same cores).
    """
    if requested:
        return requested, f"{requested} (settings.model.cpu_threads)"
    current = torch.get_num_threads()
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(name, "").strip():
            return None, f"torch default ({current}), from {name}={os.environ[name]}"
    return None, f"torch default ({current})"


def _parse_dtype(value: Any) -> torch.dtype | None:
    if value is None or value == "auto":
        return None
    if isinstance(value, torch.dtype):
        return value
    try:
        return _DTYPES[str(value).lower().removeprefix("torch.")]
    except KeyError:
        raise InvalidInputError(
            f"unknown dtype {value!r}; use one of auto, float32, bfloat16, float16",
            param="dtype",
        ) from None


@dataclass
class LoadPlan:
    """Where and how the weights load, decided before anything is read."""

    device: str
    dtype: torch.dtype
    quantization: str | None = None  # "nf4" | "fp4"
    quantization_config: Any = None
    notes: list[str] = field(default_factory=list)


def _resolve_device(device: str | None, settings: Settings) -> str:
    device = device or settings.model.device
    if not device or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"device {device!r} was asked for but CUDA is not available; "
                "use device='cpu' or unset MONGARS_MODEL__DEVICE"
            )
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"device {device!r} does not exist ({torch.cuda.device_count()} CUDA device(s))"
            )
    return device


def plan_load(
    *,
    device: str | None,
    dtype: Any,
    quantize_4bit: bool | None,
    settings: Settings,
) -> LoadPlan:
    """Decide device, dtype and quantisation from arguments > settings > hardware."""
    model_settings = settings.model
    resolved_device = _resolve_device(device, settings)
    on_cuda = resolved_device.startswith("cuda")
    explicit_dtype = _parse_dtype(dtype) or _parse_dtype(model_settings.dtype)
    notes: list[str] = []

    if on_cuda:
        chosen = explicit_dtype or (
            torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        )
    else:
        if explicit_dtype is torch.float16:
            warnings.warn(
                "float16 is not used on CPU (slow and lossy there); loading in float32 instead",
                UserWarning,
                stacklevel=3,
            )
            explicit_dtype = torch.float32
        chosen = explicit_dtype or (torch.bfloat16 if cpu_supports_bf16() else torch.float32)
        if explicit_dtype is None:
            notes.append(
                "cpu dtype: "
                + ("bf16 (native bf16)" if chosen is torch.bfloat16 else "fp32 (no native bf16)")
            )

    # 4-bit: an explicit argument, or a setting the user set, is a request; the
    # default setting (True) means "when CUDA is available".
    asked = quantize_4bit if quantize_4bit is not None else model_settings.quantize_4bit
    explicitly_asked = quantize_4bit is True or (
        quantize_4bit is None
        and model_settings.quantize_4bit
        and "quantize_4bit" in model_settings.model_fields_set
    )
    plan = LoadPlan(device=resolved_device, dtype=chosen, notes=notes)
    if not asked:
        return plan
    if not on_cuda:
        if explicitly_asked:
            if model_settings.strict_quantization:
                raise ModelLoadError(
                    f"4-bit quantisation was requested but the model loads on "
                    f"{resolved_device!r} (no CUDA device), and strict quantisation "
                    "(MONGARS_MODEL__STRICT_QUANTIZATION=true) refuses to load unquantised "
                    "weights. Load on a CUDA device, or set quantize_4bit=False "
                    "(MONGARS_MODEL__QUANTIZE_4BIT=false) to load unquantised."
                )
            message = (
                f"4-bit quantisation was requested but the model loads on {resolved_device!r} "
                "(no CUDA device): loading unquantised weights in "
                f"{str(chosen).removeprefix('torch.')} instead. Set quantize_4bit=False "
                "(MONGARS_MODEL__QUANTIZE_4BIT=false) to silence this, or "
                "MONGARS_MODEL__STRICT_QUANTIZATION=true to make it an error."
            )
            warnings.warn(message, QuantizationFallbackWarning, stacklevel=3)
            logger.warning("%s", message)
        else:
            notes.append("4-bit: off (no CUDA)")
        return plan

    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        message = (
            '4-bit quantisation needs bitsandbytes: pip install "mongars-llm[quant]" '
            "(or set MONGARS_MODEL__QUANTIZE_4BIT=false)"
        )
        if model_settings.strict_quantization or explicitly_asked:
            raise ModelLoadError(message) from err
        warnings.warn(message + "; loading unquantised", QuantizationFallbackWarning, stacklevel=3)
        return plan

    from transformers import BitsAndBytesConfig

    compute_dtype = _DTYPES[model_settings.bnb_4bit_compute_dtype]
    plan.quantization = model_settings.bnb_4bit_quant_type
    plan.quantization_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model_settings.bnb_4bit_quant_type,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=model_settings.bnb_4bit_use_double_quant,
    )
    plan.dtype = compute_dtype if explicit_dtype is None else explicit_dtype
    return plan


def use_cpu_threads(plan: LoadPlan, settings: Settings) -> None:
    """On a CPU plan, set torch's thread count when the settings ask for one
    (:func:`choose_cpu_threads`); the count is noted in the plan either way."""
    if plan.device.startswith("cuda"):
        return
    threads, why = choose_cpu_threads(settings.model.cpu_threads)
    if threads is not None:
        torch.set_num_threads(threads)
    plan.notes.append(f"cpu threads: {why}")


@dataclass
class Llm2VecLayout:
    """A published LLM2Vec directory: a LoRA adapter (MNTP) naming its base model."""

    base: str
    adapter_dir: Path


def _adapter_base(adapter_dir: Path) -> str | None:
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        return None
    base = json.loads(config_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        return None
    candidate = (adapter_dir / base).resolve()
    return str(candidate) if candidate.exists() else str(base)


def detect_llm2vec_layout(path: str | Path) -> Llm2VecLayout | None:
    """An adapter directory (``adapter_config.json``) is loaded as base + adapter.

    The base is the adapter's ``base_model_name_or_path`` (resolved relative to
    the adapter directory first).
    """
    adapter_dir = Path(path)
    if not adapter_dir.is_dir():
        return None
    base = _adapter_base(adapter_dir)
    if base is None:
        return None
    return Llm2VecLayout(base=base, adapter_dir=adapter_dir)


@dataclass(frozen=True)
class Checkpoint:
    """What one ``from_pretrained`` call loads, once LLM2Vec layouts are unfolded."""

    #: folder or Hub id of the causal LM's weights (a provisioned copy when there is one)
    source: str
    revision: str | None
    #: where the tokenizer comes from when not ``source`` (an LLM2Vec adapter folder)
    tokenizer_source: str | None
    #: the model id that LLM2Vec's prompt formats key on (the published base model's)
    prompt_model_id: str
    adapters: tuple[AdapterSpec, ...]
    #: embedding defaults: the call's, else ``llm2vec_config.json``'s, else the library's
    pooling: str
    max_length: int | None
    bidirectional: bool
    #: True for a published LLM2Vec layout (an MNTP adapter folder naming its base)
    llm2vec: bool = False


def resolve_checkpoint(
    path_or_repo: str | Path,
    *,
    settings: Settings,
    adapters: Any = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    pooling: str | None = None,
    max_length: int | None = None,
    bidirectional: bool | None = None,
) -> Checkpoint:
    """Decide what to load for ``path_or_repo``, before anything heavy is read.

    A Hub id that ``provision`` installed loads from that copy. A directory
    holding a LoRA adapter (``adapter_config.json``), such as a published
    LLM2Vec MNTP repo, loads as its base model plus that adapter (named
    ``"mntp"``, ``use="embed"``), with the adapter folder's tokenizer when it
    has one; ``bidirectional=None`` then means on. The ``llm2vec_config.json``
    (:class:`~._llm2vec.EmbeddingConfig`) of the last ``use="embed"`` adapter
    that has one supplies ``pooling`` and ``max_length`` when they are ``None``;
    a wrong one is an :class:`InvalidInputError` naming the file.
    """
    from .._sources import check_model_source
    from ..provisioning import provisioned_copy

    source = check_model_source(path_or_repo, error=ModelLoadError)  # a missing folder
    specs = adapter_specs(adapters)
    prompt_model_id = source
    # weights `provision` installed are loaded from there, not fetched again
    local_copy = provisioned_copy(
        source, revision=revision, settings=settings, trust_remote_code=trust_remote_code
    )
    if local_copy is not None:
        source, revision = str(local_copy.path), None
    layout = detect_llm2vec_layout(source)
    tokenizer_source = None
    if layout is not None:
        specs.insert(0, AdapterSpec("mntp", str(layout.adapter_dir), "embed"))
        if (layout.adapter_dir / "tokenizer_config.json").is_file():
            tokenizer_source = str(layout.adapter_dir)
        config_path = layout.adapter_dir / "config.json"
        name = None
        if config_path.is_file():
            name = json.loads(config_path.read_text(encoding="utf-8")).get("_name_or_path")
        prompt_model_id = str(name or layout.base)
        source = layout.base
        base_copy = provisioned_copy(source, settings=settings)
        if base_copy is not None:
            source = str(base_copy.path)
        if bidirectional is None:
            bidirectional = True
    trained = _trained_embedding(specs)
    return Checkpoint(
        source=source,
        revision=revision,
        tokenizer_source=tokenizer_source,
        prompt_model_id=prompt_model_id,
        adapters=tuple(specs),
        pooling=pooling or trained.pooling,
        max_length=max_length or trained.max_length,
        bidirectional=bool(bidirectional),
        llm2vec=layout is not None,
    )


def _trained_embedding(specs: list[AdapterSpec]) -> EmbeddingConfig:
    """The embedding settings of the last ``use="embed"`` adapter folder that has an
    ``llm2vec_config.json``, else the defaults."""
    from ._embedder import library_error
    from ._llm2vec import EmbeddingConfig, EmbeddingInputError

    trained = EmbeddingConfig()
    for spec in specs:
        if spec.use == "embed" and Path(spec.path).is_dir():
            try:
                trained = EmbeddingConfig.read(spec.path) or trained
            except EmbeddingInputError as err:
                raise library_error(err) from err
    return trained


def load_causal_lm(
    source: str,
    plan: LoadPlan,
    *,
    trust_remote_code: bool = False,
    revision: str | None = None,
    token: str | None = None,
    tokenizer_source: str | None = None,
) -> tuple[Any, Any]:
    """Load the causal LM and its tokenizer once, per ``plan``; sdpa attention."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {
        "dtype": plan.dtype,
        "trust_remote_code": trust_remote_code,
        "attn_implementation": "sdpa",
        "low_cpu_mem_usage": True,
    }
    if revision:
        kwargs["revision"] = revision
    if token:
        kwargs["token"] = token
    if plan.quantization_config is not None:
        kwargs["quantization_config"] = plan.quantization_config
        kwargs["device_map"] = {"": plan.device}
    try:
        with quiet_loading_bars(source):
            tokenizer = AutoTokenizer.from_pretrained(
                tokenizer_source or source,
                trust_remote_code=trust_remote_code,
                **({"revision": revision} if revision and not tokenizer_source else {}),
                **({"token": token} if token else {}),
            )
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except LLMRuntimeError:
        raise
    except Exception as err:
        raise ModelLoadError(
            f"could not load the model from {source!r}: {err}. Check that the path is a "
            "Hugging Face checkpoint directory (config.json + *.safetensors + tokenizer) "
            "or a Hub repo id you can access"
        ) from err
    if plan.quantization_config is None:
        model.to(plan.device)  # type: ignore[arg-type]
    model.eval()
    model.requires_grad_(False)
    from ._decoding import check_tokenizer_template

    check_tokenizer_template(tokenizer, source)  # a broken one fails here, not on a request
    if tokenizer.pad_token_id is None:
        # LLM2Vec and most decoder-only recipes pad with EOS; padded positions are masked.
        tokenizer.pad_token = tokenizer.eos_token
    log_event(
        logger,
        "llm_runtime_plan",
        logging.DEBUG,
        source=source,
        device=plan.device,
        dtype=str(plan.dtype).removeprefix("torch."),
        quantization=plan.quantization,
    )
    return model, tokenizer


#: weights smaller than this load without transformers' "Loading weights" bar (it
#: would flash for a fraction of a second); bigger ones, and Hub downloads, keep it
QUIET_LOAD_BYTES = 2 * 1024**3


@contextlib.contextmanager
def no_loading_bars() -> Iterator[None]:
    """No transformers/Hub bars ("Loading weights", "Writing model shards") meanwhile;
    the caller's setting is restored after."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if was_enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def quiet_loading_bars(source: str) -> Iterator[None]:
    """:func:`no_loading_bars` for a local model under :data:`QUIET_LOAD_BYTES`."""
    folder = Path(source).expanduser()
    weights = 0
    if folder.is_dir():
        weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        weights += sum(p.stat().st_size for p in folder.glob("*.bin"))
    with (
        no_loading_bars()
        if folder.is_dir() and weights < QUIET_LOAD_BYTES
        else contextlib.nullcontext()
    ):
        yield
