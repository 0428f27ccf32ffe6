"""GGUF import: a ``.gguf`` file (a local path or an Ollama blob) → a transformers folder.

The runtime, ``serve`` and ``bundle build`` load transformers checkpoints, so a
GGUF model is converted once, at provisioning time, into a folder under the
models dir::

    <folder>/config.json, generation_config.json, model.safetensors
    <folder>/tokenizer.json, tokenizer_config.json, chat_template.jinja
    <folder>/.mongars-complete.json    marker: source, sha256, architecture, types

The weights are saved as safetensors in float32 for quantised files (in the
file's own float type otherwise). The tokenizer and its chat template come from
the GGUF's metadata. Before the slow part runs, the file's header and tensor
table are read here (a few milliseconds, no dependency) so an architecture or a
quantisation type that transformers cannot de-quantise fails with a message
naming it.

For the architectures transformers loads with no weight conversion of its own
(``llama``, ``mistral``, ``qwen2``) the conversion streams: transformers parses
the metadata once (the config), and each tensor is de-quantised by the ``gguf``
package from the memory-mapped file, fixed up by transformers' GGUF tensor
processor and written at its place in ``model.safetensors``: the same bytes
``from_pretrained(gguf_file=...)`` + ``save_pretrained`` write, without ever
holding the float32 model. Other architectures go through exactly that
``from_pretrained`` + ``save_pretrained`` (with the ``gguf`` package, extra
``[gguf]``).

A conversion writes into a hidden staging folder and is renamed into place only
when complete, so an interrupted one never looks installed; both GGUF providers
(``local`` and ``ollama``) convert through :func:`stage_conversion`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

from .._fs import atomic_write_json, sha256_file
from .._version import __version__
from ..errors import ProvisionError
from ..logging import log_event
from ._staging import clear_work, replace_dir, staging_path

__all__ = [
    "GGUF_MARKER_NAME",
    "GgufConversion",
    "GgufHeader",
    "check_convertible",
    "convert_gguf",
    "read_gguf_header",
    "read_marker",
    "stage_conversion",
]

logger = logging.getLogger("mongars_llm.provision")

GGUF_MARKER_NAME = ".mongars-complete.json"
#: bumped when the converted folder's layout changes: older conversions are redone
CONVERTER_VERSION = 1
_MAGIC = b"GGUF"
# GGUF value types: struct format of the scalar ones; 8 = string, 9 = array
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9
# ggml tensor types that are plain floats (not block-quantised)
_FLOAT_TYPES = {0: "F32", 1: "F16", 30: "BF16", 28: "F64"}
_FLOAT_SIZES = {0: 4, 1: 2, 30: 2, 28: 8}
_MAX_DIMS = 8  # ggml tensors have at most 4 dimensions
_MAX_STRING = 1 << 26  # a metadata string longer than 64 MiB means a corrupt header
_MAX_NESTING = 16  # arrays of arrays: llama.cpp writes one level; deeper means a corrupt header


@dataclass(frozen=True)
class GgufHeader:
    """What a GGUF file says about itself, read without loading any tensor."""

    path: Path
    version: int
    architecture: str
    name: str | None
    tensor_types: dict[str, int]  # ggml type name -> number of tensors
    n_elements: int  # weights in all tensors
    metadata: dict[str, Any] = field(repr=False)  # scalar and string values only
    #: the tensor table, in file order; offsets are absolute (from the start of the file)
    tensors: tuple[GgufTensorInfo, ...] = field(default=(), repr=False)

    @property
    def quantized(self) -> bool:
        return any(t not in _FLOAT_TYPES.values() for t in self.tensor_types)

    @property
    def float_dtype(self) -> str:
        """The dtype the converted weights are saved in."""
        if self.quantized or "F32" in self.tensor_types or not self.tensor_types:
            return "float32"
        return "bfloat16" if "BF16" in self.tensor_types else "float16"

    @property
    def converted_bytes(self) -> int:
        """About the size of the converted weights."""
        return self.n_elements * (4 if self.float_dtype == "float32" else 2)


@dataclass(frozen=True)
class GgufTensorInfo:
    """Where one tensor's bytes are in a GGUF file and how they are stored."""

    name: str
    shape: tuple[int, ...]  # torch order (ggml writes the fastest-moving dimension first)
    type_id: int  # the ggml type
    offset: int  # from the start of the file
    nbytes: int  # 0 for a type this module cannot size (the conversion refuses it first)


