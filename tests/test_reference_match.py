"""CLI output vs. the independent float64 reference (one-ulp bound)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.fixtures import EMBED, INT_BUFFER, LAYOUTS, LM_HEAD, SUBDIRS
from tests.helpers import check_against_reference, run_cli, run_traj, step_dir
from tests.reference import load_model_dir

IRREGULAR = (3, 7, 20, 22, 50)


def test_irregular_sharded_base_multi_target(make_traj, tmp_path: Path) -> None:
    """Irregular steps, 2-shard base, 1-file ckpts, mixed dtypes, near and far target in one run."""
    traj = make_traj(steps=IRREGULAR, base_shards=2, fp32_names=("model.norm.weight",))
    out = tmp_path / "out"
    run_traj(traj, out, [100, 10000])
    outs = check_against_reference(traj, out, [100, 10000])
    got = outs[100.0]
    assert got["model.norm.weight"].dtype == torch.float32, "per-tensor dtype not kept"
    assert got[INT_BUFFER].dtype == torch.int64
    assert not torch.equal(got[LM_HEAD], got[EMBED]), "untied lm_head must follow its own path"
    assert torch.equal(got[INT_BUFFER], load_model_dir(traj.base)[INT_BUFFER])
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("step-")) == [
        "step-100",
        "step-10000",
    ]


def test_sharded_checkpoints_with_different_split(make_traj, tmp_path: Path) -> None:
    """Base in 2 shards, every checkpoint in 3 shards: tensors are matched by name."""
    traj = make_traj(steps=IRREGULAR, base_shards=2, ckpt_shards=3)
    run_traj(traj, tmp_path / "out", [80])
    check_against_reference(traj, tmp_path / "out", [80])


def test_single_file_base_sharded_checkpoints(make_traj, tmp_path: Path) -> None:
    """Single-file base stays single-file with sharded ckpts; 100.0 -> step-100, 150.5 kept."""
    traj = make_traj(ckpt_shards=2)
    out = tmp_path / "out"
    run_traj(traj, out, ["100.0", "150.5"])
    check_against_reference(traj, out, [100.0, 150.5])
    assert (out / "step-100").is_dir() and (out / "step-150.5").is_dir()
    assert not (out / "step-100" / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("diverges", [False, True], ids=["lm_head_equal", "lm_head_stale"])
def test_tied_with_lm_head_in_files(make_traj, tmp_path: Path, diverges: bool) -> None:
    """Tied + both tensors stored: output lm_head equals output embed_tokens."""
    traj = make_traj(tied=True, lm_head_diverges=diverges, base_shards=2)
    run_traj(traj, tmp_path / "out", [100])
    got = check_against_reference(traj, tmp_path / "out", [100])[100.0]
    assert torch.equal(got[LM_HEAD], got[EMBED])


def test_tied_without_lm_head(make_traj, tmp_path: Path) -> None:
    """Tied and lm_head absent from the files: output has no lm_head either."""
    traj = make_traj(tied=True, lm_head=False)
    run_traj(traj, tmp_path / "out", [100])
    got = check_against_reference(traj, tmp_path / "out", [100])[100.0]
    assert LM_HEAD not in got


def test_fp64_base(make_traj, tmp_path: Path) -> None:
    """fp64 checkpoints: the output is float64 and agrees with the float64 reference to 1e-10.

    One float64 ulp is below what either float64 computation can promise, so the bound here
    is relative; it still catches a wrong prediction by ten orders of magnitude.
    """
    from tests.reference import load_model_dir, reference_from_dirs

    traj = make_traj(steps=IRREGULAR, dtype=torch.float64, base_shards=2)
    run_traj(traj, tmp_path / "out", [100])
    ref = reference_from_dirs(traj.base, traj.ckpt_dirs, [100.0])[100.0]
    got = load_model_dir(tmp_path / "out" / "step-100")
    for name, value in got.items():
        if value.is_floating_point():
            assert value.dtype == torch.float64, name
            scale = float(ref[name].abs().max()) or 1.0
            assert float((value - ref[name]).abs().max()) <= 1e-10 * scale, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_other_base_dtypes(make_traj, tmp_path: Path, dtype: torch.dtype) -> None:
    """fp16 and fp32 bases: output keeps the base dtype and meets the bound."""
    traj = make_traj(steps=IRREGULAR, dtype=dtype, base_shards=2)
    run_traj(traj, tmp_path / "out", [100])
    got = check_against_reference(traj, tmp_path / "out", [100])[100.0]
    assert got[EMBED].dtype == dtype


@pytest.mark.parametrize(
    ("dtype", "flag"),
    [(torch.bfloat16, "float32"), (torch.float32, "bfloat16")],
    ids=["bf16_to_fp32", "fp32_to_bf16"],
)
def test_dtype_flag(make_traj, tmp_path: Path, dtype: torch.dtype, flag: str) -> None:
    """--dtype converts every float tensor and rewrites config.json's torch_dtype."""
    traj = make_traj(steps=IRREGULAR, dtype=dtype, base_shards=2)
    run_traj(traj, tmp_path / "out", [100], "--dtype", flag)
    check_against_reference(traj, tmp_path / "out", [100], dtype_flag=flag)
    cfg = json.loads((step_dir(tmp_path / "out", 100) / "config.json").read_text())
    assert cfg["torch_dtype"] == flag


