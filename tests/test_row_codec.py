"""Row transforms of the store (relex_stream.row_codec): exact round trips on any bit pattern."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from relex_stream.row_codec import (
    MODES,
    OPS,
    TRANSFORMS,
    bytes_to_chunk,
    chunk_to_bytes,
    decode,
    decode_rows,
    default_transform,
    encode,
    encode_rows,
    rows_to_read,
    shuffle_bytes,
    unshuffle_bytes,
    xor_decode,
    xor_encode,
)

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
    elif dtype is np.uint64:  # fp64
        values = [
            0x7FF8000000000000,
            0x7FF0000000000001,
            0xFFF8000000000000,
            0x7FF0000000000000,
            0xFFF0000000000000,
            0,
            0x8000000000000000,
            1,
            0x800FFFFFFFFFFFFF,
            0x3FF0000000000000,
            0xFFFFFFFFFFFFFFFF,
        ]
    elif dtype is np.uint8:  # fp8 e4m3: NaN, ±0, subnormals, extremes
        values = [0x7F, 0xFF, 0x00, 0x80, 0x01, 0x81, 0x7E, 0xFE]
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


# --------------------------------------------------------------------------- named transforms

WORDS = [np.uint8, np.uint16, np.uint32, np.uint64]


def test_transform_names_and_defaults() -> None:
    assert set(TRANSFORMS) >= {"none", "xor-prev", "sub-prev+zigzag+shuffle"}
    assert default_transform(2) == "xor-prev" and default_transform(1) == "xor-prev"
    assert default_transform(4) == "sub-prev+zigzag+shuffle" == default_transform(8)
    assert default_transform(2, "F16") == "sub-prev+zigzag+shuffle"
    assert default_transform(2, "BF16") == "xor-prev" == default_transform(2, "bfloat16")
    assert all(default_transform(w) in TRANSFORMS for w in (1, 2, 4, 8))
    with pytest.raises(ValueError, match="3-byte"):
        default_transform(3)
    with pytest.raises(ValueError, match="use one of"):
        encode_rows(np.zeros((1, 4), np.uint16), np.zeros(4, np.uint16), "xor-next")


def _pipeline(rows: np.ndarray, base: np.ndarray, transform: str, chunk: int) -> list:
    """rows -> encode_rows -> per row and inner chunk: chunk_to_bytes -> zstd-1 payloads."""
    from numcodecs import Zstd

    codes = encode_rows(rows, base, transform)
    zstd = Zstd(level=1)
    starts = range(0, base.size, chunk)
    return [
        [zstd.encode(chunk_to_bytes(r[i : i + chunk], transform)) for i in starts] for r in codes
    ]


def _unpipeline(payloads: list, base: np.ndarray, transform: str, chunk: int) -> np.ndarray:
    from numcodecs import Zstd

    codes = np.empty((len(payloads), base.size), dtype=base.dtype)
    for k, row_payloads in enumerate(payloads):
        for j, payload in enumerate(row_payloads):
            buf = np.frombuffer(Zstd().decode(payload), dtype=np.uint8)
            target = codes[k, j * chunk : (j + 1) * chunk]
            assert bytes_to_chunk(buf, transform, target) is target
    return decode_rows(codes, base, transform, out=codes)


@pytest.mark.parametrize("dtype", WORDS)
@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
def test_named_transform_round_trip_through_zstd(dtype: type, transform: str) -> None:
    """Every named transform, every word size, chunked like the store (last chunk partial)."""
    for seed, (k, c, chunk) in enumerate([(1, 1, 1), (3, 17, 5), (9, 3000, 1024)]):
        rows, base = _trajectory(dtype, k, c, seed)
        before = rows.copy(), base.copy()
        back = _unpipeline(_pipeline(rows, base, transform, chunk), base, transform, chunk)
        assert back.dtype == rows.dtype
        assert np.array_equal(back, rows)
        assert np.array_equal(rows, before[0]) and np.array_equal(base, before[1])


@pytest.mark.parametrize("dtype", WORDS)
@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
def test_named_transforms_continue_along_rows(dtype: type, transform: str) -> None:
    """encode_rows(rows[k:], rows[k-1]) is encode_rows(rows)[k:]: appending keeps old chunks."""
    rows, base = _trajectory(dtype, 6, 333, 4)
    full = encode_rows(rows, base, transform)
    for k in range(1, 6):
        reference = rows[k - 1] if TRANSFORMS[transform].mode == "prev" else base
        assert np.array_equal(encode_rows(rows[k:], reference, transform), full[k:])
        assert np.array_equal(decode_rows(full[k:], reference, transform), rows[k:])
    # and along columns: an inner chunk's codes depend on its own columns only
    assert np.array_equal(encode_rows(rows[:, 100:200], base[100:200], transform), full[:, 100:200])


@pytest.mark.parametrize("dtype", WORDS)
@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
def test_named_transforms_in_place(dtype: type, transform: str) -> None:
    rows, base = _trajectory(dtype, 5, 400, 8)
    expected = encode_rows(rows, base, transform)
    work = rows.copy()
    assert encode_rows(work, base, transform, out=work) is work
    assert np.array_equal(work, expected)
    assert decode_rows(work, base, transform, out=work) is work
    assert np.array_equal(work, rows)
    # chunk bytes: into a given buffer, and back into the chunk's own memory when unshuffled
    chunk = expected[2, :128].copy()
    buf = np.full(chunk.nbytes, 0xEE, dtype=np.uint8)
    assert chunk_to_bytes(chunk, transform, out=buf) is buf
    assert np.array_equal(buf, chunk_to_bytes(chunk, transform))
    target = np.zeros_like(chunk)
    bytes_to_chunk(buf, transform, target)
    assert np.array_equal(target, chunk)
    if not TRANSFORMS[transform].shuffle:
        view = chunk_to_bytes(chunk, transform)
        assert np.shares_memory(view, chunk)  # no copy
        assert bytes_to_chunk(view, transform, chunk) is chunk
        assert np.array_equal(chunk, expected[2, :128])
    else:
        with pytest.raises(ValueError, match="own buffer"):
            bytes_to_chunk(chunk.view(np.uint8), transform, chunk)


def test_shuffle_layout_is_byte_planes_lsb_first() -> None:
    words = np.array([0x04030201, 0x14131211, 0x24232221], dtype=np.uint32)
    planes = shuffle_bytes(words)
    assert planes.tolist() == [0x01, 0x11, 0x21, 0x02, 0x12, 0x22, 0x03, 0x13, 0x23, 4, 0x14, 0x24]
    assert chunk_to_bytes(words, "sub-prev+zigzag+shuffle").tolist() == planes.tolist()
    assert chunk_to_bytes(words, "xor-prev").tolist() == words.view(np.uint8).tolist()
    back = np.zeros(3, dtype=np.uint32)
    assert np.array_equal(unshuffle_bytes(planes, back), words)


def test_small_fp32_steps_leave_the_high_planes_zero() -> None:
    """Adam-sized fp32 steps: sub+zigzag codes are small, so the top byte planes are all zero."""
    rng = np.random.default_rng(0)
    base = (0.02 * rng.standard_normal(4096)).astype(np.float32)
    rows = np.stack([base + np.float32(1e-7) * rng.standard_normal(4096).astype(np.float32)])
    bits, ref = rows.view(np.uint32), base.view(np.uint32)
    name = "sub-prev+zigzag+shuffle"
    planes = chunk_to_bytes(encode_rows(bits, ref, name)[0], name).reshape(4, -1)
    assert not planes[3].any()  # |diff| < 2^23 ulps everywhere
    assert planes[0].any()
    xor_planes = encode_rows(bits, ref, "xor-prev")[0].view(np.uint8).reshape(-1, 4).T
    assert np.count_nonzero(planes[2]) < np.count_nonzero(xor_planes[2])  # carries stay local


def test_chunk_functions_refuse_bad_input() -> None:
    chunk = np.zeros(8, dtype=np.uint32)
    for transform in ("xor-prev", "sub-prev+zigzag+shuffle"):
        with pytest.raises(ValueError):
            chunk_to_bytes(np.zeros((2, 4), np.uint32), transform)  # 2-D
        with pytest.raises(ValueError):
            chunk_to_bytes(np.zeros(8, np.int32), transform)  # signed
        with pytest.raises(ValueError):
            chunk_to_bytes(np.zeros(16, np.uint32)[::2], transform)  # strided
        with pytest.raises(ValueError):
            chunk_to_bytes(chunk, transform, out=np.zeros(31, np.uint8))
        with pytest.raises(ValueError):
            bytes_to_chunk(np.zeros(31, np.uint8), transform, chunk)  # wrong length
        with pytest.raises(ValueError):
            bytes_to_chunk(np.zeros(8, np.uint32), transform, chunk)  # not bytes
        with pytest.raises(ValueError):
            bytes_to_chunk(np.zeros(32, np.uint8), transform, np.zeros(8, np.float32))
    with pytest.raises(ValueError, match="unknown row transform"):
        chunk_to_bytes(chunk, "shuffle")
    with pytest.raises(ValueError):
        encode_rows(np.zeros((2, 4), np.uint32), np.zeros(4, np.uint16), "xor-prev")
    assert rows_to_read([2], "xor-prev") == [0, 1, 2]
    assert rows_to_read([2], "none") == [2]
