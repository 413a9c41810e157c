"""`watch` follows a run while checkpoints are written into it: one timeline row per complete
checkpoint, none taken half-written, and a drift equal to the one of dense predictions."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from relex_stream.store import TrajectoryStore
from tests.fixtures import Spec, build_trajectory
from tests.helpers import REPO_ROOT, make_deep_dir, remove_deep_dir, run_cli
from tests.reference import is_float, load_model_dir, reference_predict

STEPS = (10, 20, 30, 40, 50, 60)
TARGET = 150
PAUSE = 1.0  # a shard stays half-written this long: longer than --settle and --interval


def _write_run(source: Path, runs: Path, log: list) -> None:
    """Copy checkpoints in step order the way a trainer writes them: config first, then the
    weights in two halves with a pause between, so the shard is visible half-written."""
    for step in STEPS:
        src = source / f"checkpoint-{step}"
        dst = runs / f"checkpoint-{step}"
        dst.mkdir(parents=True)
        for extra in src.iterdir():
            if extra.name != "model.safetensors":
                shutil.copy2(extra, dst / extra.name)
        data = (src / "model.safetensors").read_bytes()
        with open(dst / "model.safetensors", "wb") as handle:
            handle.write(data[: len(data) // 2])
            handle.flush()
            log.append(("half", step, time.monotonic()))
            time.sleep(PAUSE)
            handle.write(data[len(data) // 2 :])
        log.append(("complete", step, time.monotonic()))
        time.sleep(0.3)


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("watch")
    traj = build_trajectory(root / "traj", Spec(steps=STEPS, vocab=256))
    runs, store = root / "live", root / "store.zarr"
    runs.mkdir()
    log: list = []
    writer = threading.Thread(target=_write_run, args=(traj.runs, runs, log))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO_ROOT))
    cmd = [sys.executable, "-m", "relex_stream", "watch", "--runs", str(runs), "--cache",
           str(store), "--base", str(traj.base), "--target", str(TARGET), "--interval", "0.2s",
           "--settle", "0.4s", "--until", str(STEPS[-1]), "--device", "cpu", "--out",
           str(root / "pred"), "--every", "2"]
    watch = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    writer.start()
    try:
        stdout, stderr = watch.communicate(timeout=240)
    finally:
        writer.join()
    assert watch.returncode == 0, stderr
    return traj, store, stdout, log, root


def test_one_timeline_row_per_complete_checkpoint(watched) -> None:
    _, store, stdout, _, _ = watched
    timeline = json.loads((store / "timeline" / "timeline.json").read_text())
    assert [row["step"] for row in timeline["rows"]] == list(STEPS[1:])
    assert (store / "timeline" / "timeline.csv").read_text().count("\n") == len(STEPS)
    lines = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == len(STEPS) - 1, stdout
    assert "appended 5 checkpoint(s)" in stdout  # the first build counts as one


def test_half_written_checkpoints_were_never_taken(watched, tmp_path: Path) -> None:
    """The store equals, Gram bit for Gram bit, one built at once from the finished files."""
    traj, store, _, _, _ = watched
    reference = tmp_path / "at_once.zarr"
    run_cli("run", "--base", traj.base, "--runs", traj.runs, "--target", TARGET, "--out",
            tmp_path / "out", "--cache", reference, "--device", "cpu", "--quiet")
    with TrajectoryStore.open(store) as a, TrajectoryStore.open(reference) as b:
        assert a.steps == b.steps == list(STEPS)
        for group in a.groups():
            if group.has_rows:
                assert np.array_equal(a.grams(group).view(np.uint64),
                                      b.grams(group).view(np.uint64))


def test_drift_equals_dense_predictions(watched) -> None:
    traj, store, _, _, _ = watched
    rows = json.loads((store / "timeline" / "timeline.json").read_text())["rows"]
    base = load_model_dir(traj.base)
    ckpts = {s: load_model_dir(traj.ckpt_dirs[s]) for s in STEPS}
    floats = [n for n, t in base.items() if is_float(t)]

    def prediction(k: int) -> torch.Tensor:
        first = {s: ckpts[s] for s in STEPS[:k]}
        out = reference_predict(base, first, [TARGET])[float(TARGET)]
        return torch.cat([out[n].flatten() for n in floats])

    w0 = torch.cat([base[n].to(torch.float64).flatten() for n in floats])
    for row in rows:
        k = row["rows"]
        drift = row["drift"][str(TARGET)]
        if k < 3:
            assert drift is None
            continue
        now, before = prediction(k), prediction(k - 1)
        dense = float((now - before).norm() / (now - w0).norm())
        assert drift == pytest.approx(dense, rel=1e-6), (k, drift, dense)


def test_every_second_checkpoint_is_materialised(watched) -> None:
    _, _, _, _, root = watched
    assert (root / "pred" / f"step-{TARGET}" / "model.safetensors").is_file()


def test_restart_continues_where_it_stopped(watched, tmp_path: Path) -> None:
    traj, store, _, _, _ = watched
    copy = tmp_path / "store.zarr"
    shutil.copytree(store, copy)
    proc = run_cli("watch", "--runs", traj.runs, "--cache", copy, "--target", TARGET,
                   "--interval", "0.1s", "--settle", "0.1s", "--until", STEPS[-1],
                   "--device", "cpu")
    assert "appended 0 checkpoint(s)" in proc.stdout  # the store already holds step 60
    timeline = json.loads((copy / "timeline" / "timeline.json").read_text())
    assert [row["step"] for row in timeline["rows"]] == list(STEPS[1:])


def _watch_to_end(traj, store: Path) -> subprocess.CompletedProcess[str]:
    """watch over a finished run (every checkpoint already complete) until its last step."""
    return run_cli("watch", "--runs", traj.runs, "--cache", store, "--base", traj.base,
                   "--target", TARGET, "--interval", "0.2s", "--settle", "0.2s", "--until",
                   STEPS[-1], "--device", "cpu", expect_rc=None)


def test_a_hostile_timeline_in_the_store_is_neither_trusted_nor_followed(watched,
                                                                         tmp_path: Path) -> None:
    """The store is input: forged timeline rows are computed again, a FIFO is not waited on,
    and a timeline directory that links elsewhere is refused without writing there."""
    traj, store, _, _, _ = watched
    honest = json.loads((store / "timeline" / "timeline.json").read_text())
    forged = json.loads(json.dumps(honest))
    forged["rows"][-1]["explained_variance"] = "0.5"  # a string where a number belongs
    forged["rows"][-2]["drift"] = {"x": 1.0}  # another target's drift
    forged["rows"][-3]["rows"] = 99  # a row for another step count
    for damage in ("forged", "fifo", "link"):
        # a store of every step but the last, with the watched store's timeline: watch appends
        # the last step and rewrites the timeline
        copy = tmp_path / damage / "store.zarr"
        run_cli("run", "--base", traj.base, "--runs", traj.runs, "--steps",
                f"{STEPS[0]}-{STEPS[-2]}", "--target", TARGET, "--out", tmp_path / damage / "o",
                "--cache", copy, "--device", "cpu", "--quiet")
        shutil.copytree(store / "timeline", copy / "timeline")
        timeline = copy / "timeline"
        (timeline / "timeline.json").unlink()
        if damage == "forged":
            (timeline / "timeline.json").write_text(json.dumps(forged))
        elif damage == "fifo":
            os.mkfifo(timeline / "timeline.json")
        else:
            elsewhere = tmp_path / damage / "elsewhere"
            elsewhere.mkdir()
            shutil.rmtree(timeline)
            timeline.symlink_to(elsewhere)
        proc = _watch_to_end(traj, copy)
        if damage == "link":
            assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
            assert "symbolic link" in proc.stderr and not any(elsewhere.iterdir())
            continue
        assert proc.returncode == 0, proc.stderr
        rows = json.loads((timeline / "timeline.json").read_text())["rows"]
        assert [r["step"] for r in rows] == [r["step"] for r in honest["rows"]]
        for got, want in zip(rows, honest["rows"], strict=True):
            # recomputed rows equal the live ones up to the last bits of the float64 reductions
            pairs = [(got[f], want[f]) for f in ("explained_variance", "r_squared", "reach",
                                                    "rows", "straight")]
            pairs += [(got["drift"][t], want["drift"][t]) for t in want["drift"]]
            for a, b in pairs:
                assert a == b if b is None or a is None else a == pytest.approx(b, rel=1e-9), (
                    damage, got, want)
            assert set(got) == set(want) and list(got["drift"]) == list(want["drift"])


def test_a_timeline_directory_swapped_for_a_link_while_watch_writes_is_not_followed(
        watched, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A co-user of the store swaps timeline/ for a link to their own directory while the
    plot is drawn (the widest window): watch refuses with one error, and nothing in the
    linked directory changes (the PNG used to be written through the link)."""
    from relex_stream import plots, watch
    from relex_stream.errors import RelexError

    _, store, _, _, _ = watched
    copy = tmp_path / "store.zarr"
    shutil.copytree(store, copy)
    rows = json.loads((copy / "timeline" / "timeline.json").read_text())["rows"]
    victim = tmp_path / "victim"
    victim.mkdir()
    for name in ("timeline.json", "timeline.csv", "timeline.png"):
        (victim / name).write_text("someone else's file")
    drawn = plots.timeline_png

    def draw_then_swap(*args: object) -> bytes:
        png = drawn(*args)
        (copy / "timeline").rename(copy / "timeline.old")
        (copy / "timeline").symlink_to(victim)
        return png

    monkeypatch.setattr(plots, "timeline_png", draw_then_swap)
    options = watch.WatchOptions(runs=tmp_path, cache=copy, targets=(float(TARGET),))
    with pytest.raises(RelexError, match="symbolic link"):
        watch._write_timeline(options, rows)
    assert {p.name: p.read_text() for p in victim.iterdir()} == {
        name: "someone else's file" for name in ("timeline.json", "timeline.csv",
                                                  "timeline.png")}


