"""A failing output disk (full, or an I/O error) is one user error, not a traceback, and the
run leaves no partial output behind: at laying out the shards, at writing a block, at the
fsync before the rename."""

from __future__ import annotations

import errno
import logging
import os

import pytest

from relex_stream import writer
from relex_stream.cli import main as cli_main

from .fixtures import Spec, build_trajectory
from .helpers import OsWithRename


class _FailingOs:
    """The os module, except that `name` fails with `error` (from its `after`-th call on)."""

    def __init__(self, name: str, error: int, after: int = 0):
        self._name, self._error, self._after, self.calls = name, error, after, 0

    def __getattr__(self, attribute: str):
        real = getattr(os, attribute)
        if attribute != self._name:
            return real

        def failing(*args, **kwargs):
            self.calls += 1
            if self.calls > self._after:
                raise OSError(self._error, os.strerror(self._error))
            return real(*args, **kwargs)

        return failing


@pytest.mark.parametrize(("call", "error", "after"), [
    ("pwrite", errno.ENOSPC, 0),  # the shard's header, while laying out
    ("pwrite", errno.ENOSPC, 3),  # a block of predictions
    ("fsync", errno.EIO, 0),  # delayed allocation reported at the fsync before the rename
    ("ftruncate", errno.EFBIG, 0),
])
def test_a_failing_output_disk_is_one_error_and_leaves_nothing(tmp_path, monkeypatch, capsys,
                                                              call, error, after):
    traj = build_trajectory(tmp_path / "traj", Spec())
    out = tmp_path / "out"
    failing = _FailingOs(call, error, after)
    monkeypatch.setattr(writer, "os", failing)
    code = cli_main([str(a) for a in ["run", "--base", traj.base, "--runs", traj.runs,
                                      "--target", 80, "--out", out, "--device", "cpu",
                                      "--quiet"]])
    err = capsys.readouterr().err
    assert failing.calls > after, "the failure was never reached"
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and os.strerror(error) in lines[0] and "--out" in lines[0], err
    assert not list(out.glob("step-*")), "a partial output was left"
    assert not list(out.glob(".step-*")), "the temporary output was not removed"


