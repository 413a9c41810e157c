"""A base and checkpoints of different float dtypes: deltas from each row's own values, the
output in the base's dtype, the store keeping every row exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from relex_stream.store import TrajectoryStore
from tests.fixtures import Spec, build_trajectory
from tests.helpers import check_against_reference, run_cli, run_traj, step_dir
from tests.reference import load_model_dir

TARGETS = [80, 120]


def _retype(directory: Path, dtype: torch.dtype, jitter: float = 0.0) -> None:
    """Re-save a model directory's float tensors in `dtype` (optionally nudged off the grid of
    the dtype it came from, so an fp32 base is not just bf16 values)."""
    for path in directory.glob("*.safetensors"):
        tensors = load_file(str(path))
        generator = torch.Generator().manual_seed(7)
        for name, t in tensors.items():
            if t.is_floating_point():
                value = t.to(torch.float64)
                if jitter:
                    value = value + jitter * torch.randn(t.shape, generator=generator,
                                                         dtype=torch.float64)
                tensors[name] = value.to(dtype)
        save_file(tensors, str(path), metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "base_dtype,ckpt_dtype",
    [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
     (torch.bfloat16, torch.float16)],
    ids=["bf16-base-fp32-ckpts", "fp32-base-bf16-ckpts", "bf16-base-fp16-ckpts"],
)
def test_mixed_dtypes_match_reference_and_store(tmp_path: Path, base_dtype, ckpt_dtype) -> None:
    # retyping the base moves it off its checkpoints: no tensor keeps a zero delta
    traj = build_trajectory(tmp_path / "traj", Spec(dtype=ckpt_dtype, vocab=96, base_shards=2,
                                                     zero_delta=False))
    _retype(traj.base, base_dtype, jitter=1e-4 if base_dtype == torch.float32 else 0.0)
    out = tmp_path / "out"
    run_traj(traj, out, TARGETS)
    outputs = check_against_reference(traj, out, TARGETS)  # within 1 ulp, in the base's dtype
    assert outputs[float(TARGETS[0])]["model.embed_tokens.weight"].dtype == base_dtype
    with TrajectoryStore.open(out / "trajectory.zarr") as store:
        expected = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
        assert set(store.current.row_dtypes.values()) == {expected[ckpt_dtype]}
    again = tmp_path / "from-store"
    run_cli("run", "--cache", out / "trajectory.zarr", "--target", ",".join(map(str, TARGETS)),
            "--out", again, "--device", "cpu", "--quiet")
    for target in TARGETS:
        first = load_model_dir(step_dir(out, target))
        second = load_model_dir(step_dir(again, target))
        assert all(torch.equal(first[n], second[n]) for n in first), "the store lost bits"


def test_base_wider_than_rows_sees_every_change(tmp_path: Path) -> None:
    """An fp32 base with bf16 checkpoints: a checkpoint equal to the base rounded to bf16 still
    moved (the base had more bits); it must not be taken as unchanged."""
    spec = Spec(dtype=torch.bfloat16, vocab=64, zero_delta=False)
    traj = build_trajectory(tmp_path / "traj", spec)
    name = "model.layers.0.self_attn.q_proj.weight"
    base_file = traj.base / "model.safetensors"
    base = load_file(str(base_file))
    for step in spec.steps:  # q_proj never leaves the (bf16) base in any checkpoint...
        path = traj.ckpt_dirs[step] / "model.safetensors"
        tensors = load_file(str(path))
        tensors[name] = base[name].clone()
        save_file(tensors, str(path), metadata={"format": "pt"})
    # ...but the fp32 base sits a fraction of a bf16 ulp above it: every element has a delta
    base = {n: t.to(torch.float32) if t.is_floating_point() else t for n, t in base.items()}
    base[name] = base[name] * (1 + 2**-12)
    save_file(base, str(base_file), metadata={"format": "pt"})
    out = tmp_path / "out"
    run_traj(traj, out, TARGETS, "--dtype", "float32")
    got = check_against_reference(traj, out, TARGETS, dtype_flag="float32")
    assert not torch.equal(got[float(TARGETS[0])][name], base[name]), "the deltas were dropped"


def test_input_bytes_count_each_checkpoint_in_its_own_dtype(tmp_path: Path) -> None:
    """A bf16 base with two fp32 and two bf16 checkpoints, read once: the summary said "0.78x
    the input", the input counted as if every checkpoint were in the rows' dtype (fp32)."""
    import relex_stream

    traj = build_trajectory(tmp_path / "traj", Spec(steps=(10, 20, 30, 40), vocab=64))
    for step in (10, 30):
        _retype(traj.ckpt_dirs[step], torch.float32)

    def file_bytes(directory: Path, floats_only: bool) -> int:
        tensors = load_file(str(directory / "model.safetensors"))
        return sum(t.numel() * t.element_size() for t in tensors.values()
                   if t.is_floating_point() or not floats_only)

    expected = file_bytes(traj.base, False) + sum(
        file_bytes(directory, True) for directory in traj.ckpt_dirs.values())
    summary = relex_stream.extrapolate(base=traj.base, runs=traj.runs, targets=[80],
                                       out=tmp_path / "out", device="cpu", quiet=True)
    assert summary.input_bytes == expected
    assert summary.bytes_from_sources == expected  # one pass: every byte read once
    assert "(1.00x the input's" in summary.lines()[1], summary.lines()[1]
