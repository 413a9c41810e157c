"""Reading safetensors headers and byte ranges without loading tensors or running code."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import RelexError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_MAX_HEADER_BYTES = 100 * 2**20

# safetensors dtype code -> (torch dtype, numpy dtype used to hold its bits)
DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "F64": (torch.float64, np.dtype("float64")),
    "F32": (torch.float32, np.dtype("float32")),
    "F16": (torch.float16, np.dtype("float16")),
    "BF16": (torch.bfloat16, np.dtype("uint16")),
    "I64": (torch.int64, np.dtype("int64")),
    "I32": (torch.int32, np.dtype("int32")),
    "I16": (torch.int16, np.dtype("int16")),
    "I8": (torch.int8, np.dtype("int8")),
    "U8": (torch.uint8, np.dtype("uint8")),
    "BOOL": (torch.bool, np.dtype("bool")),
}
FLOAT_CODES = ("F64", "F32", "F16", "BF16")
TORCH_TO_CODE = {torch_dtype: code for code, (torch_dtype, _) in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie: file, absolute byte offset, dtype code and shape."""

    name: str
    file: Path
    offset: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1].itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_CODES


def read_header(path: Path) -> tuple[dict, int, bytes]:
    """Parse a safetensors header: (tensor entries, byte offset of the data, raw header bytes)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise RelexError(f"{path} is truncated: it is not a safetensors file")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(_MAX_HEADER_BYTES, size - 8):
                raise RelexError(f"{path} has a corrupt or truncated safetensors header")
            raw = f.read(header_len)
    except OSError as exc:
        raise RelexError(f"cannot read {path}: {exc.strerror}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RelexError(f"{path} has a corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise RelexError(f"{path} has a corrupt safetensors header")
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    for name, entry in header.items():
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            dtype, shape = entry["dtype"], tuple(int(d) for d in entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise RelexError(f"{path}: corrupt header entry for tensor {name!r}") from None
        if dtype not in DTYPES:
            raise RelexError(
                f"{path}: tensor {name!r} has dtype {dtype}, which relex_stream does not support"
            )
        expected = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype][1].itemsize
        if end - begin != expected or begin < 0 or data_start + end > size:
            raise RelexError(
                f"{path} is truncated or corrupt: tensor {name!r} lies outside the file"
            )
    return header, data_start, raw


def header_fingerprint(path: Path) -> dict:
    """Size, mtime and a hash of the header: enough to notice a replaced or edited file."""
    _, _, raw = read_header(path)
    stat = path.stat()
    return {
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "header_sha256": hashlib.sha256(raw).hexdigest(),
    }


def read_into(info: TensorInfo, start: int, out: np.ndarray) -> None:
    """Fill `out` (1-D, the tensor's bit dtype) with flattened elements [start, start+len(out))."""
    view = memoryview(out).cast("B")
    offset = info.offset + start * info.itemsize
    fd = os.open(info.file, os.O_RDONLY)
    try:
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                raise RelexError(f"{info.file} is truncated while reading {info.name!r}")
            done += got
    finally:
        os.close(fd)


def bits_to_torch(bits: np.ndarray, dtype_code: str) -> torch.Tensor:
    """View a numpy array of a tensor's bits as the torch dtype it encodes (no copy)."""
    tensor = torch.from_numpy(bits)
    if dtype_code == "BF16":
        return tensor.view(torch.bfloat16)
    return tensor
