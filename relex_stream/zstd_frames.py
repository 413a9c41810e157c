"""zstd frames of the store's chunks, with one compression context per thread.

numcodecs' Zstd creates and frees a compression context for every chunk it encodes: with the
1 MiB chunks of the store, each context's tables are fresh memory (page faults and zeroing), a
few percent of the store writer's CPU on the drift bench (bench/RESULTS.md). Its extension
module exports the zstd library it is built with, so the same library is called here through
ctypes with a context kept per thread (the GIL is let go during the call, as numcodecs does).
The frames are the bytes numcodecs writes (same library, same level; checked at import on a
known input, else numcodecs is used).
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
    """A thread's compression context and output buffer; freed with the thread."""

    def __init__(self, library: ctypes.CDLL):
        self._library = library
        self.cctx = library.ZSTD_createCCtx()
        if not self.cctx:
            raise MemoryError("ZSTD_createCCtx failed")
        self.out = np.empty(0, dtype=np.uint8)

    def buffer(self, nbytes: int) -> np.ndarray:
        if self.out.size < nbytes:
            self.out = np.empty(nbytes, dtype=np.uint8)
        return self.out

    def __del__(self) -> None:
        if getattr(self, "cctx", None):
            self._library.ZSTD_freeCCtx(self.cctx)
            self.cctx = None


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
        probe = np.frombuffer(bytes(range(256)) * 64 + bytes(5000), dtype=np.uint8)
        frame = _compress_with(_Context(library), library, probe)
        if bytes(frame) != bytes(_numcodecs.encode(probe)):
            log.debug("zstd through ctypes gives other bytes than numcodecs: not used")
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


_library = _load()


def compress(data: memoryview | np.ndarray, reuse: bool = False) -> bytes | memoryview:
    """One zstd frame (level LEVEL) of a contiguous buffer's bytes. With `reuse`, a view of
    this thread's output buffer, valid until the thread's next compress; else bytes."""
    if _library is None:
        return _numcodecs.encode(data)
    array = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    context = getattr(_local, "context", None)
    if context is None:
        context = _local.context = _Context(_library)
    frame = _compress_with(context, _library, array)
    return frame if reuse else bytes(frame)


def decompress(frame: bytes | memoryview, out: np.ndarray) -> None:
    """Decode one frame into `out` (contiguous; its size is the frame's content size)."""
    _numcodecs.decode(frame, out=out)
