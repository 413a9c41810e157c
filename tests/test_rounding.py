"""float64 → bfloat16 / float16 is rounded once, to nearest even (README, Numerics).

torch's own cast goes through float32 and rounds twice; kernels.round_to must not. The judge
here is an exact rounding with fractions, written from the definition of the formats.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from relex_stream.kernels import round_to
from tests.helpers import run_cli

# (significand bits with the leading one, exponent of the smallest normal, largest finite)
FORMATS = {
    torch.bfloat16: (8, -126, (2 - 2.0**-7) * 2.0**127),
    torch.float16: (11, -14, 65504.0),
}


def exact_round(x: float, dtype: torch.dtype) -> float:
    """x rounded to nearest, ties to even, into `dtype`'s set of values, exactly."""
    if math.isnan(x) or math.isinf(x) or x == 0:
        return x
    precision, min_exponent, largest = FORMATS[dtype]
    exponent = max(math.frexp(abs(x))[1] - 1, min_exponent)  # of the leading bit
    quantum = Fraction(2) ** (exponent - precision + 1)
    scaled = Fraction(abs(x)) / quantum
    whole = scaled.numerator // scaled.denominator
    rest = scaled - whole
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and whole % 2 == 1):
        whole += 1
    magnitude = whole * quantum
    rounded = math.inf if magnitude > largest else float(magnitude)
    return math.copysign(rounded, x)


def _check(values: list[float], dtype: torch.dtype) -> None:
    got = round_to(torch.tensor(values, dtype=torch.float64), dtype).to(torch.float64).tolist()
    for x, y in zip(values, got, strict=True):
        want = exact_round(x, dtype)
        if math.isnan(want):
            assert math.isnan(y), x
        else:
            assert y == want and math.copysign(1, y) == math.copysign(1, want), (x, y, want)


def _near_midpoints(dtype: torch.dtype, count: int) -> list[float]:
    """Values a hair either side of, and on, midpoints between neighbours of `dtype`, over its
    whole range: where rounding through float32 lands on the midpoint and goes wrong."""
    generator = torch.Generator().manual_seed(7)
    words = torch.randint(0, 2**16, (count,), generator=generator, dtype=torch.int32)
    neighbours = words.to(torch.int16).view(dtype).to(torch.float64)
    above = (words + 1).to(torch.int16).view(dtype).to(torch.float64)
    values = []
    for a, b in zip(neighbours.tolist(), above.tolist(), strict=True):
        if not (math.isfinite(a) and math.isfinite(b)) or (a < 0) != (b < 0):
            continue
        mid = (a + b) / 2  # exact in float64
        for nudge in (-2.0**-40, -2.0**-30, 0.0, 2.0**-30, 2.0**-40):
            values.append(mid + nudge * abs(mid) if mid else mid)
    return values


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_to_is_one_rounding_near_every_kind_of_midpoint(dtype: torch.dtype) -> None:
    values = _near_midpoints(dtype, 3000)
    # the first finding: torch rounds 1 + 2^-8 + 2^-26 to 1.0 in bf16
    values += [1 + 2.0**-8 + 2.0**-26, 1 + 2.0**-11 + 2.0**-26, -(1 + 2.0**-8 + 2.0**-26)]
    largest = FORMATS[dtype][2]
    half_ulp_above = largest + (largest - torch.tensor(largest).to(dtype).to(torch.float64)
                                .nextafter(torch.tensor(0.0, dtype=torch.float64)).item()) / 2
    values += [largest, half_ulp_above, math.nextafter(half_ulp_above, 0), 1e300, -1e300,
               5e-324, -5e-324, 0.0, -0.0, math.inf, -math.inf, math.nan, 2.0**-149,
               2.0**-150, 3 * 2.0**-151, 2.0**-25, 2.0**-24, 3 * 2.0**-26]
    _check(values, dtype)
    # and the midpoints do trip torch's cast, so the values above test something
    wrong = [x for x in values if math.isfinite(x) and
             torch.tensor(x, dtype=torch.float64).to(dtype).item() != exact_round(x, dtype)]
    assert wrong


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=1,
                max_size=40), st.sampled_from([torch.bfloat16, torch.float16]))
def test_round_to_matches_exact_rounding_on_any_float64(values: list[float],
                                                        dtype: torch.dtype) -> None:
    _check(values, dtype)


