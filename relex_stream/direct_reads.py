"""Reads of checkpoint bytes past the page cache (O_DIRECT) when the cache does not hold them.

A run reads every checkpoint byte once or twice, and a trajectory is usually far larger than
RAM. Read through the page cache, those bytes cost the kernel a page allocation and a copy each,
plus reclaiming older pages once the cache is full: on this project's bench machine reading 6.2
GB cold took 8.0-11.8 s through the cache (11.0 s of system time where it was recorded) and
2.8-4.1 s direct in 4 MiB pieces (0.21 s), bench/RESULTS.md. A run on two cores pays that CPU
time out of its Gram product. So a read whose pages are mostly not in the page cache (mincore)
is read direct: whole aligned blocks into this thread's staging buffer, then copied into place.
A read the cache holds (a warm rerun, a small model) is left to it, and so is anything the file
system or platform will not do direct: the bytes are the same either way.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading

import numpy as np

from .direct_writes import ALIGN_BYTES, O_DIRECT, set_direct

STAGE_BYTES = 4 << 20  # one direct read (fixed cost per reading thread, not the budget)
DIRECT_MIN_BYTES = 256 << 10  # smaller reads go through the page cache
RESIDENT_ENOUGH = 0.5  # a read with at least this fraction of its pages cached uses the cache

_local = threading.local()


def _libc_calls():
    """(mmap, mincore, munmap) from the C library through ctypes, or None."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        map_, core, unmap = libc.mmap, libc.mincore, libc.munmap
    except (OSError, AttributeError):
        return None
    map_.restype = ctypes.c_void_p
    map_.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                     ctypes.c_int64]
    core.restype = ctypes.c_int
    core.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    unmap.restype = ctypes.c_int
    unmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return map_, core, unmap


_LIBC = _libc_calls() if O_DIRECT else None
_MAP_FAILED = ctypes.c_void_p(-1).value


def resident_fraction(fd: int, offset: int, length: int) -> float:
    """Fraction of the pages of bytes [offset, offset + length) of fd in the page cache (1.0
    when that cannot be told). Maps the range without touching it: no page is read."""
    if _LIBC is None or length <= 0:
        return 1.0
    map_, core, unmap = _LIBC
    page = mmap.PAGESIZE
    start = offset - offset % page
    span = offset + length - start
    address = map_(None, span, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
    if address in (None, _MAP_FAILED):
        return 1.0
    try:
        pages = np.empty(-(-span // page), dtype=np.uint8)
        if core(address, span, pages.ctypes.data) != 0:
            return 1.0
        return float(np.count_nonzero(pages & 1)) / pages.size
    finally:
        unmap(address, span)


def _stage() -> np.ndarray:
    """This thread's aligned (STAGE_BYTES,) staging buffer (an anonymous mapping is aligned)."""
    stage = getattr(_local, "stage", None)
    if stage is None or stage.shape[0] != STAGE_BYTES:
        stage = _local.stage = np.frombuffer(mmap.mmap(-1, STAGE_BYTES), dtype=np.uint8)
    return stage


def read_uncached(fd: int, out: np.ndarray, offset: int) -> int:
    """Read bytes [offset, offset + len(out)) of fd into `out` ((n,) uint8) direct when the page
    cache holds few of them; returns how many leading bytes of `out` it filled (0: none, read
    them through the cache; fewer than n: the file ended, or the file system stopped taking
    direct reads). fd is left as it came (no O_DIRECT)."""
    n = out.shape[0]
    if not O_DIRECT or n < DIRECT_MIN_BYTES:
        return 0
    if resident_fraction(fd, offset, n) >= RESIDENT_ENOUGH:
        return 0
    if not set_direct(fd, True):
        return 0
    stage = _stage()
    done = 0
    try:
        while done < n:
            position = offset + done
            skip = position % ALIGN_BYTES  # bytes before `position` in the first block read
            want = min(STAGE_BYTES, -(-(skip + n - done) // ALIGN_BYTES) * ALIGN_BYTES)
            try:
                got = os.preadv(fd, [stage[:want]], position - skip)
            except OSError as exc:
                if exc.errno == errno.EINVAL:  # no direct reads here after all: the cache reads
                    break
                raise
            take = min(got - skip, n - done)
            if take <= 0:
                break
            np.copyto(out[done : done + take], stage[skip : skip + take])
            done += take
            if got < want:  # the end of the file
                break
    finally:
        set_direct(fd, False)
    return done
