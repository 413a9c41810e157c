"""The backtest command: held-out errors of every method and window, exact from the Grams.

Predicting observed step j from earlier ones with weights w costs no weight reads:
‖Δ_j − wᵀD‖² = G_jj − 2 wᵀG[:, j] + wᵀ G w (docs/DESIGN.md §1).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .diagnostics import heldout_error_sq, relative_error
from .errors import RelexError
from .methods import MethodSpec, combination_weights, parse_method
from .report import StoreGrams, finite_values, json_text, load_grams, make_out_dir, write_files

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("relex", "raw-ols", "two-point")
DEFAULT_THRESHOLD = 0.3


@dataclass(frozen=True)
class BacktestRow:
    """One method on one window: overall error at each held-out step, and per tensor."""

    method: str
    window: int  # number of observed steps used (the last ones before the held-out steps)
    window_steps: list[int]
    heldout_steps: list[int]
    distances: list[float]  # held-out step − the window's last step
    errors: list[float]  # ‖Δ̂ − Δ‖/‖Δ‖ over all tensors concatenated, per held-out step
    tensor_errors: dict[str, list[float]]  # name -> per held-out step (nan: tensor never moved)
    reach: float | None  # farthest distance with every error up to it under the threshold
    verdict: str

    @property
    def mean_error(self) -> float:
        """Mean over held-out steps of the overall relative error."""
        finite = finite_values(self.errors)
        return sum(finite) / len(finite) if finite else math.nan

    def label(self, with_window: bool) -> str:
        """The method, with its window size when several windows were compared."""
        return f"{self.method} [window {self.window}]" if with_window else self.method


def _shown(error: float) -> str:
    """A relative error for a sentence; NaN when the held-out step's delta is zero (0 / 0)."""
    return "undefined (the held-out delta is zero)" if math.isnan(error) else f"{error:.3f}"


def verdict(
    label: str, distances: Sequence[float], errors: Sequence[float], threshold: float
) -> tuple[float | None, str]:
    """(reach, one plain line): how far ahead the held-out error stays under `threshold`."""
    reach = None
    for distance, error in zip(distances, errors, strict=True):
        if not error <= threshold:  # nan fails too
            break
        reach = distance
    if reach is None:
        return None, (
            f"{label}: do not extrapolate: even the nearest held-out step (+{distances[0]:g} "
            f"steps) has error {_shown(errors[0])}, not under the threshold {threshold:g}"
        )
    if reach == distances[-1]:
        return reach, (
            f"{label}: error stays under {threshold:g} at every held-out step, up to "
            f"+{reach:g} steps ahead (largest {max(errors):.3f})"
        )
    after = len([d for d in distances if d <= reach])
    return reach, (
        f"{label}: error stays under {threshold:g} up to +{reach:g} steps ahead; at "
        f"+{distances[after]:g} it is {_shown(errors[after])}"
    )


@dataclass
class BacktestResult:
    """Every (method, window) row, with the table and verdicts as text."""

    store: Path
    steps: list[int]
    holdout_steps: list[int]
    threshold: float
    rows: list[BacktestRow]
    files: list[Path] = field(default_factory=list)

    def ranking(self) -> list[BacktestRow]:
        """Rows from lowest to highest mean held-out error."""
        return sorted(self.rows, key=lambda r: (not math.isfinite(r.mean_error), r.mean_error))

    def lines(self) -> list[str]:
        """The terminal table (rows: method and window; columns: held-out steps) and verdicts."""
        many = len({r.window for r in self.rows}) > 1
        labels = [r.label(many) for r in self.rows]
        width = max(len("held-out step"), *(len(x) for x in labels)) + 2
        head = "".join(f" {s:>8d}" for s in self.holdout_steps)  # a space even for wide cells
        dist = "".join(f" {'+' + format(d, 'g'):>8s}" for d in self.rows[0].distances)
        out = [
            f"backtest of {self.store}: predict the last {len(self.holdout_steps)} observed "
            "steps from earlier ones; relative error ‖Δ̂ − Δ‖/‖Δ‖ over all tensors",
            f"{'held-out step':{width}s}{head} {'mean':>8s}",
            f"{'distance':{width}s}{dist}",
        ]
        for label, row in zip(labels, self.rows, strict=True):
            cells = "".join(f" {e:8.4f}" for e in row.errors)
            out.append(f"{label:{width}s}{cells} {row.mean_error:8.4f}")
        out += [row.verdict for row in self.rows]
        best = self.ranking()[0]
        out.append(f"lowest mean error: {best.label(many)} ({best.mean_error:.4f})")
        return out


def _window_sizes(windows: Sequence[int | str | None] | None, train: int) -> list[int]:
    """Distinct window sizes, 'all' (None) resolved to the `train` steps before the held-out
    ones."""
    sizes = []
    for window in windows or [None]:
        size = train if window in (None, "all") else int(window)
        if not 2 <= size <= train:
            raise RelexError(
                f"window {window} is not possible: with {train} observed steps before the "
                f"held-out ones, a window holds 2 to {train} steps"
            )
        if size not in sizes:
            sizes.append(size)
    return sizes


def _specs(methods: Sequence[str | MethodSpec] | None) -> list[MethodSpec]:
    """Parsed methods (default DEFAULT_METHODS); reconstructions cannot be backtested."""
    specs = [
        m if isinstance(m, MethodSpec) else parse_method(m) for m in (methods or DEFAULT_METHODS)
    ]
    for spec in specs:
        if not spec.extrapolates:
            raise RelexError(
                f"{spec} reconstructs observed steps and cannot predict held-out ones; "
                "backtest extrapolating methods (relex, raw-ols, two-point, expo)"
            )
    if len(set(specs)) != len(specs):  # as run refuses it: every row would come twice
        raise RelexError("the same method is given twice in --methods; give each once")
    return specs


