"""Appends to a new file past the page cache (O_DIRECT) where the file system takes them.

Writing the store through the page cache costs about as much CPU as reading the checkpoints:
on this project's bench machine 6.3 GB took 6.9 s of system time written buffered and 0.55 s
written direct (bench/RESULTS.md), and buffered writes also evict the checkpoint pages a run is
reading. Direct writes need the buffer address, the file offset and the length aligned, so the
bytes are staged in aligned buffers and written a whole number of blocks at a time; the
unaligned end is written through the page cache by `flush` or `finish`. A file system that
refuses direct I/O (at open or at any write) gets ordinary writes: the bytes in the file are
the same either way.

A direct write waits for the device. So that the writing thread can build the next chunk
meanwhile, each writing thread has STAGES staging buffers and a helper thread that writes the
full ones: one is filled while the others are being written (on the dense bench ~5% of the
run's wall time, bench/RESULTS.md). Everything else happens on the writing thread: a file's
writes in flight are waited for before anything goes through the page cache, before `flush`
and `finish` return, and before its descriptor may be closed (`settle`); a refusal the helper
met is then written buffered, and any other error is raised there.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import queue
import threading
import weakref
from collections.abc import Callable

ALIGN_BYTES = 4096  # the largest logical block size in use; a multiple of the smaller ones
STAGE_BYTES = 4 << 20  # one staging buffer (fixed cost, not the budget)
STAGES = 3  # staging buffers per writing thread: one being filled, the others being written
DIRECT_MIN_BYTES = 256 << 10  # smaller writes go through the page cache (see DirectAppender)
O_DIRECT = getattr(os, "O_DIRECT", 0)  # 0 where the platform has none: always buffered

_local = threading.local()


class _InFlight:
    """What a writing thread and its helper share: which staging buffers are free, and a lock
    and condition for the appenders' counts of writes in flight."""

    def __init__(self) -> None:
        self.free = [threading.Event() for _ in range(STAGES)]
        for event in self.free:
            event.set()
        self.changed = threading.Condition()


class _Stages:
    """A writing thread's staging buffers and the helper thread that writes them direct; the
    helper ends when the writing thread does (this object is then collected)."""

    def __init__(self) -> None:
        self.buffers = [memoryview(mmap.mmap(-1, STAGE_BYTES)) for _ in range(STAGES)]
        self.current = 0
        self.shared = _InFlight()
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=_write_jobs, args=(self.jobs, self.shared), daemon=True,
                         name="relex-direct-writes").start()
        weakref.finalize(self, self.jobs.put, None)

    def filling(self) -> memoryview:
        """The buffer to fill next (waits until it is written, when it was in flight)."""
        self.shared.free[self.current].wait()
        return self.buffers[self.current]

    def send(self, appender: DirectAppender, blocks: memoryview, offset: int) -> None:
        """Hand blocks (the start of the buffer being filled) to the helper; fill the next."""
        with self.shared.changed:
            appender._in_flight += 1
        self.shared.free[self.current].clear()
        self.jobs.put((appender, blocks, offset, self.current))
        self.current = (self.current + 1) % STAGES


def _stages() -> _Stages:
    stages = getattr(_local, "stages", None)
    if stages is None:
        stages = _local.stages = _Stages()
    return stages


def _stage() -> memoryview:
    """This thread's aligned staging buffer to fill (an anonymous mapping is page aligned)."""
    return _stages().filling()


def _write_jobs(jobs: queue.SimpleQueue, shared: _InFlight) -> None:
    """The helper: write each job's blocks direct at its offset. What the file system refuses
    (EINVAL, or a short write not on a block boundary), and every later job of the same file,
    is kept as bytes for the writing thread to write buffered; another error is kept to be
    raised there."""
    while True:
        job = jobs.get()
        if job is None:
            return
        appender, blocks, offset, index = job
        try:
            if not appender._refused and appender._error is None:
                offset, blocks = _pwrite_direct(appender.fd, blocks, offset)
            if blocks and appender._error is None:
                appender._refused.append((offset, bytes(blocks)))
        except BaseException as exc:  # raised on the writing thread
            appender._error = exc
        finally:
            shared.free[index].set()
            with shared.changed:
                appender._in_flight -= 1
                shared.changed.notify_all()
            # hold nothing while waiting: the appender keeps the stages alive, and they must be
            # collected for this thread to be told to end
            del job, appender, blocks


