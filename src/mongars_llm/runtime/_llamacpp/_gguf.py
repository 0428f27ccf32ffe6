"""Checking a GGUF file before llama.cpp reads it (standard library only).

llama.cpp aborts the whole process on some malformed inputs (a failed
``GGML_ASSERT`` is ``abort()``, not an exception), so :func:`inspect_gguf`
reads the header itself first: the magic and version, every metadata key (the
architecture, the context length, the tokenizer's special tokens) and every
tensor's type, shape and offset, and checks that the tensor data the header
promises lies inside the file (a truncated download fails here, with the
file's name, instead of inside llama.cpp). :func:`check_gguf` adds what the
engine needs: an architecture that llama.cpp runs as a decoder.

Large arrays (the vocabulary, its merges) are skipped, not read: a 100 MB
file's header is checked in a few milliseconds.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import ModelLoadError

__all__ = ["DECODER_ARCHITECTURES", "GGUFInfo", "check_gguf", "inspect_gguf"]

_MAGIC = b"GGUF"
_SCALARS = {  # GGUF value type -> struct format
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
# ggml type -> (elements per block, bytes per block), for the types GGUF files carry.
_BLOCKS: dict[int, tuple[int, int]] = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    9: (32, 36),  # Q8_1
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    15: (256, 292),  # Q8_K
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    27: (1, 8),  # I64
    28: (1, 8),  # F64
    30: (1, 2),  # BF16
}

#: text decoders of llama.cpp (the ``LLM_ARCH_NAMES`` of the llama.cpp that
#: llama-cpp-python 0.3.36 vendors, less its encoders, vision, audio and draft models)
_DECODER_NAMES = """
llama llama4 deci falcon grok gpt2 gptj gptneox mpt baichuan starcoder refact bloom stablelm
qwen qwen2 qwen2moe qwen3 qwen3moe qwen3next qwen35 qwen35moe phi2 phi3 phimoe plamo plamo2
plamo3 codeshell orion internlm2 minicpm minicpm3 gemma gemma2 gemma3 gemma3n gemma4 starcoder2
mamba mamba2 jamba falcon-h1 xverse command-r cohere2 cohere2moe dbrx olmo olmo2 olmoe openelm
arctic deepseek deepseek2 deepseek32 chatglm glm4 glm4moe bitnet jais jais2 nemotron nemotron_h
nemotron_h_moe exaone exaone4 exaone-moe rwkv6 rwkv6qwen2 rwkv7 arwkv7 granite granitemoe
granitehybrid granite_swa plm bailingmoe bailingmoe2 dots1 arcee afmoe ernie4_5 ernie4_5-moe
hunyuan-moe hunyuan-dense smollm3 gpt-oss lfm2 lfm2moe smallthinker seed_oss grovemoe apertus
minimax-m2 pangu-embedded mistral3 mistral4 mimo2 maincoder nanbeige
"""
DECODER_ARCHITECTURES = frozenset(_DECODER_NAMES.split())

_FALLBACK = 'or load it with engine="torch"'


@dataclass
class GGUFInfo:
    """What the header of a GGUF file says: its metadata and its tensors' types."""

    path: Path
    version: int
    metadata: dict[str, Any] = field(default_factory=dict)
    tensor_types: dict[str, int] = field(default_factory=dict)  # ggml type -> tensor count
    #: each tensor's dimensions in GGUF order (``ne``: the fastest-varying first)
    tensor_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    @property
    def context_length(self) -> int | None:
        value = self.metadata.get(f"{self.architecture}.context_length")
        return int(value) if isinstance(value, int) else None


