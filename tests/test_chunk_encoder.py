"""The store's chunk encoder: when it tries zstd, and that every frame decodes to its chunk."""

from __future__ import annotations

import numpy as np

from relex_stream import shards
from relex_stream.shards import PROBE_EVERY, PROBE_MAX_GAP, ChunkEncoder, crc32c, decode_chunk


def _encode_all(chunks: list[np.ndarray], monkeypatch) -> list[int]:
    """Encode `chunks` with one encoder; the indices of the chunks zstd was tried on."""
    tried: list[int] = []
    real = shards.encode_chunk

    def counting(data, compress, cutoff=1.0):
        if compress:
            tried.append(index[0])
        return real(data, compress, cutoff)

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
