"""A background reader that fills preallocated buffers with the next chunk while one is in use.

The order of every read of a run is known before the first one (only the writes wait for the
combination weights), so one thread can run ahead through that list. Buffers come from a fixed
pool of arenas: the reader waits for a free arena, so memory stays bounded whatever the model.
On CUDA the arenas are pinned, so uploads from them can be asynchronous.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ChunkRead:
    """One read: columns [start, stop) of a tensor's base and K observed rows."""

    tensor: str
    stage: str  # "gram" (first pass) or "materialise" (second pass)
    start: int
    stop: int
    n_rows: int
    bits: np.dtype  # numpy dtype holding the tensor's bits

    @property
    def nbytes(self) -> int:
        """Bytes of base and rows this read brings in."""
        return (self.n_rows + 1) * (self.stop - self.start) * self.bits.itemsize


@dataclass
class Chunk:
    """A filled buffer: base (c,) and rows (K, c) of the tensor's bit dtype; release() frees it."""

    job: ChunkRead
    base: np.ndarray
    rows: np.ndarray
    release: Callable[[], None]


class ChunkReader:
    """Iterate over filled chunks in job order; `fill(job, base, rows)` does the actual reading."""

    def __init__(
        self,
        jobs: list[ChunkRead],
        fill: Callable[[ChunkRead, np.ndarray, np.ndarray], None],
        n_arenas: int = 2,
        pin_memory: bool = False,
    ):
        self._jobs, self._fill = jobs, fill
        arena_bytes = max((j.nbytes for j in jobs), default=0) + 64
        self._arenas = [
            torch.empty(arena_bytes, dtype=torch.uint8, pin_memory=pin_memory)
            for _ in range(n_arenas)
        ]
        self._free: queue.Queue[int] = queue.Queue()
        for i in range(n_arenas):
            self._free.put(i)
        self._ready: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relex-reader", daemon=True)
        self._thread.start()

    @property
    def arena_bytes(self) -> int:
        return sum(a.numel() for a in self._arenas)

    def _views(self, arena: int, job: ChunkRead) -> tuple[np.ndarray, np.ndarray]:
        width = job.stop - job.start
        raw = self._arenas[arena].numpy()
        flat = raw[: job.nbytes].view(job.bits)
        return flat[:width], flat[width:].reshape(job.n_rows, width)

    def _run(self) -> None:
        try:
            for job in self._jobs:
                arena = self._free.get()
                if self._stop.is_set():
                    return
                base, rows = self._views(arena, job)
                self._fill(job, base, rows)
                self._ready.put((job, arena, base, rows))
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
            job, arena, base, rows = item
            yield Chunk(job, base, rows, lambda arena=arena: self._free.put(arena))

    def close(self) -> None:
        """Stop the thread (after the read in flight) and wait for it."""
        self._stop.set()
        for _ in self._arenas:
            self._free.put(0)
        self._thread.join()
