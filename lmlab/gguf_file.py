"""The GGUF container (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) read with `struct`.

`gguf.GGUFReader` parses every element of every metadata array into a numpy view: 17 s for Gemma 3's
262k-token vocabulary on this machine (1.5 s for SmolLM2's 49k). This walks the same header once in
Python (about 1 s for Gemma 3) and offers the part of GGUFReader's interface lmlab uses:
`fields[key].contents()`, and `tensors` with `name`, `tensor_type`, `shape` (GGUF order, fastest
first), `data` (a numpy view of the memory map, shaped as GGUFReader shapes it), `data_offset`, `n_bytes`.
The map is copy-on-write, so torch can view blocks without a copy and without a read-only warning.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quant_shape_to_byte_shape

from lmlab.errors import CheckpointError

_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# element types GGUFReader exposes as typed arrays; every other type is raw uint8 blocks
_NUMPY = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
          "I32": np.int32, "I64": np.int64}


def _read_string(buf, off: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, off)
    end = off + 8 + n
    if end > len(buf):
        raise ValueError(f"string of {n} bytes runs past the end of the file")
    return buf[off + 8:end].decode("utf-8", errors="replace"), end


def _read_value(buf, off: int, vtype: int, keep: bool) -> tuple[Any, int]:
    """One metadata value at `off` (decoded only when `keep`) and the offset after it."""
    if vtype == _STRING:
        return _read_string(buf, off)
    if vtype != _ARRAY:
        fmt = "<" + _SCALAR[vtype]
        return struct.unpack_from(fmt, buf, off)[0], off + struct.calcsize(fmt)
    etype, count = struct.unpack_from("<IQ", buf, off)
    off += 12
    if etype == _STRING:
        items = []
        for _ in range(count):  # each string carries its own length: no way but to walk them
            (n,) = struct.unpack_from("<Q", buf, off)
            if keep:
                items.append(buf[off + 8:off + 8 + n].decode("utf-8", errors="replace"))
            off += 8 + n
        return (items if keep else None), off
    if etype == _ARRAY:
        raise ValueError("nested GGUF arrays are not supported")
    fmt = f"<{count}{_SCALAR[etype]}"
    size = struct.calcsize(fmt)
    return (list(struct.unpack_from(fmt, buf, off)) if keep else None), off + size


def read_kv(buf, path: Path, prefixes: tuple[str, ...] | None = None) -> tuple[dict[str, Any], int, int]:
    """(metadata whose keys start with one of `prefixes`, or all; tensor count; offset after the KV section)."""
    if buf[:4] != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (expected magic b'GGUF', found {bytes(buf[:4])!r})")
    off = 4
    try:
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version < 2:
            raise CheckpointError(f"{path}: GGUF version {version} is too old (expected 2 or 3)")
        meta, off = {}, 24
        for _ in range(n_kv):
            key, off = _read_string(buf, off)
            (vtype,), off = struct.unpack_from("<I", buf, off), off + 4
            value, off = _read_value(buf, off, vtype, keep=prefixes is None or key.startswith(prefixes))
            if value is not None:
                meta[key] = value
    except (struct.error, ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: truncated or corrupt GGUF metadata at byte {off} ({err})") from err
    return meta, n_tensors, off


@dataclass
class Field:
    """A metadata value, as `gguf.ReaderField.contents()` gives it."""

    value: Any

    def contents(self) -> Any:
        return self.value


@dataclass
class Tensor:
    """One tensor of the file (the attributes of `gguf.ReaderTensor` that lmlab reads)."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray
    n_elements: int
    n_bytes: int
    data_offset: int
    data: np.ndarray


class GGUFFile:
    """A GGUF file's metadata and tensors over a copy-on-write memory map (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        meta, n_tensors, off = read_kv(self._map, self.path)
        self.fields = {k: Field(v) for k, v in meta.items()}
        infos = []
        try:
            for _ in range(n_tensors):
                name, off = _read_string(self._map, off)
                (n_dims,) = struct.unpack_from("<I", self._map, off)
                dims = struct.unpack_from(f"<{n_dims}Q", self._map, off + 4)
                kind, rel = struct.unpack_from("<IQ", self._map, off + 4 + 8 * n_dims)
                off += 4 + 8 * n_dims + 12
                infos.append((name, dims, GGMLQuantizationType(kind), rel))
        except (struct.error, ValueError) as err:
            raise CheckpointError(f"{self.path}: truncated or corrupt GGUF tensor table at byte {off} ({err})") from err
        align = int(meta.get("general.alignment", 32))
        start = off + (-off % align)
        self.data = np.frombuffer(self._map, dtype=np.uint8)
        self.tensors = [self._tensor(name, dims, kind, start + rel) for name, dims, kind, rel in infos]

    def _tensor(self, name: str, dims: tuple[int, ...], kind: GGMLQuantizationType, at: int) -> Tensor:
        n = int(np.prod(dims))
        block, size = GGML_QUANT_SIZES[kind]
        n_bytes = n * size // block
        if at + n_bytes > len(self.data):
            raise CheckpointError(f"{self.path}: truncated GGUF file: tensor {name} ends at byte {at + n_bytes}, "
                                  f"the file has {len(self.data)}")
        shape = tuple(reversed(dims))  # numpy order: slowest first
        raw = self.data[at:at + n_bytes]
        if kind.name in _NUMPY:
            data = raw.view(_NUMPY[kind.name]).reshape(shape)
        else:
            data = raw.reshape(quant_shape_to_byte_shape(shape, kind))
        return Tensor(name, kind, np.array(dims), n, n_bytes, at, data)


__all__ = ["GGUFFile", "Field", "Tensor", "read_kv"]
