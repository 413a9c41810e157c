"""Checkpoint bytes the page cache does not hold are read past it (O_DIRECT): the same bytes.

The files are evicted from the page cache with posix_fadvise(DONTNEED) (clean pages go), so the
direct path is taken for real; where this file system takes no direct reads, or the pages will
not go, the tests that need them skip and say why.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relex_stream import direct_reads, sources
from relex_stream.cli import main as cli_main
from relex_stream.errors import RelexError
from relex_stream.tensor_files import Piece, TensorInfo, read_into

from .fixtures import Spec, build_trajectory
from .helpers import check_against_reference

FILE_BYTES = 3 * (64 << 10) + 12345  # several small stages, and an unaligned end


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _cold_fraction(path: Path) -> float:
    _evict(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        return direct_reads.resident_fraction(fd, 0, path.stat().st_size)
    finally:
        os.close(fd)


@pytest.fixture
def data_file(tmp_path_factory, monkeypatch) -> tuple[Path, bytes]:
    """A file of random bytes, with small stages and thresholds so that reads span several."""
    monkeypatch.setattr(direct_reads, "STAGE_BYTES", 64 << 10)
    monkeypatch.setattr(direct_reads, "DIRECT_MIN_BYTES", 1)
    path = tmp_path_factory.mktemp("direct") / "data.bin"
    data = np.random.default_rng(0).integers(0, 256, FILE_BYTES, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    if not direct_reads.O_DIRECT or direct_reads._LIBC is None:
        pytest.skip("no O_DIRECT or mincore on this platform")
    if _cold_fraction(path) > 0.1:
        pytest.skip("the page cache keeps this file's pages after POSIX_FADV_DONTNEED")
    fd = os.open(path, os.O_RDONLY)
    try:
        if not direct_reads.set_direct(fd, True):
            pytest.skip("this file system takes no direct reads")
    finally:
        os.close(fd)
    return path, data


def _read(path: Path, offset: int, n: int) -> tuple[int, np.ndarray, int]:
    """(bytes read direct, the (n,) buffer, the fd's flags after the call)."""
    out = np.full(n, 0xAB, dtype=np.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        done = direct_reads.read_uncached(fd, out, offset)
        return done, out, fcntl.fcntl(fd, fcntl.F_GETFL)
    finally:
        os.close(fd)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offset=st.integers(0, FILE_BYTES), n=st.integers(1, FILE_BYTES + 5000))
def test_an_evicted_range_is_read_direct_with_the_files_bytes(data_file, offset, n):
    path, data = data_file
    _evict(path)
    done, out, flags = _read(path, offset, n)
    expected = data[offset : offset + n]
    assert done == len(expected), "an uncached read should go direct up to the file's end"
    assert out[:done].tobytes() == expected
    assert (out[done:] == 0xAB).all(), "bytes past the end of the file were written"
    assert not flags & direct_reads.O_DIRECT, "O_DIRECT left set on the descriptor"


def test_a_cached_range_is_left_to_the_page_cache(data_file):
    path, data = data_file
    assert path.read_bytes() == data  # now in the page cache
    fd = os.open(path, os.O_RDONLY)
    try:
        assert direct_reads.resident_fraction(fd, 100, 50_000) == 1.0
    finally:
        os.close(fd)
    done, _, _ = _read(path, 100, 50_000)
    assert done == 0


def test_a_refused_direct_read_hands_the_rest_to_the_page_cache(data_file, monkeypatch):
    path, data = data_file
    real = os.preadv
    calls = []

    def refuse_second(fd, buffers, offset, *flags):
        calls.append(offset)
        if len(calls) == 2:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buffers, offset, *flags)

    monkeypatch.setattr(direct_reads.os, "preadv", refuse_second)
    _evict(path)
    done, out, flags = _read(path, 5, FILE_BYTES - 5)
    assert done == (64 << 10) - 5  # the first stage, less the 5 bytes before the offset
    assert out[:done].tobytes() == data[5 : 5 + done]
    assert not flags & direct_reads.O_DIRECT

    # through read_into the rest comes from the page cache: the whole range is right
    calls.clear()
    _evict(path)
    info = TensorInfo("w", "U8", (FILE_BYTES - 5,), (Piece(path, 5, FILE_BYTES - 5),))
    out = np.empty(FILE_BYTES - 5, dtype=np.uint8)
    read_into(info, 0, out)
    assert out.tobytes() == data[5:]


