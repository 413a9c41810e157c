"""Appending checkpoints to a store: the same bits as building at once, only the new checkpoints
read, old shards untouched, a killed append leaves the old store, and refusals change nothing."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from relex_stream.store import TrajectoryStore
from tests.fixtures import Spec, build_trajectory
from tests.helpers import REPO_ROOT, check_against_reference, run_cli, step_dir

# 21 steps: the first store holds 13 (panels of 8 rows: one full, one partial), the append
# adds 8 more and must recompute the partial panel exactly as a build of all 21 does.
STEPS = tuple(range(10, 220, 10))
FIRST = "10-130"
TARGET = 400


def _run(traj, out: Path, store: Path, *extra: object, base: bool = True, expect_rc=0):
    args: list[object] = ["run", "--runs", traj.runs, "--target", TARGET, "--out", out,
                          "--cache", store, "--device", "cpu", *extra]
    if base:
        args += ["--base", traj.base]
    return run_cli(*args, expect_rc=expect_rc)


def _grams(store: Path) -> dict[str, bytes]:
    with TrajectoryStore.open(store) as opened:
        return {
            name: opened.gram(name).numpy().tobytes()
            for group in opened.groups() if group.has_rows for name in group.tensors
        }


def _files(store: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(store)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(store.rglob("*")) if p.is_file()}


def _weights(out: Path) -> dict[str, bytes]:
    """The safetensors files of OUT/step-TARGET, by name."""
    return {p.name: p.read_bytes() for p in sorted(step_dir(out, TARGET).glob("*.safetensors"))}


def _shard_files(files: dict[str, tuple[bytes, int]]) -> dict[str, tuple[bytes, int]]:
    return {k: v for k, v in files.items() if re.search(r"/(rows|base)/g\d+/c/", k)}


@pytest.fixture(scope="module")
def traj(tmp_path_factory: pytest.TempPathFactory):
    return build_trajectory(tmp_path_factory.mktemp("append") / "traj",
                            Spec(steps=STEPS, vocab=4096, base_shards=2))


@pytest.fixture(scope="module")
def at_once(traj, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store and output built from all steps in one run."""
    root = tmp_path_factory.mktemp("at_once")
    _run(traj, root / "out", root / "store.zarr")
    return root


def test_append_equals_building_at_once(traj, at_once: Path, tmp_path: Path) -> None:
    store = tmp_path / "store.zarr"
    _run(traj, tmp_path / "first", store, "--steps", FIRST)
    before = _files(store)
    proc = _run(traj, tmp_path / "second", store)
    assert re.search(r"appended 8 step\(s\) \(140\.\.210\)", proc.stdout), proc.stdout
    assert _grams(store) == _grams(at_once / "store.zarr"), "Gram bits differ from a rebuild"
    assert _weights(tmp_path / "second") == _weights(at_once / "out")
    check_against_reference(traj, tmp_path / "second", [TARGET])
    after = _files(store)
    old = _shard_files(before)
    assert old and all(after.get(k) == v for k, v in old.items()), "an old shard was rewritten"
    with TrajectoryStore.open(store) as opened:
        assert opened.steps == list(STEPS)


def test_append_after_deleting_old_checkpoints_reads_only_new_ones(traj, at_once: Path,
                                                                   tmp_path: Path) -> None:
    copy = tmp_path / "traj"
    shutil.copytree(traj.root, copy)  # copy2 keeps mtimes: the fingerprints still match
    store = tmp_path / "store.zarr"
    run_cli("run", "--base", copy / "base", "--runs", copy / "runs", "--steps", FIRST,
            "--target", TARGET, "--out", tmp_path / "first", "--cache", store, "--device", "cpu",
            "--quiet")
    for step in range(10, 140, 10):  # the trainer deleted them (max_ckpt_to_keep)
        shutil.rmtree(copy / "runs" / f"checkpoint-{step}")
    new_bytes = sum(p.stat().st_size for s in range(140, 220, 10)
                    for p in (copy / "runs" / f"checkpoint-{s}").glob("*.safetensors"))
    assert new_bytes, "test bug: no new checkpoint files"
    proc = run_cli("run", "--runs", copy / "runs", "--target", TARGET, "--out",
                   tmp_path / "second", "--cache", store, "--device", "cpu")
    read = _summary_bytes(proc.stdout, "from checkpoints")
    # the new checkpoints' tensor bytes (their files less the headers), nothing else
    assert 0.95 * new_bytes < read <= new_bytes, (read, new_bytes, proc.stdout)
    assert _weights(tmp_path / "second") == _weights(at_once / "out")


def test_a_stored_step_half_removed_does_not_stop_an_append(traj, at_once: Path,
                                                              tmp_path: Path) -> None:
    """A trainer's retention removes the oldest checkpoint right after saving the next one:
    a stored step's directory caught half removed ended the append (and watch with it)."""
    copy = tmp_path / "traj"
    shutil.copytree(traj.root, copy)
    store = tmp_path / "store.zarr"
    common = ("--target", TARGET, "--cache", store, "--device", "cpu", "--quiet")
    run_cli("run", "--base", copy / "base", "--runs", copy / "runs", "--steps", FIRST,
            "--out", tmp_path / "first", *common)
    (copy / "runs" / "checkpoint-10" / "model.safetensors").unlink()
    run_cli("run", "--runs", copy / "runs", "--out", tmp_path / "second", *common)
    assert _weights(tmp_path / "second") == _weights(at_once / "out")


