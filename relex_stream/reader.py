"""A background reader that fills buffers from a ring of host memory ahead of the computation.

The order of every read of a run is known before the first one, so one thread runs ahead
through that list, as far as the ring has room. The ring is one slab of --max-memory's share,
handed out first in, first out: a chunk's buffer comes back when both its computation and its
store write are done. On CUDA the slab is page-locked once (cudaHostRegister), at its exact
size, so uploads from it are asynchronous and it is counted in --max-memory as it is.

Some reads wait: the second pass over a tensor starts only once its first pass has finished
(its combination weights exist, and what the store wrote is on disk), and reads nothing at all
when the first pass kept the tensor's deltas.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

ALIGN_BYTES = 64
log = logging.getLogger(__name__)


class Ring:
    """A slab of `capacity` bytes handed out in order; allocate() waits for room."""

    def __init__(self, capacity: int, pin: bool = False, device: torch.device | None = None):
        self.capacity = max(ALIGN_BYTES, -(-capacity // ALIGN_BYTES) * ALIGN_BYTES)
        self._slab = torch.empty(self.capacity, dtype=torch.uint8, device=device)
        self._pinned = _pin(self._slab) if pin else False
        self._array = self._slab.numpy() if self._slab.device.type == "cpu" else None
        self._live: collections.deque = collections.deque()  # [offset, size, freed], in order
        self._head = 0
        self._cond = threading.Condition()
        self._closed = False

    def _fits(self, size: int) -> int | None:
        """Offset where `size` bytes fit now, or None."""
        if not self._live:
            return 0 if size <= self.capacity else None
        tail = self._live[0][0]  # the oldest allocation's start; head: the newest one's end
        if self._live[-1][0] >= tail:  # not wrapped: free space [head, capacity) and [0, tail)
            if self._head + size <= self.capacity:
                return self._head
            return 0 if size <= tail else None
        return self._head if self._head + size <= tail else None  # wrapped: [head, tail)

    def allocate(self, size: int) -> tuple[int, np.ndarray]:
        """(token, a uint8 view of `size` bytes); blocks until the ring has room."""
        token, offset = self._take(size, wait=True)
        return token, self._array[offset : offset + size]

    def try_tensor(self, size: int) -> tuple[int, torch.Tensor] | None:
        """(token, a uint8 tensor of `size` bytes) if the ring has room now, else None."""
        found = self._take(size, wait=False)
        if found is None:
            return None
        token, offset = found
        return token, self._slab[offset : offset + size]

    def _take(self, size: int, wait: bool) -> tuple[int, int] | None:
        size = max(ALIGN_BYTES, -(-size // ALIGN_BYTES) * ALIGN_BYTES)
        if size > self.capacity:
            if not wait:
                return None
            raise AssertionError(f"a read of {size} bytes exceeds the ring of {self.capacity}")
        with self._cond:
            while (offset := self._fits(size)) is None:
                if self._closed:
                    raise RuntimeError("ring closed")
                if not wait:
                    return None
                self._cond.wait()
            entry = [offset, size, False]
            self._live.append(entry)
            self._head = offset + size
            return id(entry), offset

    def free(self, token: int) -> None:
        with self._cond:
            for entry in self._live:
                if id(entry) == token:
                    entry[2] = True
                    break
            while self._live and self._live[0][2]:
                self._live.popleft()
            if not self._live:
                self._head = 0
            self._cond.notify_all()

    def close_wait(self) -> None:
        """Wake whoever waits for room (they stop); the slab stays usable until close()."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def close(self) -> None:
        self.close_wait()
        if self._pinned:
            torch.cuda.synchronize()  # no upload from the slab may still be in flight
            torch.cuda.cudart().cudaHostUnregister(self._slab.data_ptr())
            self._pinned = False


