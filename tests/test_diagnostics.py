"""G-only diagnostics against the same quantities measured on explicit deltas D."""

from __future__ import annotations

import math

import pytest
import torch

from relex_stream import fit
from relex_stream.diagnostics import (
    heldout_error_sq,
    increment_gram,
    path_efficiency,
    random_signs,
    rank1_scores,
    relative_error,
    sign_flipped_grams,
    tensor_stats,
)
from relex_stream.methods import combination_weights, parse_method

STEPS = [5, 10, 20, 25, 40, 50, 55, 70, 80, 95, 100, 120]


def deltas_of(kind: str, n: int = 2000, seed: int = 0) -> torch.Tensor:
    """(K, n) float64 deltas: 'walk' (no drift), 'line' (rank-1 linear drift + noise) or 'mixed'."""
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor(STEPS, dtype=torch.float64)
    noise = torch.randn(len(STEPS), n, generator=g, dtype=torch.float64)
    if kind == "walk":
        return noise.cumsum(0)
    direction = torch.randn(n, generator=g, dtype=torch.float64)
    line = (t / t[-1])[:, None] * direction
    if kind == "line":
        return line + 0.05 * noise
    return line + 0.4 * noise.cumsum(0) / math.sqrt(len(STEPS))


def test_increment_gram_is_the_gram_of_step_differences() -> None:
    deltas = deltas_of("mixed", n=50)
    increments = torch.diff(deltas, dim=0, prepend=torch.zeros(1, 50, dtype=torch.float64))
    assert torch.allclose(increment_gram(deltas @ deltas.T), increments @ increments.T,
                          rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["walk", "line", "mixed"])
def test_path_efficiency_matches_explicit_lengths(kind: str) -> None:
    deltas = deltas_of(kind, n=200)
    steps = torch.diff(deltas, dim=0, prepend=torch.zeros(1, 200, dtype=torch.float64))
    want = float(deltas[-1].norm() / steps.norm(dim=1).sum())
    assert path_efficiency(deltas @ deltas.T) == pytest.approx(want, rel=1e-10)


def test_path_efficiency_of_a_straight_path_is_one() -> None:
    direction = torch.randn(30, dtype=torch.float64)
    deltas = torch.tensor(STEPS, dtype=torch.float64)[:, None] * direction
    assert path_efficiency(deltas @ deltas.T) == pytest.approx(1.0, rel=1e-9)


def test_sign_flipped_grams_are_grams_of_explicit_walks() -> None:
    deltas = deltas_of("mixed", n=40)
    increments = torch.diff(deltas, dim=0, prepend=torch.zeros(1, 40, dtype=torch.float64))
    signs = random_signs(16, len(STEPS), seed=3)
    grams = sign_flipped_grams(deltas @ deltas.T, signs)
    for s, gram in zip(signs, grams, strict=True):
        walk = (s[:, None] * increments).cumsum(0)  # (K, n)
        assert torch.allclose(gram, walk @ walk.T, rtol=1e-10, atol=1e-10)


def test_rank1_scores_match_the_engine_fit() -> None:
    steps = torch.tensor(STEPS, dtype=torch.float64)
    grams = torch.stack([d @ d.T for d in (deltas_of(k, n=100) for k in ("walk", "line", "mixed"))])
    explained, r_squared = rank1_scores(grams, steps)
    for i, gram in enumerate(grams):
        result = fit.fit_diagnostics(gram, steps)
        assert float(explained[i]) == pytest.approx(result.explained_variance, rel=1e-10)
        assert float(r_squared[i]) == pytest.approx(result.r_squared, rel=1e-9)


@pytest.mark.parametrize("spec", ["relex", "relex:rank=2,fit=poly:2", "raw-ols", "two-point",
                                  "two-point:from=0", "expo:alpha=0.5"])