def _pwrite_direct(fd: int, blocks: memoryview, offset: int) -> tuple[int, memoryview]:
    """Write whole blocks direct at offset until all are written or the file system refuses
    (EINVAL, or a short write off a block boundary): the offset reached and what is left."""
    while blocks:
        try:
            done = os.pwrite(fd, blocks, offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            break
        offset += done
        blocks = blocks[done:]
        if blocks and (done == 0 or done % ALIGN_BYTES):
            break
    return offset, blocks


def set_direct(fd: int, on: bool) -> bool:
    """Set (on) or clear O_DIRECT on fd; False when that fails (or the platform has none)."""
    if not O_DIRECT:
        return False
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, (flags | O_DIRECT) if on else (flags & ~O_DIRECT))
    except OSError:
        return False
    return True


class DirectAppender:
    """Sequential writes to `fd` (a new, empty file opened for writing) from its start.

    Writes of at least DIRECT_MIN_BYTES go direct, and so do the writes that follow one until
    something makes the file readable (flush, finish); other small ones (compressed chunks) go
    through the page cache, where they cost little, because a direct write waits for the
    device: one per small frame made the realistic bench's store writer ~2 s slower. The last
    partial block is kept in memory either way, so the next direct write starts on a boundary.
    """

    def __init__(self, fd: int, direct: bool = True):
        self.fd = fd
        self._can_direct = direct and set_direct(fd, True) and set_direct(fd, False)
        self._direct_on = False  # the fd's O_DIRECT flag as last set
        self._end = 0  # bytes written so far
        self._carry = b""  # the bytes after the last block boundary before _end
        self._carry_in_file = True  # whether _carry has been written (else only in memory)
        self._stages: _Stages | None = None  # where this file's writes in flight went
        self._in_flight = 0  # blocks handed to the helper and not yet written
        self._refused: list[tuple[int, bytes]] = []  # (offset, bytes) the helper could not write
        self._error: BaseException | None = None  # what the helper met, raised by settle()

    @property
    def direct(self) -> bool:
        """Whether large writes still go direct (False once the file system refused)."""
        return self._can_direct

    def wait(self) -> None:
        """Wait for this file's writes in flight (from any thread): then its descriptor may be
        closed without a late write landing in whatever file reuses the number."""
        if self._stages is None:
            return
        shared = self._stages.shared
        with shared.changed:
            while self._in_flight:
                shared.changed.wait()

    def settle(self) -> None:
        """Wait for this file's writes in flight; write buffered what the file system refused
        (no more direct writes then); raise an error the helper met. After it, the file's
        descriptor may be closed."""
        self.wait()
        error, self._error = self._error, None
        if error is not None:
            self._refused.clear()
            raise error
        if self._refused:
            self._can_direct = False
            self._mode(direct=False)
            for offset, data in self._refused:
                _pwrite_all(self.fd, memoryview(data), offset)
            self._refused.clear()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._check()
        view = memoryview(data).cast("B")
        if not view:
            return
        # after a direct write its unaligned end is held in memory: what follows (a chunk's
        # 4-byte trailer) joins it rather than forcing it out through the page cache
        if self._can_direct and (len(view) >= DIRECT_MIN_BYTES or not self._carry_in_file):
            self._write_direct(view)
        else:
            self._write_buffered(view)

    def write_filled(self, n: int, fill: Callable[[memoryview], None]) -> None:
        """Append n bytes that `fill` writes into the (n,) view it is given: straight into the
        staging buffer when they go direct, so a chunk built there is not copied once more."""
        self._check()
        if n <= 0:
            return
        stage = _stage()
        held = len(self._carry)
        direct = self._can_direct and (n >= DIRECT_MIN_BYTES or not self._carry_in_file)
        if direct and held + n <= STAGE_BYTES:
            offset = self._end - held  # a block boundary
            self._end += n
            stage[:held] = self._carry
            fill(stage[held : held + n])
            self._send_stage(stage, held + n, offset, memoryview(b""))
        elif not direct and n <= STAGE_BYTES:  # the staging buffer is free between writes
            fill(stage[:n])
            self._write_buffered(stage[:n])
        else:  # (a direct write would stage the carry over the bytes: build them apart)
            buffer = memoryview(bytearray(n))
            fill(buffer)
            self.write(buffer)

    def flush(self) -> None:
        """Make every byte written so far readable from the file."""
        self.settle()
        if self._carry and not self._carry_in_file:
            self._mode(direct=False)
            _pwrite_all(self.fd, memoryview(self._carry), self._end - len(self._carry))
            self._carry_in_file = True

    def finish(self) -> None:
        """Write what is still in memory (the caller syncs and closes)."""
        self.flush()
        self._mode(direct=False)

    def _write_buffered(self, view: memoryview) -> None:
        self.flush()  # the block holding the carry must be in the file before bytes after it
        self._mode(direct=False)
        end = _pwrite_all(self.fd, view, self._end)
        tail = end % ALIGN_BYTES
        if len(view) >= tail:
            self._carry = bytes(view[len(view) - tail :])
        else:
            self._carry = (self._carry + bytes(view))[-tail:]
        self._end, self._carry_in_file = end, True

    def _write_direct(self, view: memoryview) -> None:
        """Stage the carry and view, write the whole blocks direct, keep the rest in memory."""
        offset = self._end - len(self._carry)  # a block boundary
        self._end += len(view)
        while view:
            stage = _stage()  # the last one filled may still be in flight
            held = len(self._carry)
            take = min(len(view), STAGE_BYTES - held)
            stage[:held] = self._carry
            stage[held : held + take] = view[:take]
            view = view[take:]
            next_offset = self._send_stage(stage, held + take, offset, view)
            if next_offset is None:
                return
            offset = next_offset

    def _send_stage(self, stage: memoryview, filled: int, offset: int,
                    rest: memoryview) -> int | None:
        """Write the whole blocks of stage[:filled] (from `offset`, a block boundary) direct and
        keep their unaligned end; the offset after them, or None when the file system refused
        and what was left (with `rest`, the bytes not yet staged) went through the page cache."""
        whole = filled - filled % ALIGN_BYTES
        self._carry, self._carry_in_file = bytes(stage[whole:filled]), False
        if whole:
            offset = self._write_blocks(stage[:whole], offset)
        if not self._can_direct:  # refused: what is left goes through the page cache
            left = self._carry + bytes(rest)  # from a block boundary to _end
            _pwrite_all(self.fd, memoryview(left), offset)
            tail = self._end % ALIGN_BYTES
            self._carry, self._carry_in_file = left[len(left) - tail :], True
            return None
        return offset

    def _write_blocks(self, blocks: memoryview, offset: int) -> int:
        """Write whole blocks (the start of the staging buffer being filled) at offset direct,
        through this thread's helper; when O_DIRECT cannot be set, stop using direct I/O for
        this file and write them buffered. Returns the offset after them."""
        self._mode(direct=True)
        if not self._direct_on:
            self._can_direct = False
            self._mode(direct=False)  # (waits for this file's writes in flight, if any)
            return _pwrite_all(self.fd, blocks, offset)
        stages = _stages()
        if self._stages is not stages:  # written from another thread before: its helper's
            self.wait()  # writes must land first (and wait() watches one helper at a time)
            self._stages = stages
        stages.send(self, blocks, offset)
        return offset + len(blocks)

    def _check(self) -> None:
        """Act on what the helper met (a refusal, an error) before writing on."""
        if self._refused or self._error is not None:
            self.settle()

    def _mode(self, direct: bool) -> None:
        if not direct and self._in_flight:  # buffered bytes must not race direct ones
            self.settle()
        if direct != self._direct_on and set_direct(self.fd, direct):
            self._direct_on = direct


def _pwrite_all(fd: int, view: memoryview, offset: int) -> int:
    """Write all of view at offset (through whatever mode fd is in); the offset after it."""
    while view:
        done = os.pwrite(fd, view, offset)
        if done == 0:
            raise OSError(errno.EIO, "a write made no progress")
        offset += done
        view = view[done:]
    return offset
