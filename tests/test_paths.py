"""Every engine path gives the reference's answer and the same bytes: read once, chunked (second
pass read again), chunked with deltas kept between the passes, the randomized kernel, a rerun,
every store codec, a window decoded from the store."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.fixtures import Spec, build_trajectory
from tests.helpers import check_against_reference, run_cli, run_traj, step_dir

# vocab 65536 × hidden 16: embed_tokens and lm_head hold 1,048,576 elements each, two of the
# store's inner chunks, so a 32M budget reads them in chunks while 4G reads them at once.
SPEC = Spec(vocab=65536, steps=(4, 9, 15, 30, 31, 44), base_shards=2)
TARGETS = [60, 100]
CHUNKED = "32M"


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory: pytest.TempPathFactory):
    return build_trajectory(tmp_path_factory.mktemp("paths") / "traj", SPEC)


def _shards(out: Path, target: float) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(step_dir(out, target).glob("*.safetensors"))}


def _read_ratio(stdout: str) -> float:
    """Bytes read from the checkpoints ÷ the input, from the closing summary."""
    match = re.search(r"read: .*?\(([\d.]+)x the input", stdout)
    assert match, stdout
    return float(match.group(1))


@pytest.fixture(scope="module")
def resident_run(trajectory, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("resident")
    proc = run_traj(trajectory, out, TARGETS, "--max-memory", "4G", quiet=False)
    return out, proc


def test_resident_run_reads_each_byte_once_and_matches_reference(trajectory, resident_run):
    out, proc = resident_run
    assert _read_ratio(proc.stdout) <= 1.001
    check_against_reference(trajectory, out, TARGETS)


def test_chunked_run_matches_resident_bytes(trajectory, resident_run, tmp_path: Path):
    out = tmp_path / "chunked"
    proc = run_traj(trajectory, out, TARGETS, "--max-memory", CHUNKED, quiet=False)
    # the two large tensors are read again in their second pass, from the checkpoints or from
    # the store (noise everywhere: the store keeps ~half the bytes), never both
    assert _read_ratio(proc.stdout) <= 2.0
    check_against_reference(trajectory, out, TARGETS)
    for target in TARGETS:
        assert _shards(out, target) == _shards(resident_run[0], target)


def test_kept_deltas_read_each_byte_once(trajectory, resident_run, tmp_path: Path):
    # --max-gpu-memory on the CPU stands in for a GPU's memory: the deltas of the chunked
    # tensors stay there between the passes, so the second pass reads only their base.
    out = tmp_path / "kept"
    proc = run_traj(trajectory, out, TARGETS, "--max-memory", CHUNKED, "--max-gpu-memory", "1G",
                    quiet=False)
    assert _read_ratio(proc.stdout) <= 1.001
    for target in TARGETS:
        assert _shards(out, target) == _shards(resident_run[0], target)


def test_randomized_kernel_matches_reference(trajectory, tmp_path: Path):
    out = tmp_path / "randomized"
    run_traj(trajectory, out, TARGETS, "--svd", "randomized")
    check_against_reference(trajectory, out, TARGETS)


def test_same_run_twice_gives_same_bytes(trajectory, resident_run, tmp_path: Path):
    out = tmp_path / "again"
    run_traj(trajectory, out, TARGETS, "--max-memory", "4G")
    for target in TARGETS:
        assert _shards(out, target) == _shards(resident_run[0], target)


@pytest.mark.parametrize("codec", ["xor-zstd", "zstd", "none"])
def test_every_store_codec_is_lossless(trajectory, resident_run, tmp_path: Path, codec: str):
    # Build with one codec, then predict from the store alone: the rows must come back
    # bit-identical, so the bytes equal the from-source run's.
    out = tmp_path / "built"
    run_traj(trajectory, out, TARGETS, "--store-codec", codec)
    again = tmp_path / "from-store"
    run_cli(
        "run", "--cache", out / "trajectory.zarr", "--target", "60,100", "--out", again,
        "--device", "cpu", "--quiet",
    )
    for target in TARGETS:
        assert _shards(again, target) == _shards(resident_run[0], target)
    check_against_reference(trajectory, again, TARGETS)


def test_windowed_rerun_from_store_decodes_later_rows(trajectory, tmp_path: Path):
    # A window of the last rows needs the rows before it decoded (each is stored against its
    # predecessor): compare with a from-source run on the same window.
    out = tmp_path / "built"
    run_traj(trajectory, out, TARGETS)
    from_store = tmp_path / "from-store"
    run_cli(
        "run", "--cache", out / "trajectory.zarr", "--target", "60,100", "--window", "3",
        "--out", from_store, "--device", "cpu", "--quiet",
    )
    from_sources = tmp_path / "from-sources"
    run_traj(trajectory, from_sources, TARGETS, "--window", "3")
    for target in TARGETS:
        assert _shards(from_store, target) == _shards(from_sources, target)
    check_against_reference(trajectory, from_store, TARGETS, steps=SPEC.steps[-3:])


def test_a_fifo_in_place_of_a_checkpoint_is_refused_not_waited_on(tmp_path: Path) -> None:
    """A checkpoint file swapped for a FIFO after its header was read (say between the passes):
    the read of its rows stops with one error instead of waiting for a writer forever."""
    import numpy as np

    from relex_stream.errors import RelexError
    from relex_stream.tensor_files import Piece, TensorInfo, read_into

    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    info = TensorInfo("w", "BF16", (4,), (Piece(fifo, 8, 4),))
    with pytest.raises(RelexError, match="no longer a regular file"):
        read_into(info, 0, np.empty(4, dtype=np.uint16))


def test_paths_of_undecodable_bytes_and_empty_out(tmp_path: Path) -> None:
    """A store and --out whose names are not UTF-8 (a surrogate escape in Python): run,
    report and backtest finish and write their text files, also with a strict UTF-8 stdout;
    report and backtest refuse an empty --out (it meant the current directory)."""
    import os
    import subprocess
    import sys

    from tests.helpers import REPO_ROOT

    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), CUDA_VISIBLE_DEVICES="",
               PYTHONIOENCODING="utf-8")
    root = os.fsencode(tmp_path)

    def cli(*args: bytes | str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "relex_stream", *args], env=env,
                              cwd=tmp_path, capture_output=True, timeout=300)

    from tests.untrusted import assert_error, assert_ok, call

    assert_ok(call("synth", "--out", tmp_path / "t", "--steps", "10-40:10", "--hidden", "16",
                   "--layers", "1", "--vocab", "32"))
    out = root + b"/o\xff"
    proc = cli("run", "--base", "t/base", "--runs", "t/runs", "--target", "100", "--out", out,
               "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    store = out + b"/trajectory.zarr"
    proc = cli("report", store, "--out", root + b"/r\xff", "--no-plots")
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(root + b"/r\xff")) == [b"report.csv", b"report.json",
                                                     b"summary.txt"]
    assert b"/o\xff/" in open(root + b"/r\xff/summary.txt", "rb").read()
    text_store = os.fsdecode(store)  # what Python makes of the name: a surrogate escape
    assert_ok(call("backtest", text_store, "--holdout", "1", "--out",
                   os.fsdecode(root + b"/b\xff"), "--no-plots"))
    for command in (("report", text_store), ("backtest", text_store, "--holdout", "1")):
        assert_error(call(*command, "--out", ""), "is not a usable path")
    assert sorted(os.listdir(tmp_path)) == ["b\udcff", "o\udcff", "r\udcff", "t"]


def test_remove_tree_leaves_what_is_deeper_than_it_ever_makes(tmp_path: Path) -> None:
    """remove_tree recursed once per level with a descriptor open per level: a folder 500
    deep planted in a store's generation (stores are shared) made a removal end in a
    RecursionError traceback. What lies deeper than the tool's own trees is left."""
    from relex_stream.safefs import MAX_REMOVE_DEPTH, remove_tree
    from tests.helpers import make_deep_dir, remove_deep_dir

    tree = tmp_path / "gen2"
    (make_deep_dir(tree, 500) / "planted").write_text("x")
    (tree / "rows.bin").write_text("ours")
    (make_deep_dir(tmp_path / "ours", MAX_REMOVE_DEPTH - 1) / "f").write_text("y")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert remove_tree(fd, "gen2") == 1
        assert remove_tree(fd, "ours") == 0
    finally:
        os.close(fd)
    assert not (tree / "rows.bin").exists() and not (tmp_path / "ours").exists()
    remove_deep_dir(tree)


