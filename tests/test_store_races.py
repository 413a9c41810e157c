"""Two runs on one store: the one that looked at the store before the other committed must not
write over what the other finished (found by a hostile-input hunt)."""

from __future__ import annotations

from pathlib import Path

import pytest

from relex_stream import engine
from tests.untrusted import assert_error, assert_ok, call

SYNTH = ("--hidden", "32", "--layers", "1", "--vocab", "64", "--steps", "10-80:10")


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("races") / "traj"
    assert_ok(call("synth", "--out", root, *SYNTH))
    return root


@pytest.mark.parametrize("first", ["absent", "rebuild"])
def test_a_build_that_lost_the_race_leaves_the_finished_store(
        trajectory: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: str) -> None:
    """Run B looked at the store (absent, or at generation 1 for --rebuild), then run A built
    it with all 8 steps; B rebuilt over it with its 5 steps, and both exited 0. B now stops
    with one line, and A's store stays whole."""
    store = tmp_path / "store"
    sources = ("--base", trajectory / "base", "--runs", trajectory / "runs", "--target", "200",
               "--cache", store, "--quiet")
    if first == "rebuild":
        assert_ok(call("run", *sources, "--steps", "10-30", "--out", tmp_path / "o0"))
    looked = engine.gather_inputs

    def look_then_wait(*args, **kwargs):
        inputs = looked(*args, **kwargs)
        monkeypatch.setattr(engine, "gather_inputs", looked)  # A runs as usual
        assert_ok(call("run", *sources, "--rebuild", "--out", tmp_path / "oA"))
        return inputs

    monkeypatch.setattr(engine, "gather_inputs", look_then_wait)
    extra = ("--rebuild",) if first == "rebuild" else ()
    assert_error(call("run", *sources, "--steps", "40-80", *extra, "--out", tmp_path / "oB"),
                 "changed while this run started")
    result = call("run", "--cache", store, "--target", "200", "--out", tmp_path / "oC")
    assert_ok(result)
    assert "observed steps: 8 (10..80)" in result.stdout, result.stdout


def test_a_read_that_lost_the_race_to_an_append_says_so(
        trajectory: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run reading the store looked at it, then an append committed (removing the Gram
    files it had planned on): it said the healthy store was damaged and to rebuild it."""
    store = tmp_path / "store"
    sources = ("--base", trajectory / "base", "--runs", trajectory / "runs", "--target", "200",
               "--cache", store, "--quiet")
    assert_ok(call("run", *sources, "--steps", "10-50", "--out", tmp_path / "o0"))
    looked = engine.gather_inputs

    def look_then_wait(*args, **kwargs):
        inputs = looked(*args, **kwargs)
        monkeypatch.setattr(engine, "gather_inputs", looked)
        assert_ok(call("run", *sources, "--out", tmp_path / "oA"))  # appends 60..80
        return inputs

    monkeypatch.setattr(engine, "gather_inputs", look_then_wait)
    assert_error(call("run", "--cache", store, "--target", "200", "--out", tmp_path / "oB"),
                 "changed while this run started")
