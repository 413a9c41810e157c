"""Sanity checks of the test reference itself (no relex_stream involved)."""

from __future__ import annotations

import pytest
import torch

from tests.reference import assert_within_one_ulp, reference_predict, ulp


def test_reference_recovers_exact_rank1_line() -> None:
    """Noise-free rank-1 drift linear in irregular steps is extrapolated exactly."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(7, 5, generator=g, dtype=torch.float64)
    d = torch.randn(7, 5, generator=g, dtype=torch.float64)
    steps = [3, 7, 20, 22, 50]
    ckpts = {s: {"w": w0 + (0.01 * s + 0.2) * d, "i": torch.tensor([s])} for s in steps}
    base = {"w": w0, "i": torch.tensor([1])}
    ref = reference_predict(base, ckpts, [500.0])[500.0]
    torch.testing.assert_close(ref["w"], w0 + (0.01 * 500 + 0.2) * d, rtol=1e-12, atol=1e-12)
    assert torch.equal(ref["i"], torch.tensor([1]))


def test_reference_zero_delta_is_base() -> None:
    """All-zero deltas predict the base exactly."""
    w0 = torch.randn(4, 3, dtype=torch.float64)
    ref = reference_predict({"w": w0}, {1: {"w": w0}, 2: {"w": w0}}, [9.0])[9.0]
    assert torch.equal(ref["w"], w0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_ulp_bound(dtype: torch.dtype) -> None:
    """One ulp passes, two ulps fail, for each output dtype and both signs."""
    ref64 = torch.tensor([1.3, -0.7, 3.0e-3, -250.0], dtype=torch.float64)
    r = ref64.to(dtype)
    assert_within_one_ulp(r + ulp(r).to(dtype), ref64, dtype, "one")
    with pytest.raises(AssertionError):
        assert_within_one_ulp((r.double() + 2.5 * ulp(r)).to(dtype), ref64, dtype, "two")
