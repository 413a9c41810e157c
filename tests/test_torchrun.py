"""torchrun on CPU (gloo): two ranks give one process's bytes; a failing rank fails the job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.fixtures import LM_HEAD, Spec, build_trajectory
from tests.helpers import REPO_ROOT, run_traj


def _torchrun(*args: object, nproc: int = 2) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", "-m", "relex_stream", *map(str, args),
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_two_ranks_match_one_process_byte_for_byte(tmp_path: Path) -> None:
    traj = build_trajectory(tmp_path / "traj", Spec(tied=True, base_shards=2, ckpt_shards=3))
    run_traj(traj, tmp_path / "single", [80, 120])
    proc = _torchrun(
        "run", "--base", traj.base, "--runs", traj.runs, "--target", "80,120",
        "--out", tmp_path / "multi", "--device", "cpu",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step in ("step-80", "step-120"):
        single, multi = _files(tmp_path / "single" / step), _files(tmp_path / "multi" / step)
        assert sorted(single) == sorted(multi)
        assert any(name.endswith(".safetensors") for name in single)
        for name in single:
            assert single[name] == multi[name], f"{step}/{name} differs between 1 and 2 ranks"
    # the closing summary is printed once, by rank 0, with numbers aggregated across ranks
    assert proc.stdout.count("output:") == 2
    assert "largest of 2 ranks" in proc.stdout


def test_a_failing_rank_fails_the_job_with_its_message(tmp_path: Path) -> None:
    def poison(step: int, tensors: dict[str, torch.Tensor]) -> None:
        if step == 30:
            tensors[LM_HEAD][0, 0] = float("nan")

    # Only the rank that owns lm_head meets the NaN; the other is waiting at a barrier.
    traj = build_trajectory(tmp_path / "traj", Spec(edit=poison))
    proc = _torchrun(
        "run", "--base", traj.base, "--runs", traj.runs, "--target", "100",
        "--out", tmp_path / "out", "--device", "cpu", "--quiet",
    )  # fmt: skip
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "lm_head.weight" in errors[0] and "step 30" in errors[0]
    assert not (tmp_path / "out" / "step-100").exists()
