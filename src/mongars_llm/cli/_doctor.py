"""``mongars-llm doctor``'s report: what this machine can run, and what we recommend.

Everything here is read, never changed. Versions come from package metadata so
that a broken install is reported rather than crashing the report.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import sys
from pathlib import Path
from typing import Any

from ..settings import Settings, get_settings

__all__ = ["cpu_bf16_flags", "diagnose"]

_PACKAGES = (
    "mongars-llm",
    "torch",
    "transformers",
    "peft",
    "huggingface_hub",
    "accelerate",
    "bitsandbytes",
    "llama-cpp-python",
    "fastapi",
    "ray",
)


def cpu_bf16_flags() -> list[str]:
    """CPU flags that make bf16 matmuls fast (AVX512-BF16, AMX); empty when unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _dir_size(path: Path) -> int | None:
    if not path.exists():
        return None
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # a file removed while we walk
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _cuda() -> dict[str, Any]:
    if _version("torch") is None:
        return {"available": False, "reason": "torch is not installed", "devices": []}
    try:
        import torch
    except Exception as err:  # a broken torch install is a finding, not a crash
        return {"available": False, "reason": f"torch failed to import: {err}", "devices": []}
    if not torch.cuda.is_available():
        return {"available": False, "reason": "no CUDA device visible to torch", "devices": []}
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        devices.append(
            {
                "index": index,
                "name": props.name,
                "memory_gib": round(props.total_memory / 2**30, 1),
                "capability": f"{props.major}.{props.minor}",
                "bf16": bool(torch.cuda.is_bf16_supported()),
            }
        )
    return {"available": True, "cuda_version": torch.version.cuda, "devices": devices}


def _cpu_threads(settings: Settings) -> dict[str, Any]:
    """The torch CPU threads the runtime will use here, and why (never changes them)."""
    if _version("torch") is None:
        return {"runtime": None, "torch_default": None, "why": "torch is not installed"}
    try:
        import torch

        from ..runtime import choose_cpu_threads, usable_cpus
    except Exception as err:  # a broken torch install is a finding, not a crash
        return {"runtime": None, "torch_default": None, "why": f"torch failed to import: {err}"}
    threads, why = choose_cpu_threads(settings.model.cpu_threads)
    return {
        "runtime": threads if threads is not None else torch.get_num_threads(),
        "torch_default": torch.get_num_threads(),
        "usable_cpus": usable_cpus(),
        "why": why,
    }


def _engine(settings: Settings, cuda: dict[str, Any]) -> dict[str, Any]:
    """Which engine a GGUF model gets here with these settings, and why (nothing loads)."""
    from ..runtime import choose_engine

    device = settings.model.device
    if not device or device == "auto":
        device = "cuda" if cuda["available"] else "cpu"
    choice = choose_engine(settings.model.engine, source="model.gguf", device=device, gguf=True)
    return {"setting": settings.model.engine, "gguf": choice.name, "why": choice.reason}


def diagnose(settings: Settings | None = None) -> dict[str, Any]:
    """The doctor report as a JSON-serialisable dict."""
    settings = settings or get_settings()
    cuda = _cuda()
    bf16_flags = cpu_bf16_flags()
    bnb = _version("bitsandbytes")
    four_bit_possible = bool(cuda["available"] and bnb)
    if four_bit_possible:
        reason_4bit = "CUDA and bitsandbytes are present"
    elif not cuda["available"]:
        reason_4bit = f"needs CUDA ({cuda['reason']})"
    else:
        reason_4bit = 'needs bitsandbytes: pip install "mongars-llm[quant]"'

    if four_bit_possible and settings.model.quantize_4bit:
        recommendation = "CUDA with 4-bit NF4 (settings.model.quantize_4bit is on)."
    elif cuda["available"]:
        recommendation = "CUDA in bf16; install the [quant] extra for 4-bit NF4 on smaller GPUs."
    elif bf16_flags:
        recommendation = f"CPU in bf16 (this CPU has {', '.join(bf16_flags)})."
    else:
        from .._machine import smol_available

        small = "smol" if smol_available() else "small"  # what a bare command picks here
        recommendation = (
            "CPU in fp32 (this CPU lacks AVX512-BF16/AMX, where bf16 would be slower); "
            f"prefer a small model such as the {small!r} profile."
        )

    models_dir = settings.resolved_models_dir
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in _PACKAGES},
        "cuda": cuda,
        "cpu": {
            "cores": os.cpu_count(),
            "bf16_flags": bf16_flags,
            "bf16_fast": bool(bf16_flags),
            "threads": _cpu_threads(settings),
        },
        "quantization_4bit": {"possible": four_bit_possible, "why": reason_4bit},
        "engine": _engine(settings, cuda),
        "cache": {
            "cache_dir": str(settings.cache_dir),
            "cache_dir_bytes": _dir_size(settings.cache_dir),
            "models_dir": str(models_dir),
            "models_dir_bytes": _dir_size(models_dir),
        },
        # SecretStr fields serialise as '**********' in JSON mode: secrets stay masked.
        "settings": settings.model_dump(mode="json"),
        "profile": _active_profile(settings),
        "recommendation": recommendation,
    }


def _active_profile(settings: Settings) -> dict[str, Any]:
    """The profile ``serve``, ``chat`` and ``provision`` use with no ``--profile``."""
    from ..errors import MongarsError
    from ..manager import ModelManager

    try:
        manager = ModelManager(settings=settings)
    except MongarsError as err:
        return {"active": None, "manifest": None, "models": [], "reason": str(err)}
    return {
        "active": manager.profile_name,
        "manifest": manager.manifest_source,
        "models": sorted({entry.name for entry in manager.profile.models.values()}),
        "reason": manager.profile_reason,
    }