def test_timeline_rows_are_reused_only_for_the_data_they_were_computed_from(
        watched, tmp_path: Path) -> None:
    """A row whose value was changed in the shared store (its checksum fails), and rows of
    another run with the same steps (a store rebuilt from it keeps the old timeline/), are
    computed again: the timeline equals one written from scratch."""
    from tests.untrusted import assert_ok, call

    traj, store, _, _, _ = watched
    other = build_trajectory(tmp_path / "other", Spec(steps=STEPS, vocab=256, seed=7))
    honest = json.loads((store / "timeline" / "timeline.json").read_text())
    edited = json.loads(json.dumps(honest))
    edited["rows"][1]["explained_variance"] = 0.125  # the right type, the wrong value
    results = {}
    for case, source, timeline in (("edited", traj, edited), ("other-run", other, honest),
                                   ("fresh-other", other, None)):
        copy = tmp_path / case / "store.zarr"
        assert_ok(call("run", "--base", source.base, "--runs", source.runs, "--steps",
                       f"{STEPS[0]}-{STEPS[-2]}", "--target", TARGET, "--out",
                       tmp_path / case / "o", "--cache", copy, "--device", "cpu", "--quiet"))
        if timeline is not None:
            (copy / "timeline").mkdir()
            (copy / "timeline" / "timeline.json").write_text(json.dumps(timeline))
        assert_ok(call("watch", "--runs", source.runs, "--cache", copy, "--target", TARGET,
                       "--interval", "0.1s", "--settle", "0s", "--until", STEPS[-1],
                       "--device", "cpu", "--quiet"))
        results[case] = json.loads((copy / "timeline" / "timeline.json").read_text())["rows"]

    def values(rows: list[dict]) -> list[float]:
        return [r["explained_variance"] for r in rows]

    assert values(results["edited"]) == pytest.approx(values(honest["rows"]), rel=1e-9)
    assert values(results["other-run"]) == pytest.approx(values(results["fresh-other"]),
                                                         rel=1e-9)
    assert values(results["other-run"]) != pytest.approx(values(honest["rows"]), rel=1e-6)