def test_a_randomized_store_is_not_taken_for_an_exact_one(make_traj, tmp_path: Path):
    """A store built with --svd randomized keeps low-rank Gram approximations; a later run from
    it with --svd exact (or auto, which is exact) used them as exact without a word: a window
    of 3 (or --rank 8) came out differing from the same run from the sources. It is refused;
    --svd randomized takes them as they are; --rebuild makes the exact ones."""
    traj = make_traj(steps=(10, 20, 30, 40, 50, 60))
    built = tmp_path / "built"
    run_traj(traj, built, [100], "--svd", "randomized")
    store = built / "trajectory.zarr"
    for svd in ("exact", "auto"):
        out = tmp_path / svd
        proc = run_cli("run", "--cache", store, "--target", 100, "--window", 3, "--svd", svd,
                       "--out", out, "--device", "cpu", "--quiet", expect_rc=2)
        assert proc.stderr.count("\n") == 1, proc.stderr
        assert "randomized" in proc.stderr and "--rebuild" in proc.stderr, proc.stderr
        assert not out.exists()
    proc = run_traj(traj, tmp_path / "sources", [30], "--cache", store, "--mode", "reconstruct",
                    "--rank", 3, expect_rc=2)  # with the sources, the stored Grams serve too
    assert "--svd randomized" in proc.stderr, proc.stderr
    again = tmp_path / "again"
    run_cli("run", "--cache", store, "--target", 100, "--svd", "randomized", "--out", again,
            "--device", "cpu", "--quiet")
    assert _shards(again, 100) == _shards(built, 100)
    exact = tmp_path / "exact"
    run_traj(traj, exact, [100], "--cache", store, "--window", 3, "--rebuild")
    check_against_reference(traj, exact, [100], steps=[40, 50, 60])