@pytest.mark.parametrize(
    ("args", "used"),
    [
        (["--window", "2"], (22, 50)),
        (["--steps", "5-40"], (7, 20, 22)),
        (["--steps", "3,20,50"], (3, 20, 50)),
        (["--steps", "3-22", "--window", "3"], (7, 20, 22)),
    ],
    ids=["window2", "steps_range", "steps_list", "steps_and_window"],
)
def test_step_selection(make_traj, tmp_path: Path, args: list[str], used: tuple) -> None:
    """--steps / --window select which observed checkpoints enter the fit."""
    traj = make_traj(steps=IRREGULAR)
    run_traj(traj, tmp_path / "out", [100], *args)
    check_against_reference(traj, tmp_path / "out", [100], steps=used)


def test_ckpt_arguments(make_traj, tmp_path: Path) -> None:
    """--ckpt STEP=PATH (repeatable) instead of --runs, with sharded checkpoints."""
    traj = make_traj(steps=(5, 9, 30, 31), ckpt_shards=2)
    ckpt_args: list[object] = []
    for step, path in traj.ckpt_dirs.items():
        ckpt_args += ["--ckpt", f"{step}={path}"]
    out = tmp_path / "out"
    args = ["run", "--base", traj.base, *ckpt_args, "--target", "60", "--out", out]
    run_cli(*args, "--device", "cpu", "--quiet")
    check_against_reference(traj, out, [60])


def test_mixed_step_dir_layouts(make_traj, tmp_path: Path) -> None:
    """All six step-dir name patterns and all three model subdirs in one --runs dir."""
    traj = make_traj(steps=(10, 20, 30, 40, 50, 60), layouts=LAYOUTS, subdirs=SUBDIRS)
    run_traj(traj, tmp_path / "out", [100])
    check_against_reference(traj, tmp_path / "out", [100])


def test_small_max_memory(make_traj, tmp_path: Path) -> None:
    """A tight --max-memory budget (one tensor at a time) still meets the bound."""
    traj = make_traj(steps=IRREGULAR, vocab=512, base_shards=2)
    run_traj(traj, tmp_path / "out", [100], "--max-memory", "2M")
    check_against_reference(traj, tmp_path / "out", [100])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_api_discovers_layout(make_traj, tmp_path: Path, layout: str) -> None:
    """Python API: each step-dir pattern is discovered (model in dir, huggingface/, actor/...)."""
    import relex_stream

    traj = make_traj(steps=(4, 8, 16), layouts=(layout,), subdirs=SUBDIRS)
    out = tmp_path / "out"
    relex_stream.extrapolate(
        base=str(traj.base), runs=str(traj.runs), targets=[40.0], out=str(out), device="cpu"
    )
    check_against_reference(traj, out, [40])


def test_api_overwrite_rerun(make_traj, tmp_path: Path) -> None:
    """Python API: a rerun into the same OUT with overwrite=True succeeds and stays correct."""
    import relex_stream

    traj = make_traj(steps=(4, 8, 16), base_shards=2)
    out = tmp_path / "out"
    kwargs = dict(base=str(traj.base), runs=str(traj.runs), targets=[40.0], out=str(out))
    relex_stream.extrapolate(**kwargs, device="cpu")
    relex_stream.extrapolate(**kwargs, device="cpu", overwrite=True)
    check_against_reference(traj, out, [40])


def test_a_near_step_directory_is_skipped_with_a_warning(make_traj, tmp_path: Path) -> None:
    """checkpoint-40.tmp looks like a step the user meant: it is skipped, and the run says so;
    a folder with another kind of name (logs) is skipped quietly. The result is the others'."""
    traj = make_traj(steps=(10, 20, 30))
    (traj.runs / "checkpoint-40.tmp").mkdir()
    (traj.runs / "global_step_1e3").mkdir()
    (traj.runs / "logs").mkdir()
    proc = run_traj(traj, tmp_path / "out", [100])
    warned = [line for line in proc.stderr.splitlines() if "skipping" in line]
    assert len(warned) == 2, proc.stderr
    assert any("'checkpoint-40.tmp'" in line for line in warned)
    assert any("'global_step_1e3'" in line for line in warned)
    assert "logs" not in proc.stderr
    check_against_reference(traj, tmp_path / "out", [100])
