"""The report and backtest commands: diagnostics and held-out errors from a store's Grams alone.

Neither command reads a weight: the store keeps each tensor's Gram matrix G (K, K), and
every statistic and every held-out error follows from G and the steps (DESIGN.md §1).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import store
from .diagnostics import TensorStats, heldout_error_sq, relative_error, tensor_stats
from .errors import RelexError
from .methods import MethodSpec, combination_weights, parse_method
from .safetensors_io import FLOAT_CODES

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("relex", "raw-ols", "two-point")
DEFAULT_THRESHOLD = 0.3
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.(.+)$")


# ---------------------------------------------------------------------------------------------
# Reading the store


@dataclass(frozen=True)
class StoreGrams:
    """The Gram matrices of a store's finished floating-point tensors, and its steps."""

    path: Path
    steps: list[int]
    grams: dict[str, torch.Tensor]  # name -> (K, K) float64
    numel: dict[str, int]
    incomplete: list[str]  # tensors an interrupted run did not finish; left out
    approximate: list[str]  # tensors with a randomized low-rank Gram (--svd randomized); left out


def _store_path(path: Path) -> Path:
    """Accept the store itself or a run's --out directory that holds trajectory.zarr."""
    nested = path / "trajectory.zarr"
    return nested if not (path / "zarr.json").exists() and nested.exists() else path


def load_grams(store_path: str | Path) -> StoreGrams:
    """Every finished float tensor's Gram matrix from the store; aliases and int tensors skipped."""
    path = _store_path(Path(store_path))
    root = store.open_existing(path)
    if root is None:
        raise RelexError(
            f"no trajectory store at {path}: pass the trajectory.zarr that `run` wrote "
            "(by default OUT/trajectory.zarr)"
        )
    meta = store.attrs(root)
    aliases = meta.get("aliases", {})
    grams: dict[str, torch.Tensor] = {}
    numel: dict[str, int] = {}
    incomplete: list[str] = []
    approximate: list[str] = []
    for name, (code, shape) in meta["layout"]["tensors"].items():
        if code not in FLOAT_CODES or name in aliases:
            continue  # copied from the base, or stored once under its source name
        if not store.is_complete(root, name):
            incomplete.append(name)
        elif store.gram_kind(root, name) != "exact":
            # A low-rank approximation of G: explained variance, null and errors would be wrong.
            approximate.append(name)
        else:
            grams[name] = store.read_gram(root, name)
            numel[name] = math.prod(shape)
    _warn_left_out(path, incomplete, approximate)
    if not grams:
        raise RelexError(
            f"the store at {path} has no finished floating-point tensor with an exact Gram "
            "matrix; rerun `run` to finish it"
            + (", with --svd exact --rebuild" if approximate else "")
        )
    steps = [int(s) for s in meta["steps"]]
    return StoreGrams(path, steps, grams, numel, incomplete, approximate)


def _warn_left_out(path: Path, incomplete: list[str], approximate: list[str]) -> None:
    """Say which tensors the statistics leave out, and how to bring them in."""
    if incomplete:
        log.warning(
            "%d tensor(s) in %s were not finished by an interrupted run and are left out; "
            "rerun `run` with the same --cache to finish them",
            len(incomplete),
            path,
        )
    if approximate:
        log.warning(
            "%d tensor(s) in %s hold a randomized low-rank Gram matrix (--svd randomized) and are "
            "left out; rebuild the store with `run --svd exact --rebuild` to include them",
            len(approximate),
            path,
        )


def tensor_group(name: str) -> tuple[int | None, str]:
    """(layer index or None, module type) of a tensor name, e.g. (3, 'self_attn.q_proj')."""
    match = _LAYER_RE.search(name)
    layer, rest = (int(match.group(1)), match.group(2)) if match else (None, name)
    if rest.startswith("model."):
        rest = rest[len("model.") :]
    rest = re.sub(r"\.\d+\.", ".*.", rest)  # experts.7.down_proj -> experts.*.down_proj
    return layer, rest.removesuffix(".weight")


