"""The store's file count is the README's formula of the model and K, before and after an
append (superseded Gram versions are removed), for a model of several groups."""

from __future__ import annotations

from pathlib import Path

import pytest

from relex_stream.store import TrajectoryStore
from relex_stream.store_layout import file_count
from tests.fixtures import Spec, build_trajectory
from tests.helpers import run_cli


def _files(store: Path) -> int:
    return sum(1 for p in store.rglob("*") if p.is_file() and "timeline" not in p.parts)


def _formula(store: Path) -> tuple[int, int]:
    with TrajectoryStore.open(store) as opened:
        gen = opened.current
        return file_count(gen.groups(), len(gen.steps), len(gen.aux)), len(gen.groups())


@pytest.mark.parametrize("fp32_norms", [False, True], ids=["bf16", "fp32-norms"])
def test_file_count_matches_the_formula(tmp_path: Path, fp32_norms: bool) -> None:
    # an int buffer, bf16 matrices and (optionally) fp32 norms: groups of several kinds
    spec = Spec(steps=(10, 20, 30, 40, 50), vocab=70000, base_shards=2,
                fp32_names=("model.norm.weight",) if fp32_norms else ())
    traj = build_trajectory(tmp_path / "traj", spec)
    store = tmp_path / "store.zarr"
    run_cli("run", "--base", traj.base, "--runs", traj.runs, "--steps", "10-30", "--target",
            100, "--out", tmp_path / "out", "--cache", store, "--device", "cpu", "--quiet")
    expected, groups = _formula(store)
    assert groups >= 3, "test bug: the model should make several groups"
    assert _files(store) == expected
    run_cli("run", "--base", traj.base, "--runs", traj.runs, "--target", 100, "--out",
            tmp_path / "out2", "--cache", store, "--device", "cpu", "--quiet")
    expected, _ = _formula(store)
    assert _files(store) == expected, "an append left files the formula does not count"
