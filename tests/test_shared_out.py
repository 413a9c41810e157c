"""OUT shared by runs in other containers or on other hosts: a live run's temporary output is
never taken for a leftover, two runs never share a temporary name, and --overwrite never
replaces a model relex_stream did not write."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relex_stream import writer
from relex_stream.checkpoints import open_model

from .fixtures import Spec, build_trajectory
from .helpers import REPO_ROOT, OsWithRename, run_cli

# Holds an flock on argv[1] until its stdin closes: a run alive in another PID namespace or on
# another host, whose pid (written in the marker) means nothing here.
_HOLDER = (
    "import fcntl, os, sys\n"
    "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
    "fcntl.flock(fd, fcntl.LOCK_EX)\n"
    "print('held', flush=True)\n"
    "sys.stdin.read()\n"
)


def _run(traj, out: Path, target: int, *extra: object, expect_rc: int = 0):
    return run_cli("run", "--base", traj.base, "--runs", traj.runs, "--target", target, "--out",
                   out, "--device", "cpu", "--quiet", *extra, expect_rc=expect_rc)


def _fake_temporary_output(out: Path, pid: str) -> Path:
    """A marked temporary output whose marker names `pid` (another namespace's, say)."""
    directory = out / ".step-100.tmp-77-0123456789abcdef"
    directory.mkdir(parents=True)
    (directory / writer.MARKER).write_text(f"{pid}\n")
    (directory / "model.safetensors").write_bytes(b"half written")
    return directory


def test_a_live_run_elsewhere_keeps_its_temporary_output(tmp_path: Path) -> None:
    """Its pid is not alive here (another host, another container), but it holds the marker:
    a run writing another target into the same OUT must leave it alone."""
    traj = build_trajectory(tmp_path / "traj", Spec())
    out = tmp_path / "out"
    live = _fake_temporary_output(out, "4194304")  # above any pid_max: no such process here
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(live / writer.MARKER)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        _run(traj, out, 200)
        assert (live / "model.safetensors").read_bytes() == b"half written"
    finally:
        holder.communicate("", timeout=30)
    # once nobody holds it, it is a leftover, and the next run removes it
    _run(traj, out, 300)
    assert not live.exists()
    assert (out / "step-200").is_dir() and (out / "step-300").is_dir()


def test_two_live_writers_in_one_process_have_their_own_temporary_outputs(tmp_path) -> None:
    """Two runs with the same pid (each pid 1 in its container) used the same temporary name:
    the second removed the first's and the first renamed the second's into place."""
    traj = build_trajectory(tmp_path / "traj", Spec())
    layout = open_model(traj.base).layout()
    dtypes = writer.output_dtypes(layout, None)
    final = tmp_path / "out" / "step-100"
    final.parent.mkdir()
    first = writer.ModelWriter.create(final, writer.new_run_id(), layout, dtypes)
    second = None
    try:
        writer.remove_leftovers(final.parent)  # what the second run does first
        assert first.tmp_dir.is_dir()
        second = writer.ModelWriter.create(final, writer.new_run_id(), layout, dtypes)
        assert second.tmp_dir != first.tmp_dir and first.tmp_dir.is_dir()
    finally:
        writer.abort_all([w for w in (first, second) if w is not None])
    assert list(final.parent.iterdir()) == []


def test_a_marker_nobody_holds_is_a_leftover_even_with_a_live_pid(tmp_path: Path) -> None:
    """The marker's pid is this test's own, alive: a pid says nothing across namespaces, the
    lock does."""
    out = tmp_path / "out"
    stale = _fake_temporary_output(out, str(os.getpid()))
    writer.remove_leftovers(out)
    assert not stale.exists()


def test_a_file_system_without_locks_removes_no_leftover(tmp_path, monkeypatch, caplog) -> None:
    out = tmp_path / "out"
    unknown = _fake_temporary_output(out, "4194304")

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(37, "No locks available")  # ENOLCK, as an NFS mount without lockd

    monkeypatch.setattr(fcntl, "flock", no_locks)
    writer.remove_leftovers(out)
    assert unknown.is_dir()
    assert "no locks" in caplog.text


@pytest.mark.parametrize("planted", ["checkpoint", "other-model"])
def test_overwrite_never_replaces_a_model_relex_stream_did_not_write(tmp_path: Path,
                                                                     planted: str) -> None:
    """A training checkpoint at OUT/step-T has exactly an output's file names; --overwrite
    replaced it without a word."""
    traj = build_trajectory(tmp_path / "traj", Spec())
    out = tmp_path / "out"
    source = sorted(traj.runs.iterdir())[-1] if planted == "checkpoint" else traj.base
    shutil.copytree(source, out / "step-100")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
              for p in (out / "step-100").iterdir()}
    proc = _run(traj, out, 100, "--overwrite", expect_rc=2)
    assert proc.stderr.count("error:") == 1 and "did not write" in proc.stderr, proc.stderr
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
             for p in (out / "step-100").iterdir()}
    assert after == before
    # a prediction there is replaced as before
    shutil.rmtree(out / "step-100")
    _run(traj, out, 100)
    first = (out / "step-100" / "model.safetensors").stat().st_mtime_ns
    time.sleep(0.01)
    _run(traj, out, 100, "--overwrite")
    assert (out / "step-100" / "model.safetensors").stat().st_mtime_ns != first
    assert REPO_ROOT.is_dir()