def _finite(values: Sequence[float]) -> list[float]:
    """The finite values, in order."""
    return [v for v in values if math.isfinite(v)]


def _quantile_text(values: Sequence[float]) -> str:
    """min, 5%, median, 95%, max of the finite values, as aligned columns."""
    finite = sorted(_finite(values))
    if not finite:
        return "n/a"
    q = torch.quantile(
        torch.tensor(finite, dtype=torch.float64),
        torch.tensor([0.0, 0.05, 0.5, 0.95, 1.0], dtype=torch.float64),
    )
    return "  ".join(f"{float(x):7.4f}" for x in q)


def _clean(value: object) -> object:
    """JSON-safe: nan/inf become null, tuples lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _write_json(path: Path, data: dict) -> Path:
    """Strict JSON (no NaN) at `path`."""
    path.write_text(json.dumps(_clean(data), indent=1, allow_nan=False) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# report


@dataclass(frozen=True)
class TensorReport:
    """One tensor's diagnostics with where it sits in the model."""

    name: str
    layer: int | None
    module: str
    numel: int
    stats: TensorStats

    def row(self) -> dict[str, object]:
        """Scalar columns for the CSV."""
        fit, null = self.stats.fit, self.stats.null
        nan3 = (math.nan,) * 3
        ev_band = null.explained_variance if null else nan3
        r2_band = null.r_squared if null else nan3
        return {
            "name": self.name,
            "layer": "" if self.layer is None else self.layer,
            "module": self.module,
            "numel": self.numel,
            "explained_variance": fit.explained_variance,
            "spectral_gap": fit.spectral_gap,
            "r_squared": fit.r_squared,
            "slope": fit.slope,
            "intercept": fit.intercept,
            "path_efficiency": self.stats.path_efficiency,
            "null_ev_p05": ev_band[0],
            "null_ev_p50": ev_band[1],
            "null_ev_p95": ev_band[2],
            "null_r2_p05": r2_band[0],
            "null_r2_p50": r2_band[1],
            "null_r2_p95": r2_band[2],
            "ev_p_value": null.ev_p_value if null else math.nan,
            "r2_p_value": null.r2_p_value if null else math.nan,
        }


def _stats_json(stats: TensorStats) -> dict:
    """The JSON record of one trajectory's statistics (nan left for _clean)."""
    fit, null = stats.fit, stats.null
    return {
        "explained_variance": fit.explained_variance,
        "spectral_gap": fit.spectral_gap,
        "sigma": fit.sigma,
        "coefficients": fit.coefficients,
        "slope": fit.slope,
        "intercept": fit.intercept,
        "r_squared": fit.r_squared,
        "path_efficiency": stats.path_efficiency,
        "null": None
        if null is None
        else {
            "samples": null.samples,
            "quantiles": [0.05, 0.5, 0.95],
            "explained_variance": null.explained_variance,
            "r_squared": null.r_squared,
            "ev_p_value": null.ev_p_value,
            "r2_p_value": null.r2_p_value,
        },
    }