def _pin(slab: torch.Tensor) -> bool:
    """Page-lock a host slab at its exact size (cudaHostRegister); False, with a warning, when
    the driver refuses (uploads are then synchronous, nothing else changes).

    Registered from a short-lived thread: a failed call leaves a CUDA error pending on the
    calling thread, which torch would report at the run's first, unrelated kernel.
    """
    device = torch.cuda.current_device()
    result: list[int] = []

    def register() -> None:
        torch.cuda.set_device(device)
        result.append(int(torch.cuda.cudart().cudaHostRegister(slab.data_ptr(), slab.numel(), 0)))

    thread = threading.Thread(target=register, name="relex-pin")
    thread.start()
    thread.join()
    if not result or result[0] != 0:
        log.warning("could not page-lock the %d-byte read buffer (CUDA error %s): uploads will "
                    "be synchronous", slab.numel(), result[0] if result else "?")
        return False
    return True


@dataclass(frozen=True)
class ReadJob:
    """One read: columns [start, stop) of a tensor's base and rows, for one or both passes."""

    key: int  # position in the run's list of reads
    tensor: str
    stage: str  # "gram" (first pass), "out" (second pass) or "both" (a tensor read once)
    start: int
    stop: int
    base_itemsize: int
    n_rows: int
    row_itemsize: int

    @property
    def nbytes(self) -> int:
        """Bytes of base and rows this read brings in."""
        width = self.stop - self.start
        return width * (self.base_itemsize + self.n_rows * self.row_itemsize)


@dataclass
class Chunk:
    """A filled buffer: base and rows of a read; release() frees it."""

    job: ReadJob
    base: np.ndarray  # (c,) base bits
    rows: np.ndarray  # (n_rows, c) row words
    release: Callable[[], None]


class ChunkReader:
    """Iterate over filled chunks in job order.

    fill(job, base, rows) does the reading; wait(job) blocks until the job may be read and
    returns the read to make (the pass may need fewer rows than planned).
    """

    def __init__(
        self,
        jobs: list[ReadJob],
        ring: Ring,
        fill: Callable[[ReadJob, np.ndarray, np.ndarray], None],
        wait: Callable[[ReadJob], ReadJob],
        base_dtypes: dict[str, np.dtype],
        row_dtypes: dict[str, np.dtype],
    ):
        self._jobs, self._ring, self._fill, self._wait = jobs, ring, fill, wait
        self._base_dtypes, self._row_dtypes = base_dtypes, row_dtypes
        self._ready: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relex-reader", daemon=True)
        self._thread.start()

    def _views(self, raw: np.ndarray, job: ReadJob) -> tuple[np.ndarray, np.ndarray]:
        width = job.stop - job.start
        base_bytes = width * job.base_itemsize
        base = raw[:base_bytes].view(self._base_dtypes[job.tensor])
        rows_raw = raw[_pad(base_bytes) : _pad(base_bytes) + width * job.n_rows * job.row_itemsize]
        rows = rows_raw.view(self._row_dtypes[job.tensor]).reshape(job.n_rows, width)
        return base, rows

    def _run(self) -> None:
        try:
            for job in self._jobs:
                if self._stop.is_set():
                    return
                job = self._wait(job)
                token, raw = self._ring.allocate(_pad(job.nbytes) + ALIGN_BYTES)
                base, rows = self._views(raw, job)
                try:
                    self._fill(job, base, rows)
                except BaseException:
                    self._ring.free(token)
                    raise
                self._ready.put((job, token, base, rows))
            self._ready.put(None)
        except BaseException as exc:  # handed to the consuming thread, which re-raises it
            self._ready.put(exc)

    def __iter__(self) -> Iterator[Chunk]:
        while True:
            item = self._ready.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            job, token, base, rows = item
            yield Chunk(job, base, rows, lambda token=token: self._ring.free(token))

    def close(self) -> None:
        """Stop the thread (after the read in flight) and wait for it."""
        self._stop.set()
        self._ring.close_wait()
        self._thread.join()


def _pad(n: int) -> int:
    return -(-n // ALIGN_BYTES) * ALIGN_BYTES
