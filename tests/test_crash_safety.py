"""Crash safety: killed runs resume to the same bytes, the store lock, changed sources, bad chunks.

The kill tests start `python -m relex_stream run` as a child process on a trajectory large
enough (two ~1M-element tensors, chunked by a small --max-memory) that a run takes a few
seconds, watch the store and the output directory to find the phase the run is in, and
SIGKILL it there. Whatever phase the kill lands in, nothing incomplete may carry a final
`OUT/step-T` name, and rerunning the same command must give the bytes of an uninterrupted run.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from relex_stream import shards
from relex_stream.errors import RelexError
from relex_stream.store import TrajectoryStore
from tests.fixtures import Spec, build_trajectory
from tests.helpers import REPO_ROOT, check_against_reference, group_dir, run_cli, run_traj, step_dir

TARGETS = (100, 150)
# vocab 100000 × hidden 16: embed_tokens and lm_head hold 1.6M elements each (four of the
# store's 512K-element inner chunks); under a 32M budget each is read in chunks of one inner
# chunk, so both passes take visible time.
BIG_SPEC = Spec(vocab=100000, steps=(10, 20, 30, 40, 50, 60), base_shards=2)
MAX_MEMORY = "32M"
BIG_NUMEL = 100_000
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


# ----------------------------------------------------------------------------- helpers


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _run_args(traj, out: Path, *extra: object) -> list[str]:
    args: list[object] = ["run", "--base", traj.base, "--runs", traj.runs]
    args += ["--target", ",".join(map(str, TARGETS)), "--out", out, "--device", "cpu"]
    args += ["--max-memory", MAX_MEMORY, *extra]
    return [str(a) for a in args]


def _start(args: list[str], log_dir: Path, name: str) -> subprocess.Popen:
    """Start `python -m relex_stream ARGS` with stdout/stderr in files under log_dir."""
    log_dir.mkdir(parents=True, exist_ok=True)
    stdout = open(log_dir / f"{name}.out", "w")  # noqa: SIM115 - closed with the process
    stderr = open(log_dir / f"{name}.err", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "relex_stream", *args],
        stdout=stdout,
        stderr=stderr,
        env=_env(),
        cwd=REPO_ROOT,
    )
    proc._log_files = (stdout, stderr)  # type: ignore[attr-defined]
    return proc


def _finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    """Wait for a started process; return (rc, stdout, stderr)."""
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"relex_stream did not exit within {timeout} s")
    out_f, err_f = proc._log_files  # type: ignore[attr-defined]
    out_f.close()
    err_f.close()
    return rc, Path(out_f.name).read_text(), Path(err_f.name).read_text()


def _wait_for(
    proc: subprocess.Popen, condition: Callable[[], bool], what: str, timeout: float = 60
) -> bool:
    """Poll `condition` until true; False if the process exited first (the phase was missed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return True
        except (OSError, ValueError, KeyError, RelexError):  # a file caught mid-write: again
            pass
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    pytest.fail(f"timed out waiting for {what}")


def _big_groups(store: Path) -> list[tuple[int, int, int]]:
    """(generation, group, rows) of the groups holding the chunked tensors, in run order, for
    the store's pending change (or its committed state)."""
    with TrajectoryStore.open(store) as opened:
        gen = opened.manifest.pending or opened.manifest.current
    if gen is None:
        raise ValueError("the store is being created")  # _wait_for looks again
    big = [
        (gen.generation, g.index, len(gen.steps))
        for g in gen.groups()
        if any(n >= BIG_NUMEL for n in g.numels)
    ]
    assert big, f"test bug: no group holds a tensor of {BIG_NUMEL} elements or more"
    return big


def _group_complete(store: Path, key: tuple[int, int, int]) -> bool:
    generation, group, rows = key
    return (store / f"gen{generation}" / "gram" / f"g{group}-k{rows}" / "zarr.json").is_file()


def _has_row_shard(store: Path, key: tuple[int, int, int]) -> bool:
    generation, group, _ = key
    shards = store / f"gen{generation}" / "rows" / f"g{group}" / "c"
    return shards.is_dir() and any(p.is_file() for p in shards.rglob("*"))


def _tmp_dirs(out: Path) -> list[Path]:
    return sorted(out.glob(".step-*.tmp-*")) if out.exists() else []


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _assert_identical(got: Path, want: Path) -> None:
    """Every file of `got` byte-identical to `want`, and the same file names."""
    assert got.is_dir(), f"{got} missing"
    a, b = _files(got), _files(want)
    assert sorted(a) == sorted(b), f"{got}: files {sorted(a)} != {sorted(b)}"
    for name in a:
        assert a[name] == b[name], f"{got / name} differs from the uninterrupted run"


def _assert_only_complete_outputs(out: Path, reference: Path) -> list[int]:
    """A final step-T that exists must be complete (identical to the reference); returns them."""
    present = []
    for target in TARGETS:
        final = step_dir(out, target)
        if final.exists():
            _assert_identical(final, step_dir(reference, target))
            present.append(target)
    leftovers = sorted(p.name for p in out.glob("step-*") if p.name not in
                       {step_dir(out, t).name for t in TARGETS})  # fmt: skip
    assert leftovers == [], f"unexpected final-looking entries {leftovers}"
    return present


def _read_ratio(stdout: str) -> float:
    match = re.search(r"read: .*?\(([\d.]+)x the input", stdout)
    assert match, f"no read summary in stdout:\n{stdout}"
    return float(match.group(1))


def _assert_clean_error(rc: int, stderr: str, want_rc: int = 2) -> str:
    """Exit `want_rc`, no traceback, exactly one stderr line starting with 'error: '."""
    assert "Traceback" not in stderr, stderr
    assert rc == want_rc, f"rc={rc} (expected {want_rc})\nstderr:\n{stderr}"
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{stderr}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory):
    """The large trajectory and an uninterrupted run of it: (traj, reference OUT, stdout)."""
    root = tmp_path_factory.mktemp("crash")
    traj = build_trajectory(root / "traj", BIG_SPEC)
    ref = root / "reference"
    proc = run_cli(*_run_args(traj, ref))
    return traj, ref, proc.stdout


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory):
    """A tiny trajectory with a complete store: (traj, reference OUT with its store)."""
    root = tmp_path_factory.mktemp("small")
    traj = build_trajectory(root / "traj", Spec(steps=(10, 20, 30, 40), base_shards=2))
    ref = root / "reference"
    run_traj(traj, ref, [100])
    return traj, ref