@dataclass
class ReportResult:
    """What `report` found: per-tensor diagnostics plus the whole model's (Grams summed)."""

    store: Path
    steps: list[int]
    tensors: list[TensorReport]
    model: TensorStats  # the concatenation of all tensors: Gram = Σ_tensors G
    null_samples: int
    seed: int
    files: list[Path] = field(default_factory=list)

    def by_name(self, name: str) -> TensorReport:
        """The report of tensor `name`."""
        return next(t for t in self.tensors if t.name == name)

    @property
    def straight(self) -> bool | None:
        """Whole-model explained variance and R² both above the null's 95%; None without null."""
        if self.model.null is None:
            return None
        return self.model.ev_above_null and self.model.r2_above_null

    def lines(self) -> list[str]:
        """The text summary."""
        n_params = sum(t.numel for t in self.tensors)
        out = [
            f"store: {self.store}; {len(self.tensors)} tensors ({n_params:,} parameters); "
            f"{len(self.steps)} observed steps ({self.steps[0]}..{self.steps[-1]})",
            f"{'':28s}{'min':>7s}  {'5%':>7s}  {'median':>7s}  {'95%':>7s}  {'max':>7s}",
        ]
        columns = (
            ("explained variance λ₁/Σλ", lambda t: t.stats.fit.explained_variance),
            ("R² of rank-1 line", lambda t: t.stats.fit.r_squared),
            ("spectral gap σ₂/σ₁", lambda t: t.stats.fit.spectral_gap),
            ("path efficiency", lambda t: t.stats.path_efficiency),
        )
        for label, get in columns:
            out.append(f"{label:28s}{_quantile_text([get(t) for t in self.tensors])}")
        out.append(f"whole model: {_stats_text(self.model)}")
        out += self._null_lines()
        out += self._worst_lines()
        return out

    def _null_lines(self) -> list[str]:
        """How many tensors beat their random-walk null, and the whole-model verdict."""
        if self.model.null is None:
            return ["random-walk null: skipped (--null-samples 0)"]
        total = sum(t.numel for t in self.tensors) or 1
        lines = [
            f"random-walk null: {self.model.null.samples} sign-flipped walks of the same "
            f"increments per tensor (seed {self.seed}); above its 95% quantile:"
        ]
        for label, above in (
            ("explained variance", lambda s: s.ev_above_null),
            ("R²", lambda s: s.r2_above_null),
        ):
            hits = [t for t in self.tensors if above(t.stats)]
            share = sum(t.numel for t in hits) / total
            lines.append(
                f"  {label}: {len(hits)}/{len(self.tensors)} tensors "
                f"({100 * share:.1f}% of parameters)"
            )
        if self.straight:
            lines.append(
                "verdict: the path is straighter than a random walk of the same steps; "
                "extrapolation is plausible (measure it with `backtest`)"
            )
        else:
            lines.append(
                "verdict: the path is not distinguishable from a random walk of the same "
                "steps; do not trust extrapolation"
            )
        return lines

    def _worst_lines(self, count: int = 5) -> list[str]:
        """The least straight tensors, ill-defined directions and tensors that never moved."""
        lines = []
        for label, key in (
            ("lowest R²", lambda t: t.stats.fit.r_squared),
            ("lowest explained variance", lambda t: t.stats.fit.explained_variance),
        ):
            ranked = sorted((t for t in self.tensors if math.isfinite(key(t))), key=key)[:count]
            lines.append(f"{label}: " + ", ".join(f"{t.name} ({key(t):.4f})" for t in ranked))
        loose = [t.name for t in self.tensors if t.stats.fit.spectral_gap > 0.9]
        if loose:
            shown = ", ".join(loose[:count]) + (" ..." if len(loose) > count else "")
            lines.append(f"direction ill-defined (σ₂/σ₁ > 0.9) in {len(loose)} tensor(s): {shown}")
        moved = [t for t in self.tensors if not math.isfinite(t.stats.fit.explained_variance)]
        if moved:
            lines.append(f"{len(moved)} tensor(s) never moved (all deltas zero)")
        return lines


def _stats_text(stats: TensorStats) -> str:
    """One line: a trajectory's explained variance, R², gap, path efficiency and null band."""
    fit, null = stats.fit, stats.null
    text = (
        f"explained variance {fit.explained_variance:.4f}, R² {fit.r_squared:.4f}, "
        f"σ₂/σ₁ {fit.spectral_gap:.3f}, path efficiency {stats.path_efficiency:.3f}"
    )
    if null is not None:
        ev, r2 = null.explained_variance, null.r_squared
        text += (
            f"; null 5–95%: explained variance {ev[0]:.4f}–{ev[2]:.4f}, R² {r2[0]:.4f}–{r2[2]:.4f}"
        )
    return text