def test_an_append_checks_the_base_it_is_given(watched, tmp_path: Path) -> None:
    """Once the store existed, watch dropped --base: another run's checkpoints were appended
    onto this run's base. The base is now checked on every append, as run checks it."""
    from tests.untrusted import assert_error, call, snapshot

    traj, store, _, _, _ = watched
    copy = tmp_path / "store.zarr"
    shutil.copytree(store, copy)
    other_base = tmp_path / "other-base"
    shutil.copytree(traj.base, other_base)
    weights = other_base / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-2] ^= 0x01  # one bit of the last tensor's last element: another run's base
    weights.write_bytes(bytes(data))
    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.copytree(traj.runs / f"checkpoint-{STEPS[-1]}", runs / "checkpoint-70")
    before = snapshot(copy)
    result = call("watch", "--runs", runs, "--cache", copy, "--base", other_base, "--target",
                  TARGET, "--interval", "0.1s", "--settle", "0.1s", "--until", 70,
                  "--device", "cpu")
    assert_error(result, "other inputs")
    assert snapshot(copy) == before


def test_a_checkpoint_arriving_below_the_stored_steps_is_named(watched, tmp_path: Path,
                                                               caplog) -> None:
    """A step copied in after a later one (rsync delivers checkpoint-100 before -30) was
    skipped without a word; it is now named once, with how to take it in."""
    from relex_stream.watch import Watcher, WatchOptions

    traj, store, _, _, _ = watched
    runs = tmp_path / "runs"
    runs.mkdir()
    for step in STEPS:
        (runs / f"checkpoint-{step}").symlink_to(traj.runs / f"checkpoint-{step}")
    shutil.copytree(traj.runs / "checkpoint-30", runs / "checkpoint-35")
    watcher = Watcher(WatchOptions(runs=runs, cache=store, targets=(TARGET,)))
    with caplog.at_level("WARNING", logger="relex_stream"):
        assert watcher.ready_steps() == [] and watcher.ready_steps() == []
    warned = [r.getMessage() for r in caplog.records if "arrived after step" in r.getMessage()]
    assert len(warned) == 1 and "checkpoint-35 arrived after step 60" in warned[0], warned
    assert "--rebuild" in warned[0]