# ----------------------------------------------------------------------------- kill tests


def _phase_condition(phase: str, out: Path) -> Callable[[], bool]:
    store = out / "trajectory.zarr"

    def first() -> tuple[int, int, int]:
        return _big_groups(store)[0]

    if phase == "gram":  # rows of the first chunked group partly stored, the group not done
        return lambda: _has_row_shard(store, first()) and not _group_complete(store, first())
    if phase == "writing":  # the first chunked tensor's materialise pass is under way
        return lambda: bool(_tmp_dirs(out)) and _group_complete(store, first())
    if phase == "finalising":  # index/config being written, or the first rename done

        def finalising() -> bool:
            if any(step_dir(out, t).exists() for t in TARGETS):
                return True
            return any(
                (tmp / "config.json").exists() or (tmp / "model.safetensors.index.json").exists()
                for tmp in _tmp_dirs(out)
            )

        return finalising
    raise AssertionError(phase)


@pytest.mark.parametrize("phase", ["gram", "writing", "finalising"])
def test_sigkill_then_rerun_gives_identical_bytes(big, tmp_path: Path, phase: str) -> None:
    """SIGKILL in a phase; no partial step-T; the same command then finishes byte-identically."""
    traj, ref, ref_stdout = big
    out = tmp_path / "out"
    args = _run_args(traj, out)
    proc = _start(args, tmp_path / "logs", "killed")
    caught = _wait_for(proc, _phase_condition(phase, out), f"phase {phase}")
    proc.send_signal(signal.SIGKILL)
    rc, _, stderr = _finish(proc)
    if not caught:
        pytest.fail(f"the run finished (rc={rc}) before phase {phase!r} was seen:\n{stderr}")
    assert rc == -signal.SIGKILL, f"rc={rc}\n{stderr}"

    present = _assert_only_complete_outputs(out, ref)
    store = out / "trajectory.zarr"
    big_done = (store / "zarr.json").exists() and any(
        _group_complete(store, key) for key in _big_groups(store))

    # Rerun the same command. An output that was completely renamed into place before the
    # kill is refused without --overwrite by design, so only then is --overwrite added.
    rerun_args = args + (["--overwrite"] if present else [])
    rc, stdout, stderr = _finish(_start(rerun_args, tmp_path / "logs", "rerun"))
    assert rc == 0, f"rerun after a kill in phase {phase} failed (rc={rc}):\n{stderr}"
    assert "Traceback" not in stderr, stderr
    for target in TARGETS:
        _assert_identical(step_dir(out, target), step_dir(ref, target))
    assert _tmp_dirs(out) == [], f"leftovers of the killed run remain: {_tmp_dirs(out)}"
    assert not list(out.glob(".step-*.replaced-*")), "a replaced output was left behind"
    if big_done:  # a finished tensor's Gram pass is skipped: less is read than from scratch
        assert _read_ratio(stdout) < _read_ratio(ref_stdout) - 0.2, (
            f"the rerun read {_read_ratio(stdout)}x the input, an uninterrupted run "
            f"{_read_ratio(ref_stdout)}x: finished tensors were not skipped\n{stdout}"
        )


