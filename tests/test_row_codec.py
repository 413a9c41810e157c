"""Row transforms of the store (relex_stream.row_codec): exact round trips on any bit pattern."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from relex_stream.row_codec import MODES, OPS, decode, encode, rows_to_read, xor_decode, xor_encode

CASES = [(mode, op) for mode in MODES for op in OPS]


def _special_bits(dtype: type) -> np.ndarray:
    """NaN (quiet, signalling, negative, payloads), ±Inf, ±0, subnormals, extremes as bits."""
    if dtype is np.uint16:  # bf16
        values = [
            0x7FC0,
            0x7F81,
            0xFFC0,
            0x7FFF,
            0x7F80,
            0xFF80,
            0x0000,
            0x8000,
            0x0001,
            0x8001,
            0x007F,
            0x7F7F,
            0xFF7F,
            0x3F80,
            0xBF80,
            0xFFFF,
        ]
    else:  # fp32
        values = [
            0x7FC00000,
            0x7F800001,
            0xFFC00000,
            0x7FFFFFFF,
            0x7F800000,
            0xFF800000,
            0,
            0x80000000,
            1,
            0x80000001,
            0x007FFFFF,
            0x7F7FFFFF,
            0xFF7FFFFF,
            0x3F800000,
            0xFFFFFFFF,
        ]
    return np.array(values, dtype=dtype)


def _trajectory(dtype: type, k: int, c: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random bits, with sparse changes between rows and special values sprinkled in."""
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    base = rng.integers(0, info.max, size=c, dtype=dtype, endpoint=True)
    rows = np.repeat(base[None, :], k, axis=0)
    for i in range(k):  # each row: a few ±1 steps from the previous one and a few arbitrary words
        if i:
            rows[i] = rows[i - 1]
        hit = rng.random(c) < 0.05
        rows[i, hit] += rng.choice(np.array([1, info.max], dtype=dtype), size=int(hit.sum()))
        wild = rng.random(c) < 0.02
        rows[i, wild] = rng.integers(0, info.max, size=int(wild.sum()), dtype=dtype, endpoint=True)
    special = _special_bits(dtype)[:c]
    for i in range(k):
        at = rng.choice(c, size=special.size, replace=False)
        rows[i, at] = rng.permutation(special)
    base[: special.size] = special
    return rows, base


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
@pytest.mark.parametrize(("mode", "op"), CASES)
def test_round_trip_is_bit_identical(dtype: type, mode: str, op: str) -> None:
    for seed, (k, c) in enumerate([(1, 1), (2, 17), (7, 1000), (30, 4096)]):
        rows, base = _trajectory(dtype, k, c, seed)
        before = rows.copy(), base.copy()
        codes = encode(rows, base, mode, op)
        assert codes.dtype == rows.dtype and codes.shape == rows.shape
        assert np.array_equal(rows, before[0])  # inputs untouched
        assert np.array_equal(base, before[1])
        back = decode(codes, base, mode, op)
        assert back.dtype == rows.dtype
        assert np.array_equal(back, rows)


@pytest.mark.parametrize(("mode", "op"), CASES)
def test_uniform_random_bits(mode: str, op: str) -> None:
    """Arbitrary words, no structure at all: every 16-bit pattern including all NaNs."""
    rng = np.random.default_rng(7)
    rows = rng.integers(0, 1 << 16, size=(5, 1 << 16), dtype=np.uint16)
    rows[0] = np.arange(1 << 16, dtype=np.uint16)  # every bf16 bit pattern once
    base = rng.permutation(np.arange(1 << 16, dtype=np.uint16))
    assert np.array_equal(decode(encode(rows, base, mode, op), base, mode, op), rows)


@pytest.mark.parametrize(("mode", "op"), CASES)
def test_through_torch_float_views(mode: str, op: str) -> None:
    """bf16 and fp32 tensors viewed as bits come back with the same bits, NaN payloads included."""
    g = torch.Generator().manual_seed(0)
    kinds = [(torch.bfloat16, torch.int16, np.uint16), (torch.float32, torch.int32, np.uint32)]
    for dtype, bits, np_bits in kinds:
        w = torch.randn(6, 257, generator=g).to(dtype)
        w[1, 3], w[2, 4], w[3, 5], w[4, 6] = float("nan"), float("inf"), float("-inf"), -0.0
        base = torch.randn(257, generator=g).to(dtype)
        rows = w.view(bits).numpy().view(np_bits)
        ref = base.view(bits).numpy().view(np_bits)
        back = decode(encode(rows, ref, mode, op), ref, mode, op)
        restored = torch.from_numpy(back.view(rows.dtype.str.replace("u", "i"))).view(dtype)
        assert torch.equal(restored.view(bits), w.view(bits))


