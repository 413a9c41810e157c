"""What a run needs on disk is checked before it reads the weights, counting everything it
writes: the side files copied into every output, and the outputs and the store together when
they share a file system (found by a hostile-input hunt; each ran into a full disk after the
whole pass, leaving half its outputs)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from relex_stream import engine
from tests.untrusted import assert_error, assert_ok, call

SYNTH = ("--hidden", "32", "--layers", "1", "--vocab", "64", "--steps", "10-40:10")
TOKENIZER_BYTES = 1_000_000


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small trajectory whose base has a 1 MB tokenizer.json beside it (Qwen2.5's is 7 MB)."""
    root = tmp_path_factory.mktemp("space") / "traj"
    assert_ok(call("synth", "--out", root, *SYNTH))
    (root / "base" / "tokenizer.json").write_bytes(os.urandom(TOKENIZER_BYTES))
    return root


def _tensor_bytes(model: Path) -> int:
    """Bytes of a safetensors file's tensors: the file less its 8-byte length and header."""
    with open(model, "rb") as f:
        (header,) = struct.unpack("<Q", f.read(8))
        json.loads(f.read(header))
    return model.stat().st_size - 8 - header


def _side_bytes(base: Path) -> int:
    return sum(p.stat().st_size for p in base.iterdir() if p.suffix != ".safetensors")


def _fake_free(monkeypatch: pytest.MonkeyPatch, free: int, devices: dict[str, int] | None = None
               ) -> None:
    """Every file system has `free` bytes; `devices` maps a path part to a device number."""
    real = engine._free_bytes
    monkeypatch.setattr(engine, "_free_bytes", lambda path: (real(path)[0], free))
    if devices is not None:
        monkeypatch.setattr(engine, "_file_system", lambda probe: next(
            (dev for part, dev in devices.items() if part in Path(probe).parts), 0))


def _targets(n: int) -> str:
    return ",".join(str(100 * (i + 1)) for i in range(n))


def test_the_side_files_of_every_output_are_counted(trajectory: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the tensors were counted: two outputs of a model with a large tokenizer.json passed
    the check on a disk that held one of them, and the second failed after the whole pass."""
    store = tmp_path / "s.zarr"
    assert_ok(call("run", "--base", trajectory / "base", "--runs", trajectory / "runs",
                   "--target", "100", "--out", tmp_path / "first", "--cache", store, "--quiet"))
    tensors = _tensor_bytes(tmp_path / "first" / "step-100" / "model.safetensors")
    side = _side_bytes(trajectory / "base")
    assert side > TOKENIZER_BYTES
    _fake_free(monkeypatch, 2 * tensors + side)  # the tensors of both fit, and one tokenizer
    out = tmp_path / "out"
    assert_error(call("run", "--cache", store, "--target", "100,200", "--out", out, "--quiet"),
                 "writing the outputs takes about", "free")
    assert not out.exists()
    _fake_free(monkeypatch, 2 * (tensors + side))
    assert_ok(call("run", "--cache", store, "--target", "100,200", "--out", out, "--quiet"))


def _build_and_outputs_bytes(trajectory: Path, tmp_path: Path, n_outputs: int) -> tuple[int, int]:
    """An upper bound on what building a store of the trajectory takes (every row and the base
    raw, the side files), and exactly what `n_outputs` outputs take."""
    probe = tmp_path / "probe"
    assert_ok(call("run", "--base", trajectory / "base", "--runs", trajectory / "runs",
                   "--target", "100", "--out", probe, "--quiet"))
    tensors = _tensor_bytes(probe / "step-100" / "model.safetensors")
    side = _side_bytes(trajectory / "base")
    steps = len(list((trajectory / "runs").iterdir()))
    return (steps + 1) * tensors + side, n_outputs * (tensors + side)


def test_outputs_and_store_on_one_file_system_must_fit_together(
        trajectory: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """OUT and its default store OUT/trajectory.zarr were each checked against the whole free
    space: a disk holding either, not both, passed, and the run failed after the pass."""
    n_outputs = 10
    store_at_most, outputs = _build_and_outputs_bytes(trajectory, tmp_path, n_outputs)
    assert outputs >= store_at_most  # so each alone fits in `outputs` bytes
    _fake_free(monkeypatch, outputs)
    out = tmp_path / "out"
    args = ("run", "--base", trajectory / "base", "--runs", trajectory / "runs",
            "--target", _targets(n_outputs), "--out", out, "--quiet")
    assert_error(call(*args), "writing the outputs and the store takes about", "free")
    assert not out.exists()
    # on two file systems each fits alone
    store = tmp_path / "elsewhere" / "s.zarr"
    store.parent.mkdir()
    out.mkdir()
    _fake_free(monkeypatch, outputs, {"out": 1, "elsewhere": 2})
    assert_ok(call(*args, "--cache", store))
    assert len(list(out.glob("step-*"))) == n_outputs


@contextmanager
def _tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `where`; the test is skipped where mounting is not allowed."""
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, check=False)
    if mounted.returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


