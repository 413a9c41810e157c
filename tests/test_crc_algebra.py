"""crc32c of concatenations, XORs and raw-blocks frames from their parts' crc32c, against
crc32c computed over the bytes themselves."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from relex_stream import crc_algebra, shards
from relex_stream.checksum import crc32c


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=3000), max_size=6))
def test_concat_is_the_crc_of_the_joined_bytes(parts):
    joined = b"".join(parts)
    assert crc_algebra.concat([(crc32c(p), len(p)) for p in parts]) == crc32c(joined)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 5000), st.integers(0, 2**32 - 1))
def test_xor_of_equal_length_messages(n, seed):
    rng = np.random.default_rng(seed)
    a, b = (rng.integers(0, 256, n, dtype=np.uint8) for _ in range(2))
    assert crc_algebra.xor(crc32c(a), crc32c(b), n) == crc32c(a ^ b)


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([0, 1, 4097, 131071, 131072, 131075, 262144, 1 << 20, (1 << 20) + 9]),
       st.integers(0, 2**32 - 1))
def test_a_raw_frames_crc_from_its_blocks_and_the_previous_rows(n, seed):
    """The frame of a chunk's XOR codes: its crc32c from the crc32c of the row's and the
    previous row's raw blocks equals the crc32c of the frame's bytes."""
    rng = np.random.default_rng(seed)
    row, previous = (rng.integers(0, 256, n, dtype=np.uint8) for _ in range(2))
    frame = np.empty(shards.raw_frame_bytes(n), dtype=np.uint8)
    shards.fill_raw_frame(frame, n, lambda lo, hi, into: np.bitwise_xor(
        row[lo:hi].reshape(into.shape), previous[lo:hi].reshape(into.shape), out=into))
    codes = [crc_algebra.xor(crc32c(row[lo:hi]), crc32c(previous[lo:hi]), hi - lo)
             for lo, hi in shards.raw_blocks(n)]
    assert shards.raw_frame_crc(n, codes) == crc32c(frame)