@dataclass(frozen=True)
class GgufConversion:
    """A finished conversion: the folder and what it came from."""

    path: Path
    source: Path
    sha256: str
    architecture: str
    tensor_types: dict[str, int]
    dtype: str
    bytes: int
    seconds: float


# ------------------------------------------------------------------ header
def read_gguf_header(path: str | Path) -> GgufHeader:
    """Parse a GGUF file's header (metadata and tensor infos); tensors are not read."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            return _parse_header(path, handle)
    except OSError as err:
        raise ProvisionError(f"cannot read the GGUF file {path}: {err}") from err
    except (struct.error, UnicodeDecodeError, ValueError) as err:
        raise ProvisionError(
            f"{path} is not a readable GGUF file ({err}); the file is truncated or corrupt: "
            "download it again"
        ) from err


def _parse_header(path: Path, handle: BinaryIO) -> GgufHeader:
    if handle.read(4) != _MAGIC:
        raise ProvisionError(
            f"{path} is not a GGUF file (no GGUF magic bytes); point the role at a .gguf file "
            "or a transformers checkpoint directory"
        )
    (version,) = struct.unpack("<I", handle.read(4))
    if version not in (2, 3):
        raise ProvisionError(
            f"{path} is GGUF version {version}; versions 2 and 3 (little-endian) are supported"
        )
    n_tensors, n_kv = struct.unpack("<QQ", handle.read(16))

    def read(fmt: str) -> Any:
        size = struct.calcsize(fmt)
        return struct.unpack("<" + fmt, handle.read(size))[0]

    def read_string() -> str:
        length = read("Q")
        if length > _MAX_STRING:
            raise ValueError(f"a metadata string of {length} bytes")
        return handle.read(length).decode("utf-8")

    def skip_value(kind: int, depth: int = 0) -> None:
        if kind in _SCALARS:
            handle.seek(struct.calcsize(_SCALARS[kind]), os.SEEK_CUR)
        elif kind == _STRING:
            handle.seek(read("Q"), os.SEEK_CUR)
        elif kind == _ARRAY:
            if depth >= _MAX_NESTING:
                raise ValueError(f"metadata arrays nested more than {_MAX_NESTING} levels deep")
            inner, count = read("I"), read("Q")
            if inner in _SCALARS:
                handle.seek(struct.calcsize(_SCALARS[inner]) * count, os.SEEK_CUR)
            else:
                for _ in range(count):
                    skip_value(inner, depth + 1)
        else:
            raise ValueError(f"unknown metadata value type {kind}")

    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = read_string()
        kind = read("I")
        if kind in _SCALARS:
            metadata[key] = read(_SCALARS[kind])
        elif kind == _STRING:
            metadata[key] = read_string()
        else:
            skip_value(kind)
    types: Counter[str] = Counter()
    elements = 0
    table: list[tuple[str, tuple[int, ...], int, int, int]] = []
    for _ in range(n_tensors):
        tensor_name = read_string()
        n_dims = read("I")
        if n_dims > _MAX_DIMS:
            raise ValueError(f"a tensor of {n_dims} dimensions")
        dims = struct.unpack(f"<{n_dims}Q", handle.read(8 * n_dims))
        count = 1
        for dim in dims:
            count *= dim
        elements += count
        kind = read("I")
        types[_type_name(kind)] += 1
        table.append((tensor_name, tuple(reversed(dims)), kind, read("Q"), count))
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0:
        raise ValueError(f"general.alignment is {alignment!r}")
    data_start = -(-handle.tell() // alignment) * alignment
    tensors = tuple(
        GgufTensorInfo(tensor_name, shape, kind, data_start + offset, _tensor_bytes(kind, count))
        for tensor_name, shape, kind, offset, count in table
    )
    architecture = metadata.get("general.architecture")
    if not isinstance(architecture, str) or not architecture:
        raise ProvisionError(f"{path} has no general.architecture in its metadata")
    name = metadata.get("general.name")
    return GgufHeader(
        path=path,
        version=version,
        architecture=architecture,
        name=name if isinstance(name, str) else None,
        tensor_types=dict(sorted(types.items())),
        n_elements=elements,
        metadata=metadata,
        tensors=tensors,
    )


def _tensor_bytes(kind: int, count: int) -> int:
    """Bytes that ``count`` values of ggml type ``kind`` take in the file (0: unknown type)."""
    if kind in _FLOAT_SIZES:
        return count * _FLOAT_SIZES[kind]
    try:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
    except Exception:  # gguf missing, or a type newer than it
        return 0
    return count // block * size


def _type_name(kind: int) -> str:
    if kind in _FLOAT_TYPES:
        return _FLOAT_TYPES[kind]
    try:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(kind).name
    except Exception:  # gguf missing, or a type newer than it
        return f"type-{kind}"


# --------------------------------------------------------- what transformers takes
def _require_gguf() -> Any:
    from .._extras import require

    return require("gguf", "gguf", feature="importing a GGUF model")


def supported_architectures() -> list[str]:
    """GGUF architectures the installed transformers can load."""
    names: set[str] = set()
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        names.update(GGUF_SUPPORTED_ARCHITECTURES)
    except ImportError:
        pass
    try:
        from transformers.integrations.gguf.utils import GGUF_ARCHS

        names.update(GGUF_ARCHS)
    except ImportError:
        pass
    return sorted(names)


def _dequantizable(type_name: str) -> bool:
    if type_name in _FLOAT_TYPES.values():
        return True
    import numpy as np

    gguf = _require_gguf()
    try:
        qtype = gguf.GGMLQuantizationType[type_name]
        _block, size = gguf.GGML_QUANT_SIZES[qtype]
        gguf.dequantize(np.zeros(size, dtype=np.uint8), qtype)
    except Exception:  # unknown to gguf, or "Dequantization for X is not yet implemented"
        return False
    return True


def check_convertible(header: GgufHeader) -> None:
    """Raise a :class:`ProvisionError` naming what transformers cannot de-quantise, or
    saying the file is truncated (its tensor table points past its end)."""
    _require_gguf()
    known = supported_architectures()
    if header.architecture not in known:
        raise ProvisionError(
            f"{header.path}: GGUF architecture {header.architecture!r} cannot be converted: "
            f"transformers loads GGUF files of these architectures only: {', '.join(known)}; "
            "use a transformers checkpoint of this model instead (provider huggingface or a "
            "local directory)"
        )
    bad = [t for t in header.tensor_types if not _dequantizable(t)]
    if bad:
        raise ProvisionError(
            f"{header.path}: quantisation type(s) {', '.join(bad)} cannot be de-quantised by the "
            "installed gguf package; use a file quantised with another type (Q4_0, Q4_1, Q4_K_M, "
            "Q5_K_M, Q8_0, F16...) or upgrade gguf"
        )
    try:
        size = header.path.stat().st_size
    except OSError as err:
        raise ProvisionError(f"cannot read the GGUF file {header.path}: {err}") from err
    if any(t.offset + t.nbytes > size for t in header.tensors):
        raise ProvisionError(
            f"{header.path} is truncated (its tensor data ends before its last tensor); "
            "download it again"
        )


# ------------------------------------------------------------------ conversion
def convert_gguf(gguf_path: str | Path, dest_dir: str | Path) -> GgufConversion:
    """Convert ``gguf_path`` into a transformers checkpoint folder at ``dest_dir``.

    The folder is written next to ``dest_dir`` under a hidden name and renamed
    into place when complete (an existing ``dest_dir`` is replaced). It holds
    the de-quantised weights (safetensors), the config, the generation config
    and the tokenizer with its chat template, plus a marker recording the
    source's sha256. Raises :class:`~mongars_llm.errors.ProvisionError` for a
    file transformers cannot convert and
    :class:`~mongars_llm.errors.MissingExtraError` without the ``gguf`` package.
    """
    source = Path(gguf_path).expanduser().absolute()
    dest = Path(dest_dir).expanduser().absolute()
    conversion = stage_conversion(source, dest)
    try:
        replace_dir(conversion.path, dest)
    except BaseException:
        shutil.rmtree(conversion.path, ignore_errors=True)
        raise
    return dataclasses.replace(conversion, path=dest)


def stage_conversion(
    source: Path,
    target: Path,
    *,
    check: Callable[[str], None] | None = None,
    report: Callable[..., None] | None = None,
    extra: dict[str, Any] | None = None,
) -> GgufConversion:
    """Convert ``source`` into a fresh staging folder beside ``target``; return it.

    The one sequence both GGUF providers run (a ``local`` ``.gguf`` file, an
    Ollama blob): clear this target's leftovers, read the header and refuse
    what transformers cannot de-quantise (milliseconds), hash the file and let
    ``check(sha256)`` refuse it (a pin, a manifest's digest), report the
    ``convert`` stage (``report`` is :meth:`ProvisionRequest.report`), then
    convert. The caller holds the target's provisioning lock and moves the
    returned ``path`` into place with :func:`~._staging.replace_dir` once
    verified; on any failure the staging folder is gone.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    clear_work(target.parent, owner=target.name)
    staging = staging_path(target.parent, target.name)
    try:
        header = read_gguf_header(source)
        check_convertible(header)
        digest = sha256_file(source)
        if check is not None:
            check(digest)
        if report is not None:
            report("convert", detail=f"GGUF {header.architecture} -> transformers")
        return write_converted(source, staging, sha256=digest, extra=extra, header=header)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_converted(
    source: Path,
    folder: Path,
    *,
    sha256: str | None = None,
    extra: dict[str, Any] | None = None,
    header: GgufHeader | None = None,
) -> GgufConversion:
    """Convert ``source`` into ``folder`` (created; not atomic) and write the marker.

    ``sha256`` is the source's digest when already known and verified (an
    Ollama blob); otherwise it is computed here. ``header`` is the source's
    header when already read and checked.
    """
    started = time.perf_counter()
    if header is None:
        header = read_gguf_header(source)
        check_convertible(header)
    digest = sha256 or sha256_file(source)
    stat = source.stat()
    folder.mkdir(parents=True, exist_ok=True)
    dtype = header.float_dtype
    try:
        _convert(source, folder, dtype, header)
    except ProvisionError:
        raise
    except Exception as err:
        raise ProvisionError(
            f"transformers could not convert {source} (GGUF architecture "
            f"{header.architecture!r}, tensor types {', '.join(header.tensor_types)}): "
            f"{type(err).__name__}: {err}"
        ) from err
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    seconds = round(time.perf_counter() - started, 3)
    atomic_write_json(
        folder / GGUF_MARKER_NAME,
        {
            "format": "gguf",
            "converter": CONVERTER_VERSION,
            "source": str(source),
            "source_bytes": stat.st_size,
            "source_mtime_ns": stat.st_mtime_ns,
            "sha256": digest,
            "architecture": header.architecture,
            "gguf_name": header.name,
            "tensor_types": header.tensor_types,
            "dtype": dtype,
            "bytes": total,
            "seconds": seconds,
            "verified": f"converted from GGUF sha256 {digest[:12]}; config.json parses",
            "installed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "mongars_llm_version": __version__,
            **(extra or {}),
        },
    )
    log_event(
        logger,
        "gguf_import",
        logging.INFO,
        source=str(source),
        architecture=header.architecture,
        types=",".join(header.tensor_types),
        dtype=dtype,
        bytes=total,
        seconds=seconds,
    )
    return GgufConversion(
        path=folder,
        source=source,
        sha256=digest,
        architecture=header.architecture,
        tensor_types=header.tensor_types,
        dtype=dtype,
        bytes=total,
        seconds=seconds,
    )


#: ``model_type``s converted tensor by tensor here (see :func:`_convert`): transformers
#: loads them through its GGUF tensor processors with no other weight conversion, so the
#: stream writes what ``from_pretrained`` + ``save_pretrained`` would. Others go through
#: transformers whole.
_STREAMED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})


