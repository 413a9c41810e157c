"""Trajectory statistics and held-out errors from Gram matrices alone (docs/DESIGN.md §1).

Everything takes G = D Dᵀ (K, K) float64 and the observed steps (K,); no weights are read.
- rank-1 fit: explained variance λ₁/Σλ, spectral gap σ₂/σ₁, coefficients σ₁u₁ and their line;
- path efficiency ‖Δ_K‖ / Σ_k ‖Δ_k − Δ_{k−1}‖ from the increments' Gram L G Lᵀ;
- a random-walk null: the same increments with random signs, Gram L⁻¹ S (L G Lᵀ) S L⁻ᵀ;
- exact held-out error of any combination w: ‖Δ_j − wᵀD‖² = G_jj − 2 wᵀG[:, j] + wᵀ G w.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .fit import TensorFit, fit_diagnostics

NULL_QUANTILES = (0.05, 0.5, 0.95)


@dataclass(frozen=True)
class NullBand:
    """Random-walk null of explained variance and R²: quantiles NULL_QUANTILES and p-values."""

    samples: int
    explained_variance: tuple[float, float, float]  # 5%, 50%, 95%
    r_squared: tuple[float, float, float]
    ev_p_value: float  # share of null walks at least as explained as the observed one
    r2_p_value: float


@dataclass(frozen=True)
class TensorStats:
    """Everything the report says about one trajectory (a tensor, or the whole model)."""

    fit: TensorFit
    path_efficiency: float
    null: NullBand | None

    @property
    def ev_above_null(self) -> bool:
        """True when the explained variance is above the null's 95% quantile."""
        null = self.null
        return null is not None and self.fit.explained_variance > null.explained_variance[2]

    @property
    def r2_above_null(self) -> bool:
        return self.null is not None and self.fit.r_squared > self.null.r_squared[2]


def differencing(k: int) -> torch.Tensor:
    """L (K, K) float64 with (L D)_k = Δ_k − Δ_{k−1} and Δ_0 = 0: ones on the diagonal, −1 below."""
    below = torch.diag(torch.ones(k - 1, dtype=torch.float64), -1)
    return torch.eye(k, dtype=torch.float64) - below


def increment_gram(gram: torch.Tensor) -> torch.Tensor:
    """L G Lᵀ (K, K) float64: the Gram matrix of the step increments δ_k = Δ_k − Δ_{k−1}."""
    lower = differencing(gram.shape[0])
    return lower @ gram.to(torch.float64) @ lower.T


def path_efficiency(gram: torch.Tensor) -> float:
    """‖Δ_K‖ / Σ_k ‖δ_k‖: 1 for a straight path, ~1/√K for a random walk; nan if no motion."""
    lengths = increment_gram(gram).diagonal().clamp_min(0.0).sqrt()  # (K,)
    total = float(lengths.sum())
    return math.sqrt(max(float(gram[-1, -1]), 0.0)) / total if total > 0 else math.nan


NULL_WORK_BYTES = 64 * 2**20  # one batch of sign-flipped walks
NULL_ARRAYS_ALIVE = 4  # (n, K, K) float64 arrays at once: scaled, product, Grams, eigenvectors


def random_signs(samples: int, k: int, seed: int = 0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """(N, K) float64 of ±1 from a generator seeded with `seed`: the same seed, the same null.

    `generator`, when given, is drawn from instead (batches of one null share one stream).
    """
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (samples, k), generator=generator).double() * 2 - 1


