"""Lossless transforms of a tensor's stored rows (checkpoint bits), applied before compression.

A stored tensor is K rows of bits (bf16 as uint16, fp32 as uint32, ...) plus the base row. RL
changes few elements between checkpoints, so a row is nearly equal to its predecessor and to the
base; replacing each row by its difference from a reference turns it into mostly zero words,
which the compressor then squeezes. Every transform here is a bijection on bit patterns (NaN, Inf,
-0 and subnormals included), so decoding is bit-identical.

modes (which reference each row is compared with):
    'none'  rows stored as they are
    'prev'  row k against row k − 1, row 0 against the base (`reference`)
    'base'  every row against the base (`reference`)
ops (how a row is compared with its reference):
    'xor'   bits ^ reference bits
    'sub'   (bits − reference bits) mod 2^w, zigzag-mapped so that ±1 ulp become 2 and 1

Chunked along rows: `encode(rows[k:], r, 'prev')` with r = rows[k − 1] (the base if k = 0) is
`encode(rows, base, 'prev')[k:]`; so appending a checkpoint needs the last row (prev) or the base
(base), and old chunks are never rewritten. `decode` follows the same rule with r = the decoded
row k − 1. 'prev' decodes row k only from rows 0..k (see `rows_to_read`); 'base' decodes any row
alone.
"""

from __future__ import annotations

import numpy as np

MODES = ("none", "prev", "base")
OPS = ("xor", "sub")


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
    bits = 8 * d.dtype.itemsize
    sign = (d.view(_signed(d.dtype)) >> (bits - 1)).view(d.dtype)  # all ones where negative
    d <<= 1
    d ^= sign
    return d


def _unzigzag(z: np.ndarray) -> np.ndarray:
    """Inverse of `_zigzag`, in place."""
    sign = z & 1
    z >>= 1
    np.negative(sign.view(_signed(z.dtype)), out=sign.view(_signed(z.dtype)))  # 1 -> all ones
    z ^= sign
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
    if op == "xor":
        if mode == "base":
            np.bitwise_xor(rows, reference[None, :], out=out)
        else:
            np.bitwise_xor(rows[0], reference, out=out[0])
            np.bitwise_xor(rows[1:], rows[:-1], out=out[1:])
        return out
    if mode == "base":
        np.subtract(rows, reference[None, :], out=out)  # wraps mod 2^w
    else:
        np.subtract(rows[0], reference, out=out[0])
        np.subtract(rows[1:], rows[:-1], out=out[1:])
    return _zigzag(out)


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
    """Stored rows needed to decode `row_ids`: for 'prev' every row up to the last one asked."""
    if mode not in MODES:
        raise ValueError(f"unknown row transform mode {mode!r}: use one of {MODES}")
    if mode == "prev":
        return list(range(max(row_ids) + 1)) if row_ids else []
    return list(row_ids)
