"""Values at the edges of what float64 and the output dtype hold: refused with one line that
says why, never written silently wrong. Judged by hand-computed values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.untrusted import assert_error, assert_ok, call

F64 = torch.float64


def _write(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({"model_type": "toy"}))


def _f64_toy(root: Path, scale: float) -> None:
    """An F64 base a = 0, b = 1; at steps 8 and 16 `a` is k·scale (k = 1, 2), b moves by
    step/1000: along a's line, step 80 is 10·scale."""
    _write(root / "base", {"a": torch.zeros(4, dtype=F64), "b": torch.ones(4, dtype=F64)})
    for k, step in enumerate((8, 16), start=1):
        _write(root / "runs" / f"checkpoint-{step}",
               {"a": torch.full((4,), k * scale, dtype=F64),
                "b": torch.ones(4, dtype=F64) + step * 1e-3})


def _run(root: Path, *extra: str):
    return call("run", "--base", root / "base", "--runs", root / "runs", "--target", "80",
                "--out", root / "out", "--device", "cpu", "--quiet", *extra)


@pytest.mark.parametrize("scale", [1e-200, 1e-150])
def test_f64_deltas_too_small_to_square_are_refused(tmp_path: Path, scale: float) -> None:
    """Their squares underflow: a's Gram was all zeros and its prediction silently the base
    (0.0 written where the line gives 10·scale)."""
    _f64_toy(tmp_path, scale)
    assert_error(_run(tmp_path), "'a'", "underflow", "1e-146")
    assert not (tmp_path / "out").exists()


def test_f64_deltas_whose_squares_hold_are_predicted(tmp_path: Path) -> None:
    """1e-140: squares of 1e-280 are normal floats; a at step 80 is 10 · 1e-140."""
    _f64_toy(tmp_path, 1e-140)
    assert_ok(_run(tmp_path))
    a = load_file(str(tmp_path / "out" / "step-80" / "model.safetensors"))["a"]
    assert torch.allclose(a, torch.full((4,), 1e-139, dtype=F64), rtol=1e-14, atol=0)


def _f32_toy(root: Path, unchanged: float) -> None:
    """An F32 base whose tensor `a` holds `unchanged` at element 2 and never moves there (its
    other elements move by step/64), and `b` = 1 moving by step/1000."""
    base_a = torch.tensor([0.0, 1.0, unchanged, 3.0, *([1.0] * 12)])
    _write(root / "base", {"a": base_a, "b": torch.ones(4)})
    for step in (8, 16):
        moved = base_a.clone()
        moved[:2] += step / 64
        _write(root / "runs" / f"checkpoint-{step}", {"a": moved, "b": torch.ones(4) + step / 1e3})


@pytest.mark.parametrize("dtype,value", [("float16", 70000.0), ("bfloat16", 3.4e38)])
def test_a_base_value_the_output_dtype_cannot_hold_is_named_as_such(
        tmp_path: Path, dtype: str, value: float) -> None:
    """The message said "pick a nearer --target" for a base value that never moves and that
    --dtype cannot hold, which no target changes."""
    _f32_toy(tmp_path, value)
    line = assert_error(_run(tmp_path, "--dtype", dtype), "'a' (element 2)", f"{value:g}",
                        f"beyond what {dtype} holds", "--dtype", "--allow-nonfinite")
    assert "--target" not in line, line
    assert not (tmp_path / "out").exists()
    assert_ok(_run(tmp_path, "--dtype", "float32"))


def test_a_prediction_overflowing_the_output_dtype_names_the_target(tmp_path: Path) -> None:
    """Element 0 of `a` moves 1/8 per 8 steps: at step 10⁷ it is 156250 > 65504 (float16)."""
    _f32_toy(tmp_path, 2.0)
    result = call("run", "--base", tmp_path / "base", "--runs", tmp_path / "runs", "--target",
                  "1e7", "--dtype", "float16", "--out", tmp_path / "out", "--device", "cpu")
    assert_error(result, "'a' (element 0) for step-10000000 overflows float16",
                 "nearer --target", "--dtype float32")
