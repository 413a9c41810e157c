"""`run` over verl FSDP shards: the same answer as over the same weights saved as safetensors.

The shards are real: gloo ranks trained a tiny Qwen2 with FSDP2 and saved `state_dict()` per
rank as verl does (tests/fsdp_fixtures.py). The base is the run's step-0 weights published in
bf16, the checkpoints are fp32 masters: the common real mix of dtypes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.fsdp_fixtures import FsdpRun, shared_fsdp_fixture
from tests.helpers import run_cli, step_dir
from tests.reference import assert_matches_reference, load_model_dir, reference_from_dirs

TARGET = 20


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[FsdpRun, Path, Path]:
    """(the FSDP2 run, its bf16 base, the same checkpoints as fp32 safetensors directories)."""
    run = shared_fsdp_fixture(tmp_path_factory).runs["fsdp2"]
    root = tmp_path_factory.mktemp("fsdp_as_hf")
    base = run.write_hf_dir(0, root / "base", torch.bfloat16)
    for step in run.steps:
        run.write_hf_dir(step, root / "runs" / f"checkpoint-{step}", torch.float32)
    return run, base, root / "runs"


def _run(base: Path, runs: Path, out: Path, *extra: object) -> None:
    run_cli("run", "--base", base, "--runs", runs, "--target", TARGET, "--out", out,
            "--device", "cpu", "--quiet", *extra)


def test_fsdp_shards_equal_safetensors_and_reference(fsdp_run, tmp_path: Path) -> None:
    run, base, hf_runs = fsdp_run
    _run(base, run.runs, tmp_path / "from-fsdp")
    _run(base, hf_runs, tmp_path / "from-hf")
    got = load_model_dir(step_dir(tmp_path / "from-fsdp", TARGET))
    same = load_model_dir(step_dir(tmp_path / "from-hf", TARGET))
    assert set(got) == set(same)
    for name in got:
        assert torch.equal(got[name], same[name]), f"{name} differs between FSDP and safetensors"
    ckpts = {step: hf_runs / f"checkpoint-{step}" for step in run.steps}
    reference = reference_from_dirs(base, ckpts, [TARGET])[float(TARGET)]
    assert_matches_reference(got, reference, load_model_dir(base))
    assert got["model.embed_tokens.weight"].dtype == torch.bfloat16  # the base's dtype


def test_fsdp_rows_are_stored_as_fp32(fsdp_run, tmp_path: Path) -> None:
    from relex_stream.store import TrajectoryStore

    run, base, _ = fsdp_run
    _run(base, run.runs, tmp_path / "out")
    with TrajectoryStore.open(tmp_path / "out" / "trajectory.zarr") as store:
        assert set(store.current.row_dtypes.values()) == {"F32"}
        assert store.current.layout.tensors["model.embed_tokens.weight"][0] == "BF16"
    again = tmp_path / "again"
    run_cli("run", "--cache", tmp_path / "out" / "trajectory.zarr", "--target", TARGET,
            "--out", again, "--device", "cpu", "--quiet")
    first = load_model_dir(step_dir(tmp_path / "out", TARGET))
    second = load_model_dir(step_dir(again, TARGET))
    assert all(torch.equal(first[n], second[n]) for n in first), "the store lost fp32 bits"
