"""Write a .safetensors file one tensor at a time.

`safetensors.torch.save_file` needs every tensor of the file in memory at once; for a single-file
checkpoint that is the whole model. The format is simple enough to stream: an 8-byte little-endian
header length N, N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]},
"__metadata__": {...}}`` padded with spaces, then the raw little-endian tensor bytes. Since every
output tensor has a known dtype and shape (those of the input it replaces), the header is written
first and the tensors follow in header order; only one tensor is ever held.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def itemsize(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


def read_header(path: str | Path) -> dict:
    """The JSON header of a .safetensors file (tensor entries and ``__metadata__``), without the data."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


class StreamWriter:
    """Write tensors with fixed (name, dtype, shape) specs, one at a time, in the order `self.order`.

    Tensors are laid out by decreasing element size, like safetensors itself does, so every tensor
    starts at an offset aligned to its element size (memory-mapped readers rely on that).
    """

    def __init__(self, path: str | Path, specs: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        if sys.byteorder != "little":  # the format is little-endian and we write raw memory
            raise RuntimeError("safetensors streaming needs a little-endian machine")
        unknown = sorted({d for _, d, _ in specs if d not in DTYPES})
        if unknown:
            raise ValueError(f"unsupported safetensors dtypes: {unknown}")
        self.path = Path(path)
        ordered = sorted(specs, key=lambda s: -itemsize(s[1]))  # stable: keeps the input order within a size
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self._specs: dict[str, tuple[str, tuple[int, ...], int]] = {}
        offset = 0
        for name, dtype, shape in ordered:
            nbytes = itemsize(dtype)
            for d in shape:
                nbytes *= int(d)
            header[name] = {"dtype": dtype, "shape": [int(d) for d in shape], "data_offsets": [offset, offset + nbytes]}
            self._specs[name] = (dtype, tuple(int(d) for d in shape), nbytes)
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # pad so the data section starts 8-byte aligned
        self.order = [s[0] for s in ordered]
        self._next = 0
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(blob)))
        self._f.write(blob)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.order) or self.order[self._next] != name:
            expected = self.order[self._next] if self._next < len(self.order) else "nothing"
            raise RuntimeError(f"{self.path}: tensor {name} written out of order (expected {expected})")
        dtype, shape, nbytes = self._specs[name]
        if tensor.dtype != DTYPES[dtype] or tuple(tensor.shape) != shape:
            raise RuntimeError(f"{self.path}: tensor {name} is {tensor.dtype} {list(tensor.shape)}, "
                               f"the header promised {dtype} {list(shape)}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        assert data.numel() == nbytes
        if nbytes:
            self._f.write(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.order):
            self._f.close()
            raise RuntimeError(f"{self.path}: closed after {self._next} of {len(self.order)} tensors")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def abort(self) -> None:
        self._f.close()