def test_round_to_leaves_other_casts_to_torch() -> None:
    x = torch.tensor([1 + 2.0**-30, -3.5], dtype=torch.float64)
    assert torch.equal(round_to(x, torch.float32), x.to(torch.float32))
    y = torch.tensor([1.5, 2.5], dtype=torch.float32)
    assert torch.equal(round_to(y, torch.bfloat16), y.to(torch.bfloat16))


def _write(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({"model_type": "toy"}))


@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float16])
def test_a_bf16_or_fp16_base_with_fp32_steps_is_rounded_once(tmp_path: Path,
                                                             base_dtype: torch.dtype) -> None:
    """verl and TRL save fp32 steps of a bf16 model. Steps 8 and 16 hold 1 + 2^-23 and 1 + 2^-22
    over a base of 1: the line reaches 1 + 2^-8 + 2^-26 (bf16) or 1 + 2^-11 + 2^-26 (fp16) at the
    target, exactly, which rounds up; through float32 it rounded down to 1."""
    _write(tmp_path / "base", {"a": torch.ones(4, dtype=base_dtype)})
    for k, step in enumerate((8, 16), start=1):
        _write(tmp_path / "runs" / f"checkpoint-{step}", {"a": torch.ones(4) + k * 2.0**-23})
    fraction_bits = 8 if base_dtype == torch.bfloat16 else 11
    target = 2 ** (26 - fraction_bits) + 1  # c(t) = t / 8 · 2^-23 along the line
    prediction = 1 + 2.0**-fraction_bits + 2.0**-26
    run_cli("run", "--base", tmp_path / "base", "--runs", tmp_path / "runs", "--target",
            f"{target:g}", "--out", tmp_path / "out", "--device", "cpu", "--quiet")
    out = load_file(str(tmp_path / "out" / f"step-{target:g}" / "model.safetensors"))["a"]
    assert out.dtype == base_dtype
    assert out.to(torch.float64).tolist() == [exact_round(prediction, base_dtype)] * 4
    assert out[0].item() != 1.0


def test_an_unchanged_negative_zero_keeps_its_bits_in_a_dense_block(tmp_path: Path) -> None:
    """Three of four columns move (a dense block): the one that never moves is -0.0 in the base
    and must stay -0.0 (it came out -0.0 + 0.0 = +0.0), in a prediction and a reconstruction."""
    base = torch.tensor([-0.0, 1.0, 2.0, 3.0], dtype=torch.bfloat16)
    _write(tmp_path / "base", {"a": base})
    for step in (8, 16):
        moved = base.clone()
        moved[1:] += step / 64
        _write(tmp_path / "runs" / f"checkpoint-{step}", {"a": moved})
    common = ["--base", tmp_path / "base", "--runs", tmp_path / "runs", "--device", "cpu",
              "--quiet"]
    run_cli("run", *common, "--target", "32", "--out", tmp_path / "pred")
    run_cli("run", *common, "--target", "16", "--mode", "reconstruct", "--out", tmp_path / "rec")
    for out in (tmp_path / "pred" / "step-32", tmp_path / "rec" / "step-16"):
        a = load_file(str(out / "model.safetensors"))["a"]
        assert a.view(torch.int16)[0].item() == base.view(torch.int16)[0].item()  # 0x8000
        assert a[1].item() != 1.0  # the block did move


def test_narrowing_a_float64_base_rounds_once(tmp_path: Path) -> None:
    """--dtype bfloat16 on an F64 base: a tensor that never moves is the base rounded once."""
    value = 1 + 2.0**-8 + 2.0**-26
    _write(tmp_path / "base", {"a": torch.full((4,), value, dtype=torch.float64),
                               "b": torch.ones(4, dtype=torch.float64)})
    for step in (8, 16):
        _write(tmp_path / "runs" / f"checkpoint-{step}",
               {"a": torch.full((4,), value, dtype=torch.float64),
                "b": torch.ones(4, dtype=torch.float64) + step / 1024})
    run_cli("run", "--base", tmp_path / "base", "--runs", tmp_path / "runs", "--target", "100",
            "--dtype", "bfloat16", "--out", tmp_path / "out", "--device", "cpu", "--quiet")
    a = load_file(str(tmp_path / "out" / "step-100" / "model.safetensors"))["a"]
    assert a.to(torch.float64).tolist() == [1.0078125] * 4
