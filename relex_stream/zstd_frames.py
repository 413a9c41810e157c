"""zstd frames of the store's chunks, with one (de)compression context per thread.

numcodecs' Zstd creates and frees a context for every chunk it encodes or decodes: with the
1 MiB chunks of the store, each context's tables are fresh memory (page faults and zeroing), a
few percent of the store writer's CPU on the drift bench, and half the time of decoding a raw
chunk (bench/RESULTS.md). Its extension module exports the zstd library it is built with, so
the same library is called here through ctypes with contexts kept per thread (the GIL is let go
during the call, as numcodecs does). The frames are the bytes numcodecs writes (same library,
same level; checked at import on a known input, else numcodecs is used), and decoding writes at
most the bytes of `out`, whatever a frame claims.
"""

from __future__ import annotations

import ctypes
import logging
import threading

import numpy as np
from numcodecs import Zstd

log = logging.getLogger(__name__)

LEVEL = 1
_numcodecs = Zstd(level=LEVEL)
_local = threading.local()


class _Context:
    """A thread's zstd contexts (compression, decompression) and output buffer; freed with
    the thread."""

    def __init__(self, library: ctypes.CDLL):
        self._library = library
        self.cctx = library.ZSTD_createCCtx()
        self.dctx = library.ZSTD_createDCtx()
        if not self.cctx or not self.dctx:
            raise MemoryError("ZSTD_createCCtx or ZSTD_createDCtx failed")
        self.out = np.empty(0, dtype=np.uint8)

    def buffer(self, nbytes: int) -> np.ndarray:
        if self.out.size < nbytes:
            self.out = np.empty(nbytes, dtype=np.uint8)
        return self.out

    def __del__(self) -> None:
        if getattr(self, "cctx", None):
            self._library.ZSTD_freeCCtx(self.cctx)
            self.cctx = None
        if getattr(self, "dctx", None):
            self._library.ZSTD_freeDCtx(self.dctx)
            self.dctx = None


def _load() -> ctypes.CDLL | None:
    try:
        import numcodecs.zstd

        library = ctypes.CDLL(numcodecs.zstd.__file__)
        library.ZSTD_createCCtx.restype = ctypes.c_void_p
        library.ZSTD_createCCtx.argtypes = []
        library.ZSTD_freeCCtx.restype = ctypes.c_size_t
        library.ZSTD_freeCCtx.argtypes = [ctypes.c_void_p]
        library.ZSTD_compressBound.restype = ctypes.c_size_t
        library.ZSTD_compressBound.argtypes = [ctypes.c_size_t]
        library.ZSTD_isError.restype = ctypes.c_uint
        library.ZSTD_isError.argtypes = [ctypes.c_size_t]
        library.ZSTD_compressCCtx.restype = ctypes.c_size_t
        library.ZSTD_compressCCtx.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                              ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        library.ZSTD_createDCtx.restype = ctypes.c_void_p
        library.ZSTD_createDCtx.argtypes = []
        library.ZSTD_freeDCtx.restype = ctypes.c_size_t
        library.ZSTD_freeDCtx.argtypes = [ctypes.c_void_p]
        library.ZSTD_decompressDCtx.restype = ctypes.c_size_t
        library.ZSTD_decompressDCtx.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                                ctypes.c_void_p, ctypes.c_size_t]
        probe = np.frombuffer(bytes(range(256)) * 64 + bytes(5000), dtype=np.uint8)
        context = _Context(library)
        frame = _compress_with(context, library, probe)
        if bytes(frame) != bytes(_numcodecs.encode(probe)):
            log.debug("zstd through ctypes gives other bytes than numcodecs: not used")
            return None
        decoded = np.empty_like(probe)
        _decompress_with(context, library, np.frombuffer(bytes(frame), dtype=np.uint8), decoded)
        if not np.array_equal(decoded, probe):
            log.debug("zstd through ctypes does not decode its own frame: not used")
            return None
        return library
    except (ImportError, OSError, AttributeError, MemoryError, ValueError) as exc:
        log.debug("zstd through ctypes is not available (%s): numcodecs compresses", exc)
        return None


def _compress_with(context: _Context, library: ctypes.CDLL, data: np.ndarray) -> memoryview:
    capacity = int(library.ZSTD_compressBound(data.size))
    out = context.buffer(capacity)
    size = library.ZSTD_compressCCtx(context.cctx, out.ctypes.data, capacity, data.ctypes.data,
                                     data.size, LEVEL)
    if library.ZSTD_isError(size):
        raise ValueError(f"zstd could not compress a {data.size}-byte chunk (code {size})")
    return memoryview(out)[:size]


def _decompress_with(context: _Context, library: ctypes.CDLL, frame: np.ndarray,
                     out: np.ndarray) -> None:
    size = library.ZSTD_decompressDCtx(context.dctx, out.ctypes.data, out.size, frame.ctypes.data,
                                       frame.size)
    if library.ZSTD_isError(size):
        raise ValueError(f"zstd could not decode a {frame.size}-byte frame (code {size})")
    if size != out.size:
        raise ValueError(f"a zstd frame decoded to {size} bytes, expected {out.size}")


_library = _load()


def _context() -> _Context:
    context = getattr(_local, "context", None)
    if context is None:
        context = _local.context = _Context(_library)
    return context


def compress(data: memoryview | np.ndarray, reuse: bool = False) -> bytes | memoryview:
    """One zstd frame (level LEVEL) of a contiguous buffer's bytes. With `reuse`, a view of
    this thread's output buffer, valid until the thread's next compress; else bytes."""
    if _library is None:
        return _numcodecs.encode(data)
    array = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    frame = _compress_with(_context(), _library, array)
    return frame if reuse else bytes(frame)


def decompress(frame: bytes | memoryview, out: np.ndarray) -> None:
    """Decode one frame into `out` ((n,) uint8, contiguous): exactly n bytes, else ValueError
    (or numcodecs' RuntimeError where the library is not used)."""
    if _library is None:
        _numcodecs.decode(frame, out=out)
        return
    if out.dtype != np.uint8 or out.ndim != 1 or not out.flags.c_contiguous:
        raise ValueError(f"out must be contiguous (n,) uint8, got {out.shape} {out.dtype}")
    source = np.frombuffer(memoryview(frame).cast("B"), dtype=np.uint8)
    _decompress_with(_context(), _library, source, out)