def test_sigkill_during_from_store_run(big, tmp_path: Path) -> None:
    """Kill a `--cache STORE` run (no sources) while it writes; the store is unharmed and the
    same command then gives the reference bytes."""
    _, ref, _ = big
    store = tmp_path / "store.zarr"
    shutil.copytree(ref / "trajectory.zarr", store)
    before = {p.relative_to(store): p.read_bytes() for p in store.rglob("*") if p.is_file()}
    out = tmp_path / "out"
    args = ["run", "--cache", str(store), "--target", ",".join(map(str, TARGETS))]
    args += ["--out", str(out), "--device", "cpu", "--max-memory", MAX_MEMORY, "--quiet"]
    proc = _start(args, tmp_path / "logs", "killed")
    caught = _wait_for(proc, lambda: bool(_tmp_dirs(out)), "the temporary output directory")
    time.sleep(0.2)  # into the materialise pass
    proc.send_signal(signal.SIGKILL)
    rc, _, stderr = _finish(proc)
    if not caught:
        pytest.fail(f"the from-store run finished (rc={rc}) before it was seen writing:\n{stderr}")

    present = _assert_only_complete_outputs(out, ref)
    after = {p.relative_to(store): p.read_bytes() for p in store.rglob("*") if p.is_file()}
    assert after == before, "a from-store run changed the store"

    rc, _, stderr = _finish(
        _start(args + (["--overwrite"] if present else []), tmp_path / "logs", "rerun")
    )
    assert rc == 0, f"rerun failed (rc={rc}):\n{stderr}"
    for target in TARGETS:
        _assert_identical(step_dir(out, target), step_dir(ref, target))
    assert _tmp_dirs(out) == [], f"leftovers of the killed run remain: {_tmp_dirs(out)}"


def test_ctrl_c_says_how_to_resume(big, tmp_path: Path) -> None:
    """SIGINT mid-run: a message on how to resume, non-zero exit, no traceback, no partial
    output; the same command then finishes byte-identically."""
    traj, ref, _ = big
    out = tmp_path / "out"
    args = _run_args(traj, out, "--quiet")
    proc = _start(args, tmp_path / "logs", "interrupted")
    caught = _wait_for(proc, _phase_condition("writing", out), "the materialise pass")
    proc.send_signal(signal.SIGINT)
    rc, _, stderr = _finish(proc, timeout=60)
    if not caught:
        pytest.fail(f"the run finished (rc={rc}) before it could be interrupted:\n{stderr}")
    assert rc != 0, "an interrupted run exited 0"
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert re.search(r"same command|resume|continue|rerun", lines[0], re.IGNORECASE), lines[0]
    assert not any(step_dir(out, t).exists() for t in TARGETS), "partial output under final name"
    assert _tmp_dirs(out) == [], f"an interrupted run left {_tmp_dirs(out)}"

    rc, _, stderr = _finish(_start(args, tmp_path / "logs", "rerun"))
    assert rc == 0, f"rerun after Ctrl-C failed (rc={rc}):\n{stderr}"
    for target in TARGETS:
        _assert_identical(step_dir(out, target), step_dir(ref, target))