def test_a_device_error_in_a_direct_read_is_one_user_error(data_file, monkeypatch):
    path, _ = data_file

    def failing(fd, buffers, offset, *flags):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(direct_reads.os, "preadv", failing)
    _evict(path)
    info = TensorInfo("w", "U8", (FILE_BYTES,), (Piece(path, 0, FILE_BYTES),))
    with pytest.raises(RelexError, match="cannot read .*Input/output error"):
        read_into(info, 0, np.empty(FILE_BYTES, dtype=np.uint8))


def test_a_file_shorter_than_its_tensor_is_refused_after_a_direct_read(data_file):
    path, _ = data_file
    _evict(path)
    info = TensorInfo("w", "U8", (FILE_BYTES,), (Piece(path, 100, FILE_BYTES),))
    with pytest.raises(RelexError, match="truncated"):
        read_into(info, 0, np.empty(FILE_BYTES, dtype=np.uint8))


def _outputs(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.safetensors"))}


def test_a_run_reading_direct_gives_the_bytes_of_one_reading_through_the_cache(
        tmp_path, monkeypatch):
    """Every checkpoint read direct, rows read by the reader's threads: the outputs are those
    of a run reading through the page cache, and match the float64 reference."""
    traj = build_trajectory(tmp_path / "traj", Spec(vocab=4096, steps=(10, 20, 30, 40)))
    if not direct_reads.O_DIRECT or direct_reads._LIBC is None:
        pytest.skip("no O_DIRECT or mincore on this platform")
    args = ["run", "--base", traj.base, "--runs", traj.runs, "--target", "80", "--device",
            "cpu", "--quiet"]

    monkeypatch.setattr(direct_reads, "O_DIRECT", 0)
    assert cli_main([str(a) for a in [*args, "--out", tmp_path / "cached"]]) == 0

    monkeypatch.setattr(direct_reads, "O_DIRECT", os.O_DIRECT)
    monkeypatch.setattr(direct_reads, "DIRECT_MIN_BYTES", 1)
    monkeypatch.setattr(direct_reads, "RESIDENT_ENOUGH", 2.0)  # never cached enough
    monkeypatch.setattr(sources, "PARALLEL_READ_BYTES", 1)
    direct = []
    real = direct_reads.read_uncached

    def counting(fd, out, offset):
        done = real(fd, out, offset)
        direct.append(done)
        return done

    monkeypatch.setattr("relex_stream.tensor_files.read_uncached", counting)
    assert cli_main([str(a) for a in [*args, "--out", tmp_path / "direct"]]) == 0
    if not any(direct):
        pytest.skip("this file system takes no direct reads")
    assert all(direct), "some reads did not go direct"
    cached, read_direct = _outputs(tmp_path / "cached"), _outputs(tmp_path / "direct")
    assert cached.keys() == read_direct.keys() and cached
    assert cached == read_direct
    check_against_reference(traj, tmp_path / "direct", [80])


def test_a_failed_row_read_is_raised_once_the_chunks_other_reads_are_done(tmp_path, monkeypatch,
                                                                         capsys):
    """The rows of a chunk are read by two threads: when one read fails, the error leaves the
    reader only after the other reads have finished (none may still write into the buffer the
    ring then hands out again), and the run ends with that one error."""
    import time

    from relex_stream.errors import RelexError as Error

    traj = build_trajectory(tmp_path / "traj", Spec(steps=(10, 20, 30, 40, 50, 60)))
    monkeypatch.setattr(sources, "PARALLEL_READ_BYTES", 1)
    started, finished, when_raised = [], [], []
    real_read = sources._read_converted

    def slow_or_failing(info, start, target, row_dtype):
        started.append(info.name)
        if len(started) == 1:
            raise Error("the first read fails")
        time.sleep(0.05)
        real_read(info, start, target, row_dtype)
        finished.append(info.name)

    real_fill = sources.RowReader.fill

    def fill(self, *args, **kwargs):
        try:
            return real_fill(self, *args, **kwargs)
        except Error:
            when_raised.append((len(started), len(finished)))
            raise

    monkeypatch.setattr(sources, "_read_converted", slow_or_failing)
    monkeypatch.setattr(sources.RowReader, "fill", fill)
    code = cli_main([str(a) for a in ["run", "--base", traj.base, "--runs", traj.runs,
                                      "--target", 80, "--out", tmp_path / "out", "--device",
                                      "cpu", "--quiet"]])
    assert code == 2 and "the first read fails" in capsys.readouterr().err
    assert when_raised, "the failing read was not in a parallel fill"
    n_started, n_finished = when_raised[0]
    assert n_started > 2, "the chunk had too few rows to test this"
    assert n_finished == n_started - 1, "the error left while other reads were still running"
