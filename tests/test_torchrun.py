"""torchrun on CPU (gloo): two ranks give one process's bytes; a failing rank fails the job."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.fixtures import LM_HEAD, Spec, build_trajectory
from tests.helpers import REPO_ROOT, run_traj


def _torchrun(*args: object, nproc: int = 2, **extra_env: str
              ) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", **extra_env)
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


# A single process with WORLD_SIZE, RANK and LOCAL_RANK left in its environment: torch would
# wait two hours for rank 1, deaf to Ctrl-C. The join's time limit is lowered for the test.
_JOIN_LIMITED = (
    "import sys\n"
    "from relex_stream import cli, distributed\n"
    "distributed.JOIN_TIMEOUT_S = float(sys.argv[1])\n"
    "distributed.JOIN_NOTICE_S = 0.2\n"
    "sys.exit(cli.main(sys.argv[2:]))\n"
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _alone(tmp_path: Path, join_timeout_s: float, port: int, rank: int = 0) -> subprocess.Popen:
    traj = build_trajectory(tmp_path / "traj", Spec())
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", WORLD_SIZE="2", RANK=str(rank),
               LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-c", _JOIN_LIMITED, str(join_timeout_s), "run", "--base", traj.base,
           "--runs", traj.runs, "--target", "100", "--out", tmp_path / "out", "--device", "cpu",
           "--quiet"]
    return subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=REPO_ROOT)


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_left_alone_gives_up_with_one_error_line(tmp_path: Path, rank: int) -> None:
    proc = _alone(tmp_path, 3.0, _free_port(), rank)
    _, stderr = proc.communicate(timeout=120)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    assert len(errors) == 1 and "did not join" in errors[0] and "unset WORLD_SIZE" in errors[0]
    assert "waiting for the other ranks" in stderr  # said while it waited
    assert not (tmp_path / "out").exists()


def test_ctrl_c_stops_a_rank_waiting_for_the_others(tmp_path: Path) -> None:
    proc = _alone(tmp_path, 600.0, _free_port())
    assert proc.stderr is not None
    deadline = time.monotonic() + 120
    seen = ""
    while "waiting for the other ranks" not in seen and time.monotonic() < deadline:
        seen += proc.stderr.readline()
    assert "waiting for the other ranks" in seen
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=60)
    assert proc.returncode == 130, seen + rest
    assert "Traceback" not in rest and rest.count("error:") == 1


def test_a_master_port_in_use_is_one_error_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = _alone(tmp_path, 60.0, taken.getsockname()[1])
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "MASTER_PORT" in errors[0], stderr[-2000:]


def test_watch_refuses_torchrun(tmp_path: Path) -> None:
    """Under torchrun each poll formed and tore down a process group; the ranks drifted apart,
    one died with a traceback and the other hung."""
    traj = build_trajectory(tmp_path / "traj", Spec())
    env = dict(os.environ, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "relex_stream", "watch", "--runs", str(traj.runs), "--base",
         str(traj.base), "--cache", str(tmp_path / "s"), "--target", "100", "--until", "30",
         "--quiet"],
        capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1, proc.stderr
    assert "without torchrun" in proc.stderr and not (tmp_path / "s").exists()


def test_a_bad_gloo_interface_is_one_error_line(tmp_path: Path) -> None:
    """gloo's RuntimeError for an interface that does not exist was a traceback on each rank."""
    traj = build_trajectory(tmp_path / "traj", Spec())
    proc = _torchrun("run", "--base", traj.base, "--runs", traj.runs, "--target", "100",
                     "--out", tmp_path / "o", "--device", "cpu", "--quiet",
                     GLOO_SOCKET_IFNAME="no-such-interface0")
    assert proc.returncode != 0
    # torchrun's agent prints a traceback of its own (ChildFailedError); no rank does
    assert "relex_stream/" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all("GLOO_" in line for line in errors), proc.stderr[-3000:]
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("step-*"))