def test_an_unforeseen_system_error_is_one_line_naming_the_file(monkeypatch, capsys, caplog):
    """An OSError no code path turned into a message (say a full disk under `synth`) still
    ends as one `error:` line and exit 2; --verbose logs where it happened."""
    from relex_stream import cli

    def full_disk(args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/x\nfake")

    monkeypatch.setattr(cli, "_synth", full_disk)
    assert cli.main(["synth", "--out", "/tmp/unused-relex-synth"]) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: No space left on device"), err
    assert "/data/x\\nfake" in lines[0]  # the name shown escaped, on the one line
    caplog.set_level(logging.DEBUG, logger="relex_stream.cli")
    assert cli.main(["--verbose", "synth", "--out", "/tmp/unused-relex-synth"]) == 2
    assert any(record.exc_info for record in caplog.records), "no traceback logged"


def test_a_failed_rename_into_place_leaves_no_temporary_directory(tmp_path, monkeypatch, capsys):
    """The temporary output keeps its marker until it has its final name: a run stopped at the
    rename (here an error; a kill is the same) leaves a directory the run itself, or the next
    one, removes, never an unmarked one that nothing may remove."""
    traj = build_trajectory(tmp_path / "traj", Spec())
    out = tmp_path / "out"
    failing = _FailingOs("rename", errno.EXDEV)
    monkeypatch.setattr(writer, "os", failing)
    code = cli_main([str(a) for a in ["run", "--base", traj.base, "--runs", traj.runs,
                                      "--target", 80, "--out", out, "--device", "cpu",
                                      "--quiet"]])
    err = capsys.readouterr().err
    assert failing.calls and code == 2, err
    assert not list(out.glob(".step-*")) and not list(out.glob("step-*")), list(out.iterdir())


def test_a_finished_output_holds_no_marker(tmp_path):
    traj = build_trajectory(tmp_path / "traj", Spec())
    out = tmp_path / "out"
    assert cli_main([str(a) for a in ["run", "--base", traj.base, "--runs", traj.runs,
                                      "--target", 80, "--out", out, "--device", "cpu",
                                      "--quiet"]]) == 0
    assert not (out / "step-80" / writer.MARKER).exists()
    assert not list(out.glob(".step-*"))


def test_an_output_that_appears_during_the_run_is_left_alone_and_nothing_is_left(
        tmp_path, monkeypatch, capsys):
    """Someone else's step-T created while the run writes its own: refused without --overwrite,
    their directory untouched, and the run's temporary output removed (it is still marked)."""
    traj = build_trajectory(tmp_path / "traj", Spec())
    out = tmp_path / "out"
    real_fsync_dir = writer._fsync_dir

    def someone_else_writes(path):
        if path.name.startswith(".step-80.tmp-") and not (out / "step-80").exists():
            (out / "step-80").mkdir()
            (out / "step-80" / "theirs.txt").write_text("keep me")
        real_fsync_dir(path)

    monkeypatch.setattr(writer, "_fsync_dir", someone_else_writes)
    code = cli_main([str(a) for a in ["run", "--base", traj.base, "--runs", traj.runs,
                                      "--target", 80, "--out", out, "--device", "cpu",
                                      "--quiet"]])
    err = capsys.readouterr().err
    assert code == 2 and "appeared during the run" in err, err
    assert sorted(p.name for p in (out / "step-80").iterdir()) == ["theirs.txt"]
    assert not list(out.glob(".step-*")), list(out.iterdir())


@pytest.mark.parametrize("planted", ["notes.txt", "subdir/", "model.safetensors/"])
def test_overwrite_replaces_outputs_never_a_users_files(tmp_path, capsys, planted) -> None:
    """--overwrite replaces an earlier output, but not a directory at OUT/step-T holding a
    file no output holds (or a directory where a file belongs): one error line, the user's
    files intact. watch, which always replaces its outputs, refuses the same way."""
    from .untrusted import assert_error, call

    traj = build_trajectory(tmp_path / "t", Spec(steps=(10, 20, 30)))
    args = ["run", "--base", str(traj.base), "--runs", str(traj.runs), "--target", "100",
            "--out", str(tmp_path / "o"), "--device", "cpu", "--quiet", "--overwrite"]
    assert cli_main(args) == 0  # an output of ours...
    assert cli_main(args) == 0  # ...is replaced
    capsys.readouterr()
    for out in ("o2", "w"):
        mine = tmp_path / out / "step-100"
        mine.mkdir(parents=True)
        (mine / "config.json").write_text("{}")
        if planted.endswith("/"):
            (mine / planted).mkdir()
            (mine / planted / "x").write_text("mine")
        else:
            (mine / planted).write_text("mine")
        before = sorted(str(p.relative_to(mine)) for p in mine.rglob("*"))
        if out == "o2":
            result = call(*args[:-6], "--out", tmp_path / out, "--device", "cpu", "--quiet",
                          "--overwrite")
        else:
            result = call("watch", "--runs", traj.runs, "--base", traj.base, "--cache",
                          tmp_path / "wc", "--target", "100", "--out", tmp_path / out,
                          "--until", "30", "--interval", "0.1s", "--settle", "0",
                          "--device", "cpu", "--quiet")
        # watch refuses any OUT/step-T it did not write, before it builds its store
        assert_error(result, "no output of relex_stream holds" if out == "o2" else
                     "not a prediction relex_stream wrote")
        assert out == "o2" or not (tmp_path / "wc").exists()
        assert sorted(str(p.relative_to(mine)) for p in mine.rglob("*")) == before
        assert (mine / "config.json").read_text() == "{}"


def test_too_many_outputs_for_the_open_file_limit_leaves_nothing(tmp_path) -> None:
    """Under a low open-file limit, laying out the 60th of 80 outputs fails: one error line
    that says so, and none of the temporary outputs is left (removing the first failed with
    EMFILE while the others held their files, and all of them stayed)."""
    import resource
    import subprocess
    import sys

    from .helpers import REPO_ROOT

    traj = build_trajectory(tmp_path / "t", Spec(steps=(10, 20, 30)))
    targets = ",".join(str(100 + i) for i in range(80))

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    proc = subprocess.run(
        [sys.executable, "-m", "relex_stream", "run", "--base", str(traj.base), "--runs",
         str(traj.runs), "--target", targets, "--out", str(tmp_path / "o"), "--device", "cpu",
         "--quiet"], preexec_fn=low_limit, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "too many open files" in proc.stderr and "ulimit -n" in proc.stderr
    assert not (tmp_path / "o").exists() or list((tmp_path / "o").iterdir()) == []


def _run_main(traj, out, *extra) -> int:
    return cli_main([str(a) for a in ["run", "--base", traj.base, "--runs", traj.runs,
                                      "--target", 80, "--out", out, "--device", "cpu",
                                      "--quiet", *extra]])


def test_a_failed_rename_over_an_earlier_output_puts_it_back(tmp_path, monkeypatch, capsys):
    """--overwrite parks the earlier prediction, then renames the new one into place; when that
    rename fails (a quota, ESTALE on a cluster), the earlier one went missing and the next run
    removed it as a leftover."""
    traj = build_trajectory(tmp_path / "traj", Spec())
    out = tmp_path / "out"
    assert _run_main(traj, out) == 0
    before = {p.name: p.read_bytes() for p in (out / "step-80").iterdir()}
    def rename(src, dst, real_rename):
        if ".tmp-" in str(src) and str(dst).endswith("step-80"):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        return real_rename(src, dst)

    monkeypatch.setattr(writer, "os", OsWithRename(rename))
    assert _run_main(traj, out, "--overwrite") == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err, err
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (out / "step-80").iterdir()} == before
    assert not list(out.glob(".step-*")), "a parked or temporary output was left"


def test_a_file_system_that_cannot_sync_a_directory_still_gets_outputs(tmp_path, monkeypatch,
                                                                       capsys) -> None:
    """Some CIFS, 9p and FUSE mounts answer EINVAL to fsync on a directory: every write failed
    ("free space") and a build left an empty store."""
    import stat as stat_module

    from relex_stream import safefs

    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat_module.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    traj = build_trajectory(tmp_path / "traj", Spec())
    out = tmp_path / "out"
    code = _run_main(traj, out, "--cache", tmp_path / "store")
    assert code == 0, capsys.readouterr().err
    assert (out / "step-80" / "model.safetensors").is_file()
    assert (tmp_path / "store" / "zarr.json").is_file()
    assert safefs.sync_dir is not None
