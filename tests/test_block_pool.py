"""Gram blocks on two compute threads: results in order, the same bytes as one thread.

BlockPool hands each task a workspace of its own and gives results back in the tasks' order;
a run on two compute threads (the default on a CPU with two cores or more) writes the same
output and Gram bytes as one pinned to a single core, with and without kept deltas.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from relex_stream.block_pool import BlockPool
from relex_stream.kernels import Workspace
from relex_stream.memory import Budget, block_scratch_bytes
from tests.fixtures import Spec, build_trajectory
from tests.helpers import REPO_ROOT, check_against_reference

TARGET = 100


def _workspaces(n: int) -> list[Workspace]:
    return [Workspace(2, 1, 8, torch.device("cpu")) for _ in range(n)]


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_results_come_back_in_order_each_in_a_workspace_of_its_own(threads):
    pool = BlockPool(_workspaces(threads))
    in_use: set[int] = set()
    lock = threading.Lock()

    def task(i: int):
        def compute(ws: Workspace) -> int:
            with lock:
                assert id(ws) not in in_use, "two tasks in flight in one workspace"
                in_use.add(id(ws))
            time.sleep(0.002 * ((i * 7) % 3))  # later tasks often finish first
            return i

        return compute

    seen = []
    try:
        for result, ws in pool.in_order(task(i) for i in range(20)):
            seen.append(result)
            with lock:
                in_use.discard(id(ws))  # the caller is done with it: it may be handed out again
    finally:
        pool.close()
    assert seen == list(range(20))


def test_an_error_in_a_task_reaches_the_caller_after_the_others_stopped():
    pool = BlockPool(_workspaces(2))
    finished = []

    def task(i: int):
        def compute(ws: Workspace) -> int:
            if i == 3:
                raise ValueError("block 3")
            time.sleep(0.01)
            finished.append(i)
            return i

        return compute

    try:
        with pytest.raises(ValueError, match="block 3"):
            for _ in pool.in_order(task(i) for i in range(10)):
                pass
        count = len(finished)
        time.sleep(0.05)
        assert len(finished) == count, "a task still ran after the caller saw the error"
    finally:
        pool.close()


def test_a_caller_that_stops_early_leaves_no_task_running():
    """An output that overflows stops the second pass mid-tensor: buffers the tasks read are
    freed next, so no task may still be running once the caller's error is raised."""
    pool = BlockPool(_workspaces(2))
    running = [0]
    lock = threading.Lock()

    def compute(ws: Workspace) -> None:
        with lock:
            running[0] += 1
        time.sleep(0.02)
        with lock:
            running[0] -= 1

    try:
        with pytest.raises(RuntimeError):
            for i, _ in enumerate(pool.in_order(compute for _ in range(10))):
                if i == 2:
                    raise RuntimeError("overflow")
        assert running[0] == 0
    finally:
        pool.close()


def test_the_budget_takes_a_second_workspace_only_when_it_is_small_beside_it():
    scratch = block_scratch_bytes(30, 1)
    roomy = Budget.split(2 << 30, 30, 1, 65536, 1 << 20, max_workspaces=2)
    assert roomy.workspaces == 2
    assert roomy.fixed == 2 * scratch + 6 * (1 << 20)
    tight = Budget.split(4 * scratch, 30, 1, 65536, 1 << 20, max_workspaces=2)
    assert tight.workspaces == 1
    assert Budget.split(2 << 30, 30, 1, 65536, 1 << 20, max_workspaces=1).workspaces == 1


def test_the_workspace_is_what_the_budget_counts():
    assert Workspace(30, 2, 65536, torch.device("cpu")).nbytes == block_scratch_bytes(30, 2)


@pytest.mark.parametrize(("cores", "ranks", "threads", "torch_threads"),
                         [(1, 1, 1, 1), (2, 1, 2, 1), (8, 1, 2, 3), (64, 1, 2, 31), (4, 2, 2, 1),
                          (4, 4, 1, 1)])
def test_threads_follow_the_cores_the_process_may_use(monkeypatch, cores, ranks, threads,
                                                      torch_threads):
    """Compute threads and torch's threads come from the affinity mask (a batch job's share of a
    larger machine), split among torchrun ranks, not from the machine's core count."""
    from relex_stream import engine
    from relex_stream.distributed import Ranks

    monkeypatch.setattr(engine.os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(engine.os, "cpu_count", lambda: 256)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    chosen = []
    monkeypatch.setattr(engine.torch, "set_num_threads", chosen.append)
    usable = engine._cores(Ranks(rank=0, world_size=ranks))
    wanted = engine._compute_threads_wanted(torch.device("cpu"), usable)
    assert wanted == threads
    engine._cpu_threads(torch.device("cpu"), wanted, usable)
    assert chosen == [torch_threads]
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    engine._cpu_threads(torch.device("cpu"), wanted, usable)
    assert chosen == [torch_threads], "OMP_NUM_THREADS set: torch's threads are left alone"


def _run(traj, out: Path, *flags: str, cores: int | None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), CUDA_VISIBLE_DEVICES="")
    env.pop("OMP_NUM_THREADS", None)
    allowed = sorted(os.sched_getaffinity(0))

    def pin() -> None:
        if cores is not None:
            os.sched_setaffinity(0, allowed[:cores])

    cmd = [sys.executable, "-m", "relex_stream", "run", "--base", str(traj.base), "--runs",
           str(traj.runs), "--target", str(TARGET), "--out", str(out), "--device", "cpu",
           *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                          timeout=300, preexec_fn=pin)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _bytes_under(root: Path, pattern: str) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob(pattern))
            if p.is_file()}


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    # 524288 x 16 embedding and lm_head: 128 Gram blocks each, so the threads take turns, and
    # larger than the read ring of a 128M budget (read in chunks)
    return build_trajectory(tmp_path_factory.mktemp("wide"), Spec(vocab=1 << 19))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
@pytest.mark.parametrize("flags", [("--max-memory", "4G"),
                                   ("--max-memory", "128M"),
                                   ("--max-memory", "128M", "--max-gpu-memory", "1G")],
                         ids=["resident-kept", "chunked-read-again", "chunked-kept"])
def test_two_compute_threads_write_the_bytes_of_one(tmp_path, wide, flags):
    one = _run(wide, tmp_path / "one", *flags, cores=1)
    two = _run(wide, tmp_path / "two", *flags, cores=None)
    assert "on 1 compute thread;" in one.stdout
    assert "on 2 compute threads;" in two.stdout
    check_against_reference(wide, tmp_path / "two", [TARGET])
    outputs = [_bytes_under(tmp_path / name / f"step-{TARGET}", "*.safetensors")
               for name in ("one", "two")]
    assert outputs[0] and outputs[0] == outputs[1], "two compute threads changed the output"
    grams = [_bytes_under(tmp_path / name / "trajectory.zarr", "gen*/gram/*/c/**/*")
             for name in ("one", "two")]
    assert grams[0] and grams[0] == grams[1], "two compute threads changed the Gram matrices"
