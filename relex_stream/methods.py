"""Prediction methods as combination weights: every output is W_0 + wᵀD (docs/DESIGN.md §1).

Each function maps the Gram matrix G = D Dᵀ (K, K) float64 and the observed steps (K,) to a
weight matrix (n_outputs, K) float64, one row per requested output; no I/O, no weights read.
The same rows drive the engine's materialise pass and the exact, G-only backtest.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .errors import RelexError
from .fit import line_weights
from .kernels import eigh_descending
from .units import MAX_RANK, parse_float, parse_positive_int, parse_step

METHODS = ("relex", "reconstruct", "fit-reconstruct", "raw-ols", "two-point", "expo")
MODES = {"extrapolate": "relex", "reconstruct": "reconstruct", "fit-reconstruct": "fit-reconstruct"}
# Which options each method accepts (CLI spelling).
_OPTIONS = {
    "relex": ("rank", "fit"),
    "reconstruct": ("rank",),
    "fit-reconstruct": ("rank", "fit"),
    "raw-ols": ("fit",),
    "two-point": ("from", "to"),
    "expo": ("alpha", "from"),
}
_POLY_RE = re.compile(r"poly:([1-9][0-9]{0,2})", re.ASCII)  # ASCII: the degree names outputs


@dataclass(frozen=True)
class MethodSpec:
    """One prediction method and its options; str() gives a label that parse_method reads back."""

    name: str = "relex"
    rank: int = 1  # relex, reconstruct, fit-reconstruct: number of singular directions kept
    fit: str = "linear"  # relex, fit-reconstruct, raw-ols: 'linear' or 'poly:D'
    from_step: int | None = None  # two-point: first point (0 = base); expo: the step K
    to_step: int | None = None  # two-point: second point
    alpha: float | None = None  # expo: extrapolation strength

    def __str__(self) -> str:
        return self._spelled(None if self.alpha is None else _short(self.alpha))

    def exact(self) -> str:
        """The label with alpha at full precision: what tells apart two methods one label names."""
        return self._spelled(None if self.alpha is None else repr(self.alpha))

    def _spelled(self, alpha: str | None) -> str:
        options = []
        if "rank" in _OPTIONS[self.name] and self.rank != 1:
            options.append(f"rank={self.rank}")
        if "fit" in _OPTIONS[self.name] and self.fit != "linear":
            options.append(f"fit={self.fit}")
        if alpha is not None:
            options.append(f"alpha={alpha}")
        if self.from_step is not None:
            options.append(f"from={self.from_step}")
        if self.to_step is not None:
            options.append(f"to={self.to_step}")
        return self.name + (":" + ",".join(options) if options else "")

    @property
    def extrapolates(self) -> bool:
        """True when outputs may lie at unobserved steps (not a reconstruction of observed ones)."""
        return self.name not in ("reconstruct", "fit-reconstruct")


def _short(alpha: float) -> str:
    """alpha as labels write it: 6 significant digits (:g) when they read back as alpha, as
    labels always did (output folder names stay), else the shortest text that does (0.1234567,
    not 0.123457: two alphas got one label and backtest.json named an alpha not used)."""
    text = f"{alpha:g}"
    return text if float(text) == alpha else repr(alpha)


def fit_degree(fit: str) -> int:
    """Polynomial degree of a --fit value: 'linear' -> 1, 'poly:D' -> D."""
    if fit == "linear":
        return 1
    match = _POLY_RE.fullmatch(fit)
    if not match or int(match.group(1)) < 1:
        raise RelexError(f"--fit {fit!r} is not understood: use linear or poly:D with D >= 1")
    return int(match.group(1))


def build_spec(
    method: str = "relex",
    mode: str = "extrapolate",
    rank: int = 1,
    fit: str = "linear",
    from_step: int | None = None,
    to_step: int | None = None,
    alpha: float | None = None,
) -> MethodSpec:
    """A checked MethodSpec from CLI-style options (--method, --mode, --rank, --fit, ...)."""
    if mode not in MODES:
        raise RelexError(f"--mode {mode!r} is not one of {', '.join(MODES)}")
    if method not in METHODS:
        raise RelexError(f"method {method!r} is not one of {', '.join(METHODS)}")
    if mode != "extrapolate":
        if method != "relex":
            raise RelexError(f"--mode {mode} works with the relex method only, not {method}")
        method = MODES[mode]
    if rank < 1:
        raise RelexError(f"rank must be at least 1, not {rank}")
    fit_degree(fit)
    for value, label in ((from_step, "from"), (to_step, "to")):
        if value is not None and value < 0:
            raise RelexError(f"{label}={value}: steps are >= 0 (0 is the base)")
    if method == "two-point" and None not in (from_step, to_step) and from_step >= to_step:
        raise RelexError(f"two-point needs from < to, got from={from_step}, to={to_step}")
    if method == "expo":
        if alpha is None or not math.isfinite(alpha):
            raise RelexError("expo needs a finite alpha, e.g. expo:alpha=0.5 (W_K + α(W_K − W_0))")
        if from_step == 0:
            raise RelexError("expo:from=0 would extrapolate the base from itself; pick a step > 0")
    given = {
        "rank": rank != 1,
        "fit": fit != "linear",
        "from": from_step is not None,
        "to": to_step is not None,
        "alpha": alpha is not None,
    }
    extra = [key for key, used in given.items() if used and key not in _OPTIONS[method]]
    if extra:
        raise RelexError(
            f"{method} takes no {', '.join(extra)} option; it accepts "
            f"{', '.join(_OPTIONS[method]) or 'no options'}"
        )
    return MethodSpec(method, rank, fit, from_step, to_step, alpha)


def parse_method(text: str, **overrides) -> MethodSpec:
    """MethodSpec from 'relex', 'relex:rank=2,fit=poly:2', 'two-point:from=10,to=40', ...

    `overrides` (rank, fit, from_step, to_step, alpha) replace inline options, so the CLI's
    --rank/--fit/--from/--to/--alpha combine with a bare --method name.
    """
    name, _, rest = text.strip().partition(":")
    if name not in METHODS:
        raise RelexError(f"method {text!r}: {name!r} is not one of {', '.join(METHODS)}")
    options: dict[str, str] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in ("rank", "fit", "from", "to", "alpha"):
            raise RelexError(
                f"method {text!r}: cannot read {item!r}; write options as key=value, e.g. "
                "relex:rank=2,fit=poly:2 or two-point:from=10,to=40"
            )
        if key in options:
            raise RelexError(f"method {text!r} gives {key!r} twice; give each option once")
        options[key] = value.strip()
    # the same parsers as the flags: inline options refuse what --rank/--from/--alpha refuse
    # ('٢', '1_0', 'nan', '1e308'), with the option named in the message
    values = {
        "rank": parse_positive_int(options["rank"], f"method {text!r}: rank", MAX_RANK)
        if "rank" in options else 1,
        "fit": options.get("fit", "linear"),
        "from_step": parse_step(options["from"], f"method {text!r}: from")
        if "from" in options else None,
        "to_step": parse_step(options["to"], f"method {text!r}: to") if "to" in options else None,
        "alpha": parse_float(options["alpha"], f"method {text!r}: alpha")
        if "alpha" in options else None,
    }
    return build_spec(name, **(values | overrides))


def _as_steps(steps: torch.Tensor | list) -> torch.Tensor:
    t = torch.as_tensor(steps, dtype=torch.float64).reshape(-1)
    if t.numel() < 2:
        raise RelexError(f"need at least two observed steps, got {t.numel()}")
    if bool((t[1:] <= t[:-1]).any()):
        raise RelexError("observed steps must be distinct and increasing")
    return t


def fit_weights(steps: torch.Tensor, targets: list[float], fit: str = "linear") -> torch.Tensor:
    """H (T, K) float64: the OLS curve through (t_k, y_k) evaluated at each target is H @ y."""
    t = _as_steps(steps)
    degree = fit_degree(fit)
    if degree == 1:
        # The engine's own line weights, so relex here and in plan.py agree bit for bit.
        return torch.stack([line_weights(t, float(target)) for target in targets])
    if t.numel() <= degree:
        raise RelexError(
            f"fit={fit} needs at least {degree + 1} observed steps, got {t.numel()}; "
            "lower the degree or use more steps"
        )
    # Powers of the steps centred and scaled to [-1, 1]: a raw Vandermonde is ill-conditioned.
    centre = float(t.mean())
    scale = float((t - centre).abs().max())
    powers = torch.arange(degree + 1, dtype=torch.float64)
    design = ((t - centre) / scale)[:, None] ** powers  # (K, D+1)
    at = ((torch.tensor(targets, dtype=torch.float64) - centre) / scale)[:, None] ** powers
    return at @ torch.linalg.pinv(design)  # (T, K)


def _basis(gram: torch.Tensor, rank: int) -> torch.Tensor | None:
    """Top-`rank` eigenvectors of G as columns (K, r), or None when every delta is zero."""
    if rank > gram.shape[0]:
        raise RelexError(f"rank {rank} exceeds the {gram.shape[0]} observed steps")
    eigenvalues, vectors = eigh_descending(gram)
    if float(eigenvalues[0]) == 0.0:
        return None
    return vectors[:, :rank]


def _project(gram: torch.Tensor, h: torch.Tensor, rank: int) -> torch.Tensor:
    """Σ_j (h·u_j) u_j for each row of h (T, K): the fitted c_j(T)/σ_j · u_j, σ cancels."""
    basis = _basis(gram, rank)
    if basis is None:
        return torch.zeros_like(h)
    return (h @ basis) @ basis.T  # (T, K)


def relex_weights(
    gram: torch.Tensor,
    steps: torch.Tensor,
    targets: list[float],
    rank: int = 1,
    fit: str = "linear",
) -> torch.Tensor:
    """RELEX rank-r weights (T, K): Σ_j ℓ_j(T)/σ_j · u_j with ℓ_j the fit through c_j = σ_j u_j.

    Wei et al. 2026, 'You Only Need Minimal RLVR Training: Extrapolating LLMs via Rank-1
    Trajectories': Ŵ_T = W_0 + Σ_j ℓ_j(T) v_j, v_j = Dᵀu_j/σ_j; ℓ_j is the OLS line (or degree-D
    polynomial) through (t_k, c_j[k]) against the real step numbers.
    """
    return _project(gram, fit_weights(steps, targets, fit), rank)


def _indices(steps: torch.Tensor, wanted: list[float], what: str) -> list[int]:
    """Row index of each wanted step in `steps`; a step that was not observed is an error."""
    where = {float(s): i for i, s in enumerate(steps.tolist())}
    missing = [w for w in wanted if float(w) not in where]
    if missing:
        raise RelexError(
            f"{what}: step(s) {', '.join(f'{m:g}' for m in missing)} not among the observed steps "
            f"{', '.join(f'{s:g}' for s in steps.tolist())}"
        )
    return [where[float(w)] for w in wanted]


def reconstruct_weights(
    gram: torch.Tensor, steps: torch.Tensor, targets: list[float], rank: int = 1
) -> torch.Tensor:
    """Rank-r reconstruction of observed steps (T, K): row for step t_k is Σ_j u_j[k] u_j.

    The paper's Finding 1 (Wei et al. 2026): projecting each observed delta onto the top-r
    singular directions, Δ̂_k = Σ_j c_j[k] v_j, already recovers the checkpoint's accuracy.
    """
    t = _as_steps(steps)
    rows = torch.eye(t.numel(), dtype=torch.float64)[_indices(t, targets, "reconstruct")]
    return _project(gram, rows, rank)  # (T, K)


def fit_reconstruct_weights(
    gram: torch.Tensor,
    steps: torch.Tensor,
    targets: list[float],
    rank: int = 1,
    fit: str = "linear",
) -> torch.Tensor:
    """The fitted curves evaluated at observed steps (T, K): relex weights with T = t_k.

    Wei et al. 2026: W_0 + Σ_j ℓ_j(t_k) v_j, the smoothed trajectory at an observed step.
    """
    t = _as_steps(steps)
    _indices(t, targets, "fit-reconstruct")
    return relex_weights(gram, t, targets, rank, fit)


def raw_ols_weights(steps: torch.Tensor, targets: list[float], fit: str = "linear") -> torch.Tensor:
    """Per-element least-squares line in raw weight space (T, K), no projection at all.

    w_k = 1/K + (T − t̄)(t_k − t̄)/Σ_i (t_i − t̄)² (linear); Σ_k w_k = 1, so the prediction is
    the OLS line through the raw checkpoints W_{t_k} evaluated at T. The naive baseline of
    Wei et al. 2026.
    """
    return fit_weights(steps, targets, fit)


def two_point_weights(
    steps: torch.Tensor,
    targets: list[float],
    from_step: int | None = None,
    to_step: int | None = None,
) -> torch.Tensor:
    """Linear extrapolation through checkpoints a < b (T, K); the base counts as step 0.

    w_a = 1 − (T−a)/(b−a), w_b = (T−a)/(b−a): Ŵ_T = W_a + (T−a)/(b−a)·(W_b − W_a). Defaults:
    a = the first observed step, b = the last. The two-checkpoint baseline of Wei et al. 2026.
    """
    t = _as_steps(steps)
    a = float(t[0]) if from_step is None else float(from_step)
    b = float(t[-1]) if to_step is None else float(to_step)
    if a >= b:
        raise RelexError(f"two-point needs from < to, got from={a:g}, to={b:g}")
    weights = torch.zeros((len(targets), t.numel()), dtype=torch.float64)
    scale = (torch.tensor(targets, dtype=torch.float64) - a) / (b - a)  # (T,)
    (ib,) = _indices(t, [b], "two-point to")
    weights[:, ib] = scale
    if a != 0.0:  # the base has zero delta, so its weight drops out
        (ia,) = _indices(t, [a], "two-point from")
        weights[:, ia] = 1.0 - scale
    return weights


def expo_weights(
    steps: torch.Tensor, targets: list[float], alpha: float, from_step: int | None = None
) -> torch.Tensor:
    """ExPO (T, K): Ŵ = W_K + α(W_K − W_0), so w_K = 1 + α whatever the target.

    Zheng et al. 2024, 'Weak-to-Strong Extrapolation Expedites Alignment'. K defaults to the
    last observed step.
    """
    t = _as_steps(steps)
    k = float(t[-1]) if from_step is None else float(from_step)
    (ik,) = _indices(t, [k], "expo from")
    weights = torch.zeros((len(targets), t.numel()), dtype=torch.float64)
    weights[:, ik] = 1.0 + alpha
    return weights


def combination_weights(
    spec: MethodSpec, gram: torch.Tensor, steps: torch.Tensor, targets: list[float]
) -> torch.Tensor:
    """Weights (T, K) float64 of `spec` for each target, from G (K, K) and the steps (K,)."""
    gram = gram.to(torch.float64)
    steps = _as_steps(steps)
    if gram.shape != (steps.numel(), steps.numel()):
        raise ValueError(f"Gram {tuple(gram.shape)} does not match {steps.numel()} steps")
    targets = [float(x) for x in targets]
    if spec.name == "relex":
        return relex_weights(gram, steps, targets, spec.rank, spec.fit)
    if spec.name == "reconstruct":
        return reconstruct_weights(gram, steps, targets, spec.rank)
    if spec.name == "fit-reconstruct":
        return fit_reconstruct_weights(gram, steps, targets, spec.rank, spec.fit)
    if spec.name == "raw-ols":
        return raw_ols_weights(steps, targets, spec.fit)
    if spec.name == "two-point":
        return two_point_weights(steps, targets, spec.from_step, spec.to_step)
    if spec.name == "expo":
        assert spec.alpha is not None  # build_spec guarantees it
        return expo_weights(steps, targets, spec.alpha, spec.from_step)
    raise RelexError(f"method {spec.name!r} is not one of {', '.join(METHODS)}")