@pytest.mark.parametrize("extra,needle", [
    (("--method", "reconstruct"), "does not (it reproduces observed steps)"),
    (("--method", "nosuch"), "is not one of"),
    (("--target", "150,150"), "names a step twice"),
    (("--out", "STORE/pred"), "is inside the store"),
])
def test_what_watch_can_refuse_it_refuses_before_the_first_append(
        watched, tmp_path: Path, extra: tuple, needle: str) -> None:
    """These were refused only after the store was built (and each restart appended one more
    checkpoint before dying)."""
    from tests.untrusted import assert_error, call

    traj = watched[0]
    store = tmp_path / "store.zarr"
    extra = tuple(str(store) + a[5:] if a.startswith("STORE") else a for a in extra)
    args = ["watch", "--runs", traj.runs, "--cache", store, "--base", traj.base, "--target",
            TARGET, "--interval", "0.1s", "--settle", "0.1s", "--until", 30, "--device", "cpu"]
    if "--target" in extra:
        i = args.index("--target")
        del args[i : i + 2]
    assert_error(call(*args, *extra), needle)
    assert not store.exists()


def test_a_method_needing_more_rows_leaves_early_rows_blank(watched, tmp_path: Path) -> None:
    """relex:fit=poly:2 needs 3 rows: watch stopped at its first drift (2 rows before it)."""
    from tests.untrusted import assert_ok, call

    traj = watched[0]
    store = tmp_path / "store.zarr"
    assert_ok(call("watch", "--runs", traj.runs, "--cache", store, "--base", traj.base,
                   "--target", TARGET, "--interval", "0.1s", "--settle", "0.1s", "--until", 50,
                   "--method", "relex:fit=poly:2", "--device", "cpu"))
    rows = json.loads((store / "timeline" / "timeline.json").read_text())["rows"]
    drift = [row["drift"][str(TARGET)] for row in rows]
    assert [row["step"] for row in rows] == [20, 30, 40, 50]
    assert drift[:2] == [None, None] and all(d is not None and d > 0 for d in drift[2:]), drift