def _backtest_row(
    data: StoreGrams, spec: MethodSpec, window: list[int], targets: list[int], threshold: float
) -> BacktestRow:
    """Errors of one method on one window, summed exactly over tensors from their Grams."""
    window_steps = [data.steps[i] for i in window]
    heldout = [data.steps[j] for j in targets]
    steps = torch.tensor(window_steps, dtype=torch.float64)
    error_sum = torch.zeros(len(targets), dtype=torch.float64)
    norm_sum = torch.zeros(len(targets), dtype=torch.float64)
    per_tensor: dict[str, list[float]] = {}
    index = torch.tensor(window)
    for name, gram in data.grams.items():
        try:
            weights = combination_weights(spec, gram[index][:, index], steps, heldout)
        except RelexError as exc:
            raise RelexError(f"{spec} on window {window_steps}: {exc}") from None
        error_sq, norm_sq = heldout_error_sq(gram, window, targets, weights)
        error_sum += error_sq
        norm_sum += norm_sq
        per_tensor[name] = relative_error(error_sq, norm_sq).tolist()
    errors = relative_error(error_sum, norm_sum).tolist()
    distances = [float(s - window_steps[-1]) for s in heldout]
    label = f"{spec} (fit on steps {window_steps[0]}..{window_steps[-1]})"
    reach, line = verdict(label, distances, errors, threshold)
    return BacktestRow(
        str(spec), len(window), window_steps, heldout, distances, errors, per_tensor, reach, line
    )


def reach(
    data: StoreGrams, holdout: int, method: str | MethodSpec = "relex",
    threshold: float = DEFAULT_THRESHOLD,
) -> float | None:
    """How far ahead (in steps) `method`, fitted on every step before the last `holdout`,
    keeps its held-out error under `threshold` (None: not even the nearest step)."""
    spec = _specs([method])[0]
    train = len(data.steps) - holdout
    row = _backtest_row(data, spec, list(range(train)), list(range(train, len(data.steps))),
                        threshold)
    return row.reach


def backtest(
    store_path: str | Path,
    holdout: int,
    windows: Sequence[int | str | None] | None = None,
    methods: Sequence[str | MethodSpec] | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    out_dir: str | Path | None = None,
    plots: bool = True,
    overwrite: bool = False,
) -> BacktestResult:
    """Predict the last `holdout` observed steps from the `window` steps before them, per method.

    Errors are exact from G: ‖Δ_j − wᵀD‖² = G_jj − 2 wᵀG[:, j] + wᵀ G w; no weights are read.
    """
    if not (threshold > 0 and math.isfinite(threshold)):
        raise RelexError(f"--threshold must be a positive number, not {threshold}")
    specs = _specs(methods)
    if out_dir is not None and plots:
        from .plots import pyplot

        pyplot()  # fail before the work if matplotlib is missing
    data = load_grams(store_path)
    n_steps = len(data.steps)
    if not 1 <= holdout <= n_steps - 2:
        raise RelexError(
            f"--holdout {holdout} is not possible with {n_steps} observed steps: hold out 1 to "
            f"{n_steps - 2} so at least two remain to fit"
        )
    if out_dir is not None:
        make_out_dir(Path(out_dir), data.path, BACKTEST_FILES, overwrite)
    train = n_steps - holdout
    targets = list(range(train, n_steps))
    rows = [
        _backtest_row(data, spec, list(range(train - size, train)), targets, threshold)
        for size in _window_sizes(windows, train)
        for spec in specs
    ]
    result = BacktestResult(
        data.path, data.steps, [data.steps[j] for j in targets], threshold, rows
    )
    if out_dir is not None:
        result.files = write_backtest(result, Path(out_dir), plots)
    return result


BACKTEST_FILES = ("backtest.json", "backtest.txt", "backtest.png")


def write_backtest(result: BacktestResult, out: Path, plots: bool = True) -> list[Path]:
    """backtest.json, backtest.txt and (if plots) backtest.png under `out` (made by
    make_out_dir), all or none of them."""
    files: dict[str, bytes | str] = {
        "backtest.json": json_text(
            {
                "store": str(result.store),
                "steps": result.steps,
                "holdout_steps": result.holdout_steps,
                "threshold": result.threshold,
                "error": (
                    "relative weight-space error |pred - true| / |true| of the delta from base"
                ),
                "rows": [
                    {
                        "method": r.method,
                        "window": r.window,
                        "window_steps": r.window_steps,
                        "heldout_steps": r.heldout_steps,
                        "distances": r.distances,
                        "errors": r.errors,
                        "mean_error": r.mean_error,
                        "reach": r.reach,
                        "verdict": r.verdict,
                        "tensor_errors": r.tensor_errors,
                    }
                    for r in result.rows
                ],
            },
        )
    }
    files["backtest.txt"] = "\n".join(result.lines()) + "\n"
    if plots:
        from . import plots as figures

        curves = [(r.method, f"window {r.window}", r.distances, r.errors) for r in result.rows]
        files |= figures.drawn("backtest.png",
                               lambda: figures.backtest_errors(curves, result.threshold))
    return write_files(out, files, BACKTEST_FILES)
