"""The store's data files, in zarr v3's sharding format, written and read directly.

A shard file holds one row of one group of tensors: its inner chunks in column order, each a
zstd frame of the chunk's little-endian bytes followed by the frame's crc32c (zarr's codec
chain bytes → zstd → crc32c), then a block of per-chunk checksums that nothing in zarr refers
to, then zarr's shard index at the very end: (offset, length) of every chunk and the index's own
crc32c. zarr reads these files as they are; relex_stream writes them itself so that a shard is
streamed to disk chunk by chunk by the one thread that owns it (zarr writes a shard as a whole,
in memory) and so that every byte read back is checked against a checksum its parent holds:

    store manifest → group record (size and crc32c of each shard's tail)
                   → tail (crc32c of every encoded chunk, and of its raw bits)
                   → chunk (its own crc32c trailer; once decoded, the raw bits' crc32c)

A chunk that does not compress is kept as a zstd frame of raw blocks: a plain copy that every
zstd decoder reads.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import as_strided

from . import zstd_frames
from .checksum import crc32c
from .direct_writes import DirectAppender
from .safefs import create_file, pread_exact

ZSTD_LEVEL = zstd_frames.LEVEL
# zstd is kept for a chunk only when it leaves at most this fraction of the bytes: below that the
# store saves its cost back in disk and reads; above it (noise in every element, bench/RESULTS.md
# "store cut-off") a chunk is kept as raw blocks, which cost a copy to write and to read.
KEEP_ZSTD_BELOW = {"xor-prev": 0.4, "sub-prev+zigzag+shuffle": 0.65, "none": 0.65}
# A shard's chunks are usually alike: one in PROBE_EVERY is compressed to decide for the next.
# Each probe that finds zstd not worth it doubles the gap to the next, up to PROBE_MAX_GAP: on
# dense rows (nothing compresses) probing every 8th chunk took ~2 s of the store writer's CPU
# on the 100M K = 30 bench, competing with the Gram product for two cores.
PROBE_EVERY = 8
PROBE_MAX_GAP = 128
MISSING = np.uint64(2**64 - 1)  # zarr's marker of an absent chunk in a shard index
_MAGIC = 0xFD2FB528
_RAW_BLOCK = 128 * 1024
_SUMS_MAGIC = b"RLXS"
_SUMS_VERSION = 1
_local = threading.local()


def scratch(role: str, nbytes: int) -> np.ndarray:
    """This thread's reusable (nbytes,) uint8 buffer for `role` (codes, frame): one per role
    and size, so encoding a chunk allocates nothing. A fresh 1 MiB buffer per chunk cost the
    store writer a page fault per 4 KiB and a memset (bench/RESULTS.md). The memory budget
    counts these among CODEC_BUFFERS."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    key = (role, nbytes)
    if key not in buffers:
        if len(buffers) >= 8:  # chunk sizes come from a handful of layouts: keep the newest
            buffers.clear()
        buffers[key] = np.empty(nbytes, dtype=np.uint8)
    return buffers[key]


# --------------------------------------------------------------------------- chunk payloads


