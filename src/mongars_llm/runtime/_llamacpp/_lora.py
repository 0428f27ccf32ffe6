"""A peft LoRA folder as a GGUF LoRA that llama.cpp loads on the base GGUF.

:func:`gguf_lora` turns ``adapter_config.json`` + ``adapter_model.safetensors``
(as the project's training writes them; a stacked adapter is an ordinary peft
folder of a larger rank) into the file llama.cpp's ``llama_adapter_lora_init``
reads, written with the ``gguf`` package's writer in the layout of llama.cpp's
own ``convert_lora_to_gguf.py``:

* metadata ``general.architecture`` (the base GGUF's), ``general.type =
  "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha``; llama.cpp
  scales each product ``B·A`` by ``alpha / rank`` (the rank of that tensor);
* per adapted matrix ``blk.N.attn_q.weight`` (the base tensor's name), two
  float32 tensors ``….lora_a`` (peft's ``lora_A``, ``(rank, in)``) and
  ``….lora_b`` (peft's ``lora_B``, ``(out, rank)``), so that in GGUF order
  ``lora_a.ne = (in, rank)`` and ``lora_b.ne = (rank, out)`` as llama.cpp checks;
* for Llama, ``lora_B`` of ``q_proj``/``k_proj`` gets the row permutation
  llama.cpp's converter applies to those weights (the GGUF stores them
  permuted for its rope layout; ``ΔW = B·A``, so permuting the rows of ``B``
  permutes the rows of ``ΔW``); ``lora_A`` is unchanged;
* peft's scaling (``alpha/r``, ``alpha/√r`` with rslora, ``alpha_pattern``)
  that ``alpha / rank`` cannot express is folded into ``lora_B``.

Everything is checked before llama.cpp sees the file (llama.cpp aborts on some
asserts): a config or tensor it cannot run — DoRA, ``modules_to_save``, LoRA
biases, embedding LoRA, a module the base GGUF has no tensor for, a shape that
does not fit — is an :class:`~mongars_llm.errors.UnsupportedError` (or
:class:`~mongars_llm.errors.ModelLoadError` for a broken file) naming the
folder and the fallback, ``engine="torch"``.

The file is written once, beside the adapter (``adapter_model.<digest>.gguf``)
or, when that folder is read-only, under ``<cache_dir>/gguf-lora/``; the digest
covers the adapter's config and weights and the base facts the layout depends
on, so a retrained adapter gets a new file. Importing this module imports
neither torch, ``gguf`` nor ``llama_cpp``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import MissingExtraError, ModelLoadError, UnsupportedError
from ._gguf import GGUFInfo

__all__ = ["LORA_FORMAT", "gguf_lora", "read_safetensors"]

logger = logging.getLogger("mongars_llm.runtime.llamacpp")

#: bumped when the written layout changes (part of the cache key)
LORA_FORMAT = 1
_FALLBACK = 'load the model with engine="torch" to use this adapter'
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>A|B)\.weight$")
#: architectures whose GGUF stores q/k rows permuted (llama.cpp's ``LlamaModel.permute``)
_PERMUTED_QK = frozenset({"llama"})
#: architectures checked here (linear LoRA maps one-to-one onto their GGUF tensors)
_SUPPORTED = frozenset({"llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3"})
_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16}


def _unsupported(folder: Path, why: str) -> UnsupportedError:
    return UnsupportedError(
        f"adapter {folder}: {why}; the llama.cpp engine cannot run it, so {_FALLBACK}"
    )


def _broken(folder: Path, why: str) -> ModelLoadError:
    return ModelLoadError(
        f"adapter {folder}: {why}; check the folder (train or copy it again), or {_FALLBACK}"
    )


def read_safetensors(file: Path, *, folder: Path) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file as float32 arrays (F32, F16, BF16, F64),
    without torch; a malformed file is a :class:`ModelLoadError` naming it."""
    try:
        data = file.read_bytes()
    except OSError as err:
        raise _broken(folder, f"cannot read {file.name} ({err})") from err
    size = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if not 0 < size <= min(_MAX_HEADER_BYTES, len(data) - 8):
        raise _broken(folder, f"{file.name} is not a safetensors file (no valid header)")
    try:
        header = json.loads(data[8 : 8 + size])
    except ValueError as err:
        raise _broken(folder, f"{file.name} has a malformed header ({err})") from err
    if not isinstance(header, dict):
        raise _broken(folder, f"{file.name} has no tensor table")
    body = memoryview(data)[8 + size :]
    out: dict[str, np.ndarray] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = [int(n) for n in info["shape"]]
            start, end = (int(n) for n in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise _broken(
                folder, f"{file.name}: tensor {key!r} is described badly ({err})"
            ) from err
        count = math.prod(shape)
        if not 0 <= start <= end <= len(body) or end - start != count * np.dtype(dtype).itemsize:
            raise _broken(
                folder,
                f"{file.name}: tensor {key!r} lies outside the file or has the wrong size "
                "(the file is truncated or corrupt)",
            )
        raw = np.frombuffer(body[start:end], dtype=dtype).reshape(shape)
        if info["dtype"] == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        out[key] = np.ascontiguousarray(raw, dtype=np.float32)
    return out


def _config(folder: Path) -> tuple[dict[str, Any], bytes]:
    file = folder / "adapter_config.json"
    try:
        raw = file.read_bytes()
        config = json.loads(raw)
    except FileNotFoundError:
        raise _broken(
            folder,
            "no adapter_config.json (a peft LoRA folder holds adapter_config.json + "
            "adapter_model.safetensors)",
        ) from None
    except (OSError, ValueError) as err:
        raise _broken(folder, f"cannot read adapter_config.json ({err})") from err
    if not isinstance(config, dict):
        raise _broken(folder, "adapter_config.json is not a JSON object")
    return config, raw


def _check_config(folder: Path, config: dict[str, Any]) -> None:
    """Refuse peft features llama.cpp's LoRA has no counterpart for."""
    kind = str(config.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise _unsupported(folder, f"it is a {kind} adapter, llama.cpp runs LoRA adapters only")
    if config.get("use_dora"):
        raise _unsupported(folder, "it is a DoRA adapter (use_dora), which llama.cpp does not run")
    if config.get("modules_to_save"):
        raise _unsupported(
            folder,
            f"it trains whole modules too (modules_to_save: {config['modules_to_save']}), which a "
            "GGUF LoRA cannot carry",
        )
    if str(config.get("bias", "none")) != "none" or config.get("lora_bias"):
        raise _unsupported(
            folder, "it trains biases (bias/lora_bias), which a GGUF LoRA cannot carry"
        )
    for key in (
        "layer_replication",
        "trainable_token_indices",
        "alora_invocation_tokens",
        "target_parameters",
        "fan_in_fan_out",
        "use_qalora",
        "use_bdlora",
        "arrow_config",
    ):
        if config.get(key):
            raise _unsupported(folder, f"it uses peft's {key}, which llama.cpp does not run")
    alpha = config.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha < 0:
        raise _broken(folder, f"adapter_config.json has lora_alpha {alpha!r}; it is a number >= 0")


def _alpha_for(module: str, config: dict[str, Any]) -> float:
    """peft's alpha for ``module`` (``alpha_pattern`` keys match name suffixes)."""
    for key, value in dict(config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return float(value)
    return float(config.get("lora_alpha", 8))


def _permute_rows(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` of a q/k projection's output rows."""
    rows = weights.shape[0]
    return (
        weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _base_key(info: GGUFInfo) -> str:
    arch = info.architecture
    meta = info.metadata
    return "|".join(
        str(v)
        for v in (
            arch,
            meta.get(f"{arch}.block_count"),
            meta.get(f"{arch}.attention.head_count"),
            meta.get(f"{arch}.attention.head_count_kv"),
            meta.get(f"{arch}.embedding_length"),
        )
    )


def _tensor_name_map(info: GGUFInfo) -> Any:
    try:
        import gguf
    except ImportError as err:
        raise MissingExtraError(
            "gguf", "cpu", feature="LoRA adapters on the llama.cpp engine"
        ) from err
    arch = info.architecture
    by_name = {name: member for member, name in gguf.MODEL_ARCH_NAMES.items()}
    blocks = int(info.metadata.get(f"{arch}.block_count", 0) or 0)
    return gguf.get_tensor_name_map(by_name[arch], blocks)


def _gguf_name(module: str, names: Any, info: GGUFInfo) -> str | None:
    """The base GGUF tensor a peft module name adapts (``model.layers.0.self_attn.q_proj``
    or LLM2Vec's decoder-only ``layers.0.self_attn.q_proj`` -> ``blk.0.attn_q.weight``)."""
    for candidate in (module, f"model.{module}"):
        name = names.get_name(candidate)
        if name is not None and f"{name}.weight" in info.tensor_shapes:
            return f"{name}.weight"
    return None


def gguf_lora(
    folder: str | os.PathLike[str], base: GGUFInfo, *, cache_dir: str | os.PathLike[str]
) -> Path:
    """The GGUF LoRA of the peft folder ``folder`` for the base model ``base``,
    converted on the first call and reused after (see the module's docstring)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(
            f"no adapter folder at {str(folder)!r}: the llama.cpp engine loads local peft LoRA "
            "folders (adapter_config.json + adapter_model.safetensors)"
        )
    arch = base.architecture
    if arch not in _SUPPORTED:
        raise _unsupported(folder, f"LoRA on a {arch!r} GGUF is not converted here")
    config, config_raw = _config(folder)
    _check_config(folder, config)
    weights_file = folder / "adapter_model.safetensors"
    if not weights_file.is_file():
        why = (
            "its weights are in adapter_model.bin (a pickle); save them as safetensors"
            if (folder / "adapter_model.bin").is_file()
            else "no adapter_model.safetensors"
        )
        raise _broken(folder, why)
    digest = hashlib.sha256()
    digest.update(f"mongars-lora-gguf:{LORA_FORMAT}|{_base_key(base)}|".encode())
    digest.update(config_raw)
    with weights_file.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    key = digest.hexdigest()[:16]
    beside = folder / f"adapter_model.{key}.gguf"
    cached = Path(cache_dir).expanduser() / "gguf-lora" / f"{folder.name}-{key}.gguf"
    for existing in (beside, cached):
        if existing.is_file():
            return existing
    tensors = _convert(folder, config, read_safetensors(weights_file, folder=folder), base)
    for target in (beside, cached):
        try:
            _write(target, arch, float(config.get("lora_alpha", 8)) or 1.0, tensors)
        except OSError as err:
            logger.debug("cannot write %s (%s)", target, err)
            continue
        logger.info("adapter %s converted for llama.cpp into %s (once)", folder, target)
        return target
    raise ModelLoadError(
        f"adapter {folder}: cannot write its GGUF LoRA beside it nor under {cached.parent}; "
        "make one of them writable"
    )


def _convert(
    folder: Path, config: dict[str, Any], weights: dict[str, np.ndarray], base: GGUFInfo
) -> list[tuple[str, np.ndarray]]:
    """``(name, float32 array)`` pairs in llama.cpp's LoRA layout, checked."""
    names = _tensor_name_map(base)
    arch = base.architecture
    pairs: dict[str, dict[str, np.ndarray]] = {}
    modules: dict[str, str] = {}
    for key, value in weights.items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise _unsupported(
                folder,
                f"adapter_model.safetensors holds {key!r}, which is not a LoRA A/B matrix of a "
                "linear layer (embedding LoRA, biases, DoRA magnitudes or saved modules)",
            )
        module = match["module"]
        target = _gguf_name(module, names, base)
        if target is None:
            raise _unsupported(
                folder,
                f"it adapts {module!r}, for which this GGUF has no tensor llama.cpp can adapt",
            )
        if target.startswith("token_embd"):
            raise _unsupported(folder, f"it adapts the token embeddings ({module!r})")
        if value.ndim != 2 or not np.isfinite(value).all():
            raise _broken(folder, f"{key} is not a finite 2-D matrix (shape {list(value.shape)})")
        pairs.setdefault(target, {})[match["part"]] = value
        modules[target] = module
    if not pairs:
        raise _broken(folder, "adapter_model.safetensors holds no LoRA weights")
    meta = base.metadata
    n_head = int(meta.get(f"{arch}.attention.head_count", 0) or 0)
    n_head_kv = int(meta.get(f"{arch}.attention.head_count_kv", 0) or 0) or n_head
    file_alpha = float(config.get("lora_alpha", 8)) or 1.0
    out: list[tuple[str, np.ndarray]] = []
    for target, parts in pairs.items():
        module = modules[target]
        if set(parts) != {"A", "B"}:
            raise _broken(folder, f"{module!r} has lora_{'A' if 'A' not in parts else 'B'} missing")
        a, b = parts["A"], parts["B"]
        n_in, n_out = base.tensor_shapes[target][:2]
        rank = a.shape[0]
        if a.shape[1] != n_in or b.shape[0] != n_out or b.shape[1] != rank:
            raise _broken(
                folder,
                f"{module!r} has lora_A {list(a.shape)} and lora_B {list(b.shape)}, but this model's "
                f"{target} is {n_in}->{n_out}: the adapter was trained on another base model",
            )
        alpha = _alpha_for(module, config)
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        fold = scale * rank / file_alpha  # llama.cpp applies file_alpha / rank
        if fold != 1.0:
            b = b * np.float32(fold)
        if arch in _PERMUTED_QK and target.endswith(("attn_q.weight", "attn_k.weight")):
            heads = n_head if target.endswith("attn_q.weight") else n_head_kv
            if not heads or n_out % (2 * heads):
                raise _unsupported(folder, f"{target} has {n_out} rows for {heads} heads")
            b = _permute_rows(b, heads)
        out.append((f"{target}.lora_a", np.ascontiguousarray(a, dtype=np.float32)))
        out.append((f"{target}.lora_b", np.ascontiguousarray(b, dtype=np.float32)))
    return out


def _write(target: Path, arch: str, alpha: float, tensors: list[tuple[str, np.ndarray]]) -> None:
    """Write the GGUF LoRA atomically (a temporary file renamed into place)."""
    import gguf

    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=".tmp", dir=target.parent
    )
    os.close(handle)
    try:
        writer = gguf.GGUFWriter(temporary, arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for name, array in tensors:
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
