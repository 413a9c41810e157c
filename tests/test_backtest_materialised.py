"""backtest's error, exact from the Gram matrix, equals the error of a materialised prediction."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.fixtures import Spec, build_trajectory
from tests.helpers import run_cli, run_traj, step_dir
from tests.reference import is_float, load_model_dir

STEPS = (10, 20, 30, 40, 50, 60, 70, 80)


def test_gram_error_equals_materialised_error(tmp_path: Path) -> None:
    # float64 checkpoints keep the output rounding (~1e-16) far below the 1e-6 tolerance
    traj = build_trajectory(tmp_path / "traj", Spec(steps=STEPS, dtype=torch.float64))
    built = tmp_path / "built"
    run_traj(traj, built, [100])
    run_cli(
        "backtest", built / "trajectory.zarr", "--holdout", "3", "--methods", "relex",
        "raw-ols", "--out", tmp_path / "bt", "--no-plots",
    )  # fmt: skip
    rows = json.loads((tmp_path / "bt" / "backtest.json").read_text())["rows"]
    base = load_model_dir(traj.base)
    for method in ("relex", "raw-ols"):
        row = next(r for r in rows if r["method"] == method)
        out = tmp_path / method
        run_traj(
            traj, out, row["heldout_steps"], "--steps", ",".join(map(str, row["window_steps"])),
            "--method", method,
        )  # fmt: skip
        for step, gram_error in zip(row["heldout_steps"], row["errors"], strict=True):
            predicted = load_model_dir(step_dir(out, step))
            actual = load_model_dir(traj.ckpt_dirs[step])
            residual = delta = 0.0
            for name, w0 in base.items():
                if is_float(w0):
                    residual += float(((predicted[name] - actual[name]).double() ** 2).sum())
                    delta += float(((actual[name] - w0).double() ** 2).sum())
            measured = (residual / delta) ** 0.5
            assert abs(measured - gram_error) <= 1e-6 * measured, (method, step, gram_error)