def test_a_store_on_a_file_system_without_locks(tmp_path: Path, monkeypatch, capsys) -> None:
    """Lustre without -o flock, NFS without lockd: writing the store is refused in one line
    that says why (it said "Function not implemented: check the disk") and leaves no store;
    reading an existing store (report, a rerun from it) works without the lock."""
    from relex_stream.cli import main as cli_main

    traj = build_trajectory(tmp_path / "traj", Spec())
    store = tmp_path / "store"
    assert cli_main([str(a) for a in ["run", "--base", traj.base, "--runs", traj.runs,
                                      "--cache", store, "--target", 100, "--out",
                                      tmp_path / "first", "--device", "cpu", "--quiet"]]) == 0
    capsys.readouterr()

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(38, "Function not implemented")  # ENOSYS

    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert cli_main(["report", str(store), "--out", str(tmp_path / "rep"), "--no-plots"]) == 0
    assert (tmp_path / "rep" / "report.json").is_file()
    assert cli_main(["run", "--cache", str(store), "--target", "200", "--out",
                     str(tmp_path / "again"), "--device", "cpu", "--quiet"]) == 0
    capsys.readouterr()
    code = cli_main([str(a) for a in ["run", "--base", traj.base, "--runs", traj.runs,
                                      "--cache", tmp_path / "new", "--target", 100, "--out",
                                      tmp_path / "o", "--device", "cpu", "--quiet"]])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and "no locks" in err, err
    assert not (tmp_path / "new").exists() or not any((tmp_path / "new").iterdir())


def test_a_run_killed_before_its_marker_was_in_place_leaves_nothing_for_long(tmp_path) -> None:
    """Killed between making its temporary directory and renaming its marker into place: the
    next run removes what is left (a marker's staging file nobody holds; an empty directory
    once it is a minute old, never a live run's about to be marked)."""
    out = tmp_path / "out"
    staged = out / ".step-100.tmp-1-aaaaaaaaaaaaaaaa"
    staged.mkdir(parents=True)
    (staged / f"{writer.MARKER}.new").write_text("1\n")
    empty_old = out / ".step-200.tmp-1-bbbbbbbbbbbbbbbb"
    empty_old.mkdir()
    an_hour_ago = time.time() - 3600
    os.utime(empty_old, (an_hour_ago, an_hour_ago))
    empty_new = out / ".step-300.tmp-1-cccccccccccccccc"
    empty_new.mkdir()
    users = out / ".step-400.tmp-1-dddddddddddddddd"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    writer.remove_leftovers(out)
    assert not staged.exists() and not empty_old.exists()
    assert empty_new.is_dir() and (users / "notes.txt").read_text() == "mine"


def test_folders_of_the_user_that_look_like_leftovers_stay(tmp_path: Path) -> None:
    """Only our own names (.step-T.tmp-PID-HEX, .step-T.replaced-PID-HEX) with a marker that
    holds a pid are leftovers; a user's .step-* folder stays, whatever it holds."""
    out = tmp_path / "out"
    kept = []
    for name, files in [(".step-notes", {writer.MARKER: "hello"}),
                        (".step-100.tmp-1-0123456789abcdef", {writer.MARKER: "hello",
                                                               "mine.txt": "x"}),
                        (".step-old", {}),
                        (".step-100.tmp-elsewhere", {writer.MARKER: "12\n"}),
                        (".step-x", {f"{writer.MARKER}.new": ""})]:
        folder = out / name
        folder.mkdir(parents=True)
        for file_name, text in files.items():
            (folder / file_name).write_text(text)
        an_hour_ago = time.time() - 3600
        os.utime(folder, (an_hour_ago, an_hour_ago))
        kept.append(folder)
    writer.remove_leftovers(out)
    assert all(folder.is_dir() for folder in kept)


def test_an_output_killed_before_its_marker_went_is_finished_by_the_next_run(tmp_path) -> None:
    """Killed between the rename into place and the marker's removal: the complete output
    kept the marker, and every later run refused it ("already exists", then "holds
    '.relex-stream-tmp'" with --overwrite)."""
    traj = build_trajectory(tmp_path / "traj", Spec())
    out = tmp_path / "out"
    _run(traj, out, 100)
    (out / "step-100" / writer.MARKER).write_text("4194304\n")
    proc = _run(traj, out, 100, expect_rc=2)
    assert "already exists" in proc.stderr and "--overwrite" in proc.stderr
    assert not (out / "step-100" / writer.MARKER).exists()
    _run(traj, out, 100, "--overwrite")


def test_a_signal_while_replacing_an_output_never_loses_it(tmp_path, monkeypatch, capsys):
    """SIGTERM right after the earlier output was parked: the parked output was removed with
    its folder, and OUT/step-T was gone. Now the replacement finishes, then the run stops."""
    import signal

    from relex_stream.cli import main as cli_main

    traj = build_trajectory(tmp_path / "traj", Spec())
    out = tmp_path / "out"
    args = [str(a) for a in ["run", "--base", traj.base, "--runs", traj.runs, "--target", 100,
                             "--out", out, "--device", "cpu", "--quiet", "--overwrite"]]
    assert cli_main(args) == 0
    def rename(src, dst, real_rename):
        real_rename(src, dst)
        if str(dst).endswith("previous"):
            signal.raise_signal(signal.SIGTERM)  # arrives as the rename returns

    monkeypatch.setattr(writer, "os", OsWithRename(rename))
    assert cli_main(args) == 143
    monkeypatch.undo()
    assert "SIGTERM" in capsys.readouterr().err
    assert open_model(out / "step-100").predicted
    assert not list(out.glob(".step-*"))
