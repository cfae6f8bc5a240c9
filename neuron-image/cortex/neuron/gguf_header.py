"""The header of a GGUF file: its scalar metadata and tensor sizes, read without the tensors.

`gguf.GGUFReader` builds numpy views of every field and tensor, including the tokenizer's vocabulary
and merges (some 100k strings for SmolLM2): about 1 s of a load on the measured CPUs, before any
weight is read (docs/benchmarks.md, P3). A footprint needs a few numbers, so this reads the header
once, skipping arrays by their lengths. Layout: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

_MAGIC = b"GGUF"
# value type -> struct format of a scalar (8: string, 9: array are variable-sized)
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
Scalar = int | float | bool | str


class GgufFormatError(ValueError):
    """Not a GGUF file this reader understands (big-endian, version 1, truncated)."""


@dataclass(frozen=True)
class GgufHeader:
    fields: dict[str, Scalar]  # scalar and string metadata; arrays are left out
    tensor_elements: list[int]  # element count of each tensor, in file order

    def int_field(self, key: str, default: int = 0) -> int:
        value = self.fields.get(key)
        return int(value) if isinstance(value, int | float) else default


def read_header(path: Path) -> GgufHeader:
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        try:
            return _Cursor(data).header()
        except struct.error as exc:
            raise GgufFormatError(f"{path}: truncated GGUF header") from exc


class _Cursor:
    def __init__(self, data: mmap.mmap) -> None:
        self.data, self.at = data, 0

    def header(self) -> GgufHeader:
        if self.data[:4] != _MAGIC:
            raise GgufFormatError("no GGUF magic")
        self.at = 4
        version = self.unpack("I")
        if version not in (2, 3):  # 1 had 32-bit counts; a byte-swapped file reads as huge
            raise GgufFormatError(f"GGUF version {version} (little-endian 2 or 3 expected)")
        tensors, kvs = self.unpack("Q"), self.unpack("Q")
        fields: dict[str, Scalar] = {}
        for _ in range(kvs):
            key = self.string()
            kind = self.unpack("I")
            if kind == _ARRAY:
                self.skip_array()
            else:
                fields[key] = self.value(kind)
        elements = []
        for _ in range(tensors):
            self.skip_string()  # name
            dims = self.unpack("I")
            count = 1
            for size in struct.unpack_from(f"<{dims}Q", self.data, self.at):
                count *= size
            self.at += 8 * dims + 4 + 8  # the dims, the tensor type, the data offset
            elements.append(count)
        return GgufHeader(fields, elements)

    def unpack(self, code: str) -> int:
        (value,) = struct.unpack_from("<" + code, self.data, self.at)
        self.at += struct.calcsize(code)
        return int(value)

    def value(self, kind: int) -> Scalar:
        if kind == _STRING:
            return self.string()
        code = _SCALARS.get(kind)
        if code is None:
            raise GgufFormatError(f"unknown GGUF value type {kind}")
        (value,) = struct.unpack_from("<" + code, self.data, self.at)
        self.at += struct.calcsize(code)
        return value  # type: ignore[no-any-return]

    def string(self) -> str:
        length = self.unpack("Q")
        self.at += length
        return bytes(self.data[self.at - length : self.at]).decode("utf-8", "replace")

    def skip_string(self) -> None:
        length = self.unpack("Q")  # read first: `self.at += self.unpack(...)` loses its advance
        self.at += length

    def skip_array(self) -> None:
        kind, count = self.unpack("I"), self.unpack("Q")
        if kind == _STRING:
            for _ in range(count):
                self.skip_string()
        elif kind == _ARRAY:
            for _ in range(count):
                self.skip_array()
        elif kind in _SCALARS:
            self.at += count * struct.calcsize(_SCALARS[kind])
        else:
            raise GgufFormatError(f"unknown GGUF array type {kind}")