@pytest.mark.parametrize("window", [slice(0, 8), slice(3, 8), slice(6, 8)])
def test_heldout_error_from_gram_equals_explicit_error(spec: str, window: slice) -> None:
    deltas = deltas_of("mixed", n=300)
    rows, targets = list(range(len(STEPS)))[window], [8, 9, 10, 11]
    if len(rows) < 3 and "poly:2" in spec:
        pytest.skip("a parabola needs three steps (test_methods checks the error)")
    gram = deltas @ deltas.T
    weights = combination_weights(
        parse_method(spec), gram[rows][:, rows], torch.tensor(STEPS)[rows],
        [STEPS[j] for j in targets],
    )
    error_sq, norm_sq = heldout_error_sq(gram, rows, targets, weights)  # (T,), (T,)
    predicted = weights @ deltas[rows]  # (T, n)
    want = (deltas[targets] - predicted).norm(dim=1)
    assert torch.allclose(error_sq.sqrt(), want, rtol=1e-6, atol=0)
    assert torch.allclose(norm_sq, deltas[targets].norm(dim=1) ** 2, rtol=1e-12)


def test_relative_error_is_nan_where_nothing_moved() -> None:
    got = relative_error(torch.tensor([4.0, 0.0]), torch.tensor([16.0, 0.0]))
    assert float(got[0]) == 0.5 and math.isnan(float(got[1]))


def test_random_walk_null_band_is_calibrated() -> None:
    # Gaussian increments are sign-symmetric, so a random walk is itself a draw from its null:
    # it lands inside the 5-95% band about 90% of the time.
    inside_ev = inside_r2 = 0
    runs = 40
    for seed in range(runs):
        deltas = deltas_of("walk", n=300, seed=seed)
        stats = tensor_stats(deltas @ deltas.T, torch.tensor(STEPS), null_samples=200, seed=seed)
        ev_low, _, ev_high = stats.null.explained_variance
        r2_low, _, r2_high = stats.null.r_squared
        inside_ev += ev_low <= stats.fit.explained_variance <= ev_high
        inside_r2 += r2_low <= stats.fit.r_squared <= r2_high
        assert stats.path_efficiency < 0.6
    assert 0.75 * runs <= inside_ev and 0.75 * runs <= inside_r2


def test_linear_drift_is_above_its_null_band() -> None:
    deltas = deltas_of("line")
    stats = tensor_stats(deltas @ deltas.T, torch.tensor(STEPS), null_samples=400)
    assert stats.ev_above_null and stats.r2_above_null
    assert stats.null.ev_p_value < 0.01 and stats.null.r2_p_value < 0.01
    assert stats.path_efficiency > 0.7  # per-step noise is comparable to per-step drift


def test_null_is_fixed_by_its_seed() -> None:
    deltas = deltas_of("mixed", n=100)
    gram, steps = deltas @ deltas.T, torch.tensor(STEPS)
    first = tensor_stats(gram, steps, null_samples=50, seed=5).null
    assert tensor_stats(gram, steps, null_samples=50, seed=5).null == first
    assert tensor_stats(gram, steps, null_samples=50, seed=6).null != first


def test_zero_deltas_give_nan_not_errors() -> None:
    stats = tensor_stats(torch.zeros(len(STEPS), len(STEPS)), torch.tensor(STEPS), null_samples=20)
    assert math.isnan(stats.fit.explained_variance) and math.isnan(stats.fit.r_squared)
    assert math.isnan(stats.path_efficiency)
    assert all(math.isnan(x) for x in stats.null.explained_variance)
    assert not stats.ev_above_null


def test_null_memory_is_bounded_by_batches_not_by_samples() -> None:
    """The null made all N sign-flipped (K, K) Grams at once: K = 100 with 100,000 samples was a
    7.5 GiB MemoryError traceback. In batches, the peak stays near NULL_WORK_BYTES; the batch
    boundaries do not change the statistics' meaning (a seeded null, same seed same band)."""
    import tracemalloc

    from relex_stream.diagnostics import NULL_WORK_BYTES, tensor_stats

    k, samples = 40, 8000  # whole: 8000 x 40 x 40 x 8 B = 98 MiB per array, several alive
    walk = torch.randn(k, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    gram = walk.cumsum(0) @ walk.cumsum(0).T
    steps = torch.arange(1, k + 1, dtype=torch.float64)
    tracemalloc.start()
    try:
        stats = tensor_stats(gram, steps, null_samples=samples, seed=5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < NULL_WORK_BYTES + 32 * 2**20, peak
    assert stats.null is not None and stats.null.samples == samples
    assert stats == tensor_stats(gram, steps, null_samples=samples, seed=5)
    low, median, high = stats.null.explained_variance
    assert 0 < low <= median <= high <= 1