def test_a_windowed_append_stores_every_new_checkpoint(traj, at_once: Path,
                                                       tmp_path: Path) -> None:
    """`--window 3` on an append stored only the last 3 new steps: the ones between could
    never be appended afterwards (they would come before the store's last step). The store
    takes them all; the window picks what the prediction uses."""
    store = tmp_path / "store.zarr"
    _run(traj, tmp_path / "first", store, "--steps", FIRST, "--quiet")
    _run(traj, tmp_path / "windowed", store, "--window", "3", "--quiet", base=False)
    with TrajectoryStore.open(store) as opened:
        assert opened.steps == list(STEPS)
    run_cli("run", "--cache", at_once / "store.zarr", "--window", "3", "--target", TARGET,
            "--out", tmp_path / "reference", "--device", "cpu", "--quiet")
    assert _weights(tmp_path / "windowed") == _weights(tmp_path / "reference")


def _summary_bytes(stdout: str, what: str) -> float:
    units = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
    match = re.search(r"([\d.]+) (B|KiB|MiB|GiB) " + what, stdout)
    assert match, stdout
    return float(match.group(1)) * units[match.group(2)]


@pytest.mark.parametrize("case", ["missing-middle", "changed-old", "new-shape",
                                  "base-as-a-new-step", "stored-step-renamed"])
def test_refused_append_leaves_store_unchanged(traj, tmp_path: Path, case: str) -> None:
    """Appends without --base. A new step whose files are the base's or a stored step's (a
    link, a renamed directory) was appended as a zero delta or a repeated row: the store's
    fingerprints of them are what an append without the base can compare."""
    copy = tmp_path / "traj"
    shutil.copytree(traj.root, copy)
    runs = copy / "runs"
    store = tmp_path / "store.zarr"
    run_cli("run", "--base", copy / "base", "--runs", runs, "--steps", FIRST, "--target",
            TARGET, "--out", tmp_path / "first", "--cache", store, "--device", "cpu", "--quiet")
    if case == "missing-middle":  # a step the store lacks, before its last step
        shutil.copytree(runs / "checkpoint-60", runs / "checkpoint-65")
        needle = "step 65"
    elif case == "changed-old":  # a checkpoint the store holds, rewritten
        path = runs / "checkpoint-50" / "model.safetensors"
        tensors = load_file(str(path))
        tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2
        save_file(tensors, str(path), metadata={"format": "pt"})
        needle = "step 50"
    elif case == "base-as-a-new-step":  # hard links of the base's files (cp -al)
        shutil.copytree(copy / "base", runs / "checkpoint-220", copy_function=os.link)
        needle = "step 220"
    elif case == "stored-step-renamed":  # the store's step 130, moved to a new name
        (runs / "checkpoint-130").rename(runs / "checkpoint-220")
        needle = "step 220"
    else:  # a new checkpoint of another shape
        path = runs / "checkpoint-150" / "model.safetensors"
        tensors = load_file(str(path))
        tensors["model.norm.weight"] = torch.zeros(17, dtype=tensors["model.norm.weight"].dtype)
        save_file(tensors, str(path), metadata={"format": "pt"})
        needle = "shape"
    before = _files(store)
    proc = run_cli("run", "--runs", runs, "--target", TARGET, "--out", tmp_path / "second",
                   "--cache", store, "--device", "cpu", "--quiet", expect_rc=None)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert _files(store) == before, "a refused append changed the store"
    assert not (tmp_path / "second").exists() or not list((tmp_path / "second").iterdir())


# ----------------------------------------------------------------------------- killed appends

BIG = Spec(steps=(10, 20, 30, 40, 50, 60, 70, 80, 90), vocab=100000, base_shards=2)


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory):
    """A trajectory whose append takes a visible time, its 6-step store, and the bytes of the
    store and output after an uninterrupted append of the last 3."""
    root = tmp_path_factory.mktemp("big_append")
    traj = build_trajectory(root / "traj", BIG)
    store = root / "store.zarr"
    run_cli("run", "--base", traj.base, "--runs", traj.runs, "--steps", "10-60", "--target",
            TARGET, "--out", root / "first", "--cache", store, "--device", "cpu", "--quiet",
            "--max-memory", "40M")
    reference = root / "appended.zarr"
    shutil.copytree(store, reference)
    run_cli("run", "--runs", traj.runs, "--target", TARGET, "--out", root / "out", "--cache",
            reference, "--device", "cpu", "--quiet", "--max-memory", "40M")
    return traj, store, reference, root / "out"


def _pending_record(store: Path) -> bool:
    return any(p.name.endswith("-k9") for p in (store / "gen1" / "gram").iterdir())