def test_a_reader_holding_the_store_delays_an_append_instead_of_ending_watch(
        watched, tmp_path: Path) -> None:
    """watch exited with 'in use' whenever a report or run --cache held the shared lock at its
    append; it now says so once and appends when the store is free."""
    import fcntl

    from tests.untrusted import assert_ok, call

    traj, store, _, _, root = watched
    copy = tmp_path / "store.zarr"
    shutil.copytree(store, copy)
    runs = tmp_path / "runs"
    runs.mkdir()
    for step in STEPS:  # the checkpoints the store was built from
        (runs / f"checkpoint-{step}").symlink_to(root / "live" / f"checkpoint-{step}")
    shutil.copytree(traj.runs / f"checkpoint-{STEPS[-1]}", runs / "checkpoint-70")
    reader = os.open(copy / "lock", os.O_RDONLY)
    fcntl.flock(reader, fcntl.LOCK_SH)
    release = threading.Timer(1.5, os.close, args=(reader,))
    release.start()
    try:
        result = call("watch", "--runs", runs, "--cache", copy, "--base", traj.base,
                      "--target", TARGET, "--interval", "0.2s", "--settle", "0.1s", "--until",
                      70, "--device", "cpu")
    finally:
        release.join()
    assert_ok(result)
    assert result.stderr.count("is in use by another process") == 1, result.stderr
    assert "appended 1 checkpoint(s)" in result.stdout
    assert TrajectoryStore.open(copy).steps[-1] == 70


def test_an_empty_run_directory_is_waited_for_like_a_missing_one(tmp_path: Path) -> None:
    """watch waited for a --runs that did not exist yet but exited ('no checkpoints found') on
    one that existed empty, as a trainer leaves it before its first save."""
    from relex_stream.watch import Watcher, WatchOptions

    runs = tmp_path / "runs"
    for exists in (False, True):
        if exists:
            runs.mkdir()
            (runs / "trainer_state.json").write_text("{}")
        watcher = Watcher(WatchOptions(runs=runs, cache=tmp_path / "s", targets=(100.0,)))
        assert watcher.ready_steps() == []


def test_a_checkpoint_removed_before_its_append_is_left_out(watched, tmp_path: Path,
                                                             monkeypatch) -> None:
    """A trainer keeping few checkpoints can remove one between watch's poll and its read:
    watch stopped with "--steps names step(s) [70] that are not observed" (no --steps given)."""
    from relex_stream import watch as watch_module

    traj, store, _, _, root = watched
    copy = tmp_path / "store.zarr"
    shutil.copytree(store, copy)
    runs = tmp_path / "runs"
    runs.mkdir()
    for step in STEPS:
        (runs / f"checkpoint-{step}").symlink_to(root / "live" / f"checkpoint-{step}")
    shutil.copytree(traj.runs / f"checkpoint-{STEPS[-1]}", runs / "checkpoint-70")
    append = watch_module.Watcher._append

    def removed_first(self, steps, building):
        shutil.rmtree(runs / "checkpoint-70")
        return append(self, steps, building)

    monkeypatch.setattr(watch_module.Watcher, "_append", removed_first)
    watcher = watch_module.Watcher(watch_module.WatchOptions(
        runs=runs, cache=copy, targets=(TARGET,), settle_s=0.0, until=70))
    watcher.ready_steps()  # first sight of checkpoint-70
    assert watcher.poll() == [] and 70 in watcher.passed_over
    assert TrajectoryStore.open(copy).steps[-1] == STEPS[-1]


def test_a_checkpoint_rewritten_while_it_is_appended_is_taken_again(watched, tmp_path: Path,
                                                                    monkeypatch) -> None:
    """A checkpoint the trainer rewrites while watch reads it is not kept (its rows could mix
    two files); watch says so and appends it once it has settled again, instead of ending."""
    from relex_stream import sources
    from relex_stream import watch as watch_module

    traj, store, _, _, root = watched
    copy = tmp_path / "store.zarr"
    shutil.copytree(store, copy)
    runs = _runs_beyond(traj, root, tmp_path)
    weights = (runs / "checkpoint-70" / "model.safetensors").resolve()
    real_read = sources.read_into
    rewrites = []

    def read_then_rewrite(info, start, out):
        real_read(info, start, out)
        if not rewrites and info.pieces[0].file.resolve() == weights:
            rewrites.append(info.name)
            weights.write_bytes(weights.read_bytes())  # the same bytes, written again

    monkeypatch.setattr(sources, "read_into", read_then_rewrite)
    watcher = watch_module.Watcher(watch_module.WatchOptions(
        runs=runs, cache=copy, targets=(TARGET,), settle_s=0.0, until=70))
    watcher.ready_steps()  # first sight of checkpoint-70
    assert watcher.poll() == [] and rewrites
    assert TrajectoryStore.open(copy).steps[-1] == STEPS[-1]
    watcher.ready_steps()  # seen again, unchanged since
    assert len(watcher.poll()) == 1
    assert TrajectoryStore.open(copy).steps[-1] == 70


