"""The store's chunk encoder: when it tries zstd, and that every frame decodes to its chunk."""

from __future__ import annotations

import numpy as np

from relex_stream import shards
from relex_stream.shards import PROBE_EVERY, PROBE_MAX_GAP, ChunkEncoder, crc32c, decode_chunk


def _encode_all(chunks: list[np.ndarray], monkeypatch) -> list[int]:
    """Encode `chunks` with one encoder; the indices of the chunks zstd was tried on."""
    tried: list[int] = []
    real = shards.encode_chunk

    def counting(data, compress, cutoff=1.0, reuse=False):
        if compress:
            tried.append(index[0])
        return real(data, compress, cutoff, reuse)

    monkeypatch.setattr(shards, "encode_chunk", counting)
    encoder, index = ChunkEncoder(True, "xor-prev"), [0]
    for i, chunk in enumerate(chunks):
        index[0] = i
        frame, crc = encoder.encode(chunk)
        assert crc == crc32c(frame)
        out = np.empty_like(chunk)
        payload = memoryview(bytes(frame) + crc.to_bytes(4, "little"))
        decode_chunk(payload, crc, out)
        assert np.array_equal(out, chunk), f"chunk {i} did not decode to itself"
    return tried


def test_probes_back_off_on_incompressible_chunks_and_come_back(monkeypatch):
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 2**16, 4096, dtype=np.uint16) for _ in range(400)]
    zeros = [np.zeros(4096, dtype=np.uint16) for _ in range(200)]
    tried = _encode_all(noise + zeros, monkeypatch)
    gaps = np.diff([t for t in tried if t < 400]).tolist()
    expected, gap = [], 2 * PROBE_EVERY  # the first probe (chunk 0) already failed
    while len(expected) < len(gaps):
        expected.append(gap)
        gap = min(2 * gap, PROBE_MAX_GAP)
    assert gaps == expected, "probes on incompressible chunks should back off, doubling"
    assert max(gaps) == PROBE_MAX_GAP
    first_zero_probe = min(t for t in tried if t >= 400)
    assert first_zero_probe - 400 <= PROBE_MAX_GAP
    assert all(t in tried for t in range(first_zero_probe, 600)), \
        "once zstd pays again, every chunk is compressed"


def test_compressible_chunks_are_all_compressed(monkeypatch):
    chunks = [np.full(4096, i % 3, dtype=np.uint16) for i in range(50)]
    assert _encode_all(chunks, monkeypatch) == list(range(50))


def test_reused_scratch_frames_are_the_fresh_frames_bit_for_bit():
    rng = np.random.default_rng(1)
    sizes = [1, 3, 128 * 1024 - 1, 128 * 1024, 128 * 1024 + 1, 1 << 20, 300_001]
    for n in sizes:
        data = np.frombuffer(rng.bytes(n), dtype=np.uint8)
        fresh = shards.raw_frame(memoryview(data))
        out = shards.scratch("frame", shards.raw_frame_bytes(n))
        out[:] = 0xAB  # stale bytes from an earlier chunk must not show through
        reused = shards.raw_frame(memoryview(data), out)
        assert bytes(reused) == bytes(fresh), f"{n}-byte chunk"
        decoded = np.empty(n, dtype=np.uint8)
        decode_chunk(memoryview(bytes(reused) + crc32c(reused).to_bytes(4, "little")),
                     crc32c(fresh), decoded)
        assert np.array_equal(decoded, data)


def test_a_reusing_encoder_builds_raw_frames_in_one_buffer_that_decode():
    rng = np.random.default_rng(2)
    encoder = ChunkEncoder(True, "xor-prev", reuse=True)
    addresses = set()
    for i in range(40):
        chunk = rng.integers(0, 2**16, 1 << 18, dtype=np.uint16)  # noise: raw frames
        frame, crc = encoder.encode(chunk)
        if isinstance(frame, memoryview):
            addresses.add(np.frombuffer(frame, dtype=np.uint8).ctypes.data)
        assert crc == crc32c(frame)
        out = np.empty_like(chunk)
        decode_chunk(memoryview(bytes(frame) + crc.to_bytes(4, "little")), crc, out)
        assert np.array_equal(out, chunk), f"chunk {i}"
    assert len(addresses) == 1, "raw frames should be built in the thread's one scratch buffer"


def test_scratch_is_per_thread_and_per_size():
    import threading

    here = shards.scratch("frame", 1000)
    assert shards.scratch("frame", 1000) is here
    assert shards.scratch("frame", 1001) is not here
    other: list[np.ndarray] = []
    thread = threading.Thread(target=lambda: other.append(shards.scratch("frame", 1000)))
    thread.start()
    thread.join()
    assert other[0] is not here, "two writing threads must not share a frame buffer"
