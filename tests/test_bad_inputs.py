"""The catalogue of bad inputs: each gives one 'error: ' line, exit 2, and writes nothing.

Cases already in tests/test_errors.py (fewer than two checkpoints, duplicate steps, a tensor
missing / reshaped / retyped in one checkpoint, a --target of 'abc') are not repeated here,
except to check that such a refusal leaves an existing output alone.

Most cases run with --overwrite over an existing OUT/step-100, whose bytes must survive the
refusal: a run may only replace an output once it has a complete new one.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.fixtures import EMBED, Spec, build_trajectory
from tests.helpers import check_against_reference, group_dir, run_cli, run_traj, step_dir

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
STEPS = (10, 20, 30, 40)


# ----------------------------------------------------------------------------- helpers


def make_existing_output(out: Path, target: int = 100) -> dict[str, bytes]:
    """Put a recognisable earlier prediction at OUT/step-T; return its files' bytes. It holds
    config.json and a model.safetensors carrying relex_stream's prediction mark: with another
    file, or weights relex_stream did not write, --overwrite would refuse it before reading
    anything."""
    from safetensors.torch import save_file

    from relex_stream.safetensors_io import PREDICTION_KEY, PREDICTION_VALUE

    final = step_dir(out, target)
    final.mkdir(parents=True)
    (final / "config.json").write_text('{"previous": true}\n' + " " * 2000)
    shard = "model-00001-of-00002.safetensors"  # a name of the two-shard bases used here
    save_file({"previous": torch.zeros(2)}, str(final / shard),
              metadata={"format": "pt", PREDICTION_KEY: PREDICTION_VALUE})
    (final / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 8}, "weight_map": {"previous": shard}}))
    return snapshot(final)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def assert_refused(
    proc: subprocess.CompletedProcess[str],
    out: Path,
    existing: dict[str, bytes] | None = None,
    target: int = 100,
) -> str:
    """Exit 2, one 'error: ' line, no traceback; OUT/step-T absent or, if it existed, unchanged;
    no temporary output left behind. Returns the error line."""
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, f"rc={proc.returncode}\nstderr:\n{proc.stderr}"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{proc.stderr}"
    assert lines[0].startswith("error: "), lines[0]
    final = step_dir(out, target)
    if existing is None:
        assert not final.exists(), f"{final} written despite the error"
    else:
        assert final.is_dir(), f"the existing {final} was removed"
        assert snapshot(final) == existing, f"the existing {final} was changed"
    if out.exists():
        leftovers = sorted(p.name for p in out.glob(".step-*"))
        assert leftovers == [], f"temporary outputs left behind: {leftovers}"
    return lines[0]


def run_args(base: Path, runs: Path, out: Path, *extra: object) -> list[object]:
    return ["run", "--base", base, "--runs", runs, "--target", "100", "--out", out,
            "--device", "cpu", "--quiet", *extra]  # fmt: skip


@pytest.fixture
def traj(tmp_path: Path):
    return build_trajectory(tmp_path / "traj", Spec(steps=STEPS, base_shards=2))


@pytest.fixture
def out_with_existing(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    out = tmp_path / "out"
    return out, make_existing_output(out)


def _mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode})")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator:
    """mount(name, options) -> a fresh tmpfs mount point; all unmounted afterwards."""
    mounted: list[Path] = []

    def mount(name: str, options: str) -> Path:
        path = tmp_path / name
        _mount_tmpfs(path, options)
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


# ----------------------------------------------------------------------------- locations


def test_missing_base_dir(traj, tmp_path: Path, out_with_existing) -> None:
    out, existing = out_with_existing
    missing = tmp_path / "no-such-base"
    proc = run_cli(*run_args(missing, traj.runs, out, "--overwrite"), expect_rc=None)
    line = assert_refused(proc, out, existing)
    assert str(missing) in line, f"the missing directory is not named: {line}"


def test_missing_run_dir(traj, tmp_path: Path, out_with_existing) -> None:
    out, existing = out_with_existing
    missing = tmp_path / "no-such-runs"
    proc = run_cli(*run_args(traj.base, missing, out, "--overwrite"), expect_rc=None)
    line = assert_refused(proc, out, existing)
    assert str(missing) in line, f"the missing directory is not named: {line}"


def test_no_checkpoints_found(traj, tmp_path: Path, out_with_existing) -> None:
    """A run dir with nothing named like a step directory."""
    out, existing = out_with_existing
    runs = tmp_path / "empty-runs"
    (runs / "eval-10").mkdir(parents=True)
    (runs / "notes.txt").write_text("no checkpoints here\n")
    proc = run_cli(*run_args(traj.base, runs, out, "--overwrite"), expect_rc=None)
    line = assert_refused(proc, out, existing)
    assert "no checkpoints" in line and str(runs) in line, line


def test_base_that_is_one_of_the_checkpoints(traj, out_with_existing) -> None:
    """--base pointing at an observed checkpoint (step 30's delta would be zero): refused."""
    out, existing = out_with_existing
    proc = run_cli(*run_args(traj.ckpt_dirs[30], traj.runs, out, "--overwrite"), expect_rc=None)
    line = assert_refused(proc, out, existing)
    assert "step 30" in line and "--base" in line, line


@pytest.mark.parametrize("case", ["base-is-a-file", "weights-link-to-a-device",
                                  "weights-dangling-link", "weights-fifo"])
def test_model_paths_that_are_not_what_they_seem(traj, out_with_existing, case: str) -> None:
    """A file given where a model directory goes, and weights that are no regular file (never
    opened: a device or a FIFO would be read forever or waited on), each say what they are."""
    out, existing = out_with_existing
    base = traj.base
    if case == "base-is-a-file":
        base = traj.base / "config.json"
    else:
        weights = traj.ckpt_dirs[30] / "model.safetensors"
        for shard in traj.ckpt_dirs[30].glob("model*.safetensors*"):
            shard.unlink()
        if case == "weights-fifo":
            os.mkfifo(weights)
        else:
            weights.symlink_to("/dev/zero" if case.endswith("device") else "/nonexistent")
    proc = run_cli(*run_args(base, traj.runs, out, "--overwrite"), expect_rc=None)
    line = assert_refused(proc, out, existing)
    expected = "is a file, not a directory" if case == "base-is-a-file" else (
        "is not a regular file")
    assert expected in line, line


def test_step_dir_without_a_model(traj, out_with_existing) -> None:
    """checkpoint-30 exists but holds no weights at all."""
    out, existing = out_with_existing
    shutil.rmtree(traj.ckpt_dirs[30])
    traj.ckpt_dirs[30].mkdir()
    (traj.ckpt_dirs[30] / "trainer_state.json").write_text("{}")
    proc = run_cli(*run_args(traj.base, traj.runs, out, "--overwrite"), expect_rc=None)
    line = assert_refused(proc, out, existing)
    assert "checkpoint-30" in line, f"the empty checkpoint is not named: {line}"


def test_validation_error_leaves_existing_output(make_traj, out_with_existing) -> None:
    """A shape mismatch (message tested in test_errors.py) with --overwrite: old output kept."""

    def reshape(step: int, tensors: dict[str, torch.Tensor]) -> None:
        if step == 30:
            tensors[Q_PROJ] = tensors[Q_PROJ].reshape(8, 32)

    traj = make_traj(steps=STEPS, edit=reshape)
    out, existing = out_with_existing
    assert_refused(run_traj(traj, out, [100], "--overwrite", expect_rc=None), out, existing)


# ----------------------------------------------------------------------------- damaged files


def _header_end(path: Path) -> int:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n


@pytest.mark.parametrize("where", ["mid-data", "inside-prefix"])
def test_truncated_safetensors(traj, out_with_existing, where: str) -> None:
    """A checkpoint file cut short: in the middle of its data, or inside the 8-byte prefix."""
    out, existing = out_with_existing
    path = traj.ckpt_dirs[30] / "model.safetensors"
    data = path.read_bytes()
    if where == "mid-data":
        start = _header_end(path)
        path.write_bytes(data[: start + (len(data) - start) // 2])
    else:
        path.write_bytes(data[:5])
    proc = run_cli(*run_args(traj.base, traj.runs, out, "--overwrite"), expect_rc=None)
    line = assert_refused(proc, out, existing)
    assert "checkpoint-30" in line, f"the damaged file is not named: {line}"


@pytest.mark.parametrize("damage", ["not-json", "bad-shape"])
def test_corrupt_header(traj, out_with_existing, damage: str) -> None:
    """Header bytes overwritten with garbage; or valid JSON where a tensor's shape disagrees
    with its data offsets."""
    out, existing = out_with_existing
    path = traj.ckpt_dirs[30] / "model.safetensors"
    data = bytearray(path.read_bytes())
    end = _header_end(path)
    if damage == "not-json":
        data[8 + 10 : 8 + 40] = b"\xff\xfe{{garbage}}\x00" + b"#" * 17
    else:
        header = data[8:end].decode()  # the first [16,16] tensor becomes [16,17], same length
        assert '"shape":[16,16]' in header, "test bug: no 16x16 tensor in the header"
        data[8:end] = header.replace('"shape":[16,16]', '"shape":[16,17]', 1).encode()
    path.write_bytes(bytes(data))
    proc = run_cli(*run_args(traj.base, traj.runs, out, "--overwrite"), expect_rc=None)
    line = assert_refused(proc, out, existing)
    assert "checkpoint-30" in line, f"the damaged file is not named: {line}"


@pytest.mark.parametrize("case", ["dotdot", "absolute", "missing-shard"])
def test_bad_index(traj, tmp_path: Path, out_with_existing, case: str) -> None:
    """The base's index.json: a weight_map value outside its directory (a real, readable
    safetensors file sits there) or naming a shard that does not exist."""
    out, existing = out_with_existing
    index_path = traj.base / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    second = sorted(set(index["weight_map"].values()))[1]
    evil = tmp_path / "evil.safetensors"
    shutil.copyfile(traj.base / second, evil)  # would load fine if it were read
    shard = {
        "dotdot": "../../evil.safetensors",
        "absolute": str(evil),
        "missing-shard": "model-00003-of-00002.safetensors",
    }[case]
    index["weight_map"] = {n: (shard if f == second else f) for n, f in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    assert (traj.base / "../../evil.safetensors").resolve() == evil.resolve()
    proc = run_cli(*run_args(traj.base, traj.runs, out, "--overwrite"), expect_rc=None)
    line = assert_refused(proc, out, existing)
    assert "index.json" in line, f"the index file is not named: {line}"
    if case == "missing-shard":
        assert "missing" in line and "model-00003-of-00002.safetensors" in line, line
    else:
        assert "outside" in line, line


def test_hf_cache_symlinked_snapshot_is_read(tmp_path: Path) -> None:
    """Not an error: a Hugging Face hub cache snapshot holds symlinks into ../../blobs. The
    index confines *names* to the directory; the files themselves may be links."""
    traj = build_trajectory(tmp_path / "traj", Spec(steps=(10, 20, 30), base_shards=2))
    blobs = tmp_path / "hub" / "blobs"
    snapshot_dir = tmp_path / "hub" / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snapshot_dir.mkdir(parents=True)
    for i, path in enumerate(sorted(traj.base.iterdir())):
        blob = blobs / f"blob{i}"
        shutil.move(str(path), blob)
        (snapshot_dir / path.name).symlink_to(os.path.relpath(blob, snapshot_dir))
    out = tmp_path / "out"
    run_cli(*run_args(snapshot_dir, traj.runs, out))
    check_against_reference(
        build_trajectory(tmp_path / "traj2", Spec(steps=(10, 20, 30), base_shards=2)), out, [100]
    )


# ----------------------------------------------------------------------------- NaN / Inf


def _poison(value: float, step: int, name: str):
    def edit(s: int, tensors: dict[str, torch.Tensor]) -> None:
        if s == step:
            t = tensors[name].clone()
            t.view(-1)[-1] = value
            tensors[name] = t

    return edit


@pytest.mark.parametrize(
    ("value", "step", "name"),
    [(float("nan"), 30, Q_PROJ), (float("inf"), 40, EMBED)],
    ids=["nan-q_proj-step30", "inf-embed-step40"],
)
def test_nonfinite_checkpoint(make_traj, out_with_existing, value, step, name) -> None:
    """Refused naming tensor and step; --allow-nonfinite then runs (exit 0)."""
    traj = make_traj(steps=STEPS, base_shards=2, edit=_poison(value, step, name))
    out, existing = out_with_existing
    proc = run_traj(traj, out, [100], "--overwrite", expect_rc=None)
    line = assert_refused(proc, out, existing)
    assert name in line, f"tensor not named: {line}"
    assert f"step {step}" in line, f"step not named: {line}"
    assert "--allow-nonfinite" in line, line
    run_traj(traj, out, [100], "--overwrite", "--allow-nonfinite")
    assert (step_dir(out, 100) / "config.json").read_text() != '{"previous": true}\n'


def test_nonfinite_base(traj, out_with_existing) -> None:
    """NaN in the base: refused, naming the tensor and the base."""
    out, existing = out_with_existing
    index = json.loads((traj.base / "model.safetensors.index.json").read_text())
    shard = traj.base / index["weight_map"][Q_PROJ]
    tensors = load_file(str(shard))
    tensors[Q_PROJ].view(-1)[0] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    proc = run_cli(*run_args(traj.base, traj.runs, out, "--overwrite"), expect_rc=None)
    line = assert_refused(proc, out, existing)
    assert Q_PROJ in line and "base" in line, line


# ----------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("where", ["in-runs", "in-a-checkpoint", "in-the-base"])
def test_output_inside_an_input_is_refused(traj, tmp_path: Path, where: str) -> None:
    """An output inside the run directory would be found as a checkpoint (step-T) by the next
    run, and --overwrite could replace what lies in an input. Nothing is written."""
    out = {"in-runs": traj.runs, "in-a-checkpoint": traj.ckpt_dirs[20],
           "in-the-base": traj.base}[where]
    before = sorted(p.relative_to(traj.root) for p in traj.root.rglob("*"))
    proc = run_cli(*run_args(traj.base, traj.runs, out, "--overwrite", "--cache",
                             tmp_path / "store.zarr"), expect_rc=2)
    assert proc.stderr.count("\n") == 1 and "overlap" in proc.stderr, proc.stderr
    assert sorted(p.relative_to(traj.root) for p in traj.root.rglob("*")) == before
    assert not (tmp_path / "store.zarr").exists()
    watch = run_cli("watch", "--runs", traj.runs, "--cache", tmp_path / "w.zarr", "--base",
                    traj.base, "--target", 100, "--out", out, "--interval", "1s",
                    "--settle", "1s", expect_rc=2)
    assert watch.stderr.count("\n") == 1 and "overlap" in watch.stderr, watch.stderr
    assert not (tmp_path / "w.zarr").exists()


def test_a_fifo_marker_in_a_leftover_is_not_waited_on(traj, tmp_path: Path) -> None:
    """OUT/.step-* directories with a marker are a killed run's leftovers; one whose marker is a
    FIFO (planted by someone who can write OUT) is not ours: neither read nor removed."""
    from relex_stream.writer import MARKER

    out = tmp_path / "out"
    planted = out / ".step-100.tmp-planted"
    planted.mkdir(parents=True)
    os.mkfifo(planted / MARKER)
    run_cli(*run_args(traj.base, traj.runs, out), expect_rc=0)
    assert (planted / MARKER).exists() and (out / "step-100").is_dir()


@pytest.mark.parametrize("what", ["runs-is-a-file", "out-is-a-file"])
def test_watch_refuses_what_it_can_before_appending(traj, tmp_path: Path, what: str) -> None:
    """watch --runs FILE waited forever; watch --out FILE failed only after the store was
    built. Both are refused first, leaving no store."""
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    runs, out = (a_file, tmp_path / "pred") if what == "runs-is-a-file" else (traj.runs, a_file)
    proc = run_cli("watch", "--runs", runs, "--cache", tmp_path / "w.zarr", "--base", traj.base,
                   "--target", 100, "--out", out, "--interval", "1s", "--settle", "1s",
                   expect_rc=2)
    assert proc.stderr.count("\n") == 1 and str(a_file) in proc.stderr, proc.stderr
    assert not (tmp_path / "w.zarr").exists() and not (tmp_path / "pred").exists()


@pytest.mark.parametrize("flags", [("--interval", "10ms"), ("--interval", "0.000001s"),
                                   ("--settle", "-1s"), ("--settle", "0 d")])  # fmt: skip
def test_watch_refuses_a_busy_poll_or_a_bad_settle(traj, tmp_path: Path, flags) -> None:
    """--interval 0.000001s polled the runs directory in a tight loop for ever: polls are at
    least 100 ms apart. --settle takes 0 in any spelling, nothing below."""
    args = {"--interval": "1s", "--settle": "1s"} | dict([flags])
    proc = run_cli("watch", "--runs", traj.runs, "--cache", tmp_path / "w.zarr", "--base",
                   traj.base, "--target", 100, *[x for kv in args.items() for x in kv],
                   expect_rc=2)
    assert proc.stderr.count("\n") == 1 and flags[0] in proc.stderr, proc.stderr
    assert not (tmp_path / "w.zarr").exists()


@pytest.mark.parametrize("case", ["users-model-in-step-dir", "cache-is-the-step-dir",
                                  "out-under-a-file"])
def test_watch_refuses_an_out_it_cannot_use_before_building(traj, tmp_path: Path,
                                                            case: str) -> None:
    """watch replaced a user's OUT/step-T (their model.safetensors and config.json) without
    asking, and built the store before an --out under a file or around the store failed."""
    out, store = tmp_path / "pred", tmp_path / "w.zarr"
    if case == "users-model-in-step-dir":
        (out / "step-100").mkdir(parents=True)
        shutil.copy(traj.ckpt_dirs[20] / "model.safetensors", out / "step-100")
        (out / "step-100" / "config.json").write_text("{}")
        needle = "not a prediction relex_stream wrote"
    elif case == "cache-is-the-step-dir":
        store = out / "step-100"
        needle = "overlap"
    else:
        (tmp_path / "a-file").write_text("x")
        out = tmp_path / "a-file" / "pred"
        needle = "a-file"
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    proc = run_cli("watch", "--runs", traj.runs, "--cache", store, "--base", traj.base,
                   "--target", 100, "--out", out, "--interval", "1s", "--settle", "1s",
                   expect_rc=2)
    assert proc.stderr.count("\n") == 1 and needle in proc.stderr, proc.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_deleted_working_directory_is_one_line(tmp_path: Path) -> None:
    """From a deleted cwd torch's libraries failed to load: an 'Intel oneMKL FATAL ERROR'
    line, no error: line."""
    gone = tmp_path / "gone"
    gone.mkdir()
    proc = subprocess.run(
        ["sh", "-c", 'cd "$1" && rmdir "$1" && exec "$0" -m relex_stream --help', sys.executable,
         str(gone)], capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent)))
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: the current directory no longer exists; cd to one that does and rerun"]


def test_output_exists_without_overwrite(traj, out_with_existing) -> None:
    out, existing = out_with_existing
    proc = run_cli(*run_args(traj.base, traj.runs, out), expect_rc=None)
    line = assert_refused(proc, out, existing)
    assert "step-100" in line and "--overwrite" in line, line


def _read_only_dir(tmpfs, with_existing: bool) -> tuple[Path, dict[str, bytes] | None]:
    """A read-only location (root ignores chmod): a tmpfs remounted read-only, else /proc."""
    try:
        path = tmpfs("ro", "size=1M")
    except pytest.skip.Exception:
        return Path("/proc/relex_stream_out"), None
    existing = make_existing_output(path) if with_existing else None
    proc = subprocess.run(["mount", "-o", "remount,ro", str(path)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip("cannot remount the tmpfs read-only")
    try:
        (path / "probe").write_text("x")
    except OSError:
        return path, existing
    pytest.skip("a read-only remount is still writable here")


@pytest.mark.parametrize("what", ["out", "cache"])
def test_read_only_location(traj, tmp_path: Path, tmpfs, what: str) -> None:
    """--out (with its default store) or --cache on a location nobody can write."""
    if what == "out":
        out, existing = _read_only_dir(tmpfs, with_existing=True)
        extra: list[object] = ["--overwrite"] if existing else []
    else:
        ro, _ = _read_only_dir(tmpfs, with_existing=False)
        out, existing = tmp_path / "out", make_existing_output(tmp_path / "out")
        extra = ["--overwrite", "--cache", ro / "store.zarr"]
    proc = run_cli(*run_args(traj.base, traj.runs, out, *extra), expect_rc=None)
    assert_refused(proc, out, existing)


@pytest.mark.parametrize("what", ["store", "outputs"])
def test_not_enough_disk(tmp_path: Path, tmpfs, what: str) -> None:
    """A 512 KiB file system for the store (~7 MiB needed) or the outputs (~1 MiB): refused up
    front, naming the space, before any weight is read."""
    tiny = tmpfs("tiny", "size=512k")
    traj = build_trajectory(tmp_path / "traj", Spec(steps=STEPS, vocab=16384, base_shards=2))
    if what == "store":
        out, existing = tmp_path / "out", make_existing_output(tmp_path / "out")
        extra = ["--cache", tiny / "store.zarr"]
    else:
        out, existing = tiny / "out", make_existing_output(tiny / "out")
        extra = ["--cache", tmp_path / "store.zarr"]
    proc = run_cli(*run_args(traj.base, traj.runs, out, "--overwrite", *extra), expect_rc=None)
    line = assert_refused(proc, out, existing)
    assert "free" in line, f"the message does not mention free space: {line}"


# ----------------------------------------------------------------------------- the store


@pytest.fixture(scope="module")
def built_store(tmp_path_factory: pytest.TempPathFactory):
    """A complete store built from trajectory A (steps 10..40): (traj A, store path)."""
    root = tmp_path_factory.mktemp("store")
    traj = build_trajectory(root / "a", Spec(steps=STEPS, base_shards=2))
    store = root / "store.zarr"
    run_traj(traj, root / "out", [100], "--cache", store)
    return traj, store


@pytest.mark.parametrize("other", ["other-files", "other-layout", "other-steps"])
def test_store_built_from_other_inputs(built_store, tmp_path: Path, other: str) -> None:
    """--cache pointing at a store of other checkpoints: same-shaped files from another run,
    another model layout, or steps the store does not hold."""
    original_traj, original = built_store
    store = tmp_path / "store.zarr"
    shutil.copytree(original, store)
    if other == "other-steps":  # the same run, plus a step 15 the store never saw
        shutil.copytree(original_traj.root, tmp_path / "b")  # copy2 keeps the mtimes
        runs = tmp_path / "b" / "runs"
        # new times: a copy keeping them would be refused as stored step 20's own files
        shutil.copytree(runs / "checkpoint-20", runs / "checkpoint-15",
                        copy_function=shutil.copy)
        traj = replace(original_traj, root=tmp_path / "b", base=tmp_path / "b" / "base", runs=runs)
    else:
        spec = {
            "other-files": Spec(steps=STEPS, base_shards=2, seed=1),
            "other-layout": Spec(steps=STEPS, base_shards=2, vocab=128),
        }[other]
        traj = build_trajectory(tmp_path / "b", spec)
    out, existing = tmp_path / "out", make_existing_output(tmp_path / "out")
    proc = run_traj(traj, out, [100], "--cache", store, "--overwrite", expect_rc=None)
    line = assert_refused(proc, out, existing)
    assert "--rebuild" in line and str(store) in line, line
    if other == "other-files":
        assert ".safetensors" in line, f"the changed file is not named: {line}"
    if other == "other-steps":  # 15 lies before the store's last step: it cannot be appended
        assert "step 15" in line, f"the missing step is not named: {line}"


def test_rebuild_refuses_a_directory_that_is_not_a_store(traj, tmp_path: Path) -> None:
    """--cache at an ordinary directory with --rebuild must not delete it."""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("do not delete\n")
    out = tmp_path / "out"
    proc = run_traj(traj, out, [100], "--cache", precious, "--rebuild", expect_rc=None)
    line = assert_refused(proc, out)
    assert str(precious) in line, line
    assert (precious / "thesis.txt").read_text() == "do not delete\n", "--rebuild deleted it"


class _Plant:
    """Unpickling this creates a marker file: proof that a store codec ran pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_store_with_pickle_codec_is_refused(built_store, tmp_path: Path) -> None:
    """A tampered store whose array metadata names a pickle codec and whose chunk is a pickle:
    refused without unpickling anything."""
    _, original = built_store
    store = tmp_path / "store.zarr"
    shutil.copytree(original, store)
    rows = group_dir(store, "rows", Q_PROJ)
    meta_path = rows / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["codecs"] = [{"name": "numcodecs.pickle", "configuration": {"protocol": 5}}]
    meta_path.write_text(json.dumps(meta))
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Plant(marker), protocol=5)
    for chunk in (rows / "c").rglob("*"):
        if chunk.is_file():
            chunk.write_bytes(payload)
    out = tmp_path / "out"
    proc = run_cli(
        "run", "--cache", store, "--target", "100", "--out", out, "--device", "cpu", "--quiet",
        expect_rc=None,
    )  # fmt: skip
    assert not marker.exists(), "a pickle in the store was executed"
    assert_refused(proc, out)


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("target", ["nan", "100,abc"])
def test_target_not_a_finite_number(traj, out_with_existing, target: str) -> None:
    out, existing = out_with_existing
    args = run_args(traj.base, traj.runs, out, "--overwrite")
    args[args.index("--target") + 1] = target
    line = assert_refused(run_cli(*args, expect_rc=None), out, existing)
    assert "--target" in line, line


def test_max_memory_too_small_for_one_chunk(traj, out_with_existing) -> None:
    out, existing = out_with_existing
    proc = run_cli(
        *run_args(traj.base, traj.runs, out, "--overwrite", "--max-memory", "64K"), expect_rc=None
    )
    line = assert_refused(proc, out, existing)
    assert "--max-memory" in line and "at least" in line, line


# ----------------------------------------------------------------------------- not safetensors

GARBAGE = b"\x80\x05\x95 this is not a valid pickle: unpickling it would raise \xff\x00" * 16


def _replace_with(model_dir: Path, files: dict[str, bytes]) -> None:
    """Replace a checkpoint's safetensors files with other files (config kept if present)."""
    for path in model_dir.glob("model*.safetensors*"):
        path.unlink()
    for rel, data in files.items():
        (model_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (model_dir / rel).write_bytes(data)


@pytest.mark.parametrize("which", ["checkpoint", "base"])
def test_bin_only_model_is_refused_unread(traj, out_with_existing, which: str) -> None:
    """pytorch_model.bin only: a message about safetensors, exit 2; the .bin is never unpickled
    (it holds garbage, so unpickling would end in a traceback)."""
    out, existing = out_with_existing
    model_dir = traj.ckpt_dirs[30] if which == "checkpoint" else traj.base
    _replace_with(model_dir, {"pytorch_model.bin": GARBAGE})
    proc = run_cli(*run_args(traj.base, traj.runs, out, "--overwrite"), expect_rc=None)
    line = assert_refused(proc, out, existing)
    assert "safetensors" in line and str(model_dir.name) in line, line


@pytest.mark.parametrize("layout", ["actor", "flat"])
@pytest.mark.parametrize("config", [True, False], ids=["with-config", "no-config"])
def test_damaged_verl_fsdp_checkpoint_is_refused_unread(
    traj, out_with_existing, layout: str, config: bool
) -> None:
    """verl FSDP shards (global_step_N/actor/model_world_size_2_rank_R.pt, with the HF config
    in actor/huggingface/) that are not torch zip files: one line naming the directory, exit
    2, nothing unpickled. (Real shards are read: tests/test_fsdp_run.py.)"""
    out, existing = out_with_existing
    step_root = traj.runs / "global_step_30"
    shutil.rmtree(traj.ckpt_dirs[30])
    prefix = "actor/" if layout == "actor" else ""
    files = {f"{prefix}model_world_size_2_rank_{r}.pt": GARBAGE for r in (0, 1)}
    files |= {f"{prefix}optim_world_size_2_rank_{r}.pt": GARBAGE for r in (0, 1)}
    files[f"{prefix}huggingface/config.json"] = (traj.base / "config.json").read_bytes()
    if config:
        files[f"{prefix}fsdp_config.json"] = b'{"FSDP_version": 2, "world_size": 2}'
    step_root.mkdir()
    _replace_with(step_root, files)
    proc = run_cli(*run_args(traj.base, traj.runs, out, "--overwrite"), expect_rc=None)
    line = assert_refused(proc, out, existing)
    assert "global_step_30" in line, f"the checkpoint is not named: {line}"
    assert ("fsdp_config.json" in line) != config or "zip" in line, line


def test_peft_adapter_is_refused(traj, out_with_existing) -> None:
    out, existing = out_with_existing
    model_dir = traj.ckpt_dirs[30]
    tensors = {"base_model.model.lora_A.weight": torch.zeros(2, 16)}
    _replace_with(model_dir, {"adapter_config.json": b'{"peft_type": "LORA", "r": 2}'})
    save_file(tensors, str(model_dir / "adapter_model.safetensors"))
    proc = run_cli(*run_args(traj.base, traj.runs, out, "--overwrite"), expect_rc=None)
    line = assert_refused(proc, out, existing)
    assert "adapter" in line, line


# ---------------------------------------------------------------------------------------------
# What the inputs may hold, the store must hold too: a run that succeeded is repeated.


def _add_tensor(name: str, tensor: torch.Tensor) -> Callable[[int, dict], None]:
    def edit(step: int, tensors: dict) -> None:  # noqa: ARG001
        tensors[name] = tensor.clone()
    return edit


@pytest.mark.parametrize("case", ["zero-size-dim-2**45", "backslash-file", "17-dims"])
def test_a_store_built_from_valid_inputs_is_read_back(tmp_path: Path, case: str) -> None:
    """Inputs the checkpoint readers take: the run that builds the store and the same run
    again from it both succeed (a zero-size tensor with a dimension of 2**45, a file name with
    a backslash next to the base, which stays out of the output), or the input is refused
    before anything is written (a 17-dimensional tensor: the store keeps at most 16)."""
    edit = None
    if case == "zero-size-dim-2**45":
        edit = _add_tensor("model.extra.z", torch.empty(0, 2**45))
    elif case == "17-dims":
        edit = _add_tensor("model.extra.w", torch.ones([1] * 17))
    traj = build_trajectory(tmp_path / "t", Spec(steps=(10, 20, 30), edit=edit))
    if edit is not None:  # the base holds the tensor too
        tensors = load_file(traj.base / "model.safetensors")
        edit(0, tensors)
        save_file(tensors, traj.base / "model.safetensors", metadata={"format": "pt"})
    if case == "backslash-file":
        (traj.base / "notes\\v1.txt").write_text("x")
    args = ("run", "--base", traj.base, "--runs", traj.runs, "--target", "100", "--out",
            tmp_path / "o", "--cache", tmp_path / "s", "--device", "cpu", "--quiet")
    from tests.untrusted import assert_error, assert_ok, call

    if case == "17-dims":
        assert_error(call(*args), "17 dimensions")
        assert not (tmp_path / "o").exists()
        return
    assert_ok(call(*args))
    assert_ok(call(*args, "--overwrite"))
    assert not (step_dir(tmp_path / "o", 100) / "notes\\v1.txt").exists()


def test_more_model_files_than_the_store_keeps_is_one_error(tmp_path: Path) -> None:
    """More than 256 files next to the base: one error line before anything is written (the
    store kept them, and the next run refused its own store)."""
    traj = build_trajectory(tmp_path / "t", Spec(steps=(10, 20, 30)))
    for i in range(300):
        (traj.base / f"vocab_{i}.txt").write_text("x")
    from tests.untrusted import assert_error, call

    assert_error(call("run", "--base", traj.base, "--runs", traj.runs, "--target", "100",
                      "--out", tmp_path / "o", "--cache", tmp_path / "s", "--device", "cpu",
                      "--quiet"), "more than 256 files")
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()
