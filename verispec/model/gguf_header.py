"""A GGUF file's header read lean: its metadata values and tensor infos, the tensors' bytes left in a
memory map of the file.

The `gguf` package's GGUFReader makes numpy views of every element of every metadata array: for
SmolLM2, whose file carries a 49,152-token vocabulary and its merges, that is 158 MB of objects for a
94 MB file, and the allocator keeps much of it after they are freed. A model needs only scalars and
tensor infos (transformers reads the vocabulary when it builds the tokenizer), so here arrays of
strings are skipped and a numeric array is one numpy view. The format: github.com/ggml-org/ggml,
docs/gguf.md (version 2 and 3, little-endian).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

MAGIC = b"GGUF"
STRING, ARRAY = 8, 9
# value type -> (struct format, numpy dtype) of the scalar types
SCALARS = {0: ("<B", "u1"), 1: ("<b", "i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"), 4: ("<I", "<u4"),
           5: ("<i", "<i4"), 6: ("<f", "<f4"), 7: ("<?", "?"), 10: ("<Q", "<u8"), 11: ("<q", "<i8"),
           12: ("<d", "<f8")}
DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class Strings:
    """An array of strings this reader skipped: its length."""

    count: int


@dataclass(frozen=True)
class Tensor:
    name: str
    dims: tuple[int, ...]  # innermost first, as GGUF lists them
    type: GGMLQuantizationType
    data: np.ndarray  # uint8 [bytes]: a view of the file's memory map


class GGUFFormatError(ValueError):
    """The bytes are not a GGUF file this reader can read (the message says where they went wrong)."""


class _Cursor:
    def __init__(self, buffer: memoryview) -> None:
        self.buffer, self.at = buffer, 0

    def unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buffer, self.at)
        self.at += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.at + n > len(self.buffer):
            raise GGUFFormatError(f"a string of {n} bytes runs past the end of the file at byte {self.at}")
        s = bytes(self.buffer[self.at: self.at + n]).decode("utf-8", errors="replace")
        self.at += n
        return s

    def value(self, kind: int) -> Any:
        if kind in SCALARS:
            return self.unpack(SCALARS[kind][0])
        if kind == STRING:
            return self.string()
        if kind != ARRAY:
            raise GGUFFormatError(f"unknown metadata value type {kind} at byte {self.at}")
        element, count = self.unpack("<I"), self.unpack("<Q")
        if element == STRING:
            for _ in range(count):
                n = self.unpack("<Q")
                self.at += n
            return Strings(count)
        if element not in SCALARS:
            raise GGUFFormatError(f"an array of value type {element} at byte {self.at} cannot be read")
        dtype = np.dtype(SCALARS[element][1])
        values = np.frombuffer(self.buffer, dtype, count, self.at)
        self.at += count * dtype.itemsize
        return values


def read_header(path: Path) -> tuple[dict[str, Any], list[Tensor]]:
    """(metadata key -> value, tensors in file order). Raises GGUFFormatError or OSError."""
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    cursor = _Cursor(memoryview(mapped))
    try:
        if bytes(mapped[:4]) != MAGIC:
            raise GGUFFormatError("the file does not start with the GGUF magic")
        version = cursor.unpack("<4xI")
        if version not in (2, 3):
            raise GGUFFormatError(f"GGUF version {version} is not supported; supported: 2, 3 (little-endian)")
        tensor_count, kv_count = cursor.unpack("<Q"), cursor.unpack("<Q")
        fields = {}
        for _ in range(kv_count):
            key = cursor.string()
            fields[key] = cursor.value(cursor.unpack("<I"))
        infos = []
        for _ in range(tensor_count):
            name = cursor.string()
            dims = tuple(cursor.unpack("<Q") for _ in range(cursor.unpack("<I")))
            infos.append((name, dims, cursor.unpack("<I"), cursor.unpack("<Q")))
    except struct.error:
        raise GGUFFormatError(f"the header runs past the end of the file (byte {cursor.at})") from None
    alignment = int(fields.get("general.alignment", DEFAULT_ALIGNMENT))
    start = -(-cursor.at // alignment) * alignment
    return fields, [_tensor(mapped, start, *info) for info in infos]


def _tensor(mapped: np.ndarray, start: int, name: str, dims: tuple[int, ...], kind: int, offset: int) -> Tensor:
    try:
        type_ = GGMLQuantizationType(kind)
    except ValueError:
        raise GGUFFormatError(f"tensor {name!r} has the unknown type number {kind}") from None
    block, block_bytes = GGML_QUANT_SIZES[type_]
    elements = int(np.prod(dims, dtype=np.int64))
    if elements % block:
        raise GGUFFormatError(f"tensor {name!r} of {elements} weights is not a whole number of {type_.name} blocks")
    first, size = start + offset, elements // block * block_bytes
    if first + size > mapped.size:
        raise GGUFFormatError(f"tensor {name!r} runs past the end of the file (truncated?)")
    return Tensor(name, dims, type_, mapped[first: first + size])
