"""Bad input: exit 2 with one 'error: ' line; early targets: a warning, still exit 0."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.fixtures import Spec, build_trajectory
from tests.helpers import check_against_reference, run_cli, run_traj, step_dir

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def assert_user_error(proc: subprocess.CompletedProcess[str], out: Path) -> None:
    """Exit 2, exactly one stderr line starting with 'error: ', no traceback, no step dirs."""
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, f"rc={proc.returncode}\nstderr:\n{proc.stderr}"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{proc.stderr}"
    assert lines[0].startswith("error: "), lines[0]
    made = sorted(p.name for p in out.glob("step-*")) if out.exists() else []
    assert made == [], f"output written despite the error: {made}"


def _drop_q(step: int, tensors: dict[str, torch.Tensor]) -> None:
    """Remove q_proj from the step-30 checkpoint."""
    if step == 30:
        del tensors[Q_PROJ]


def _reshape_q(step: int, tensors: dict[str, torch.Tensor]) -> None:
    """Give q_proj a different shape at step 30."""
    if step == 30:
        tensors[Q_PROJ] = tensors[Q_PROJ].reshape(8, 32)


def _retype_q(step: int, tensors: dict[str, torch.Tensor]) -> None:
    """Store q_proj as int32 at step 30 (a float tensor may change float dtype, not kind)."""
    if step == 30:
        tensors[Q_PROJ] = tensors[Q_PROJ].to(torch.int32)


@pytest.mark.parametrize(
    "edit", [_drop_q, _reshape_q, _retype_q], ids=["missing", "shape", "dtype"]
)
def test_inconsistent_checkpoint(make_traj, tmp_path: Path, edit) -> None:
    """A tensor missing / reshaped / retyped in one checkpoint is a user error."""
    traj = make_traj(steps=(10, 20, 30, 40), edit=edit, base_shards=2)
    out = tmp_path / "out"
    assert_user_error(run_traj(traj, out, [100], expect_rc=None), out)


def test_duplicate_ckpt_steps(make_traj, tmp_path: Path) -> None:
    """Two --ckpt with the same step is a user error."""
    traj = make_traj(steps=(10, 20, 30))
    out = tmp_path / "out"
    args = ["run", "--base", traj.base, "--ckpt", f"10={traj.ckpt_dirs[10]}"]
    args += ["--ckpt", f"20={traj.ckpt_dirs[20]}", "--ckpt", f"10={traj.ckpt_dirs[30]}"]
    proc = run_cli(
        *args, "--target", "100", "--out", out, "--device", "cpu", "--quiet", expect_rc=None
    )
    assert_user_error(proc, out)


def test_duplicate_steps_in_run_dir(make_traj, tmp_path: Path) -> None:
    """checkpoint-10 and global_step_10 in the same run dir is a user error."""
    traj = make_traj(steps=(10, 20, 30))
    shutil.copytree(traj.runs / "checkpoint-10", traj.runs / "global_step_10")
    out = tmp_path / "out"
    assert_user_error(run_traj(traj, out, [100], expect_rc=None), out)


def test_single_checkpoint_in_run_dir(make_traj, tmp_path: Path) -> None:
    """A run dir with one checkpoint is a user error."""
    traj = make_traj(steps=(10,))
    out = tmp_path / "out"
    assert_user_error(run_traj(traj, out, [100], expect_rc=None), out)


def test_single_ckpt_argument(make_traj, tmp_path: Path) -> None:
    """A single --ckpt is a user error."""
    traj = make_traj(steps=(10, 20))
    out = tmp_path / "out"
    args = ["run", "--base", traj.base, "--ckpt", f"10={traj.ckpt_dirs[10]}", "--target", "100"]
    proc = run_cli(*args, "--out", out, "--device", "cpu", "--quiet", expect_rc=None)
    assert_user_error(proc, out)


def test_window_of_one(make_traj, tmp_path: Path) -> None:
    """--window 1 leaves fewer than two checkpoints: a user error."""
    traj = make_traj(steps=(10, 20, 30))
    out = tmp_path / "out"
    assert_user_error(run_traj(traj, out, [100], "--window", "1", expect_rc=None), out)


def test_target_not_a_number(make_traj, tmp_path: Path) -> None:
    """--target abc is a user error."""
    traj = make_traj(steps=(10, 20, 30))
    out = tmp_path / "out"
    assert_user_error(run_traj(traj, out, ["abc"], expect_rc=None), out)


@pytest.mark.parametrize("target", [50, 35], ids=["at_last_step", "before_last_step"])
def test_target_not_after_last_step_warns(make_traj, tmp_path: Path, target: int) -> None:
    """A target at/before the last observed step runs (exit 0) and logs a warning."""
    traj = make_traj(steps=(10, 20, 30, 40, 50))
    out = tmp_path / "out"
    proc = run_traj(traj, out, [target], quiet=False)
    assert "warning" in proc.stderr.lower(), f"no warning on stderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    check_against_reference(traj, out, [target])


def test_api_raises_relex_error(tmp_path: Path) -> None:
    """Python API: a user error raises relex_stream.RelexError and writes no step dir."""
    import relex_stream

    traj = build_trajectory(tmp_path / "t", Spec(steps=(10, 20, 30), edit=_reshape_q))
    out = tmp_path / "out"
    with pytest.raises(relex_stream.RelexError):
        relex_stream.extrapolate(
            base=str(traj.base), runs=str(traj.runs), targets=[100.0], out=str(out), device="cpu"
        )
    assert not step_dir(out, 100).exists()


def test_api_single_checkpoint_raises(tmp_path: Path) -> None:
    """Python API: fewer than two checkpoints raises RelexError."""
    import relex_stream

    traj = build_trajectory(tmp_path / "t", Spec(steps=(10,)))
    with pytest.raises(relex_stream.RelexError):
        relex_stream.extrapolate(
            base=str(traj.base), runs=str(traj.runs), targets=[100.0], out=str(tmp_path / "o")
        )