def _runs_beyond(traj, root: Path, where: Path) -> Path:
    """A runs directory of the watched steps plus two new ones, 70 and 80 (copies of 50 and
    60 made now: new times, so not taken for the stored steps' own files)."""
    runs = where / "runs"
    runs.mkdir()
    for step in STEPS:
        (runs / f"checkpoint-{step}").symlink_to(root / "live" / f"checkpoint-{step}")
    for new, old in ((70, 50), (80, 60)):
        shutil.copytree(traj.runs / f"checkpoint-{old}", runs / f"checkpoint-{new}",
                        copy_function=shutil.copy)
    return runs


def _timeline_steps(store: Path) -> list[int]:
    return [r["step"] for r in json.loads((store / "timeline" / "timeline.json").read_text())
            ["rows"]]


def test_another_appender_is_neither_fatal_nor_counted(watched, tmp_path: Path,
                                                       monkeypatch) -> None:
    """Another process appending between watch's look at the store and its lock ended watch
    ("the store changed while this run started"); one that stored a step watch was about to
    append had it counted and printed as watch's own ("appended 9" for 3). Now watch waits
    for the next poll, counts only its own appends, and still brings the timeline up to date."""
    from relex_stream import engine
    from relex_stream import watch as watch_module
    from relex_stream.units import StepSelection

    traj, store, _, _, root = watched
    copy = tmp_path / "store.zarr"
    shutil.copytree(store, copy)
    runs = _runs_beyond(traj, root, tmp_path)

    def other_appends(step: int) -> None:
        engine.update_store(cache=copy, runs=runs, quiet=True, device="cpu",
                            steps=StepSelection((), (*STEPS, 70, 80)[: STEPS.index(60) + 1 +
                                                (step // 10 - 6)], str(step)))

    real_gather = engine.gather_inputs
    raced = []

    def gather_then_race(*args, **kwargs):  # the other commits after this run's look
        inputs = real_gather(*args, **kwargs)
        if not raced:
            raced.append(70)
            other_appends(70)
        return inputs

    monkeypatch.setattr(engine, "gather_inputs", gather_then_race)
    watcher = watch_module.Watcher(watch_module.WatchOptions(
        runs=runs, cache=copy, targets=(TARGET,), settle_s=0.0, until=80))
    watcher.ready_steps()
    assert watcher.poll() == [] and raced and watcher.appended == 0 and watcher.busy_reported
    monkeypatch.setattr(engine, "gather_inputs", real_gather)
    append = watch_module.Watcher._append

    def other_first(self, steps, building):
        other_appends(steps[-1])  # stored by the other just before watch's own append
        return append(self, steps, building)

    monkeypatch.setattr(watch_module.Watcher, "_append", other_first)
    lines = watcher.poll()  # 70 is the other's: only the timeline catches up
    assert len(lines) == 1 and watcher.appended == 0
    assert _timeline_steps(copy)[-1] == 70
    lines = watcher.poll()  # 80: stored by the other just before watch's append
    assert watcher.appended == 0 and TrajectoryStore.open(copy).steps[-1] == 80
    assert _timeline_steps(copy)[-1] == 80 and len(lines) == 1


def test_a_restart_brings_the_timeline_and_out_up_to_date(watched, tmp_path: Path) -> None:
    """watch killed between committing an append and writing its timeline row (and --out)
    was, when started again, "appended 0" with the timeline and the prediction left behind
    for good (until a new checkpoint came, never at the end of training)."""
    traj, store, _, _, _ = watched
    copy = tmp_path / "store.zarr"
    shutil.copytree(store, copy)
    timeline = copy / "timeline" / "timeline.json"
    data = json.loads(timeline.read_text())
    data["rows"] = data["rows"][:-1]  # the last append's row was never written
    timeline.write_text(json.dumps(data))
    proc = run_cli("watch", "--runs", traj.runs, "--cache", copy, "--target", TARGET,
                   "--interval", "0.1s", "--settle", "0.1s", "--until", STEPS[-1],
                   "--device", "cpu", "--out", tmp_path / "pred")
    assert "appended 0 checkpoint(s)" in proc.stdout
    assert _timeline_steps(copy) == list(STEPS[1:])
    assert (tmp_path / "pred" / f"step-{TARGET}" / "model.safetensors").is_file()


def test_a_deeply_nested_folder_in_a_step_is_just_files(tmp_path: Path) -> None:
    """os.walk recursed once per level: a step directory holding a folder 1,200 deep ended
    watch with a RecursionError traceback."""
    from relex_stream.watch import _snapshot

    deep = tmp_path / "checkpoint-10"
    try:
        (make_deep_dir(deep, 1200) / "x").write_text("x")
        (deep / "model.safetensors").write_text("y")
        found = _snapshot(deep)
    finally:
        remove_deep_dir(deep)
    assert [entry[0] for entry in found] == ["/".join(["a"] * 1200 + ["x"]), "model.safetensors"]


def _poison(directory: Path) -> None:
    """A training blow-up: NaN in one weight of the checkpoint's model file."""
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    name = next(n for n, t in tensors.items() if t.is_floating_point())
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_a_nan_checkpoint_is_left_out_until_it_is_saved_again(watched, tmp_path: Path,
                                                              caplog, monkeypatch) -> None:
    """watch ended on a NaN checkpoint ("leave its step out with --steps", a flag watch does
    not have), and every restart read the same step and ended again: no later checkpoint was
    ever taken. It is now named once and left out; the next one is appended, and a step saved
    again with finite values is taken."""
    from relex_stream import watch as watch_module

    traj, store, _, _, root = watched
    copy = tmp_path / "store.zarr"
    shutil.copytree(store, copy)
    runs = _runs_beyond(traj, root, tmp_path)
    shutil.move(runs / "checkpoint-80", tmp_path / "later")
    _poison(runs / "checkpoint-70")
    appends = []
    append = watch_module.Watcher._append
    monkeypatch.setattr(watch_module.Watcher, "_append",
                        lambda self, steps, building: appends.append(steps) or append(
                            self, steps, building))
    watcher = watch_module.Watcher(watch_module.WatchOptions(
        runs=runs, cache=copy, targets=(TARGET,), settle_s=0.0, until=80))
    with caplog.at_level("WARNING", logger="relex_stream"):
        watcher.ready_steps()  # first sight of checkpoint-70
        assert watcher.poll() == [] and watcher.poll() == []
    warned = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(warned) == 1 and "at step 70" in warned[0] and "--steps" not in warned[0]
    assert appends == [[70]]  # read once, not at every poll
    assert TrajectoryStore.open(copy).steps[-1] == STEPS[-1]

    shutil.move(tmp_path / "later", runs / "checkpoint-80")
    watcher.ready_steps()
    assert len(watcher.poll()) == 1  # the next checkpoint is appended
    assert TrajectoryStore.open(copy).steps[-6:] == [*STEPS[1:], 80]

    again = tmp_path / "again.zarr"  # saved again, finite: taken
    shutil.copytree(store, again)
    shutil.rmtree(runs / "checkpoint-80")
    watcher = watch_module.Watcher(watch_module.WatchOptions(
        runs=runs, cache=again, targets=(TARGET,), settle_s=0.0))
    watcher.ready_steps()
    assert watcher.poll() == [] and 70 in watcher.refused
    shutil.copy(traj.runs / "checkpoint-50" / "model.safetensors",
                runs / "checkpoint-70" / "model.safetensors")
    watcher.ready_steps()  # its files changed: seen anew
    assert len(watcher.poll()) == 1 and watcher.appended == 1
    assert TrajectoryStore.open(again).steps[-1] == 70


def test_a_prediction_watch_cannot_write_names_watch_s_remedies(tmp_path: Path) -> None:
    """An fp16 prediction overflowing at --target 1e12 named --dtype and --allow-nonfinite,
    flags of run that watch does not take."""
    from tests.untrusted import assert_error, call

    traj = build_trajectory(tmp_path / "traj", Spec(steps=(10, 20), dtype=torch.float16))
    line = assert_error(call("watch", "--runs", traj.runs, "--cache", tmp_path / "store",
                             "--base", traj.base, "--target", "1e12", "--out", tmp_path / "out",
                             "--interval", "0.1s", "--settle", "0s", "--until", 20,
                             "--device", "cpu"), "overflows float16", "nearer --target",
                        "without --out")
    assert "--dtype" not in line and "--allow-nonfinite" not in line, line
