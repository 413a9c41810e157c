"""Combination weights of every method against a dense float64 implementation built from D."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from relex_stream.errors import RelexError
from relex_stream.methods import (
    MethodSpec,
    build_spec,
    combination_weights,
    parse_method,
    raw_ols_weights,
)

STEPS = [3, 7, 10, 18, 25, 40, 41, 60]  # irregular on purpose: fits use step numbers
TARGETS = [60.0, 80.0, 150.0]


@pytest.fixture(scope="module")
def trajectory() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Base W_0 (n,), checkpoints W (K, n) and deltas D (K, n), float64: rank-2 drift + noise."""
    g = torch.Generator().manual_seed(1)
    n = 300
    t = torch.tensor(STEPS, dtype=torch.float64)
    base = torch.randn(n, generator=g, dtype=torch.float64)
    v1, v2 = torch.randn(2, n, generator=g, dtype=torch.float64)
    deltas = (
        0.02 * t[:, None] * v1
        + 0.3 * torch.sin(t / 9)[:, None] * v2
        + 0.05 * torch.randn(len(STEPS), n, generator=g, dtype=torch.float64)
    )
    return base, base + deltas, deltas


def predict(spec: str, trajectory, targets: list[float]) -> torch.Tensor:
    """W_0 + wᵀD (T, n) with w from the Gram matrix alone."""
    base, _, deltas = trajectory
    weights = combination_weights(
        parse_method(spec), deltas @ deltas.T, torch.tensor(STEPS, dtype=torch.float64), targets
    )
    return base + weights @ deltas


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    scale = float(want.abs().max())
    assert torch.allclose(got, want, rtol=0, atol=1e-9 * scale), float((got - want).abs().max())


def dense_curve(steps: list[int], values: np.ndarray, degree: int, at: list[float]) -> np.ndarray:
    """np.polyfit of each column of values (K, m) against steps, evaluated at `at`: (T, m)."""
    coefficients = np.polyfit(np.asarray(steps, dtype=np.float64), values, degree)  # (deg+1, m)
    powers = np.asarray(at, dtype=np.float64)[:, None] ** np.arange(degree, -1, -1)  # (T, deg+1)
    return powers @ coefficients.reshape(degree + 1, -1)


def dense_projection(deltas: torch.Tensor, rank: int):
    """Right singular vectors v_j (r, n) and coefficients c_j = D v_j as columns (K, r)."""
    _, _, vh = torch.linalg.svd(deltas, full_matrices=False)
    directions = vh[:rank]  # (r, n)
    return directions, (deltas @ directions.T).numpy()


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("fit,degree", [("linear", 1), ("poly:2", 2)])
def test_relex_matches_dense_svd_fit(trajectory, rank: int, fit: str, degree: int) -> None:
    base, _, deltas = trajectory
    directions, coefficients = dense_projection(deltas, rank)
    fitted = torch.from_numpy(dense_curve(STEPS, coefficients, degree, TARGETS))  # (T, r)
    want = base + fitted @ directions
    assert_close(predict(f"relex:rank={rank},fit={fit}", trajectory, TARGETS), want)


def test_linear_is_poly_one(trajectory) -> None:
    assert_close(predict("relex:fit=poly:1", trajectory, TARGETS),
                 predict("relex", trajectory, TARGETS))


@pytest.mark.parametrize("rank", [1, 2])
def test_reconstruct_is_rank_r_projection(trajectory, rank: int) -> None:
    base, _, deltas = trajectory
    picked = [1, 4, 7]
    directions, coefficients = dense_projection(deltas, rank)
    want = base + torch.from_numpy(coefficients[picked]) @ directions
    got = predict(f"reconstruct:rank={rank}", trajectory, [STEPS[i] for i in picked])
    assert_close(got, want)


def test_reconstruct_full_rank_gives_the_checkpoints(trajectory) -> None:
    _, checkpoints, _ = trajectory
    assert_close(predict(f"reconstruct:rank={len(STEPS)}", trajectory, STEPS), checkpoints)


@pytest.mark.parametrize("rank,fit,degree", [(1, "linear", 1), (2, "poly:3", 3)])
def test_fit_reconstruct_is_the_curve_at_observed_steps(
    trajectory, rank: int, fit: str, degree: int
) -> None:
    base, _, deltas = trajectory
    directions, coefficients = dense_projection(deltas, rank)
    fitted = torch.from_numpy(dense_curve(STEPS, coefficients, degree, STEPS))
    got = predict(f"fit-reconstruct:rank={rank},fit={fit}", trajectory, STEPS)
    assert_close(got, base + fitted @ directions)


