"""Direct (O_DIRECT) appends write exactly the bytes given, whatever the file system does."""

from __future__ import annotations

import errno
import fcntl
import gc
import os
import random
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relex_stream import direct_writes
from relex_stream.direct_writes import (
    ALIGN_BYTES,
    DIRECT_MIN_BYTES,
    O_DIRECT,
    STAGE_BYTES,
    DirectAppender,
)

SIZES = [0, 1, 3, ALIGN_BYTES - 1, ALIGN_BYTES, ALIGN_BYTES + 1, 5 * ALIGN_BYTES + 7,
         STAGE_BYTES - 5, STAGE_BYTES, STAGE_BYTES + ALIGN_BYTES + 3, 2 * STAGE_BYTES + 11]


def _append(appender: DirectAppender, piece: bytes, filled: bool) -> None:
    """write(piece), or write_filled with a fill that builds the piece in the view it is given
    (as the store builds a raw frame in the staging buffer)."""
    if not filled:
        appender.write(piece)
        return

    def fill(view: memoryview) -> None:
        assert len(view) == len(piece)
        view[:] = b"\xee" * len(view)  # whatever was there must not matter
        view[:] = piece

    appender.write_filled(len(piece), fill)


def _write(path, pieces: list[bytes], direct: bool = True,
           filled: str = "none") -> DirectAppender:
    """filled: 'none' (every piece by write), 'all' (by write_filled) or 'odd' (alternating)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        appender = DirectAppender(fd, direct=direct)
        for i, piece in enumerate(pieces):
            _append(appender, piece, filled == "all" or (filled == "odd" and i % 2 == 1))
        appender.finish()
        os.fsync(fd)
    finally:
        os.close(fd)
    return appender


def _pieces(sizes: list[int], seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(n) for n in sizes]


def _direct_supported(tmp_path) -> bool:
    if not O_DIRECT:
        return False
    try:
        fd = os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


@pytest.mark.parametrize("filled", ["none", "all", "odd"])
def test_every_size_around_blocks_and_stage_round_trips(tmp_path, filled):
    pieces = _pieces(SIZES + SIZES[::-1])
    _write(tmp_path / "f", pieces, filled=filled)
    assert (tmp_path / "f").read_bytes() == b"".join(pieces)


def test_direct_io_is_used_where_the_file_system_takes_it(tmp_path, monkeypatch):
    if not _direct_supported(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    real_write, direct_sizes, buffered_sizes = os.pwrite, [], []

    def watching(fd, data, offset):
        sizes = direct_sizes if fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT else buffered_sizes
        sizes.append(len(data))
        return real_write(fd, data, offset)

    monkeypatch.setattr(direct_writes.os, "pwrite", watching)
    small, large = b"s" * 1000, b"L" * (DIRECT_MIN_BYTES + 5)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        appender = DirectAppender(fd)
        appender.write(small)
        assert direct_sizes == [], "a small write should go through the page cache"
        appender.write(large)
        appender.wait()  # direct writes are made by the helper thread
        assert direct_sizes and all(n % ALIGN_BYTES == 0 for n in direct_sizes)
        assert sum(direct_sizes) == (len(small) + len(large)) // ALIGN_BYTES * ALIGN_BYTES
        assert buffered_sizes == [len(small)]
        appender.write(b"tail")  # a chunk's trailer after a direct write: held, not written
        assert buffered_sizes == [len(small)]
        appender.finish()
        assert buffered_sizes == [len(small), (len(small) + len(large) + 4) % ALIGN_BYTES]
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT  # the end went through the cache
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == small + large + b"tail"


def test_buffered_writes_give_the_same_bytes(tmp_path):
    pieces = _pieces([7, STAGE_BYTES + 1, 123, ALIGN_BYTES], seed=1)
    appender = _write(tmp_path / "buffered", pieces, direct=False)
    assert not appender.direct
    _write(tmp_path / "direct", pieces)
    assert (tmp_path / "buffered").read_bytes() == (tmp_path / "direct").read_bytes()


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.one_of(st.integers(0, 3 * ALIGN_BYTES),
                                st.integers(DIRECT_MIN_BYTES, DIRECT_MIN_BYTES + 3 * ALIGN_BYTES)),
                      max_size=12),
       seed=st.integers(0, 9), filled=st.sampled_from(["none", "all", "odd"]))
def test_any_sequence_of_writes_round_trips(tmp_path_factory, sizes, seed, filled):
    path = tmp_path_factory.mktemp("seq") / "f"
    pieces = _pieces(sizes, seed)
    _write(path, pieces, filled=filled)
    assert path.read_bytes() == b"".join(pieces)


@settings(max_examples=40, deadline=None)
@given(steps=st.lists(st.one_of(st.integers(0, 3 * ALIGN_BYTES), st.just("flush"),
                                st.integers(DIRECT_MIN_BYTES, DIRECT_MIN_BYTES + 2 * ALIGN_BYTES)),
                      max_size=14),
       seed=st.integers(0, 9))
def test_flushed_bytes_are_readable_at_once_and_the_file_ends_right(tmp_path_factory, steps,
                                                                     seed):
    """What a run reads back while a shard is still being written (a second pass from the
    store) is there after flush(), and writing on after a flush loses nothing."""
    path = tmp_path_factory.mktemp("flush") / "f"
    rng = random.Random(seed)
    written = b""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        appender = DirectAppender(fd)
        for step in steps:
            if step == "flush":
                appender.flush()
                assert path.read_bytes() == written
            else:
                piece = rng.randbytes(step)
                appender.write(piece)
                written += piece
        appender.finish()
    finally:
        os.close(fd)
    assert path.read_bytes() == written


@pytest.mark.parametrize("filled", ["none", "all", "odd"])
@pytest.mark.parametrize("fail_at", [0, 1, 3])
def test_a_refused_direct_write_falls_back_to_buffered(tmp_path, monkeypatch, fail_at, filled):
    """A file system that opens O_DIRECT but refuses the writes (EINVAL) loses nothing."""
    real_write, calls = os.pwrite, []

    def refusing_write(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT:
            calls.append(len(data))
            if len(calls) > fail_at:
                raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data, offset)

    monkeypatch.setattr(direct_writes.os, "pwrite", refusing_write)
    sizes = [ALIGN_BYTES + 3, STAGE_BYTES + 9, DIRECT_MIN_BYTES + 5, 17, DIRECT_MIN_BYTES,
             2 * ALIGN_BYTES, 3 * DIRECT_MIN_BYTES + 1, 5]
    pieces = _pieces(sizes, seed=fail_at)
    appender = _write(tmp_path / "f", pieces, filled=filled)
    if O_DIRECT and _direct_supported(tmp_path):
        assert len(calls) == fail_at + 1, "the refusal should end direct writes for the file"
        assert not appender.direct
    assert (tmp_path / "f").read_bytes() == b"".join(pieces)


def test_a_short_unaligned_direct_write_is_completed_buffered(tmp_path, monkeypatch):
    real_write, short = os.pwrite, [True]

    def short_write(fd, data, offset):
        if short[0] and len(data) > 1000:
            short[0] = False
            return real_write(fd, bytes(data[:1000]), offset)  # short, at an unaligned length
        return real_write(fd, data, offset)

    monkeypatch.setattr(direct_writes.os, "pwrite", short_write)
    pieces = _pieces([3 * ALIGN_BYTES + 1, 5 * ALIGN_BYTES], seed=3)
    _write(tmp_path / "f", pieces)
    assert (tmp_path / "f").read_bytes() == b"".join(pieces)


def test_other_write_errors_are_raised(tmp_path, monkeypatch):
    def full_disk(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct_writes.os, "pwrite", full_disk)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        with pytest.raises(OSError) as caught:
            DirectAppender(fd).write(b"y" * (2 * ALIGN_BYTES))
        assert caught.value.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_a_file_system_that_refuses_o_direct_at_fcntl_gets_buffered_writes(tmp_path,
                                                                           monkeypatch):
    real_fcntl = fcntl.fcntl

    def refusing(fd, cmd, arg=0):
        if cmd == fcntl.F_SETFL and arg & O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_fcntl(fd, cmd, arg)

    monkeypatch.setattr(direct_writes.fcntl, "fcntl", refusing)
    pieces = _pieces([STAGE_BYTES + 3, 5, DIRECT_MIN_BYTES, DIRECT_MIN_BYTES + 1], seed=4)
    appender = _write(tmp_path / "f", pieces, filled="odd")
    assert not appender.direct
    assert (tmp_path / "f").read_bytes() == b"".join(pieces)


@settings(max_examples=30, deadline=None)
@given(steps=st.lists(st.tuples(st.integers(0, 2),
                                st.one_of(st.integers(0, 2 * ALIGN_BYTES),
                                          st.integers(DIRECT_MIN_BYTES, STAGE_BYTES + 3)),
                                st.booleans()),
                      max_size=16),
       seed=st.integers(0, 9))
def test_files_written_in_turn_share_the_staging_buffers_and_keep_their_bytes(
        tmp_path_factory, steps, seed):
    """The store writer appends to many shards in turn through one staging buffer, each file
    holding its unaligned end in memory meanwhile: each file ends with exactly its own bytes."""
    folder = tmp_path_factory.mktemp("turns")
    rng = random.Random(seed)
    fds = [os.open(folder / str(i), os.O_WRONLY | os.O_CREAT | os.O_EXCL) for i in range(3)]
    written = [b"", b"", b""]
    try:
        appenders = [DirectAppender(fd) for fd in fds]
        for i, size, filled in steps:
            piece = rng.randbytes(size)
            _append(appenders[i], piece, filled)
            written[i] += piece
        for appender in appenders:
            appender.finish()
    finally:
        for fd in fds:
            os.close(fd)
    for i in range(3):
        assert (folder / str(i)).read_bytes() == written[i]


def test_an_error_of_a_direct_write_is_raised_on_the_writing_thread(tmp_path, monkeypatch):
    """Direct writes are made by a helper thread: an error it meets (a full disk) is raised by
    the appender's next call, not lost."""
    if not _direct_supported(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    real_write = os.pwrite

    def full_when_direct(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data, offset)

    monkeypatch.setattr(direct_writes.os, "pwrite", full_when_direct)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        appender = DirectAppender(fd)
        appender.write(b"x" * (2 * DIRECT_MIN_BYTES))
        with pytest.raises(OSError) as caught:
            appender.finish()
        assert caught.value.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_wait_returns_once_the_helper_has_written(tmp_path, monkeypatch):
    """After wait() the whole blocks are in the file, so the descriptor may be closed (a late
    write would otherwise land in whatever file reuses its number)."""
    if not _direct_supported(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    real_write = os.pwrite

    def slow(fd, data, offset):
        time.sleep(0.2)
        return real_write(fd, data, offset)

    monkeypatch.setattr(direct_writes.os, "pwrite", slow)
    data = random.Random(5).randbytes(3 * STAGE_BYTES + 100)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        appender = DirectAppender(fd)
        appender.write(data)
        appender.wait()
        whole = len(data) // ALIGN_BYTES * ALIGN_BYTES
        with open(tmp_path / "f", "rb") as reader:  # fd itself is O_DIRECT: unaligned reads fail
            assert reader.read(whole) == data[:whole]
    finally:
        os.close(fd)


def test_the_helper_thread_ends_with_its_writing_thread(tmp_path):
    def helpers() -> int:
        return sum(t.name == "relex-direct-writes" for t in threading.enumerate())

    before = helpers()

    def write_one() -> None:
        _write(tmp_path / "f", [b"z" * (DIRECT_MIN_BYTES + 7)])

    thread = threading.Thread(target=write_one)
    thread.start()
    thread.join()
    gc.collect()
    deadline = time.monotonic() + 5
    while helpers() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert helpers() == before
    assert (tmp_path / "f").read_bytes() == b"z" * (DIRECT_MIN_BYTES + 7)


def test_a_file_written_from_one_thread_then_another_keeps_its_bytes(tmp_path, monkeypatch):
    """Each writing thread has its own helper: a file handed from one thread to the next waits
    for the first helper's writes before the second takes over, and finishes."""
    real_write = os.pwrite

    def slow_start(fd, data, offset):  # the first thread's first write is still in flight
        if offset == 0:  # when the next thread's writes are done
            time.sleep(1.0)
        return real_write(fd, data, offset)

    monkeypatch.setattr(direct_writes.os, "pwrite", slow_start)
    pieces = _pieces([STAGE_BYTES + 5, 2 * STAGE_BYTES + 3, 7, 2 * STAGE_BYTES + 1], seed=8)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        appender = DirectAppender(fd)
        for piece in pieces:
            thread = threading.Thread(target=appender.write, args=(piece,), daemon=True)
            thread.start()
            thread.join(timeout=10)
            assert not thread.is_alive(), "a write hung"
        finisher = threading.Thread(target=appender.finish, daemon=True)
        finisher.start()
        finisher.join(timeout=10)
        assert not finisher.is_alive(), "finish hung"
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"".join(pieces)
