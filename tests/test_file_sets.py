"""safefs.replace_files writes a command's files as one set: a signal during the renames waits
for them to end, and a rename that fails leaves no temporary and says which files are new."""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import pytest

from relex_stream import safefs
from relex_stream.errors import RelexError

from .helpers import OsWithRename


def _earlier_set(out: Path) -> None:
    out.mkdir()
    for name in ("a.json", "b.csv", "c.png"):
        (out / name).write_text("old")


class _Os(OsWithRename):
    """os with replace (what replace_files renames with) going through the rename hook."""

    def replace(self, src, dst, **kwargs):
        return self._rename(src, dst, lambda s, d: os.replace(s, d, **kwargs))


def test_a_signal_between_renames_waits_for_the_set(tmp_path, monkeypatch) -> None:
    """SIGINT after the first rename left the first file new, the others old, and their
    temporaries in OUT."""
    out = tmp_path / "out"
    _earlier_set(out)
    calls = []

    def rename(src, dst, real):
        real(src, dst)
        calls.append(dst)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(safefs, "os", _Os(rename))
    with pytest.raises(KeyboardInterrupt):
        safefs.replace_files(out, {"a.json": "new", "b.csv": "new", "c.png": "new"})
    monkeypatch.undo()
    assert {p.name: p.read_text() for p in out.iterdir()} == {
        "a.json": "new", "b.csv": "new", "c.png": "new"}


def test_a_failed_rename_leaves_no_temporary_and_says_what_is_new(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _earlier_set(out)
    calls = []

    def rename(src, dst, real):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))  # chattr +i, a sticky dir
        real(src, dst)

    monkeypatch.setattr(safefs, "os", _Os(rename))
    with pytest.raises(RelexError, match=r"b\.csv.*a\.json are new"):
        safefs.replace_files(out, {"a.json": "new", "b.csv": "new", "c.png": "new"})
    monkeypatch.undo()
    assert {p.name: p.read_text() for p in out.iterdir()} == {
        "a.json": "new", "b.csv": "old", "c.png": "old"}


def test_backtest_table_cells_stay_apart_for_large_errors() -> None:
    """Errors of 10,000 and more ran into the next cell: 7228324703506722.00007228324703506722.0"""
    from relex_stream.backtest import BacktestResult, BacktestRow

    row = BacktestRow("relex", 3, [10, 20, 30], [40, 50], [10.0, 20.0], [12345.5, 7.25e15],
                      {}, None, "relex: do not extrapolate")
    table = BacktestResult(Path("S"), [10, 20, 30, 40, 50], [40, 50], 0.3, [row]).lines()
    cells = table[3].split()
    assert cells[1:] == ["12345.5000", "7250000000000000.0000", f"{row.mean_error:.4f}"], table
    assert table[1].split()[-3:] == ["40", "50", "mean"]


def test_an_interrupted_report_does_not_speak_of_a_store_it_does_not_write(tmp_path, monkeypatch,
                                                                           capsys) -> None:
    from relex_stream import cli

    def interrupted(args) -> None:
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.REPORT_HANDLERS, "report", interrupted)
    assert cli.main(["report", str(tmp_path / "S")]) == 130
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "store" not in err and "rerun" in err, err