def raw_frame_bytes(n: int) -> int:
    """Bytes of the raw-blocks frame of an n-byte chunk."""
    return 4 + 1 + 8 + 3 * max(1, -(-n // _RAW_BLOCK)) + n


def raw_frame(data: memoryview, out: np.ndarray | None = None) -> bytearray | memoryview:
    """A zstd frame that stores `data` as raw blocks (decoding it is a copy): the bytearray it
    was built in (a bytes() of it would copy every byte once more), or a view of `out`
    ((raw_frame_bytes(len(data)),) uint8) when given."""
    n = len(data)
    if out is None:
        frame = bytearray(raw_frame_bytes(n))
    elif out.shape != (raw_frame_bytes(n),) or out.dtype != np.uint8:
        raise ValueError(f"out must be ({raw_frame_bytes(n)},) uint8, got {out.shape} {out.dtype}")
    else:
        frame = memoryview(out)
    source = np.frombuffer(data, dtype=np.uint8)
    fill_raw_frame(np.frombuffer(frame, dtype=np.uint8), n,
                   lambda lo, hi, into: np.copyto(into, source[lo:hi].reshape(into.shape)))
    return frame


def fill_raw_frame(frame: np.ndarray, n: int,
                   fill_payload: Callable[[int, int, np.ndarray], None]) -> None:
    """Lay out the raw-blocks frame of an n-byte chunk in `frame` (raw_frame_bytes(n),) uint8:
    the frame and block headers here, the chunk's bytes by fill_payload(lo, hi, into), which
    writes bytes [lo, hi) of the chunk into `into`: (m, B) for m whole blocks of B bytes (rows
    strided over the block headers), or (hi − lo,) for a last, partial block. A caller can so
    compute them in place (XOR codes) in at most two calls instead of copying them in."""
    whole, rest = divmod(n, _RAW_BLOCK)
    frame[:13] = _frame_header(n)
    if whole:
        headers = as_strided(frame[13:], shape=(whole, 3), strides=(_RAW_BLOCK + 3, 1))
        headers[...] = _WHOLE_BLOCK_HEADER
        if not rest:
            headers[-1] = _LAST_WHOLE_BLOCK_HEADER
        payload = as_strided(frame[16:], shape=(whole, _RAW_BLOCK), strides=(_RAW_BLOCK + 3, 1))
        fill_payload(0, whole * _RAW_BLOCK, payload)
    if rest or not whole:  # a last, partial block (an empty chunk has one of 0 bytes)
        pos = 13 + whole * (_RAW_BLOCK + 3)
        frame[pos : pos + 3] = _block_header(rest, last=True)
        fill_payload(whole * _RAW_BLOCK, n, frame[pos + 3 : pos + 3 + rest])


def _frame_header(n: int) -> np.ndarray:
    """A raw frame's 13 header bytes: magic, single segment, 8-byte content size n."""
    return np.frombuffer(struct.pack("<IBQ", _MAGIC, 0xE0, n), dtype=np.uint8)


def _block_header(size: int, last: bool) -> np.ndarray:
    """A raw block's 3 header bytes."""
    return np.frombuffer((int(last) | (size << 3)).to_bytes(3, "little"), dtype=np.uint8)


_WHOLE_BLOCK_HEADER = _block_header(_RAW_BLOCK, last=False)
_LAST_WHOLE_BLOCK_HEADER = _block_header(_RAW_BLOCK, last=True)


def frame_content_size(frame: memoryview | bytes) -> int | None:
    """The decoded size a zstd frame declares, or None when it does not say (or is no frame)."""
    if len(frame) < 6 or int.from_bytes(frame[:4], "little") != _MAGIC:
        return None
    descriptor = frame[4]
    fcs_flag, single, dict_flag = descriptor >> 6, (descriptor >> 5) & 1, descriptor & 3
    if dict_flag or (fcs_flag == 0 and not single):
        return None
    pos = 5 + (0 if single else 1)
    width = (1, 2, 4, 8)[fcs_flag]
    if len(frame) < pos + width:
        return None
    value = int.from_bytes(frame[pos : pos + width], "little")
    return value + 256 if width == 2 else value


def encode_chunk(data: np.ndarray, compress: bool, cutoff: float = 1.0,
                 reuse: bool = False) -> tuple[bytes | bytearray | memoryview, int, float]:
    """(zstd frame, its crc32c, compressed ÷ raw) of one chunk's bytes: raw blocks when not
    asked to compress or when zstd leaves more than `cutoff` of the bytes (the ratio is then
    what zstd reached, or 1.0 when it was not tried). With `reuse`, the frame is built in
    this thread's scratch: valid until the thread's next encode."""
    view = memoryview(np.ascontiguousarray(data).view(np.uint8)).cast("B")
    frame = zstd_frames.compress(view, reuse) if compress else None
    ratio = len(frame) / max(1, len(view)) if frame is not None else 1.0
    if frame is None or ratio > cutoff:
        out = scratch("frame", raw_frame_bytes(len(view))) if reuse else None
        frame = raw_frame(view, out)
    return frame, crc32c(frame), ratio


class ChunkEncoder:
    """Encodes one shard's chunks, deciding from every PROBE_EVERY-th whether zstd pays.

    With `reuse`, a frame lives in the thread's scratch until the thread's next encode:
    for a caller that writes each frame out before it encodes the next (the store writer).
    """

    def __init__(self, compress: bool, transform: str, reuse: bool = False):
        self._reuse = reuse
        self._compress = compress
        self._cutoff = KEEP_ZSTD_BELOW[transform]
        self._gap = PROBE_EVERY  # chunks from one probe to the next
        self._since_probe = PROBE_EVERY
        self._worth_it = True

    def tries_zstd(self) -> bool:
        """Whether the next chunk goes to zstd (a probe, or zstd paid at the last one)."""
        return self._compress and (self._since_probe >= self._gap or self._worth_it)

    def skip(self) -> None:
        """Count a chunk the caller kept as raw blocks itself (when tries_zstd() was False)."""
        self._since_probe += 1

    def encode(self, data: np.ndarray) -> tuple[bytes | bytearray | memoryview, int]:
        probe = self._compress and self._since_probe >= self._gap
        if probe:
            frame, crc, ratio = encode_chunk(data, True, self._cutoff, self._reuse)
            self._worth_it = ratio <= self._cutoff
            self._gap = PROBE_EVERY if self._worth_it else min(2 * self._gap, PROBE_MAX_GAP)
            self._since_probe = 1
            return frame, crc
        self._since_probe += 1
        frame, crc, _ = encode_chunk(data, self._compress and self._worth_it, self._cutoff,
                                     self._reuse)
        return frame, crc


def decode_chunk(payload: memoryview, expected_crc: int, out: np.ndarray) -> None:
    """Check a chunk's crc32c trailer against its bytes and `expected_crc`, decode into `out`.

    Raises ValueError on any mismatch (the caller names the tensor and the remedy).
    """
    frame, trailer = payload[:-4], int.from_bytes(payload[-4:], "little")
    actual = crc32c(frame)
    if actual != trailer or actual != expected_crc:
        raise ValueError("checksum mismatch")
    target = out.view(np.uint8).reshape(-1)
    if frame_content_size(frame) != target.nbytes:
        raise ValueError("chunk decodes to the wrong size")
    zstd_frames.decompress(frame, target)


# --------------------------------------------------------------------------- shard files


@dataclass(frozen=True)
class ShardIndex:
    """Where each inner chunk of a shard lies, with its encoded and raw-bits crc32c."""

    offsets: np.ndarray  # (n,) uint64
    sizes: np.ndarray  # (n,) uint64, trailer included
    encoded_crcs: np.ndarray  # (n,) uint32: crc32c of each zstd frame
    raw_crcs: np.ndarray  # (n,) uint32: crc32c of each chunk's raw bits (before the transform)


@dataclass(frozen=True)
class ShardRecord:
    """What a group record keeps of one shard: its size and the crc32c of its tail."""

    size: int
    tail_crc: int

    def to_json(self) -> list[int]:
        return [self.size, self.tail_crc]


def tail_bytes(n_chunks: int) -> int:
    """Bytes of the checksum block and the zarr index at the end of a shard of `n_chunks`."""
    return 12 + 8 * n_chunks + 16 * n_chunks + 4


def _tail(index: ShardIndex) -> bytes:
    n = index.offsets.size
    sums = np.empty((n, 2), dtype="<u4")
    sums[:, 0], sums[:, 1] = index.encoded_crcs, index.raw_crcs
    head = _SUMS_MAGIC + struct.pack("<II", _SUMS_VERSION, n)
    zarr_index = np.empty((n, 2), dtype="<u8")
    zarr_index[:, 0], zarr_index[:, 1] = index.offsets, index.sizes
    index_bytes = zarr_index.tobytes()
    return head + sums.tobytes() + index_bytes + struct.pack("<I", crc32c(index_bytes))


class ShardWriter:
    """One shard file being written: chunks appended in any order, the tail written by finish().

    Only one thread writes a given shard (zarr shards are whole files: two writers lose data).
    """

    def __init__(self, dir_fd: int, name: str, n_chunks: int):
        self._fd = create_file(dir_fd, name)
        self._file = DirectAppender(self._fd)
        self._pos = 0
        self.index = ShardIndex(
            np.full(n_chunks, MISSING, dtype=np.uint64),
            np.full(n_chunks, MISSING, dtype=np.uint64),
            np.zeros(n_chunks, dtype=np.uint32),
            np.zeros(n_chunks, dtype=np.uint32),
        )

    @property
    def fd(self) -> int:
        return self._fd

    def write_chunk(self, j: int, frame: bytes | bytearray | memoryview, frame_crc: int,
                    raw_crc: int) -> None:
        """Append chunk j (its frame and crc32c trailer) at the end of the file."""
        self._file.write(frame)
        self._file.write(struct.pack("<I", frame_crc))
        self._record(j, len(frame), frame_crc, raw_crc)

    def write_raw_chunk(self, j: int, n: int,
                        fill_payload: Callable[[int, int, np.ndarray], None],
                        raw_crc: int) -> None:
        """Append chunk j of n bytes as a raw-blocks frame that fill_payload (see
        fill_raw_frame) writes in the file's staging buffer: no frame is built elsewhere and
        copied in."""
        size = raw_frame_bytes(n)
        frame_crc = []

        def fill(view: memoryview) -> None:
            buffer = np.frombuffer(view, dtype=np.uint8)  # (size + 4,)
            fill_raw_frame(buffer[:size], n, fill_payload)
            frame_crc.append(crc32c(buffer[:size]))
            struct.pack_into("<I", buffer, size, frame_crc[0])

        self._file.write_filled(size + 4, fill)
        self._record(j, size, frame_crc[0], raw_crc)

    def _record(self, j: int, frame_bytes: int, frame_crc: int, raw_crc: int) -> None:
        self.index.offsets[j] = self._pos
        self.index.sizes[j] = frame_bytes + 4
        self.index.encoded_crcs[j] = frame_crc
        self.index.raw_crcs[j] = raw_crc
        self._pos += frame_bytes + 4

    def flush(self) -> None:
        """Make the chunks written so far readable from the file (reads of this run)."""
        self._file.flush()

    def finish(self) -> ShardRecord:
        """Write the checksum block and the zarr index, sync and close; every chunk written."""
        if bool((self.index.offsets == MISSING).any()):
            missing = int(np.flatnonzero(self.index.offsets == MISSING)[0])
            raise AssertionError(f"shard finished with chunk {missing} unwritten")
        tail = _tail(self.index)
        self._file.write(tail)
        self._file.finish()
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        return ShardRecord(self._pos + len(tail), crc32c(tail))

    def abort(self) -> None:
        if self._fd >= 0:
            self._file.wait()  # no direct write of it may land after the number is reused
            os.close(self._fd)
            self._fd = -1


def max_chunk_bytes(chunk_bytes: int) -> int:
    """The most bytes one stored chunk of `chunk_bytes` raw bytes takes (frame and trailer): a
    raw-blocks frame, as zstd frames are kept only when smaller (slack for older stores)."""
    return raw_frame_bytes(chunk_bytes) + 4 + (chunk_bytes >> 7) + 1024


def read_index(fd: int, n_chunks: int, record: ShardRecord, chunk_bytes: int) -> ShardIndex:
    """The index of a finished shard, checked against its group record; ValueError if damaged.

    chunk_bytes: raw bytes of one chunk; a chunk stored larger than any frame of it can be is
    refused here, before a read of that size (a forged index could ask for a TiB)."""
    size = os.fstat(fd).st_size
    if size != record.size:
        raise ValueError(f"the file holds {size} bytes where the store recorded {record.size}")
    tail_size = tail_bytes(n_chunks)
    if tail_size > size:
        raise ValueError("the file is too short for its index")
    tail = pread_exact(fd, tail_size, size - tail_size)
    if crc32c(tail) != record.tail_crc:
        raise ValueError("its index does not match the checksum the store recorded")
    if tail[:4] != _SUMS_MAGIC or struct.unpack_from("<II", tail, 4) != (_SUMS_VERSION, n_chunks):
        raise ValueError("its checksum block is not one relex_stream writes")
    sums = np.frombuffer(tail, dtype="<u4", count=2 * n_chunks, offset=12).reshape(n_chunks, 2)
    zarr_index = np.frombuffer(
        tail, dtype="<u8", count=2 * n_chunks, offset=12 + 8 * n_chunks
    ).reshape(n_chunks, 2)
    offsets, sizes = zarr_index[:, 0].copy(), zarr_index[:, 1].copy()
    data_end = size - tail_size
    if bool((offsets == MISSING).any()) or bool((sizes == MISSING).any()):
        raise ValueError("a chunk is missing from its index")
    end = np.uint64(data_end)  # (offset + size could wrap around in uint64)
    if bool((sizes < 5).any()) or bool((sizes > end).any()) or bool((offsets > end - sizes).any()):
        raise ValueError("its index points outside the file")
    if bool((sizes > np.uint64(max_chunk_bytes(chunk_bytes))).any()):
        raise ValueError("its index holds a chunk larger than any chunk can be stored")
    return ShardIndex(offsets, sizes, sums[:, 0].copy(), sums[:, 1].copy())


def read_chunk_payload(fd: int, index: ShardIndex, j: int) -> bytes:
    """The encoded bytes (frame and trailer) of chunk j."""
    return pread_exact(fd, int(index.sizes[j]), int(index.offsets[j]))


# --------------------------------------------------------------------------- zarr metadata

_BYTES = {"name": "bytes", "configuration": {"endian": "little"}}
_CRC = {"name": "crc32c"}
_KEYS = {"name": "default", "configuration": {"separator": "/"}}


def unsigned_name(itemsize: int) -> str:
    """zarr data type of a word of `itemsize` bytes (bits are stored as unsigned words)."""
    return {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64"}[itemsize]


def sharded_array_meta(shape: list[int], itemsize: int, inner_cols: int) -> dict:
    """zarr.json of a (rows, width) array of words, one shard per row, inner chunks of a row."""
    codecs = [_BYTES, {"name": "zstd", "configuration": {"level": ZSTD_LEVEL, "checksum": False}}]
    sharding = {
        "name": "sharding_indexed",
        "configuration": {
            "chunk_shape": [1, inner_cols],
            "codecs": [*codecs, _CRC],
            "index_codecs": [_BYTES, _CRC],
            "index_location": "end",
        },
    }
    return _array_meta(shape, unsigned_name(itemsize), [1, shape[1]], [sharding])


def plain_array_meta(shape: list[int], data_type: str) -> dict:
    """zarr.json of a small array stored as one uncompressed chunk with a crc32c."""
    return _array_meta(shape, data_type, [max(1, s) for s in shape], [_BYTES, _CRC])


def _array_meta(shape: list[int], data_type: str, chunks: list[int], codecs: list) -> dict:
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": list(shape),
        "data_type": data_type,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunks}},
        "chunk_key_encoding": _KEYS,
        "fill_value": 0 if data_type != "bool" else False,
        "codecs": codecs,
        "attributes": {},
        "storage_transformers": [],
    }


def group_meta(attributes: dict | None = None) -> dict:
    return {"zarr_format": 3, "node_type": "group", "attributes": attributes or {}}


def plain_chunk(data: np.ndarray) -> tuple[bytes, int]:
    """The one chunk of a plain array: its little-endian bytes and their crc32c trailer."""
    raw = np.ascontiguousarray(data).tobytes()
    crc = crc32c(raw)
    return raw + struct.pack("<I", crc), crc


def read_plain_chunk(
    payload: bytes, expected_crc: int | None, dtype: np.dtype, count: int
) -> np.ndarray:
    """Check and decode the chunk of a plain array; ValueError if damaged.

    expected_crc: what the parent recorded, or None when the caller checks a digest after.
    """
    if len(payload) != count * np.dtype(dtype).itemsize + 4:
        raise ValueError("the chunk has the wrong size")
    data, trailer = payload[:-4], int.from_bytes(payload[-4:], "little")
    actual = crc32c(data)
    if actual != trailer or (expected_crc is not None and actual != expected_crc):
        raise ValueError("checksum mismatch")
    return np.frombuffer(data, dtype=dtype).copy()
