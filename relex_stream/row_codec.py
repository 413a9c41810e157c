"""Lossless transforms of a tensor's stored rows (checkpoint bits), applied before compression.

A stored tensor is K rows of bits (bf16 as uint16, fp32 as uint32, ...) plus the base row. RL
moves weights little between checkpoints: in bf16 most words do not change at all, in fp32
almost every word changes, but only in its low bytes. Replacing each row by its difference from
a reference turns it into zero words (bf16) or words whose high bytes are zero (fp32), which the
compressor then squeezes. Every transform here is a bijection on bit patterns (NaN, Inf, -0 and
subnormals included), so decoding is bit-identical.

A named transform (`TRANSFORMS`, the name the store records) has two parts:

1. row-wise, `encode_rows` / `decode_rows` on (K, c) words: each row against a reference,
       mode 'none'  rows stored as they are
            'prev'  row k against row k − 1, row 0 against the base (`reference`)
            'base'  every row against the base (benchmarks only)
       op   'xor'   bits ^ reference bits
            'sub'   (bits − reference bits) mod 2^w, zigzag-mapped so that ±1 ulp become 2 and 1
2. per inner chunk of C words of one row, `chunk_to_bytes` / `bytes_to_chunk`: with `shuffle`,
   byte j of every word goes to plane j (C bytes per plane, least significant byte first), so
   the sign/exponent bytes, which a small step leaves alone, sit together and compress, and the
   noisy low mantissa bytes do not spoil them. A chunk decodes alone.

| name | for | with zstd-1, measured (bench/RESULTS.md) |
| --- | --- | --- |
| 'xor-prev' | bf16, 1-byte words | 1.1% of raw bf16 rows, consecutive RL steps |
| 'sub-prev+zigzag+shuffle' | fp32, fp16, fp64 | fp32 Adam-like steps: 0.36-0.60 of raw |
| 'none' | stores without a transform | |

Chunked along rows: `encode(rows[k:], r, 'prev')` with r = rows[k − 1] (the base if k = 0) is
`encode(rows, base, 'prev')[k:]`; so appending a checkpoint needs the last row, and old chunks are
never rewritten. `decode` follows the same rule with r = the decoded row k − 1. 'prev' decodes row
k only from rows 0..k (see `rows_to_read`). A row of another dtype than the base uses the base
converted to the row's dtype as its reference (any fixed reference decodes exactly).

Byte planes are of the words as they lie in memory: little-endian, as safetensors stores them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MODES = ("none", "prev", "base")
OPS = ("xor", "sub")


@dataclass(frozen=True)
class Transform:
    """A row transform: reference `mode`, combining `op`, and a per-chunk byte shuffle."""

    mode: str
    op: str
    shuffle: bool


# name -> spec. The names are recorded in stores: never change what a name means.
TRANSFORMS: dict[str, Transform] = {
    "none": Transform("none", "xor", False),
    "xor-prev": Transform("prev", "xor", False),
    "sub-prev+zigzag+shuffle": Transform("prev", "sub", True),
}


def default_transform(itemsize: int, dtype: str | None = None) -> str:
    """The measured choice for words of `itemsize` bytes (bench/RESULTS.md, issues 3 and 12).

    4- and 8-byte words (fp32, fp64): 'sub-prev+zigzag+shuffle' (fp32 Adam steps touch almost
    every word, but only its low bytes). 2-byte words: 'xor-prev' for bf16 (a shuffle saves at
    most 0.07% of raw on consecutive steps and halves the speed), but 'sub-prev+zigzag+shuffle'
    when `dtype` says fp16 ('F16' or 'float16'; 17-30% smaller: its 10 mantissa bits see more
    small steps). 1-byte words: 'xor-prev'.
    """
    if itemsize == 2 and dtype in ("F16", "float16"):
        return "sub-prev+zigzag+shuffle"
    if itemsize in (1, 2):
        return "xor-prev"
    if itemsize in (4, 8):
        return "sub-prev+zigzag+shuffle"
    raise ValueError(f"no row transform for {itemsize}-byte words: use 1, 2, 4 or 8")


def transform_spec(transform: str) -> Transform:
    """The spec of a transform name; ValueError for a name this version does not know."""
    try:
        return TRANSFORMS[transform]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown row transform {transform!r}: use one of {', '.join(TRANSFORMS)}"
        ) from None


# --------------------------------------------------------------------------- row-wise part


def encode_rows(
    rows: np.ndarray, reference: np.ndarray, transform: str, out: np.ndarray | None = None
) -> np.ndarray:
    """(K, c) unsigned words -> (K, c) codes of `transform`'s row-wise part (see `encode`)."""
    spec = transform_spec(transform)
    return encode(rows, reference, spec.mode, spec.op, out=out)