def _convert(source: Path, folder: Path, dtype: str, header: GgufHeader | None = None) -> None:
    """Write the transformers folder for ``source``: streamed when it can, else whole.

    The streamed conversion parses the file's metadata once (transformers'
    ``load_gguf_checkpoint`` without tensors: the config and what picks the
    tokenizer) and then de-quantises one tensor at a time straight from the
    memory-mapped file into ``model.safetensors``, so neither the whole float
    state dict nor a model is ever in memory. The other path (architectures
    transformers loads with weight conversions of its own) loads the model with
    ``from_pretrained`` and saves it.
    """
    header = header or read_gguf_header(source)
    plan = _stream_plan(source, header, dtype)
    if plan is None:
        _convert_with_transformers(source, folder, dtype)
        return
    tokenizer = _load_tokenizer(source, plan.config.model_type)
    _check_template(tokenizer, source)  # before the slow part
    _write_streamed(source, folder / "model.safetensors", plan)
    config = plan.config
    config.dtype = dtype  # what from_pretrained(dtype=...) then save_pretrained record
    config.architectures = [plan.model_class.__name__]
    config.name_or_path = source.stem
    config.save_pretrained(folder)
    if plan.generation_config is not None:
        plan.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _check_config(folder)


def _load_tokenizer(source: Path, model_type: str | None = None) -> Any:
    """The file's tokenizer; with ``model_type`` (known from a parsed config) its class is
    picked from it, sparing ``AutoTokenizer`` a second parse of the metadata."""
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": source.name}
    if model_type is not None:
        from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES

        if TOKENIZER_MAPPING_NAMES.get(model_type):
            kwargs["tokenizer_type"] = model_type
    return AutoTokenizer.from_pretrained(str(source.parent), **kwargs)