@pytest.mark.parametrize("phase", ["new-rows", "group-done", "committing"])
def test_killed_append_keeps_old_store_and_rerun_finishes(big, tmp_path: Path, phase) -> None:
    traj, original, reference, reference_out = big
    store = tmp_path / "store.zarr"
    shutil.copytree(original, store)
    args = [sys.executable, "-m", "relex_stream", "run", "--runs", str(traj.runs), "--target",
            str(TARGET), "--out", str(tmp_path / "out"), "--cache", str(store), "--device",
            "cpu", "--quiet", "--max-memory", "40M"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen(args, env=env, cwd=REPO_ROOT, stderr=subprocess.PIPE)
    conditions = {
        "new-rows": lambda: any((store / "gen1" / "rows").glob("g*/c/8/0")),
        "group-done": lambda: _pending_record(store),
        "committing": lambda: any(tmp_path.glob("out/.step-*")),
    }
    deadline = time.monotonic() + 120
    while not conditions[phase]():
        assert proc.poll() is None, f"the append ended before phase {phase}"
        assert time.monotonic() < deadline, f"phase {phase} never seen"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with TrajectoryStore.open(store) as opened:
        committed = opened.steps
    assert committed in (list(BIG.steps[:6]), list(BIG.steps)), committed
    rerun = subprocess.run(args, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert _grams(store) == _grams(reference)
    assert _weights(tmp_path / "out") == _weights(reference_out)
    assert not list(tmp_path.glob("out/.step-*")), "leftovers of the killed run remain"


def test_appended_store_reads_back_in_zarr(big) -> None:
    """The store is a zarr v3 hierarchy: zarr itself reads the Grams and the shards' codes."""
    zarr = pytest.importorskip("zarr")
    _, _, reference, _ = big
    with TrajectoryStore.open(reference) as opened:
        group = next(g for g in opened.groups() if g.has_rows)
        gen = opened.current.generation
        k = len(opened.steps)
        ours = opened.grams(group)
    root = zarr.open_group(str(reference), mode="r")
    theirs = root[f"gen{gen}/gram/g{group.index}-k{k}"][:]
    assert np.array_equal(theirs, ours)
    rows = root[f"gen{gen}/rows/g{group.index}"]
    assert rows.shape == (k, group.width)
    codes = rows[k - 1, : group.chunk_cols]
    assert codes.dtype.itemsize == 2 and codes.shape == (group.chunk_cols,)


def test_the_disk_check_of_an_append_counts_rows_as_the_store_keeps_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An append asked for the raw size of its new rows: on realistic bf16 RL the store keeps
    a few percent of that, so `watch` on a tight disk stopped with a false "takes about
    37 MiB but 12 MiB free". The rows appended last say what the next ones take."""
    from relex_stream import engine
    from tests.untrusted import assert_error, assert_ok, call

    traj = tmp_path / "t"
    assert_ok(call("synth", "--out", traj, "--steps", "10-90:10", "--profile", "drift",
                   "--hidden", "64", "--layers", "2", "--vocab", "5000"))
    store = tmp_path / "s.zarr"
    common = ("--target", "200", "--cache", store, "--device", "cpu", "--quiet")
    assert_ok(call("run", "--base", traj / "base", "--runs", traj / "runs", "--steps", "10-60",
                   "--out", tmp_path / "first", *common))
    model_bytes = (traj / "runs" / "checkpoint-10" / "model.safetensors").stat().st_size
    free = {"store": model_bytes * 3 // 2}  # 2 raw rows would not fit; stored ones do
    monkeypatch.setattr(engine, "_free_bytes", lambda path: (path, free["store"] if (
        path == store) else 10 * model_bytes))
    assert_ok(call("run", "--runs", traj / "runs", "--steps", "10-80", "--out",
                   tmp_path / "second", *common))
    free["store"] = model_bytes // 100  # measured, and still more than there is: refused
    assert_error(call("run", "--runs", traj / "runs", "--out", tmp_path / "third", *common),
                 "the store", "free")
    with TrajectoryStore.open(store) as opened:
        assert opened.steps == list(range(10, 90, 10))


def test_a_committed_append_whose_clean_up_fails_still_writes_its_outputs(
        traj, at_once: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Removing what an append superseded (an older Gram version) failed on a directory made
    read-only after the commit: the run said "error: Permission denied" and wrote no output,
    though the store was committed and correct. It is a warning now."""
    from relex_stream.store import TrajectoryStore as Store
    from tests.untrusted import assert_ok, call

    store = tmp_path / "store.zarr"
    common = ("--target", TARGET, "--cache", store, "--device", "cpu", "--quiet")
    assert_ok(call("run", "--base", traj.base, "--runs", traj.runs, "--steps", FIRST, "--out",
                   tmp_path / "first", *common))

    def refused(self, old):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Store, "_collect_garbage", refused)
    result = call("run", "--runs", traj.runs, "--out", tmp_path / "second", *common)
    assert_ok(result)
    assert "is committed, but removing what the change replaced failed" in result.stderr
    assert _weights(tmp_path / "second") == _weights(at_once / "out")