def decode_rows(
    codes: np.ndarray, reference: np.ndarray, transform: str, out: np.ndarray | None = None
) -> np.ndarray:
    """Inverse of `encode_rows`: (K, c) codes -> (K, c) words; `out` may be `codes` itself."""
    spec = transform_spec(transform)
    return decode(codes, reference, spec.mode, spec.op, out=out)


def _check(codes: np.ndarray, reference: np.ndarray, mode: str, op: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown row transform mode {mode!r}: use one of {MODES}")
    if op not in OPS:
        raise ValueError(f"unknown row transform op {op!r}: use one of {OPS}")
    if codes.ndim != 2:
        raise ValueError(f"rows must be 2-D (K, c), got shape {codes.shape}")
    if codes.dtype.kind != "u":
        raise ValueError(f"rows must be unsigned integer bits (uint16 for bf16), got {codes.dtype}")
    if mode != "none" and (reference.dtype != codes.dtype or reference.shape != codes.shape[1:]):
        raise ValueError(
            f"reference must be ({codes.shape[1]},) {codes.dtype}, "
            f"got {reference.shape} {reference.dtype}"
        )


def _signed(dtype: np.dtype) -> np.dtype:
    return np.dtype(f"i{dtype.itemsize}")


def _zigzag(d: np.ndarray) -> np.ndarray:
    """In place on unsigned words holding two's-complement differences: 0,-1,1,-2 -> 0,1,2,3."""
    shift = 8 * d.dtype.itemsize - 1
    sign = np.empty(d.shape[-1], dtype=d.dtype)
    for row in d if d.ndim == 2 else d[None]:  # one row of scratch, not a copy of all K rows
        np.right_shift(row.view(_signed(d.dtype)), shift, out=sign.view(_signed(d.dtype)))
        row <<= 1
        row ^= sign  # all ones where the difference was negative
    return d


def _unzigzag(z: np.ndarray) -> np.ndarray:
    """Inverse of `_zigzag`, in place."""
    sign = np.empty(z.shape[-1], dtype=z.dtype)
    signed = sign.view(_signed(z.dtype))
    for row in z if z.ndim == 2 else z[None]:
        np.bitwise_and(row, 1, out=sign)
        np.negative(signed, out=signed)  # 1 -> all ones
        row >>= 1
        row ^= sign
    return z


def _out(like: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    if out is None:
        return np.empty_like(like)
    if out.shape != like.shape or out.dtype != like.dtype:
        raise ValueError(f"out must be {like.shape} {like.dtype}, got {out.shape} {out.dtype}")
    return out


def encode(
    rows: np.ndarray,
    reference: np.ndarray,
    mode: str,
    op: str = "xor",
    out: np.ndarray | None = None,
) -> np.ndarray:
    """(K, c) unsigned bits -> (K, c) codes of the same dtype, in `out` or a new array.

    The inputs are left untouched unless `out` is `rows` itself (then it encodes in place).
    """
    _check(rows, reference, mode, op)
    if mode == "none":
        if out is None:
            return rows.copy()
        _out(rows, out)[...] = rows
        return out
    if out is rows and mode == "prev":  # row k needs the original row k - 1: walk backwards
        return _encode_prev_in_place(rows, reference, op)
    out = _out(rows, out)
    combine = np.bitwise_xor if op == "xor" else np.subtract  # subtract wraps mod 2^w
    if mode == "base":
        combine(rows, reference[None, :], out=out)
    else:
        combine(rows[0], reference, out=out[0])
        combine(rows[1:], rows[:-1], out=out[1:])
    return out if op == "xor" else _zigzag(out)


def _encode_prev_in_place(rows: np.ndarray, reference: np.ndarray, op: str) -> np.ndarray:
    combine = np.bitwise_xor if op == "xor" else np.subtract  # subtract wraps mod 2^w
    for k in range(rows.shape[0] - 1, 0, -1):
        combine(rows[k], rows[k - 1], out=rows[k])
    combine(rows[0], reference, out=rows[0])
    return rows if op == "xor" else _zigzag(rows)


def decode(
    codes: np.ndarray,
    reference: np.ndarray,
    mode: str,
    op: str = "xor",
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Inverse of `encode`: (K, c) codes -> (K, c) bits, bit-identical, in `out` or a new array.

    `out` may be `codes` itself: the store reads codes into its arena and decodes them there.
    """
    _check(codes, reference, mode, op)
    if out is None:
        out = codes.copy()
    elif out is not codes:
        _out(codes, out)[...] = codes
    if mode == "none":
        return out
    if op == "sub":
        _unzigzag(out)
    combine = np.bitwise_xor if op == "xor" else np.add  # add wraps mod 2^w
    if mode == "base":
        combine(out, reference[None, :], out=out)
        return out
    combine(out[0], reference, out=out[0])
    for k in range(1, out.shape[0]):  # a running scan, one row at a time (cache friendly)
        combine(out[k], out[k - 1], out=out[k])
    return out


def xor_encode(rows: np.ndarray, reference: np.ndarray, mode: str) -> np.ndarray:
    """`encode` with op 'xor'."""
    return encode(rows, reference, mode, "xor")


def xor_decode(codes: np.ndarray, reference: np.ndarray, mode: str) -> np.ndarray:
    """`decode` with op 'xor'."""
    return decode(codes, reference, mode, "xor")


def rows_to_read(row_ids: list[int], mode: str) -> list[int]:
    """Stored rows needed to decode `row_ids`: for 'prev' every row up to the last one asked.

    `mode` is a mode ('prev') or a transform name ('xor-prev').
    """
    if mode in TRANSFORMS:
        mode = TRANSFORMS[mode].mode
    if mode not in MODES:
        raise ValueError(f"unknown row transform mode {mode!r}: use one of {MODES}")
    if mode == "prev":
        return list(range(max(row_ids) + 1)) if row_ids else []
    return list(row_ids)


# --------------------------------------------------------------------------- per-chunk part


def _check_chunk(chunk: np.ndarray, what: str) -> None:
    if chunk.ndim != 1 or chunk.dtype.kind != "u" or not chunk.flags.c_contiguous:
        raise ValueError(
            f"{what} must be a contiguous 1-D array of unsigned words, "
            f"got {chunk.shape} {chunk.dtype}"
        )


def shuffle_bytes(chunk: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """(C,) words of w bytes -> (C·w,) uint8: byte j of every word in plane j (LSB plane first)."""
    _check_chunk(chunk, "chunk")
    width, n = chunk.dtype.itemsize, chunk.shape[0]
    out = _byte_buffer(out, n * width)
    np.copyto(out.reshape(width, n), chunk.view(np.uint8).reshape(n, width).T)  # ~3 GB/s
    return out


def unshuffle_bytes(buf: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Inverse of `shuffle_bytes`: (C·w,) uint8 planes -> `out` (C,) words of w bytes."""
    _check_chunk(out, "out")
    width, n = out.dtype.itemsize, out.shape[0]
    _check_bytes(buf, n * width)
    words = out.view(np.uint8)
    for j in range(width):  # one strided copy per plane: ~3x faster than a transposed copyto
        words[j::width] = buf[j * n : (j + 1) * n]
    return out


def chunk_to_bytes(
    codes_chunk: np.ndarray, transform: str, out: np.ndarray | None = None
) -> np.ndarray:
    """(C,) codes of one row's inner chunk -> (C·itemsize,) uint8 for the compressor.

    Without a shuffle this is a view of `codes_chunk` (no copy) unless `out` is given.
    """
    _check_chunk(codes_chunk, "codes_chunk")
    if transform_spec(transform).shuffle:
        return shuffle_bytes(codes_chunk, out)
    if out is None:
        return codes_chunk.view(np.uint8)
    out = _byte_buffer(out, codes_chunk.nbytes)
    out[...] = codes_chunk.view(np.uint8)
    return out


def bytes_to_chunk(buf: np.ndarray, transform: str, out: np.ndarray) -> np.ndarray:
    """Inverse of `chunk_to_bytes`: (C·itemsize,) uint8 -> `out` (C,) codes; returns `out`.

    `buf` may be `out`'s own bytes when there is no shuffle (then nothing is copied).
    """
    _check_chunk(out, "out")
    _check_bytes(buf, out.nbytes)
    if transform_spec(transform).shuffle:
        if np.may_share_memory(buf, out):
            raise ValueError("a shuffled chunk cannot be decoded into its own buffer")
        return unshuffle_bytes(buf, out)
    words = out.view(np.uint8)
    if not (buf.ctypes.data == words.ctypes.data):
        words[...] = buf
    return out


def _check_bytes(buf: np.ndarray, size: int) -> None:
    if buf.dtype != np.uint8 or buf.shape != (size,):
        raise ValueError(f"buf must be ({size},) uint8, got {buf.shape} {buf.dtype}")


def _byte_buffer(out: np.ndarray | None, size: int) -> np.ndarray:
    if out is None:
        return np.empty(size, dtype=np.uint8)
    _check_bytes(out, size)
    if not out.flags.c_contiguous:
        raise ValueError("out must be contiguous")
    return out
