"""zstd frames through ctypes with a context per thread: numcodecs' bytes, any input, any thread."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numcodecs import Zstd

from relex_stream import zstd_frames

NUMCODECS = Zstd(level=zstd_frames.LEVEL)


def test_the_ctypes_path_is_in_use_here():
    # numcodecs' wheels export the zstd symbols; if a release stops doing so this fails, and
    # the fallback (tested below) keeps the store right but slower
    assert zstd_frames._library is not None


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 300_000), density=st.sampled_from([0.0, 0.001, 0.05, 1.0]),
       seed=st.integers(0, 2**16))
def test_frames_are_numcodecs_bytes_and_decode(size, density, seed):
    rng = np.random.default_rng(seed)
    data = np.where(rng.random(size) < density, rng.integers(1, 256, size), 0).astype(np.uint8)
    frame = zstd_frames.compress(memoryview(data))
    assert isinstance(frame, bytes)
    assert frame == NUMCODECS.encode(data)
    out = np.empty(size, dtype=np.uint8)
    zstd_frames.decompress(frame, out)
    assert np.array_equal(out, data)


def test_a_reused_frame_is_valid_until_the_next_compress():
    first_data = np.arange(100_000, dtype=np.uint32).view(np.uint8)
    second_data = np.zeros(400_000, dtype=np.uint8)
    first = zstd_frames.compress(first_data, reuse=True)
    assert isinstance(first, memoryview)
    kept = bytes(first)
    second = zstd_frames.compress(second_data, reuse=True)
    assert kept == NUMCODECS.encode(first_data)
    assert bytes(second) == NUMCODECS.encode(second_data)


def test_threads_compress_at_once_each_with_its_own_context():
    rng = np.random.default_rng(3)
    inputs = [np.where(rng.random(1 << 18) < 0.02, 5, 0).astype(np.uint8) for _ in range(8)]
    expected = [NUMCODECS.encode(x) for x in inputs]
    errors: list[str] = []

    def work(i: int) -> None:
        for _ in range(20):
            for j, x in enumerate(inputs):
                frame = zstd_frames.compress(x, reuse=True)
                if bytes(frame) != expected[j]:
                    errors.append(f"thread {i} input {j}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors


def test_without_the_library_numcodecs_compresses(monkeypatch):
    monkeypatch.setattr(zstd_frames, "_library", None)
    data = np.frombuffer(b"abc" * 10_000, dtype=np.uint8)
    assert zstd_frames.compress(data, reuse=True) == NUMCODECS.encode(data)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**16), cut=st.integers(0, 400), flips=st.lists(
    st.tuples(st.integers(0, 10_000), st.integers(1, 255)), max_size=4))
def test_a_damaged_frame_is_a_value_error_and_writes_only_into_out(seed, cut, flips):
    """Stores are untrusted: a frame may be truncated or altered (its crc32c recomputed), and
    decoding it must fail cleanly, never write past `out`."""
    rng = np.random.default_rng(seed)
    size = int(rng.integers(1, 20_000))
    data = np.where(rng.random(size) < 0.3, rng.integers(1, 256, size), 0).astype(np.uint8)
    frame = bytearray(NUMCODECS.encode(data))
    frame = frame[: max(0, len(frame) - cut)]
    for at, mask in flips:
        if frame:
            frame[at % len(frame)] ^= mask
    guarded = np.full(size + 64, 0xA5, dtype=np.uint8)
    try:
        zstd_frames.decompress(bytes(frame), guarded[:size])
    except ValueError:
        pass
    assert (guarded[size:] == 0xA5).all(), "decoding wrote past out"


def test_a_frame_of_another_size_than_out_is_refused():
    data = np.arange(5000, dtype=np.uint8)
    frame = NUMCODECS.encode(data)
    for n in (4999, 5001):
        with pytest.raises(ValueError):
            zstd_frames.decompress(frame, np.empty(n, dtype=np.uint8))


def test_decoding_raw_and_compressed_frames_matches_numcodecs():
    rng = np.random.default_rng(9)
    for density in (0.0, 0.01, 1.0):
        data = np.where(rng.random(1 << 20) < density, rng.integers(1, 256, 1 << 20),
                        0).astype(np.uint8)
        frame = NUMCODECS.encode(data)
        out = np.empty_like(data)
        zstd_frames.decompress(frame, out)
        assert np.array_equal(out, data)