# ----------------------------------------------------------------------------- the store lock


def test_locked_store_refuses_second_run(small, tmp_path: Path) -> None:
    """Another process holding STORE.lock: one error line naming it (its pid), exit 2; the store
    is usable once the lock is released."""
    traj, ref = small
    out = tmp_path / "out"
    store = out / "trajectory.zarr"
    store.mkdir(parents=True)
    with open(store / "lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        handle.write(str(os.getpid()))
        handle.flush()
        proc = run_traj(traj, out, [100], expect_rc=None)
    line = _assert_clean_error(proc.returncode, proc.stderr)
    assert str(os.getpid()) in line, f"the message does not name the other run's pid: {line}"
    assert "in use" in line or "another run" in line, line
    assert not step_dir(out, 100).exists()


def test_two_real_runs_on_one_store(big, tmp_path: Path) -> None:
    """Run A holds the store (paused with SIGSTOP); run B on the same --cache fails naming A's
    pid; A then finishes with the reference bytes."""
    traj, ref, _ = big
    cache = tmp_path / "shared.zarr"
    lock = cache / "lock"
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    a = _start(_run_args(traj, out_a, "--cache", cache, "--quiet"), tmp_path / "logs", "a")
    try:
        caught = _wait_for(
            a, lambda: lock.exists() and lock.read_text().strip() == str(a.pid), "A's lock"
        )
        assert caught, f"run A exited before taking the lock: {_finish(a)}"
        a.send_signal(signal.SIGSTOP)
        b_args = _run_args(traj, out_b, "--cache", cache, "--quiet")
        rc, _, stderr = _finish(_start(b_args, tmp_path / "logs", "b"))
        line = _assert_clean_error(rc, stderr)
        assert str(a.pid) in line, f"the message does not name run A's pid {a.pid}: {line}"
        assert not out_b.exists() or not list(out_b.glob("step-*")), "run B wrote output"
    finally:
        a.send_signal(signal.SIGCONT)
    rc, _, stderr = _finish(a)
    assert rc == 0, f"run A failed after the refused run B (rc={rc}):\n{stderr}"
    for target in TARGETS:
        _assert_identical(step_dir(out_a, target), step_dir(ref, target))


# ----------------------------------------------------------------------------- integrity


def test_changed_source_is_named_and_rebuild_works(tmp_path: Path) -> None:
    """Rewriting one checkpoint with other values: refused naming it (exit 2); --rebuild then
    gives the bytes of a fresh run on the changed sources."""
    traj = build_trajectory(tmp_path / "traj", Spec(steps=(10, 20, 30, 40), base_shards=2))
    store = tmp_path / "store.zarr"
    run_traj(traj, tmp_path / "first", [100], "--cache", store)

    path = traj.ckpt_dirs[30] / "model.safetensors"
    tensors = load_file(str(path))
    tensors[Q_PROJ] = tensors[Q_PROJ] * 1.5  # same name, shape and dtype: only the values change
    save_file(tensors, str(path), metadata={"format": "pt"})

    out = tmp_path / "second"
    proc = run_traj(traj, out, [100], "--cache", store, expect_rc=None)
    line = _assert_clean_error(proc.returncode, proc.stderr)
    assert "30" in line and "model.safetensors" in line, f"changed file not named: {line}"
    assert "--rebuild" in line, f"no way out suggested: {line}"
    assert not step_dir(out, 100).exists()

    run_traj(traj, out, [100], "--cache", store, "--rebuild")
    check_against_reference(traj, out, [100])  # the prediction from the changed sources
    with pytest.raises(AssertionError):  # which really differs from the old one
        _assert_identical(step_dir(out, 100), step_dir(tmp_path / "first", 100))


def _chunk_offset(store: Path, name: str) -> int:
    """Byte offset, in its row-0 shard, of the first inner chunk of tensor `name`."""
    with TrajectoryStore.open(store) as opened:
        group = opened.group_of(name)
        record = opened.record(group).rows[0]
        shard = group_dir(store, "rows", name) / "c" / "0" / "0"
        fd = os.open(shard, os.O_RDONLY)
        try:
            index = shards.read_index(fd, group.n_chunks, record, group.chunk_cols * 8)
        finally:
            os.close(fd)
        return int(index.offsets[group.chunk_range(name, 0, 1)[0]])


DAMAGE = {
    "rows-garbage": ("rows", "garbage"),
    "base-garbage": ("base", "garbage"),
    "gram-garbage": ("gram", "garbage"),
    "rows-bitflip": ("rows", "bitflip"),
    "rows-missing": ("rows", "missing"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_store_chunk_names_tensor(small, tmp_path: Path, case: str) -> None:
    """A damaged store chunk (garbage, one flipped byte, deleted file): one error line naming
    the tensor and how to rebuild, exit 2, no output.

    rows/base chunks are read by a from-store run; the Gram matrix is read by any run that
    finds the tensor complete, so that case reruns with the sources.
    """
    traj, ref = small
    array, damage = DAMAGE[case]
    store = tmp_path / "store.zarr"
    shutil.copytree(ref / "trajectory.zarr", store)
    if array == "gram":
        rows_dir = group_dir(store, "rows", Q_PROJ)
        k = len(list((rows_dir / "c").iterdir()))
        chunks = [store / rows_dir.parts[-3] / "gram" / f"{rows_dir.name}-k{k}" / "c/0/0/0"]
    else:
        chunks = sorted(p for p in (group_dir(store, array, Q_PROJ) / "c").rglob("*")
                        if p.is_file())
    assert chunks and chunks[0].is_file(), f"test bug: no chunk files for {array}"
    if damage == "garbage":
        chunks[0].write_bytes(b"\x00garbage, not a zstd frame\xff" * 8)
    elif damage == "bitflip":  # one bit inside the first stored chunk of Q_PROJ's row 0
        data = bytearray(chunks[0].read_bytes())
        data[_chunk_offset(store, Q_PROJ) + 20] ^= 0x10
        chunks[0].write_bytes(bytes(data))
    else:
        chunks[0].unlink()

    out = tmp_path / "out"
    if array == "gram":
        proc = run_traj(traj, out, [100], "--cache", store, expect_rc=None)
    else:
        proc = run_cli(
            "run", "--cache", store, "--target", "100", "--out", out, "--device", "cpu",
            "--quiet", expect_rc=None,
        )  # fmt: skip
    line = _assert_clean_error(proc.returncode, proc.stderr)
    assert Q_PROJ in line, f"the message does not name tensor {Q_PROJ}: {line}"
    assert "--rebuild" in line, f"the message does not say how to rebuild: {line}"
    assert not step_dir(out, 100).exists(), "output written from a damaged store"
    assert _tmp_dirs(out) == []


def test_sigterm_leaves_no_temporary_output_and_the_rerun_finishes(big, tmp_path: Path) -> None:
    """A job's time limit sends SIGTERM: the run stops with one error line and exit 143, its
    temporary outputs are removed (SIGTERM killed it outright and left model-sized hidden
    directories in OUT), and the same command then finishes byte-identically."""
    traj, ref, _ = big
    out = tmp_path / "out"
    args = _run_args(traj, out)
    proc = _start(args, tmp_path / "logs", "terminated")
    caught = _wait_for(proc, _phase_condition("writing", out), "phase writing")
    proc.send_signal(signal.SIGTERM)
    rc, _, stderr = _finish(proc)
    if not caught:
        pytest.fail(f"the run finished (rc={rc}) before it wrote outputs:\n{stderr}")
    assert rc == 143, f"rc={rc}\n{stderr}"
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "SIGTERM" in errors[0], stderr
    assert _tmp_dirs(out) == [], f"temporary outputs left: {_tmp_dirs(out)}"
    rc, _, stderr = _finish(_start(args, tmp_path / "logs", "rerun"))
    assert rc == 0, stderr
    for target in TARGETS:
        _assert_identical(step_dir(out, target), step_dir(ref, target))