@dataclass
class _StreamPlan:
    """What the streamed conversion writes: every saved tensor, where it comes from."""

    config: Any  # the transformers config, from the one parse of the metadata
    dtype: Any  # torch.dtype
    processor: Any  # transformers' GGUF TensorProcessor for the architecture
    gguf_to_hf: dict[str, str]  # GGUF tensor name -> transformers parameter name
    shapes: dict[str, tuple[int, ...]]  # every tensor save_pretrained writes -> its shape
    sources: list[GgufTensorInfo]  # the file's tensors that map to a saved one, file order
    model_class: Any
    generation_config: Any
    parsed: dict[str, Any]  # load_gguf_checkpoint's result (the processors may use it)


def _stream_plan(source: Path, header: GgufHeader, dtype_name: str) -> _StreamPlan | None:
    """Map the file's tensors onto the model's saved weights; ``None`` when the file is not
    streamed (another architecture, or tensors that do not cover the weights exactly)."""
    if not header.tensors or not all(t.nbytes for t in header.tensors):
        return None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    parsed_config = load_gguf_checkpoint(str(source), return_tensors=False)["config"]
    if parsed_config.get("model_type") not in _STREAMED_MODEL_TYPES:
        return None
    config = AutoConfig.for_model(**parsed_config)
    dtype = getattr(torch, dtype_name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    # the per-tensor fix-ups transformers applies (llama.cpp's q/k row permutation)
    processor = TENSOR_PROCESSORS.get(header.architecture, TensorProcessor)(config=parsed_config)
    gguf_to_hf = get_gguf_hf_weights_map(model, processor)
    # what save_pretrained writes: the state dict less the second name of a tied weight
    shapes: dict[str, tuple[int, ...]] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            shapes[name] = tuple(tensor.shape)
    sources = [t for t in header.tensors if gguf_to_hf.get(t.name) in shapes]
    if sorted(gguf_to_hf[t.name] for t in sources) != sorted(shapes):
        return None  # a weight missing from the file, or two tensors for one weight
    generation_config = model.generation_config if model.can_generate() else None
    return _StreamPlan(
        config=config,
        dtype=dtype,
        processor=processor,
        gguf_to_hf=gguf_to_hf,
        shapes=shapes,
        sources=sources,
        model_class=type(model),
        generation_config=generation_config,
        parsed={"config": parsed_config},
    )


def _write_streamed(source: Path, path: Path, plan: _StreamPlan) -> None:
    """De-quantise the planned tensors one at a time into one safetensors file at ``path``.

    The layout is the one ``safetensors`` writes (tensors sorted by name, all of
    one dtype here), so the file is byte-for-byte what ``save_pretrained`` saves;
    the header is written first from the planned shapes, then each tensor at its
    offset as it is de-quantised from the memory-mapped GGUF.
    """
    import numpy as np
    import torch

    gguf = _require_gguf()
    element = torch.empty((), dtype=plan.dtype).element_size()
    offsets = _write_safetensors_header(path, plan.shapes, plan.dtype, {"format": "pt"})
    data = np.memmap(source, mode="r", dtype=np.uint8)
    try:
        with open(path, "r+b") as out:
            for info in plan.sources:
                raw = data[info.offset : info.offset + info.nbytes]
                if info.type_id in _FLOAT_SIZES:
                    stored = raw.reshape(*info.shape[:-1], -1)
                else:  # rows of blocks, as gguf.GGUFReader hands them over
                    stored = raw.reshape(*info.shape[:-1], info.nbytes // _rows(info.shape))
                weights = gguf.dequantize(stored, gguf.GGMLQuantizationType(info.type_id))
                result = plan.processor.process(
                    weights=weights,
                    name=info.name,
                    tensor_key_mapping=plan.gguf_to_hf,
                    parsed_parameters=plan.parsed,
                )
                name = plan.gguf_to_hf.get(result.name or "")
                if name not in offsets:
                    raise ProvisionError(f"{source}: tensor {info.name} maps to no weight")
                tensor = torch.from_numpy(np.copy(result.weights)).to(plan.dtype)
                if tuple(tensor.shape) != plan.shapes[name]:
                    raise ProvisionError(
                        f"{source}: tensor {info.name} has shape {tuple(tensor.shape)}, "
                        f"the model's {name} {plan.shapes[name]}"
                    )
                start, end = offsets[name]
                payload = tensor.contiguous().view(torch.uint8).numpy()
                if payload.nbytes != end - start or tensor.element_size() != element:
                    raise ProvisionError(f"{source}: tensor {info.name} has an unexpected size")
                out.seek(start)
                out.write(payload.data)
                del weights, result, tensor, payload
    finally:
        del data


def _rows(shape: tuple[int, ...]) -> int:
    rows = 1
    for dim in shape[:-1]:
        rows *= dim
    return rows


_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def _write_safetensors_header(
    path: Path, shapes: dict[str, tuple[int, ...]], dtype: Any, metadata: dict[str, str]
) -> dict[str, tuple[int, int]]:
    """Create ``path`` at its full size with a safetensors header; return each tensor's
    absolute ``(start, end)`` byte range. Same bytes as ``safetensors.torch.save_file``
    for tensors of one dtype: names sorted, compact JSON padded with spaces to 8 bytes."""
    import torch

    dtype_name = _SAFETENSORS_DTYPES[str(dtype).removeprefix("torch.")]
    element = torch.empty((), dtype=dtype).element_size()
    entries: dict[str, Any] = {"__metadata__": metadata}
    position = 0
    relative: dict[str, tuple[int, int]] = {}
    for name in sorted(shapes):
        count = 1
        for dim in shapes[name]:
            count *= dim
        relative[name] = (position, position + count * element)
        entries[name] = {
            "dtype": dtype_name,
            "shape": list(shapes[name]),
            "data_offsets": list(relative[name]),
        }
        position += count * element
    head = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    head += b" " * (-len(head) % 8)
    base = 8 + len(head)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(head)))
        out.write(head)
        out.truncate(base + position)
    return {name: (base + a, base + b) for name, (a, b) in relative.items()}


