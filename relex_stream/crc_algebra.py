"""crc32c of a concatenation, and of an XOR of equal-length messages, from the parts' crc32c.

The store checksums an incompressible chunk twice: its raw bits, and the zstd frame that holds
its codes (XOR against the previous row) between block headers. Both follow from the crc32c of
the chunk's 128 KiB blocks and the previous row's, without a second pass over the bytes.

crc32c is affine over GF(2): crc(m) = lin(m) ^ crc(0ⁿ) with lin linear, so for messages of
equal length crc(a ^ b) = crc(a) ^ crc(b) ^ crc(0ⁿ), and lin(a ‖ b) = shift(lin(a), |b|) ^
lin(b), where shift advances the register over |b| zero bytes (zlib's crc32_combine, here for
crc32c's reflected polynomial). A shift is a 32x32 bit matrix, applied as four byte tables.
"""

from __future__ import annotations

import functools

import numpy as np

from .checksum import crc32c

_POLY = 0x82F63B78  # crc32c, reflected


def _times(matrix: list[int], vector: int) -> int:
    """matrix (32 columns) times a 32-bit vector over GF(2)."""
    out = 0
    j = 0
    while vector:
        if vector & 1:
            out ^= matrix[j]
        vector >>= 1
        j += 1
    return out


def _compose(a: list[int], b: list[int]) -> list[int]:
    """The matrix of a∘b."""
    return [_times(a, column) for column in b]


@functools.lru_cache(maxsize=64)
def _shift_tables(nbytes: int) -> tuple[tuple[int, ...], ...]:
    """Four 256-entry tables: shift(v) = t0[v & 255] ^ t1[v >> 8 & 255] ^ t2[...] ^ t3[v >> 24]."""
    one_bit = [_POLY] + [1 << (j - 1) for j in range(1, 32)]  # the register over one zero bit
    power = _compose(one_bit, one_bit)
    power = _compose(power, power)
    power = _compose(power, power)  # one zero byte
    matrix = [1 << j for j in range(32)]  # identity
    n = nbytes
    while n:
        if n & 1:
            matrix = _compose(power, matrix)
        n >>= 1
        if n:
            power = _compose(power, power)
    columns = np.array(matrix, dtype=np.uint32)  # (32,)
    values = np.arange(256, dtype=np.uint32)
    tables = []
    for i in range(4):
        bits = (values[:, None] >> np.arange(8, dtype=np.uint32)) & 1  # (256, 8)
        table = np.bitwise_xor.reduce(bits * columns[8 * i : 8 * i + 8], axis=1)
        tables.append(tuple(int(x) for x in table))
    return tuple(tables)


def shift(value: int, nbytes: int) -> int:
    """The linear part of a crc register advanced over `nbytes` zero bytes."""
    t0, t1, t2, t3 = _shift_tables(nbytes)
    return t0[value & 255] ^ t1[value >> 8 & 255] ^ t2[value >> 16 & 255] ^ t3[value >> 24]


@functools.lru_cache(maxsize=64)
def zeros_crc(nbytes: int) -> int:
    """crc32c of `nbytes` zero bytes."""
    return crc32c(bytes(nbytes))


def concat(parts: list[tuple[int, int]]) -> int:
    """crc32c of the concatenation of parts given as (crc32c, length in bytes)."""
    linear = total = 0
    for crc, length in parts:
        linear = shift(linear, length) ^ crc ^ zeros_crc(length)
        total += length
    return linear ^ zeros_crc(total)


def xor(crc_a: int, crc_b: int, nbytes: int) -> int:
    """crc32c of a ^ b from those of a and b, both `nbytes` long."""
    return crc_a ^ crc_b ^ zeros_crc(nbytes)
