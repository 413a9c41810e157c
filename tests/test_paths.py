"""Every engine path gives the reference's answer: resident vs chunked, device-resident,
randomized vs exact kernel, and the same run twice gives the same bytes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.fixtures import Spec, build_trajectory
from tests.helpers import check_against_reference, run_cli, run_traj, step_dir

# vocab 16384 × hidden 16: embed_tokens and lm_head hold 262,144 elements each, four Gram
# blocks, so a small --max-memory really splits them into chunks.
SPEC = Spec(vocab=16384, steps=(4, 9, 15, 30, 31, 44), base_shards=2)
TARGETS = [60, 100]


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory: pytest.TempPathFactory):
    return build_trajectory(tmp_path_factory.mktemp("paths") / "traj", SPEC)


def _shards(out: Path, target: float) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(step_dir(out, target).glob("*.safetensors"))}


def _read_ratio(stdout: str) -> float:
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
    assert _read_ratio(proc.stdout) <= 1.05
    check_against_reference(trajectory, out, TARGETS)


def test_chunked_run_matches_resident_bytes(trajectory, resident_run, tmp_path: Path):
    out = tmp_path / "chunked"
    proc = run_traj(trajectory, out, TARGETS, "--max-memory", "12M", quiet=False)
    # the two large tensors are streamed twice, everything else once
    assert 1.5 < _read_ratio(proc.stdout) <= 2.0
    check_against_reference(trajectory, out, TARGETS)
    for target in TARGETS:
        assert _shards(out, target) == _shards(resident_run[0], target)


def test_device_resident_path_reads_once_and_matches(trajectory, resident_run, tmp_path: Path):
    # --max-gpu-memory on CPU runs the GPU path's code: chunks are uploaded into a resident
    # copy during the Gram pass and the materialise pass reads nothing.
    out = tmp_path / "device"
    proc = run_traj(
        trajectory, out, TARGETS, "--max-memory", "12M", "--max-gpu-memory", "1G", quiet=False
    )
    assert _read_ratio(proc.stdout) <= 1.05
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
    )  # fmt: skip
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
    )  # fmt: skip
    from_sources = tmp_path / "from-sources"
    run_traj(trajectory, from_sources, TARGETS, "--window", "3")
    for target in TARGETS:
        assert _shards(from_store, target) == _shards(from_sources, target)
    check_against_reference(trajectory, from_store, TARGETS, steps=SPEC.steps[-3:])