def _check_config(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    if not isinstance(config, dict) or "quantization_config" in config:
        raise ProvisionError(f"the converted config.json in {folder} still names a quantisation")


def _convert_with_transformers(source: Path, folder: Path, dtype: str) -> None:
    """The whole-model conversion: ``from_pretrained(gguf_file=...)`` then ``save_pretrained``."""
    import inspect

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": source.name, "dtype": getattr(torch, dtype)}
    try:  # transformers >= 5.x can keep GGUF blocks packed: ask for plain tensors
        from transformers.utils.quantization_config import GgufConfig

        if "dequantize" in inspect.signature(GgufConfig).parameters:
            kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    # the tokenizer first: a broken chat template fails before the slow conversion
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    _check_template(tokenizer, source)
    model = AutoModelForCausalLM.from_pretrained(str(source.parent), **kwargs)
    _drop_quantization_markers(model)
    model.config.name_or_path = source.stem
    model.save_pretrained(folder, safe_serialization=True)
    del model
    tokenizer.save_pretrained(folder)
    _check_config(folder)


def _check_template(tokenizer: Any, source: Path) -> None:
    """Test-render the file's chat template(s) within bounds (a loop or a huge string
    in a template would otherwise freeze the server on its first chat request)."""
    from .._chat_template import ChatTemplateError, check_chat_template

    templates = tokenizer.chat_template
    if isinstance(templates, str):
        templates = {"default": templates}
    variables = dict(getattr(tokenizer, "special_tokens_map", None) or {})
    for name, template in (templates or {}).items():
        if not isinstance(template, str):
            continue
        try:
            check_chat_template(template, **variables)
        except ChatTemplateError as err:
            which = "" if name == "default" else f" {name!r}"
            raise ProvisionError(
                f"{source}: its chat template{which} is broken: {err.reason}; fix: correct "
                "tokenizer.chat_template in the file's metadata, or use another file"
            ) from err


def _drop_quantization_markers(model: Any) -> None:
    """The weights are plain tensors now: forget the GGUF "quantizer" so they save."""
    if getattr(model, "hf_quantizer", None) is not None:
        packed = [n for n, p in model.state_dict().items() if not p.is_floating_point()]
        if packed:
            raise ProvisionError(
                f"transformers kept {len(packed)} GGUF tensor(s) packed ({packed[0]}); "
                "upgrade transformers to convert this file"
            )
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


# ------------------------------------------------------------------ installed folders
def read_marker(folder: Path) -> dict[str, Any] | None:
    """The conversion marker of ``folder``, or ``None`` when it is not a finished import."""
    try:
        data = json.loads((folder / GGUF_MARKER_NAME).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("format") != "gguf":
        return None
    if data.get("converter") != CONVERTER_VERSION:
        return None
    return data


def verify_converted(folder: Path) -> str:
    """Re-check an installed conversion: marker, config and weights present."""
    marker = read_marker(folder)
    if marker is None:
        raise ProvisionError(f"{folder} has no readable {GGUF_MARKER_NAME}; provision it again")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ProvisionError(f"{folder}/config.json is missing or not JSON ({err})") from err
    if not isinstance(config, dict):
        raise ProvisionError(f"{folder}/config.json is not a JSON object")
    if not any(folder.glob("*.safetensors")):
        raise ProvisionError(f"{folder} has no safetensors weights; provision it again")
    if not (folder / "tokenizer_config.json").is_file():
        raise ProvisionError(f"{folder} has no tokenizer; provision it again")
    return str(marker.get("verified") or "converted GGUF present")
