"""The layout of a GGUF file checked without reading its weights: header, metadata, tensor table and
the size the tensor data needs (a truncated or corrupt file is found before anything converts it).

GGUF (versions 2 and 3, little-endian): ``b"GGUF"``, version ``u32``, tensor count ``u64``, metadata
count ``u64``; each metadata entry a key string, a value type ``u32`` and a value; each tensor an
entry of name, ``n_dims u32``, ``dims u64[n_dims]``, type ``u32`` and data offset ``u64``; the data
starts at the next multiple of ``general.alignment`` (32 unless the metadata says otherwise).
Strings are a ``u64`` length and UTF-8 bytes.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

__all__ = ["gguf_layout_error"]

# metadata value type -> size in bytes of fixed-size values (8 = string, 9 = array)
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_MAX_COUNT = 1 << 40  # more entries than any file could hold: a corrupt count


class _Layout(Exception):
    """What is wrong with the file (one line)."""


class _Reader:
    def __init__(self, buf: mmap.mmap | bytes):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> int:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise _Layout(f"ends at byte {len(self.buf)} inside its header (needs {self.pos + size})")
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return int(v)

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise _Layout(f"ends at byte {len(self.buf)} inside its header (needs {self.pos + n})")
        self.pos += n

    def string(self) -> bytes:
        n = self.take("<Q")
        start = self.pos
        self.skip(n)
        return bytes(self.buf[start : self.pos])

    def value(self, vtype: int) -> int | None:
        """Skip one metadata value; return it when it is an integer (for ``general.alignment``)."""
        if vtype in _FIXED:
            if vtype in (4, 5):
                return self.take("<I" if vtype == 4 else "<i")
            self.skip(_FIXED[vtype])
        elif vtype == _STRING:
            self.string()
        elif vtype == _ARRAY:
            itype, count = self.take("<I"), self.take("<Q")
            if count > _MAX_COUNT:
                raise _Layout(f"an array claims {count} items")
            if itype in _FIXED:
                self.skip(count * _FIXED[itype])
            else:
                for _ in range(count):
                    self.value(itype)
        else:
            raise _Layout(f"unknown metadata value type {vtype} at byte {self.pos - 4}")
        return None


def _tensor_bytes(ggml_type: int, n_elements: int) -> int | None:
    """Bytes of a tensor of ``n_elements`` of ``ggml_type`` (None where the ``gguf`` package is missing)."""
    try:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError:  # pragma: no cover - the zoo extra brings gguf
        return None
    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise _Layout(f"unknown tensor type {ggml_type}") from None
    return n_elements // block * type_size


def _check(buf: mmap.mmap | bytes) -> None:
    r = _Reader(buf)
    if bytes(buf[:4]) != b"GGUF":
        raise _Layout("it does not start with the GGUF magic bytes")
    r.skip(4)
    version = r.take("<I")
    if version not in (2, 3):
        raise _Layout(f"unsupported GGUF version {version} (2 and 3 are read)")
    n_tensors, n_kv = r.take("<Q"), r.take("<Q")
    if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
        raise _Layout(f"it claims {n_tensors} tensors and {n_kv} metadata entries")
    alignment = 32
    for _ in range(n_kv):
        key = r.string()
        v = r.value(r.take("<I"))
        if key == b"general.alignment" and v is not None:
            alignment = v
    if alignment <= 0:
        raise _Layout(f"general.alignment is {alignment}")
    need = 0
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.take("<I")
        if n_dims > 8:
            raise _Layout(f"tensor {name[:40]!r} claims {n_dims} dimensions")
        n = 1
        for _ in range(n_dims):
            n *= r.take("<Q")
        ggml_type, offset = r.take("<I"), r.take("<Q")
        size = _tensor_bytes(ggml_type, n)
        need = max(need, offset + (size or 0))
    start = -(-r.pos // alignment) * alignment
    if need and start + need > len(buf):
        raise _Layout(f"its tensor data needs {start + need} bytes, the file has {len(buf)} (truncated)")


def gguf_layout_error(path: str | Path) -> str | None:
    """What makes ``path`` an unreadable GGUF file (one line), or None when its layout is whole.

    Reads the header, metadata and tensor table (memory-mapped; the weights are not read) and checks
    that the file holds every tensor's data."""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            return "the file is empty"
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                _check(buf)
            except _Layout as e:
                return str(e)
    return None