def sign_flipped_grams(gram: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """(N, K, K) float64 Grams of the walks Σ_{i≤k} s_i δ_i, for signs (N, K).

    With A = L⁻¹ (lower-triangular ones): A diag(s) (L G Lᵀ) diag(s) Aᵀ.
    """
    increments = increment_gram(gram).numpy()  # (K, K)
    # numpy: torch's batched matmul costs ~100x more for many tiny matrices on a busy CPU.
    scaled = np.tril(np.ones_like(increments))[None] * signs.numpy()[:, None, :]  # L⁻¹ S (N, K, K)
    return torch.from_numpy(scaled @ increments @ scaled.transpose(0, 2, 1))


def null_scores(
    gram: torch.Tensor, steps: torch.Tensor, samples: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explained variance (N,) and R² (N,) of `samples` walks made of the observed increments
    with random signs (fixed seed), in batches whose (n, K, K) arrays fit NULL_WORK_BYTES.

    Whole, the (N, K, K) Grams took N·K²·8 bytes several times over: 7.5 GiB for K = 100 and
    100,000 samples, 5 GB for K = 1,000 and the default 200.
    """
    k = gram.shape[0]
    batch = max(1, NULL_WORK_BYTES // (NULL_ARRAYS_ALIVE * k * k * 8))
    generator = torch.Generator().manual_seed(seed)
    explained, r_squared = [], []
    for start in range(0, samples, batch):
        n = min(batch, samples - start)
        signs = random_signs(n, k, generator=generator)  # (n, K)
        scores = rank1_scores(sign_flipped_grams(gram, signs), steps)  # (n,), (n,)
        explained.append(scores[0])
        r_squared.append(scores[1])
    return torch.cat(explained), torch.cat(r_squared)


def rank1_scores(grams: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Explained variance (N,) and R² (N,) of the rank-1 coefficient line, for (N, K, K) Grams.

    Batched twin of plan.fit_diagnostics; both are sign-free, so u₁'s sign needs no fixing.
    """
    # numpy's batched eigh is several times faster than torch's on CPU for many small matrices.
    values, vecs = np.linalg.eigh(grams.detach().cpu().numpy())  # ascending
    eigenvalues, vectors = torch.from_numpy(values), torch.from_numpy(vecs)
    eigenvalues = eigenvalues.clamp_min(0.0)
    total = eigenvalues.sum(-1)
    top = eigenvalues[:, -1]
    explained = torch.where(total > 0, top / total.clamp_min(1e-300), torch.nan)
    coefficients = top.sqrt()[:, None] * vectors[:, :, -1]  # (N, K)
    t = steps.to(torch.float64)
    centred = t - t.mean()
    centred_c = coefficients - coefficients.mean(-1, keepdim=True)  # (N, K)
    slope = (centred_c @ centred) / (centred @ centred)  # (N,)
    residual = centred_c - slope[:, None] * centred  # (N, K)
    spread = (centred_c**2).sum(-1)
    r_squared = torch.where(
        spread > 0, 1.0 - (residual**2).sum(-1) / spread.clamp_min(1e-300), torch.nan
    )
    return explained, r_squared


def _quantiles(values: torch.Tensor) -> tuple[float, float, float]:
    finite = values[values.isfinite()]
    if finite.numel() == 0:
        return (math.nan, math.nan, math.nan)
    q = torch.quantile(finite, torch.tensor(NULL_QUANTILES, dtype=torch.float64))
    return tuple(float(x) for x in q)  # type: ignore[return-value]


def _p_value(null: torch.Tensor, observed: float) -> float:
    """(1 + #null ≥ observed) / (1 + N): the usual Monte Carlo p-value."""
    if not math.isfinite(observed):
        return math.nan
    return (1 + int((null >= observed).sum())) / (1 + null.numel())


def null_band(
    gram: torch.Tensor, steps: torch.Tensor, fit: TensorFit, samples: int = 200, seed: int = 0
) -> NullBand:
    """Quantiles of explained variance and R² over `samples` sign-flipped walks (fixed seed)."""
    explained, r_squared = null_scores(gram, steps, samples, seed)
    return NullBand(
        samples=samples,
        explained_variance=_quantiles(explained),
        r_squared=_quantiles(r_squared),
        ev_p_value=_p_value(explained, fit.explained_variance),
        r2_p_value=_p_value(r_squared, fit.r_squared),
    )


def tensor_stats(
    gram: torch.Tensor, steps: torch.Tensor, null_samples: int = 200, seed: int = 0
) -> TensorStats:
    """Rank-1 fit, path efficiency and (if null_samples > 0) random-walk null of one Gram (K, K)."""
    gram = gram.to(torch.float64)
    steps = torch.as_tensor(steps, dtype=torch.float64)
    fit = fit_diagnostics(gram, steps)
    band = null_band(gram, steps, fit, null_samples, seed) if null_samples > 0 else None
    return TensorStats(fit=fit, path_efficiency=path_efficiency(gram), null=band)


def heldout_error_sq(
    gram: torch.Tensor, window: list[int], targets: list[int], weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """‖Δ_j − wᵀD_window‖² (T,) and ‖Δ_j‖² (T,) for held-out rows j, exactly from G.

    gram: (K, K) of all observed steps; window: the m row indices the weights (T, m) combine;
    targets: the T row indices predicted. Clamped at 0 against rounding in the subtraction.
    """
    gram = gram.to(torch.float64)
    rows = torch.tensor(window)
    cols = torch.tensor(targets)
    inner = gram[rows][:, rows]  # (m, m)
    cross = gram[rows][:, cols]  # (m, T)
    norm_sq = gram[cols, cols]  # (T,)
    quadratic = ((weights @ inner) * weights).sum(-1)  # (T,)
    linear = (weights * cross.T).sum(-1)  # (T,)
    return (norm_sq - 2 * linear + quadratic).clamp_min(0.0), norm_sq


def relative_error(error_sq: torch.Tensor, norm_sq: torch.Tensor) -> torch.Tensor:
    """‖Δ̂ − Δ‖/‖Δ‖ elementwise; nan where the true delta is zero (nothing to predict)."""
    return torch.where(norm_sq > 0, (error_sq / norm_sq.clamp_min(1e-300)).sqrt(), torch.nan)


def prediction_drift(
    grams: list[torch.Tensor],
    weights_of: Callable[[torch.Tensor, int], torch.Tensor],
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """‖Ŵ_T(k) − Ŵ_T(k−1)‖ (T,) and ‖Ŵ_T(k) − W_0‖ (T,) over all tensors, exactly from G.

    grams: each tensor's Gram (K, K), K ≥ k; weights_of(G[:m, :m], m) gives the combination
    weights (T, m) of the prediction from the first m rows. Both predictions are combinations of
    the first k rows, so with Δw = w_k − w_{k−1} (zero-padded): ‖·‖² = Δwᵀ G Δw and w_kᵀ G w_k.
    """
    moved = norm = None
    for gram in grams:
        gram = gram[:k, :k].to(torch.float64)
        now = weights_of(gram, k)  # (T, k)
        before = torch.zeros_like(now)
        before[:, : k - 1] = weights_of(gram[: k - 1, : k - 1], k - 1)
        delta = now - before
        step = ((delta @ gram) * delta).sum(-1)  # (T,)
        size = ((now @ gram) * now).sum(-1)
        moved = step if moved is None else moved + step
        norm = size if norm is None else norm + size
    return moved.clamp_min(0.0).sqrt(), norm.clamp_min(0.0).sqrt()