def report(
    store_path: str | Path,
    out_dir: str | Path | None = None,
    null_samples: int = 200,
    seed: int = 0,
    plots: bool = True,
) -> ReportResult:
    """Diagnostics of every stored tensor; with out_dir, write JSON, CSV, summary and PNGs."""
    if null_samples < 0:
        raise RelexError(f"--null-samples must be 0 (no null) or more, not {null_samples}")
    if out_dir is not None and plots:
        from .plots import pyplot

        pyplot()  # fail before the work if matplotlib is missing
    data = load_grams(store_path)
    steps = torch.tensor(data.steps, dtype=torch.float64)
    tensors = [
        TensorReport(
            name,
            *tensor_group(name),
            data.numel[name],
            tensor_stats(gram, steps, null_samples, seed),
        )
        for name, gram in data.grams.items()
    ]
    whole = torch.stack(list(data.grams.values())).sum(0)  # Gram of all tensors concatenated
    result = ReportResult(
        data.path,
        data.steps,
        tensors,
        tensor_stats(whole, steps, null_samples, seed),
        null_samples,
        seed,
    )
    if out_dir is not None:
        result.files = write_report(result, Path(out_dir), plots)
    return result


def write_report(result: ReportResult, out: Path, plots: bool = True) -> list[Path]:
    """report.json, report.csv, summary.txt and (if plots) PNG figures under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    files = [
        _write_json(
            out / "report.json",
            {
                "store": str(result.store),
                "steps": result.steps,
                "null_samples": result.null_samples,
                "seed": result.seed,
                "model": _stats_json(result.model),
                "tensors": [
                    {
                        "name": t.name,
                        "layer": t.layer,
                        "module": t.module,
                        "numel": t.numel,
                        **_stats_json(t.stats),
                    }
                    for t in result.tensors
                ],
            },
        )
    ]
    csv_path = out / "report.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(result.tensors[0].row()))
        writer.writeheader()
        writer.writerows(t.row() for t in result.tensors)
    files.append(csv_path)
    summary = out / "summary.txt"
    summary.write_text("\n".join(result.lines()) + "\n")
    files.append(summary)
    if plots:
        files += _report_plots(result, out)
    return files


def _representatives(result: ReportResult) -> list[TensorReport]:
    """Largest tensor, best / median / worst R², lowest explained variance; no repeats."""
    fitted = sorted(
        (t for t in result.tensors if math.isfinite(t.stats.fit.r_squared)),
        key=lambda t: t.stats.fit.r_squared,
    )
    if not fitted:
        return []
    picks = [
        max(result.tensors, key=lambda t: t.numel),
        fitted[-1],
        fitted[len(fitted) // 2],
        fitted[0],
        min(fitted, key=lambda t: t.stats.fit.explained_variance),
    ]
    unique: dict[str, TensorReport] = {}
    for pick in picks:
        if math.isfinite(pick.stats.fit.r_squared):
            unique.setdefault(pick.name, pick)
    return list(unique.values())


def _report_plots(result: ReportResult, out: Path) -> list[Path]:
    """coefficients.png, histograms.png, by_layer.png and by_module.png under `out`."""
    from . import plots

    def panel(title: str, stats: TensorStats) -> tuple:
        fit = stats.fit
        return (title, result.steps, fit.coefficients, fit.slope, fit.intercept, fit.r_squared)

    panels = [panel("whole model", result.model)]
    panels += [panel(t.name, t.stats) for t in _representatives(result)]
    explained = [t.stats.fit.explained_variance for t in result.tensors]
    r_squared = [t.stats.fit.r_squared for t in result.tensors]
    modules = [t.module for t in result.tensors]

    def null_median(band: str) -> float:
        """Median over tensors of the null's 95% quantile of `band`, for a reference line."""
        tops = _finite([getattr(t.stats.null, band)[2] for t in result.tensors if t.stats.null])
        return float(torch.tensor(tops).median()) if tops else math.nan

    return [
        plots.coefficient_trajectories(out / "coefficients.png", panels),
        plots.histograms(
            out / "histograms.png",
            explained,
            r_squared,
            null_median("explained_variance"),
            null_median("r_squared"),
        ),
        plots.by_layer(
            out / "by_layer.png", [t.layer for t in result.tensors], modules, explained, r_squared
        ),
        plots.by_module(out / "by_module.png", modules, explained, r_squared),
    ]


