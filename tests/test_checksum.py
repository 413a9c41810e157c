"""crc32c through ctypes (the GIL let go) gives zarr's checksum, the same as the extension."""

from __future__ import annotations

from pathlib import Path

import google_crc32c
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relex_stream import checksum
from relex_stream.checksum import CTYPES_MIN_BYTES, crc32c

SIZES = [0, 1, 9, CTYPES_MIN_BYTES - 1, CTYPES_MIN_BYTES, CTYPES_MIN_BYTES + 1, 1 << 20]


def _reference_crc32c(data: bytes) -> int:
    """Bitwise crc32c (Castagnoli, reflected, polynomial 0x82F63B78), written from the RFC."""
    table = []
    for byte in range(256):
        value = byte
        for _ in range(8):
            value = (value >> 1) ^ (0x82F63B78 if value & 1 else 0)
        table.append(value)
    crc = 0xFFFFFFFF
    for byte in data:
        crc = (crc >> 8) ^ table[(crc ^ byte) & 0xFF]
    return crc ^ 0xFFFFFFFF


def test_the_reference_gives_the_rfc_check_value():
    assert _reference_crc32c(b"123456789") == 0xE3069283


def test_the_bundled_library_is_found_where_the_wheel_ships_it():
    libs = Path(google_crc32c.__file__).resolve().parent.parent / "google_crc32c.libs"
    if not list(libs.glob("libcrc32c*.so*")):
        pytest.skip("this google-crc32c install bundles no C library")
    assert checksum._library is not None


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("through_ctypes", [True, False])
def test_every_path_gives_the_reference_value(size, through_ctypes, monkeypatch):
    if not through_ctypes:
        monkeypatch.setattr(checksum, "_library", None)
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    expected = _reference_crc32c(data) if size <= CTYPES_MIN_BYTES + 1 else \
        google_crc32c.value(data)
    for form in (data, bytearray(data), memoryview(data), np.frombuffer(data, np.uint8)):
        assert crc32c(form) == expected


@settings(max_examples=30, deadline=None)
@given(n_rows=st.integers(1, 4), n_cols=st.integers(0, CTYPES_MIN_BYTES), seed=st.integers(0, 9))
def test_arrays_of_any_layout_are_summed_as_their_contiguous_bytes(n_rows, n_cols, seed):
    rows = np.random.default_rng(seed).integers(-(2**15), 2**15, (n_rows, n_cols), dtype=np.int16)
    for array in (rows, rows[:, ::2], rows.T, rows[::-1]):
        assert crc32c(array) == google_crc32c.value(np.ascontiguousarray(array).tobytes())


def test_large_buffers_go_through_the_library_and_small_ones_do_not(monkeypatch):
    """ctypes lets the GIL go during a foreign call (its documented default): what matters is
    that large buffers take that path."""
    if checksum._library is None:
        pytest.skip("no bundled C library: the extension is used")
    calls = []

    def counting(address: int, length: int) -> int:
        calls.append(length)
        return real(address, length)

    real = checksum._library
    monkeypatch.setattr(checksum, "_library", counting)
    crc32c(b"x" * (CTYPES_MIN_BYTES - 1))
    assert calls == []
    crc32c(np.zeros(CTYPES_MIN_BYTES, dtype=np.uint8))
    assert calls == [CTYPES_MIN_BYTES]
