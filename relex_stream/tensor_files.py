"""Where a tensor's bytes lie on disk, and reading a range of its elements with pread.

A tensor is a sequence of pieces: one for a safetensors file, one per rank for verl FSDP shards
(dim-0 slices in rank order, which concatenate to the tensor flattened in C order). Reads go
through os.preadv into the engine's own buffers rather than mmap, so checkpoint pages never
count against the process's resident memory; bytes the page cache does not hold are read
past it (direct_reads.py).
"""

from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .direct_reads import read_uncached
from .errors import RelexError
from .safetensors_io import DTYPES, FLOAT_CODES


@dataclass(frozen=True)
class Piece:
    """`numel` consecutive elements of a tensor, at absolute byte `offset` of `file`."""

    file: Path
    offset: int
    numel: int


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint: dtype code, shape, and its bytes as pieces in order."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1].itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_CODES


def read_into(info: TensorInfo, start: int, out: np.ndarray) -> None:
    """Fill `out` (1-D, the tensor's bit dtype) with flattened elements [start, start+len(out)).

    out: C-contiguous, of the tensor's item size (uint16 for BF16, ...); ValueError otherwise.
    """
    itemsize = info.itemsize
    if out.ndim != 1 or out.dtype.itemsize != itemsize or not out.flags.c_contiguous:
        raise ValueError(f"out must be 1-D, contiguous, of item size {itemsize}")
    if start < 0 or start + out.shape[0] > info.numel:
        raise ValueError(f"elements [{start}, {start + out.shape[0]}) are outside {info.name!r}")
    view = memoryview(out).cast("B")
    first = 0  # flattened index of the current piece's first element
    done = 0
    for piece in info.pieces:
        lo, hi = max(start, first), min(start + out.shape[0], first + piece.numel)
        first += piece.numel
        if lo >= hi:
            continue
        part = view[done : done + (hi - lo) * itemsize]
        _pread_all(piece.file, part, piece.offset + (lo - (first - piece.numel)) * itemsize,
                   info.name)
        done += len(part)
    if done != len(view):
        raise RelexError(f"tensor {info.name!r} is shorter than its shape says")


def _pread_all(path: Path, view: memoryview, offset: int, name: str) -> None:
    try:
        # never waited on: a FIFO swapped in for a checkpoint between the passes is refused
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise RelexError(f"cannot read {path}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RelexError(f"{path} is no longer a regular file; it changed during the run")
        done = read_uncached(fd, np.frombuffer(view, dtype=np.uint8), offset)
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                raise RelexError(f"{path} is truncated while reading {name!r}")
            done += got
    except OSError as exc:
        raise RelexError(f"cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def bits_to_torch(bits: np.ndarray, dtype_code: str) -> torch.Tensor:
    """View a numpy array of a tensor's bits as the torch dtype it encodes (no copy)."""
    return torch.from_numpy(bits).view(DTYPES[dtype_code][0])


def word_dtype(dtype_code: str) -> np.dtype:
    """The unsigned word holding one element's bits (bf16, fp16 as uint16, fp32 as uint32)."""
    return np.dtype(f"u{DTYPES[dtype_code][1].itemsize}")


def widest(codes: list[str]) -> str:
    """The float dtype every value of `codes` converts to exactly (bf16 with fp16: fp32)."""
    unique = set(codes)
    if "F64" in unique:
        return "F64"
    if "F32" in unique or len(unique) > 1:
        return "F32"
    return unique.pop()