@pytest.mark.parametrize("fit,degree", [("linear", 1), ("poly:2", 2)])
def test_raw_ols_is_a_per_element_fit_of_raw_weights(trajectory, fit: str, degree: int) -> None:
    _, checkpoints, _ = trajectory
    want = torch.from_numpy(dense_curve(STEPS, checkpoints.numpy(), degree, TARGETS))
    assert_close(predict(f"raw-ols:fit={fit}", trajectory, TARGETS), want)


def test_raw_ols_weights_formula() -> None:
    t = torch.tensor(STEPS, dtype=torch.float64)
    target = 90.0
    want = 1 / len(STEPS) + (target - t.mean()) * (t - t.mean()) / ((t - t.mean()) ** 2).sum()
    assert torch.allclose(raw_ols_weights(t, [target])[0], want, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("a,b,spec", [
    (3, 60, "two-point"),
    (0, 40, "two-point:from=0,to=40"),
    (10, 25, "two-point:from=10,to=25"),
])
def test_two_point_is_a_line_through_two_checkpoints(trajectory, a: int, b: int, spec: str) -> None:
    base, checkpoints, _ = trajectory
    w_a = base if a == 0 else checkpoints[STEPS.index(a)]
    w_b = checkpoints[STEPS.index(b)]
    want = torch.stack([w_a + (target - a) / (b - a) * (w_b - w_a) for target in TARGETS])
    assert_close(predict(spec, trajectory, TARGETS), want)


@pytest.mark.parametrize("k,spec", [(60, "expo:alpha=0.5"), (25, "expo:alpha=-0.25,from=25")])
def test_expo_is_weak_to_strong_extrapolation(trajectory, k: int, spec: str) -> None:
    base, checkpoints, _ = trajectory
    alpha = parse_method(spec).alpha
    w_k = checkpoints[STEPS.index(k)]
    want = (w_k + alpha * (w_k - base)).expand(len(TARGETS), -1)
    assert_close(predict(spec, trajectory, TARGETS), want)


@pytest.mark.parametrize("spec", ["relex", "relex:rank=3,fit=poly:2", "reconstruct:rank=2",
                                  "fit-reconstruct"])
def test_zero_deltas_predict_the_base(spec: str) -> None:
    gram = torch.zeros(len(STEPS), len(STEPS), dtype=torch.float64)
    weights = combination_weights(parse_method(spec), gram, torch.tensor(STEPS), STEPS[:2])
    assert torch.equal(weights, torch.zeros_like(weights))


@pytest.mark.parametrize("text", [
    "relex", "relex:rank=2", "relex:fit=poly:2", "relex:rank=3,fit=poly:4", "reconstruct:rank=2",
    "fit-reconstruct:rank=2,fit=poly:2", "raw-ols", "raw-ols:fit=poly:2", "two-point",
    "two-point:from=10,to=40", "two-point:from=0,to=40", "expo:alpha=0.5",
    "expo:alpha=0.5,from=40",
])
def test_parse_round_trip(text: str) -> None:
    spec = parse_method(text)
    assert parse_method(str(spec)) == spec
    assert str(spec) == text


def test_parse_fields() -> None:
    assert parse_method("two-point:from=10,to=40") == MethodSpec("two-point", from_step=10,
                                                                 to_step=40)
    assert parse_method("expo:alpha=0.5,from=40") == MethodSpec("expo", from_step=40, alpha=0.5)
    assert parse_method("relex:rank=2,fit=poly:3") == MethodSpec("relex", rank=2, fit="poly:3")


@pytest.mark.parametrize("text,needle", [
    ("ols", "not one of"),
    ("relex:rank=0", "between 1 and"),
    ("relex:rank=two", "whole number"),
    # inline options refuse what the flags refuse (int()/float() took all of these)
    ("relex:rank=\u0662", "whole number"),
    ("relex:rank=99999", "between 1 and 4096"),
    ("two-point:from=1_0,to=20", "not a step number"),
    ("two-point:from=10,to=\uff14\uff10", "not a step number"),
    ("expo:alpha=1e308", "out of range"),
    ("expo:alpha=inf", "not a number"),
    ("expo:alpha=0x10", "not a number"),
    ("relex:fit=cubic", "poly:D"),
    ("relex:fit=poly:0", "poly:D"),
    ("relex:fit=poly:\u0662", "poly:D"),  # the degree names output folders: ASCII only
    ("relex:fit=poly:02", "poly:D"),
    ("relex:alpha=1", "takes no alpha"),
    ("raw-ols:rank=2", "takes no rank"),
    ("expo", "needs a finite alpha"),
    ("expo:alpha=nan", "not a number"),
    ("two-point:from=40,to=10", "from < to"),
    ("two-point:from=-1", "not a step number"),
    ("relex:rank", "key=value"),
    ("relex:rank=1,rank=2", "twice"),
    ("two-point:from=0,to=20,to=30", "twice"),
])
def test_parse_errors_say_what_to_do(text: str, needle: str) -> None:
    with pytest.raises(RelexError, match=needle):
        parse_method(text)


def test_build_spec_modes() -> None:
    assert build_spec(mode="reconstruct", rank=2) == MethodSpec("reconstruct", rank=2)
    assert build_spec(mode="fit-reconstruct", fit="poly:2").name == "fit-reconstruct"
    assert build_spec().name == "relex"
    with pytest.raises(RelexError, match="relex method only"):
        build_spec("raw-ols", mode="reconstruct")
    with pytest.raises(RelexError, match="--mode"):
        build_spec(mode="predict")


@pytest.mark.parametrize("spec,targets,needle", [
    ("reconstruct", [11.0], "not among the observed steps"),
    ("fit-reconstruct", [100.0], "not among the observed steps"),
    ("two-point:from=5,to=60", [100.0], "not among the observed steps"),
    ("two-point:from=0,to=50", [100.0], "not among the observed steps"),
    ("expo:alpha=1,from=9", [100.0], "not among the observed steps"),
    ("relex:fit=poly:8", [100.0], "at least 9 observed steps"),
    ("relex:rank=9", [100.0], "exceeds"),
])
def test_impossible_requests_raise(trajectory, spec: str, targets, needle: str) -> None:
    with pytest.raises(RelexError, match=needle):
        predict(spec, trajectory, targets)


def test_two_methods_with_one_label_are_refused_naming_them(monkeypatch) -> None:
    """Two methods that name one output folder were refused as "--target lists the same step
    twice", with a single --target given; the message names the two methods. (Alphas no longer
    share a label: the collision is made here by hand.)"""
    from pathlib import Path

    from relex_stream import outputs

    methods = [parse_method("expo:alpha=0.5,from=40"), parse_method("expo:alpha=0.5000001,from=40")]
    monkeypatch.setattr(outputs, "_label", lambda *args: "same")
    with pytest.raises(RelexError) as caught:
        outputs.plan_outputs(Path("OUT"), [100.0], methods, [None])
    message = str(caught.value)
    assert "--target" not in message
    assert "expo:alpha=0.5,from=40" in message and "expo:alpha=0.5000001,from=40" in message
    with pytest.raises(RelexError, match="--target lists the same step twice"):
        outputs.plan_outputs(Path("OUT"), [100.0, 100.0], methods[:1], [None])


@pytest.mark.parametrize("alpha, label", [
    (0.5, "0.5"), (2.0, "2"), (-1.5, "-1.5"), (1e-07, "1e-07"), (1e15, "1e+15"),
    (0.123457, "0.123457"),  # 6 digits that read back: the label of every earlier version
    (0.1234567, "0.1234567"), (0.5000001, "0.5000001"), (1234567.0, "1234567.0"),
    (0.1 + 0.2, "0.30000000000000004"), (2**-1074, "4.94066e-324"),  # :g reads back (subnormal)
])
def test_an_alpha_label_reads_back_as_that_alpha(alpha: float, label: str) -> None:
    """expo's alpha was written with :g (6 significant digits): alpha=0.1234567 ran under the
    label, folder and backtest row of 0.123457, and 0.1234567 and 0.1234568 shared them. :g is
    kept where it reads back (folder names stay), the shortest exact text used elsewhere."""
    spec = parse_method(f"expo:alpha={alpha!r}")
    assert str(spec) == f"expo:alpha={label}"
    assert float(label) == alpha and parse_method(str(spec)) == spec


def test_alphas_that_differ_in_the_7th_digit_get_their_own_folders() -> None:
    """run refused --method expo:alpha=0.1234567 --method expo:alpha=0.1234568 (one folder)."""
    from pathlib import Path

    from relex_stream.outputs import plan_outputs

    methods = [parse_method("expo:alpha=0.1234567"), parse_method("expo:alpha=0.1234568")]
    planned = plan_outputs(Path("OUT"), [100.0], methods, [None])
    assert [p.directory for p in planned] == [Path("OUT/expo_alpha-0.1234567/step-100"),
                                              Path("OUT/expo_alpha-0.1234568/step-100")]