class _Reader:
    """Reads a GGUF header from a memory map (no copy of the skipped arrays)."""

    def __init__(self, data: Any) -> None:
        self.data, self.pos, self.size = data, 0, len(data)

    def take(self, n: int) -> bytes:
        if self.pos + n > self.size:
            raise EOFError
        self.pos += n
        return bytes(self.data[self.pos - n : self.pos])

    def skip(self, n: int) -> None:
        if self.pos + n > self.size:
            raise EOFError
        self.pos += n

    def unpack(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise EOFError
        value = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += n
        return value

    def string(self) -> str:
        return self.take(self.unpack("<Q")).decode("utf-8", errors="replace")

    def value(self, kind: int, *, keep: bool) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            if keep:
                return self.string()
            self.skip(self.unpack("<Q"))
            return None
        if kind == _ARRAY:
            item, count = self.unpack("<I"), self.unpack("<Q")
            if item in _SCALARS and not keep:
                self.skip(struct.calcsize(_SCALARS[item]) * count)
                return None
            if count > self.size:
                raise EOFError
            if item == _STRING and not keep:
                data, pos, size, unpack_from = self.data, self.pos, self.size, struct.unpack_from
                for _ in range(count):  # the vocabulary: lengths only, in a tight loop
                    if pos + 8 > size:
                        raise EOFError
                    pos += 8 + unpack_from("<Q", data, pos)[0]
                if pos > size:
                    raise EOFError
                self.pos = pos
                return None
            values = [self.value(item, keep=keep) for _ in range(count)]
            return values if keep else None
        raise ValueError(f"unknown GGUF value type {kind}")


def _bad(path: Path, why: str) -> ModelLoadError:
    return ModelLoadError(
        f"cannot load {str(path)!r} with llama.cpp: {why}; check the file (download it "
        f"again) {_FALLBACK}"
    )


def inspect_gguf(path: str | os.PathLike[str]) -> GGUFInfo:
    """Read and check the header of the GGUF file at ``path``.

    :class:`~mongars_llm.errors.ModelLoadError` naming the file when it is
    missing, not a GGUF, of an unknown version, or shorter than its header says.
    """
    file = Path(path)
    if not file.is_file():
        raise ModelLoadError(f"no GGUF file at {str(file)!r}: give the path of a .gguf file")
    size = file.stat().st_size
    if size < 24:
        raise _bad(file, f"it has {size} bytes, fewer than a GGUF header")
    try:
        with (
            file.open("rb") as handle,
            mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data,
        ):
            reader = _Reader(data)
            if reader.take(4) != _MAGIC:
                raise _bad(file, "it is not a GGUF file (no 'GGUF' magic at its start)")
            version = reader.unpack("<I")
            if version not in (2, 3):
                raise _bad(file, f"GGUF version {version} is not one llama.cpp reads (2 or 3)")
            n_tensors, n_kv = reader.unpack("<Q"), reader.unpack("<Q")
            info = GGUFInfo(path=file, version=version)
            for _ in range(n_kv):
                key = reader.string()
                kind = reader.unpack("<I")
                keep = not key.startswith("tokenizer.ggml.") or key.endswith("_id")
                info.metadata[key] = reader.value(kind, keep=keep)
            extents: list[tuple[str, int, int]] = []
            for _ in range(n_tensors):
                name = reader.string()
                dims = reader.unpack("<I")
                shape = [reader.unpack("<Q") for _ in range(dims)]
                kind, offset = reader.unpack("<I"), reader.unpack("<Q")
                info.tensor_types[str(kind)] = info.tensor_types.get(str(kind), 0) + 1
                info.tensor_shapes[name] = tuple(shape)
                elements = 1
                for n in shape:
                    elements *= n
                block = _BLOCKS.get(kind)
                extents.append((name, offset, elements // block[0] * block[1] if block else 0))
            alignment = int(info.metadata.get("general.alignment", 32) or 32)
            start = -(-reader.pos // alignment) * alignment
    except EOFError:
        raise _bad(
            file, f"the file ends inside its header ({size} bytes): it is truncated"
        ) from None
    except (ValueError, UnicodeError, struct.error) as err:
        raise _bad(file, f"its header is malformed ({err})") from err
    for name, offset, nbytes in extents:
        if start + offset + nbytes > size:
            raise _bad(
                file,
                f"tensor {name!r} ends at byte {start + offset + nbytes}, past the end of the "
                f"file ({size} bytes): the file is truncated",
            )
    return info


def check_gguf(path: str | os.PathLike[str]) -> GGUFInfo:
    """:func:`inspect_gguf`, and an architecture llama.cpp runs as a text decoder."""
    info = inspect_gguf(path)
    arch = info.architecture
    if not arch:
        raise _bad(info.path, "its header names no architecture (general.architecture)")
    if arch not in DECODER_ARCHITECTURES:
        raise ModelLoadError(
            f"cannot load {str(info.path)!r} with llama.cpp: its architecture {arch!r} is not a "
            f"text decoder that llama.cpp runs here; {_FALLBACK} (after converting it to a "
            "transformers folder)"
        )
    return info