@pytest.mark.parametrize(("size", "cache"), [("1500k", True), ("176k", False)])
def test_a_small_real_disk_is_refused_before_anything_is_written(
        trajectory: Path, tmp_path: Path, size: str, cache: bool) -> None:
    """1.5 MB: room for one output with its tokenizer.json, not two. 176 KiB, without the large
    tokenizer: room for the two outputs or the store beside them, not both. Both ran the whole
    pass and failed writing, one output left behind in the first; now nothing is written."""
    base = tmp_path / "base"
    base.mkdir()
    for path in (trajectory / "base").iterdir():
        if cache or path.name != "tokenizer.json":
            os.link(path, base / path.name)
    with _tmpfs(tmp_path / "mnt", size) as mnt:
        extra = ("--cache", tmp_path / "s.zarr") if cache else ()
        result = call("run", "--base", base, "--runs", trajectory / "runs", "--target",
                      "100,200", "--out", mnt / "out", "--quiet", *extra)
        assert_error(result, "takes about", "free")
        assert list(mnt.iterdir()) == []


def _failing_store_writes(monkeypatch: pytest.MonkeyPatch, where: str) -> list[str]:
    """The store's writes fail with ENOSPC at `where`: its first manifest, the new generation's
    folders, or the first side file; returns the names whose writes failed."""
    import errno

    from relex_stream import store as store_module

    real = store_module.write_atomic
    calls: list[str] = []
    failed: list[str] = []

    def write_atomic(dir_fd: int, name: str, data: bytes, sync: bool = True) -> None:
        calls.append(name)
        if (where == "manifest" and len(calls) == 1 or where == "generation" and len(calls) == 2
                or where == "aux" and name == "0"):
            failed.append(name)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(dir_fd, name, data, sync)

    monkeypatch.setattr(store_module, "write_atomic", write_atomic)
    return failed


@pytest.mark.parametrize("where", ["manifest", "generation", "aux"])
@pytest.mark.parametrize("existing", ["absent", "empty-folder"])
def test_a_new_store_whose_creation_fails_is_removed(trajectory: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     where: str, existing: str) -> None:
    """A full disk (or no inodes left) while the new store was created, its change begun or
    its side files written left S/zarr.json, S/lock and S/gen1/ behind: only a failure later
    in the pass removed a refused new store. An empty folder given as --cache stays, empty."""
    store = tmp_path / "s.zarr"
    if existing == "empty-folder":
        store.mkdir()
    failed = _failing_store_writes(monkeypatch, where)
    result = call("run", "--base", trajectory / "base", "--runs", trajectory / "runs",
                  "--target", "100", "--out", tmp_path / "out", "--cache", store, "--quiet")
    assert failed, "the failure was never reached"
    assert_error(result, os.strerror(28))
    if existing == "absent":
        assert not store.exists()
    else:
        assert list(store.iterdir()) == []
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()  # the space is freed: the same command runs
    assert_ok(call("run", "--base", trajectory / "base", "--runs", trajectory / "runs",
                   "--target", "100", "--out", tmp_path / "out", "--cache", store, "--quiet"))


def test_an_existing_store_is_kept_when_its_append_cannot_begin(
        trajectory: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store that holds a finished run is never removed, whatever fails."""
    from relex_stream.store import TrajectoryStore

    store = tmp_path / "s.zarr"
    assert_ok(call("run", "--base", trajectory / "base", "--runs", trajectory / "runs",
                   "--steps", "10-30", "--target", "100", "--out", tmp_path / "first",
                   "--cache", store, "--quiet"))
    _failing_store_writes(monkeypatch, "manifest")
    assert_error(call("run", "--base", trajectory / "base", "--runs", trajectory / "runs",
                      "--target", "100", "--out", tmp_path / "out", "--cache", store, "--quiet"),
                 os.strerror(28))
    with TrajectoryStore.open(store) as opened:
        assert opened.steps == [10, 20, 30]


@pytest.mark.parametrize("inodes", [5, 20])
def test_a_store_on_a_disk_without_inodes_leaves_nothing(trajectory: Path, tmp_path: Path,
                                                         inodes: int) -> None:
    """The same on a real file system out of inodes (a tmpfs with a few)."""
    with _tmpfs(tmp_path / "mnt", f"8m,nr_inodes={inodes}") as mnt:
        assert_error(call("run", "--base", trajectory / "base", "--runs", trajectory / "runs",
                          "--target", "100", "--out", tmp_path / "out", "--cache", mnt / "s",
                          "--quiet"), "No space left on device")
        assert list(mnt.iterdir()) == []
