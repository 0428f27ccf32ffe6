"""The model a run trains: device and precision, the base model, the LoRA wrapping, seeding.

:func:`resolve_precision` settles device and precision before any weight loads
(QLoRA off CUDA is refused there); :func:`load_base_model` loads the base causal
LM in it (4-bit for QLoRA); :func:`build_peft_model` seeds every RNG and injects
the LoRA layers, so their initialisation is reproducible.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BundleError, ConfigError
from ._config import BundleConfig

__all__ = [
    "TORCH_DTYPES",
    "Precision",
    "build_peft_model",
    "load_base_model",
    "resolve_precision",
    "seed_everything",
]

#: a precision's torch dtype name (also what the wrapper's ``config.json`` records)
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class Precision:
    """Device and precision resolved before any weights load (recorded in metadata)."""

    device: str
    precision: str  # fp32 | bf16 | fp16
    qlora: bool

    @property
    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, TORCH_DTYPES[self.precision])

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device, "precision": self.precision, "qlora": self.qlora}


def resolve_precision(config: BundleConfig) -> Precision:
    """Pick device and precision; refuse QLoRA without CUDA before anything loads.

    CPU trains in fp32 (bf16/fp16 autocast on CPU is slow and lossy for LoRA);
    CUDA uses bf16 where supported, else fp16.
    """
    import torch

    cuda = torch.cuda.is_available()
    device = config.device or ("cuda" if cuda else "cpu")
    on_cuda = device.startswith("cuda")
    if config.qlora:
        if not on_cuda or not cuda:
            raise ConfigError(
                "QLoRA (qlora=true) needs a CUDA GPU and bitsandbytes; this machine has "
                f"{'no CUDA device' if not cuda else 'device=' + device}. Train plain LoRA "
                "(drop --qlora) or run on a CUDA machine"
            )
        from .._extras import require

        require("bitsandbytes", "quant", feature="QLoRA training")
    if on_cuda and not cuda:
        raise ConfigError(f"device={device!r} but CUDA is not available; use device='cpu'")
    precision = config.precision
    if precision == "auto":  # fp32 on CPU: bf16 there is slow and lossy for LoRA
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if on_cuda else "fp32"
    if precision == "fp16" and not on_cuda:
        raise ConfigError("precision='fp16' is not supported for CPU training; use fp32 or bf16")
    return Precision(device=device, precision=precision, qlora=config.qlora)


def load_base_model(
    config: BundleConfig, precision: Precision, *, source: str | Path | None = None
) -> Any:
    """Load the base causal LM in the resolved precision (4-bit when QLoRA); ``source``
    (a provisioned copy of ``config.base_model``) is read instead of the Hub."""
    from transformers import AutoModelForCausalLM

    loader: Any = AutoModelForCausalLM
    kwargs: dict[str, Any] = {
        "revision": None if source is not None else config.base_model_revision,
        "trust_remote_code": config.trust_remote_code,
        "dtype": precision.torch_dtype,
    }
    if precision.qlora:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=precision.torch_dtype,
            bnb_4bit_use_double_quant=True,
        )
        kwargs["device_map"] = {"": precision.device}
    try:
        model = loader.from_pretrained(str(source or config.base_model), **kwargs)
    except (OSError, ValueError) as err:
        raise BundleError(f"cannot load the base model {config.base_model!r}: {err}") from err
    if precision.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model.to(precision.device)
    model.config.use_cache = False
    return model


def build_peft_model(model: Any, config: BundleConfig) -> Any:
    """Seed every RNG, then inject the LoRA layers (so their init is reproducible)."""
    from peft import LoraConfig, get_peft_model

    seed_everything(config.seed)
    target: Any = config.target_modules
    if target == ["all-linear"]:
        target = "all-linear"
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=target,
        modules_to_save=config.modules_to_save,
        task_type="CAUSAL_LM",
    )
    from ..runtime import quiet_peft_deprecations

    try:
        with quiet_peft_deprecations():
            return get_peft_model(model, lora)
    except ValueError as err:
        raise ConfigError(f"cannot build the LoRA adapter: {err}") from err


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's RNGs (every CUDA device's too)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