# ---------------------------------------------------------------------------------------------
# backtest


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
        finite = _finite(self.errors)
        return sum(finite) / len(finite) if finite else math.nan

    def label(self, with_window: bool) -> str:
        """The method, with its window size when several windows were compared."""
        return f"{self.method} [window {self.window}]" if with_window else self.method


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
            f"steps) has error {errors[0]:.3f}, above the threshold {threshold:g}"
        )
    if reach == distances[-1]:
        return reach, (
            f"{label}: error stays under {threshold:g} at every held-out step, up to "
            f"+{reach:g} steps ahead (largest {max(errors):.3f})"
        )
    after = len([d for d in distances if d <= reach])
    return reach, (
        f"{label}: error stays under {threshold:g} up to +{reach:g} steps ahead; at "
        f"+{distances[after]:g} it is {errors[after]:.3f}"
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
        head = "".join(f"{s:>9d}" for s in self.holdout_steps)
        dist = "".join(f"{'+' + format(d, 'g'):>9s}" for d in self.rows[0].distances)
        out = [
            f"backtest of {self.store}: predict the last {len(self.holdout_steps)} observed "
            "steps from earlier ones; relative error ‖Δ̂ − Δ‖/‖Δ‖ over all tensors",
            f"{'held-out step':{width}s}{head}{'mean':>9s}",
            f"{'distance':{width}s}{dist}",
        ]
        for label, row in zip(labels, self.rows, strict=True):
            cells = "".join(f"{e:9.4f}" for e in row.errors)
            out.append(f"{label:{width}s}{cells}{row.mean_error:9.4f}")
        out += [row.verdict for row in self.rows]
        best = self.ranking()[0]
        out.append(f"lowest mean error: {best.label(many)} ({best.mean_error:.4f})")
        return out


def parse_windows(text: str) -> list[int | str]:
    """'4,6,all' -> [4, 6, 'all']."""
    windows: list[int | str] = []
    for part in text.split(","):
        part = part.strip()
        if part == "all":
            windows.append(part)
        elif part.isdigit():
            windows.append(int(part))
        else:
            raise RelexError(f"--windows {text!r}: give window sizes like 4,8,all")
    return windows


def _window_sizes(windows: Sequence[int | str] | None, train: int) -> list[int]:
    """Distinct window sizes, 'all' resolved to the `train` steps before the held-out ones."""
    sizes = []
    for window in windows or ["all"]:
        size = train if window == "all" else int(window)
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


def backtest(
    store_path: str | Path,
    holdout: int,
    windows: Sequence[int | str] | None = None,
    methods: Sequence[str | MethodSpec] | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    out_dir: str | Path | None = None,
    plots: bool = True,
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


def write_backtest(result: BacktestResult, out: Path, plots: bool = True) -> list[Path]:
    """backtest.json and (if plots) backtest.png under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    files = [
        _write_json(
            out / "backtest.json",
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
    ]
    (out / "backtest.txt").write_text("\n".join(result.lines()) + "\n")
    files.append(out / "backtest.txt")
    if plots:
        from . import plots as figures

        curves = [(r.method, f"window {r.window}", r.distances, r.errors) for r in result.rows]
        files.append(figures.backtest_errors(out / "backtest.png", curves, result.threshold))
    return files
