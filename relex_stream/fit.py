"""The RELEX fit from a Gram matrix and step numbers, in float64: line weights, diagnostics.

Every prediction is W_0 + wᵀD with D the (K, n) observed deltas; methods.py turns these into
each method's K weights w (docs/DESIGN.md §1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .kernels import eigh_descending

# σ₂/σ₁ above this: the top direction is poorly defined (a warning in `run`, a flag in `report`)
GAP_WARNING = 0.9


@dataclass(frozen=True)
class TensorFit:
    """Rank-1 diagnostics of one tensor's trajectory, from its Gram matrix."""

    sigma: tuple[float, ...]  # singular values of D, descending
    coefficients: tuple[float, ...]  # σ₁ u₁[k], sign fixed so the last is >= 0
    slope: float  # a in c(t) = a t + b
    intercept: float  # b
    r_squared: float  # of the line through the coefficients
    explained_variance: float  # λ₁ / Σλ
    spectral_gap: float  # σ₂ / σ₁ (1.0 when σ₁ = 0)


def line_weights(steps: torch.Tensor, target: float) -> torch.Tensor:
    """h (K,) such that the OLS line through (t_k, y_k) evaluated at `target` is h·y; float64."""
    t = steps.to(torch.float64)
    centred = t - t.mean()
    spread = float((centred * centred).sum())
    return 1.0 / t.numel() + (target - float(t.mean())) * centred / spread


def fit_diagnostics(gram: torch.Tensor, steps: torch.Tensor) -> TensorFit:
    """Explained variance, spectral gap, coefficient trajectory and its line, from G alone."""
    eigenvalues, vectors = eigh_descending(gram)
    sigma = eigenvalues.sqrt()
    total = float(eigenvalues.sum())
    sigma_1 = float(sigma[0])
    u_1 = vectors[:, 0]
    if float(u_1[-1]) < 0:
        u_1 = -u_1
    coefficients = sigma_1 * u_1  # (K,)
    t = steps.to(torch.float64)
    centred = t - t.mean()
    slope = float((centred * coefficients).sum() / (centred * centred).sum())
    intercept = float(coefficients.mean() - slope * t.mean())
    residual = coefficients - (slope * t + intercept)
    spread = float(((coefficients - coefficients.mean()) ** 2).sum())
    r_squared = 1.0 - float((residual**2).sum()) / spread if spread > 0 else math.nan
    return TensorFit(
        sigma=tuple(float(s) for s in sigma),
        coefficients=tuple(float(c) for c in coefficients),
        slope=slope,
        intercept=intercept,
        r_squared=r_squared,
        explained_variance=float(eigenvalues[0]) / total if total > 0 else math.nan,
        spectral_gap=float(sigma[1]) / sigma_1 if sigma_1 > 0 and len(sigma) > 1 else 1.0,
    )
