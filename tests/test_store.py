"""Runs from the zarr trajectory store alone (sources moved or deleted)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.fixtures import Trajectory
from tests.helpers import assert_mirrors_base, run_cli, run_traj, step_dir
from tests.reference import assert_matches_reference, load_model_dir, reference_from_dirs

IRREGULAR = (3, 7, 20, 22, 50)


def run_from_store(store: Path, out: Path, targets: str) -> None:
    """`relex_stream run --cache STORE` with no --base/--runs."""
    run_cli(
        "run", "--cache", store, "--target", targets, "--out", out, "--device", "cpu", "--quiet"
    )


def assert_same_model_dir(a: Path, b: Path) -> None:
    """Same file names; identical bytes for .safetensors, equal JSON, identical other files."""
    names_a = sorted(p.name for p in a.iterdir())
    names_b = sorted(p.name for p in b.iterdir())
    assert names_a == names_b, f"{names_a} != {names_b}"
    for name in names_a:
        fa, fb = a / name, b / name
        if name.endswith(".json"):
            assert json.loads(fa.read_text()) == json.loads(fb.read_text()), f"{name} differs"
        else:
            assert fa.read_bytes() == fb.read_bytes(), f"{name}: bytes differ"


def moved_reference(traj: Trajectory, moved_root: Path, target: float) -> dict:
    """Reference for one target computed from a trajectory whose root was moved."""
    rel = {s: p.relative_to(traj.root) for s, p in traj.ckpt_dirs.items()}
    return reference_from_dirs(
        moved_root / "base", {s: moved_root / r for s, r in rel.items()}, [target]
    )[float(target)]


def test_default_store_after_moving_sources(make_traj, tmp_path: Path) -> None:
    """Default store, sources moved: same bytes for the same target; new target meets the bound."""
    traj = make_traj(steps=IRREGULAR, base_shards=2, ckpt_shards=2)
    out1 = tmp_path / "out1"
    run_traj(traj, out1, [100])
    store = out1 / "trajectory.zarr"
    assert store.is_dir(), "default store OUT/trajectory.zarr not created"

    moved = tmp_path / "moved"
    shutil.move(str(traj.root), str(moved))
    assert not traj.base.exists()

    out2 = tmp_path / "out2"
    run_from_store(store, out2, "100,130")
    assert_same_model_dir(step_dir(out1, 100), step_dir(out2, 100))
    assert_mirrors_base(step_dir(out2, 130), moved / "base")
    got = load_model_dir(step_dir(out2, 130))
    base = load_model_dir(moved / "base")
    assert_matches_reference(got, moved_reference(traj, moved, 130), base)


def test_explicit_cache_after_deleting_sources(make_traj, tmp_path: Path) -> None:
    """--cache PATH (outside OUT), tied model, sources deleted: byte-identical output."""
    traj = make_traj(steps=(10, 20, 30, 45), tied=True, base_shards=2)
    store = tmp_path / "cache" / "traj.zarr"
    out1 = tmp_path / "out1"
    run_traj(traj, out1, [90], "--cache", store)
    assert store.is_dir(), "--cache PATH not created"
    base_copy = load_model_dir(traj.base)
    shutil.rmtree(traj.root)

    out2 = tmp_path / "out2"
    run_from_store(store, out2, "90")
    assert_same_model_dir(step_dir(out1, 90), step_dir(out2, 90))
    got = load_model_dir(step_dir(out2, 90))
    assert set(got) == set(base_copy)