@pytest.mark.parametrize("op", OPS)
def test_unchanged_rows_encode_to_zero(op: str) -> None:
    rows, base = _trajectory(np.uint16, 4, 300, 3)
    same = np.repeat(base[None, :], 4, axis=0)
    assert not encode(same, base, "prev", op).any()
    assert not encode(same, base, "base", op).any()
    repeated = np.repeat(rows[:1], 3, axis=0)
    assert not encode(repeated, base, "prev", op)[1:].any()


def test_sub_maps_one_ulp_steps_to_small_codes() -> None:
    base = np.array([0x3F80, 0x3F80, 0x0000, 0xFFFF], dtype=np.uint16)
    rows = np.array([[0x3F81, 0x3F7F, 0xFFFF, 0x0000]], dtype=np.uint16)  # +1, -1, wraps both ways
    assert encode(rows, base, "base", "sub").tolist() == [[2, 1, 1, 2]]


@pytest.mark.parametrize(("mode", "op"), CASES)
def test_appending_rows_continues_the_encoding(mode: str, op: str) -> None:
    """Encoding rows k.. against row k-1 (prev) or the base gives the tail of the full encoding."""
    rows, base = _trajectory(np.uint16, 9, 500, 11)
    full = encode(rows, base, mode, op)
    for k in range(1, 9):
        reference = rows[k - 1] if mode == "prev" else base
        assert np.array_equal(encode(rows[k:], reference, mode, op), full[k:])
        assert np.array_equal(decode(full[k:], reference, mode, op), rows[k:])


def test_xor_helpers_and_rows_to_read() -> None:
    rows, base = _trajectory(np.uint16, 5, 64, 2)
    for mode in MODES:
        assert np.array_equal(xor_decode(xor_encode(rows, base, mode), base, mode), rows)
        assert np.array_equal(xor_encode(rows, base, mode), encode(rows, base, mode, "xor"))
    assert rows_to_read([3, 1], "prev") == [0, 1, 2, 3]
    assert rows_to_read([3, 1], "base") == [3, 1]
    assert rows_to_read([2], "none") == [2]
    assert rows_to_read([], "prev") == []


def test_rejects_bad_input() -> None:
    rows = np.zeros((2, 4), dtype=np.uint16)
    with pytest.raises(ValueError):
        encode(rows, np.zeros(4, np.uint16), "next")
    with pytest.raises(ValueError):
        encode(rows, np.zeros(4, np.uint16), "prev", "add")
    with pytest.raises(ValueError):
        encode(rows.astype(np.int16), np.zeros(4, np.int16), "prev")
    with pytest.raises(ValueError):
        encode(rows, np.zeros(5, np.uint16), "base")
    with pytest.raises(ValueError):
        encode(rows[0], np.zeros(4, np.uint16), "base")


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
@pytest.mark.parametrize(("mode", "op"), CASES)
def test_in_place_and_out_buffers(dtype: type, mode: str, op: str) -> None:
    """encode/decode into a given buffer or in place (the store decodes inside its read arena)."""
    rows, base = _trajectory(dtype, 6, 777, 5)
    expected = encode(rows, base, mode, op)
    buffer = np.full_like(rows, 0xAB)
    assert encode(rows, base, mode, op, out=buffer) is buffer
    assert np.array_equal(buffer, expected)
    work = rows.copy()
    assert encode(work, base, mode, op, out=work) is work
    assert np.array_equal(work, expected)
    target = np.full_like(rows, 0xCD)
    assert decode(expected, base, mode, op, out=target) is target
    assert np.array_equal(target, rows)
    assert decode(work, base, mode, op, out=work) is work
    assert np.array_equal(work, rows)
    with pytest.raises(ValueError):
        decode(expected, base, mode, op, out=np.zeros((6, 776), dtype=dtype))
