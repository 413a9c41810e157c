"""The report command: per-tensor diagnostics from a store's Gram matrices alone.

No weight is read: the store keeps each tensor's Gram matrix G (K, K), and every statistic
follows from G and the steps (docs/DESIGN.md §1). backtest.py builds on the loading code here.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .diagnostics import TensorStats, tensor_stats
from .errors import NotAStore, RelexError
from .safefs import replace_files
from .store import TrajectoryStore

log = logging.getLogger(__name__)

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.(.+)$")


# ---------------------------------------------------------------------------------------------
# Reading the store


@dataclass(frozen=True)
class StoreGrams:
    """The Gram matrices of a store's floating-point tensors, and its steps."""

    path: Path
    steps: list[int]
    grams: dict[str, torch.Tensor]  # name -> (K, K) float64
    numel: dict[str, int]
    support: dict[str, int]  # name -> elements where some stored row differs from the base
    approximate: list[str]  # tensors with a randomized low-rank Gram (--svd randomized); left out


def _store_path(path: Path) -> Path:
    """Accept the store itself or a run's --out directory that holds trajectory.zarr."""
    nested = path / "trajectory.zarr"
    return nested if not (path / "zarr.json").exists() and nested.exists() else path


_PASS_A_STORE = "pass the trajectory.zarr that `run` wrote (by default OUT/trajectory.zarr)"


def _open_store(path: Path) -> TrajectoryStore:
    """The store at `path`, opened with a shared lock; RelexError worded for report and backtest
    (the store's own says to pass another --cache, which they do not have) when it is none."""
    try:
        if TrajectoryStore.probe(path) != "store":
            raise RelexError(f"no trajectory store at {path}: {_PASS_A_STORE}")
        return TrajectoryStore.open(path, lock="shared")
    except NotAStore as exc:
        raise RelexError(f"{exc.fact}: {_PASS_A_STORE}") from None


def load_grams(store_path: str | Path) -> StoreGrams:
    """Every float tensor's exact Gram matrix from the store (tied copies are stored once)."""
    path = _store_path(Path(store_path))
    grams: dict[str, torch.Tensor] = {}
    numel: dict[str, int] = {}
    support: dict[str, int] = {}
    approximate: list[str] = []
    with _open_store(path) as store:
        steps = store.steps
        for group in store.groups():
            if not group.has_rows:
                continue  # copied from the base
            record = store.record(group)
            stacked = store.grams(group)
            for i, (name, count) in enumerate(zip(group.tensors, group.numels, strict=True)):
                if record.kinds[name] != "exact":
                    # A low-rank approximation of G: explained variance, null and errors would
                    # be wrong.
                    approximate.append(name)
                    continue
                grams[name] = torch.from_numpy(stacked[i].copy())
                numel[name] = count
                support[name] = record.support[name]
    if approximate:
        log.warning(
            "%d tensor(s) in %s hold a randomized low-rank Gram matrix (--svd randomized) and are "
            "left out; rebuild the store with `run --svd exact --rebuild` to include them",
            len(approximate),
            path,
        )
    if not grams:
        raise RelexError(
            f"the store at {path} has no floating-point tensor with an exact Gram matrix"
            + ("; rebuild it with `run --svd exact --rebuild`" if approximate else "")
        )
    return StoreGrams(path, steps, grams, numel, support, approximate)


def tensor_group(name: str) -> tuple[int | None, str]:
    """(layer index or None, module type) of a tensor name, e.g. (3, 'self_attn.q_proj')."""
    match = _LAYER_RE.search(name)
    layer, rest = (int(match.group(1)), match.group(2)) if match else (None, name)
    if rest.startswith("model."):
        rest = rest[len("model.") :]
    rest = re.sub(r"\.\d+\.", ".*.", rest)  # experts.7.down_proj -> experts.*.down_proj
    return layer, rest.removesuffix(".weight")


def finite_values(values: Sequence[float]) -> list[float]:
    """The finite values, in order."""
    return [v for v in values if math.isfinite(v)]


def _quantile_text(values: Sequence[float]) -> str:
    """min, 5%, median, 95%, max of the finite values, as aligned columns."""
    finite = sorted(finite_values(values))
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


def json_text(data: dict) -> str:
    """Strict JSON (no NaN: null instead) of `data`, as a file's text."""
    return json.dumps(_clean(data), indent=1, allow_nan=False) + "\n"


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
    support: int  # elements where some stored step differs from the base

    @property
    def support_fraction(self) -> float:
        return self.support / self.numel if self.numel else math.nan

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
            "support_fraction": self.support_fraction,
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
        support = sum(t.support for t in self.tensors) / max(1, n_params)
        out = [
            f"store: {self.store}; {len(self.tensors)} tensors ({n_params:,} parameters); "
            f"{len(self.steps)} observed steps ({self.steps[0]}..{self.steps[-1]}); "
            f"{100 * support:.1f}% of the parameters changed at some step",
            f"{'':28s}{'min':>7s}  {'5%':>7s}  {'median':>7s}  {'95%':>7s}  {'max':>7s}",
        ]
        columns = (
            ("explained variance λ₁/Σλ", lambda t: t.stats.fit.explained_variance),
            ("R² of rank-1 line", lambda t: t.stats.fit.r_squared),
            ("spectral gap σ₂/σ₁", lambda t: t.stats.fit.spectral_gap),
            ("path efficiency", lambda t: t.stats.path_efficiency),
            ("support (changed share)", lambda t: t.support_fraction),
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
    overwrite: bool = False,
) -> ReportResult:
    """Diagnostics of every stored tensor; with out_dir, write JSON, CSV, summary and PNGs
    (files of those names already there are replaced only with `overwrite`)."""
    if null_samples < 0:
        raise RelexError(f"--null-samples must be 0 (no null) or more, not {null_samples}")
    if out_dir is not None and plots:
        from .plots import pyplot

        pyplot()  # fail before the work if matplotlib is missing
    data = load_grams(store_path)
    if out_dir is not None:
        make_out_dir(Path(out_dir), data.path, REPORT_FILES, overwrite)
    steps = torch.tensor(data.steps, dtype=torch.float64)
    tensors = [
        TensorReport(
            name,
            *tensor_group(name),
            data.numel[name],
            tensor_stats(gram, steps, null_samples, seed),
            data.support[name],
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


REPORT_FILES = ("report.json", "report.csv", "summary.txt", "coefficients.png",
                "histograms.png", "by_layer.png", "by_module.png")


def make_out_dir(out: Path, store: Path, names: tuple[str, ...], overwrite: bool) -> None:
    """The directory report or backtest writes its files `names` to, made; RelexError when it
    is not one, lies inside the store (the store holds only what a run wrote; beside it, as in
    a run's OUT, is fine), already holds one of `names` and `overwrite` is off (it may be the
    user's), or holds a directory under one of them (no file can replace it). Checked before
    the work so a mistake costs nothing; the files are written later, as one set."""
    if out.resolve().is_relative_to(store.resolve()):
        raise RelexError(f"--out {out} is inside the store {store}; give --out a directory "
                         "outside the store")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RelexError(f"cannot make --out {out}: {exc.strerror or exc}; give a directory "
                         "(new or existing) that can be written") from None
    present = [name for name in names if os.path.lexists(out / name)]
    if present and not overwrite:
        raise RelexError(f"--out {out} already holds {', '.join(present)}; pass --overwrite to "
                         "replace them, or give another --out")
    for name in present:
        if (out / name).is_dir() and not (out / name).is_symlink():
            raise RelexError(f"--out {out} holds a directory {name}; move it away or give "
                             "another --out")


def write_files(out: Path, files: dict[str, bytes | str], names: tuple[str, ...]) -> list[Path]:
    """`files` in `out` as one set (safefs.replace_files); a file of `names` the set lacks (a
    PNG, with --no-plots) is removed with the renames: it would describe another store. Without
    --overwrite make_out_dir found none of `names` there, so nothing of the user's is removed."""
    return replace_files(out, files, stale=[name for name in names if name not in files])


def write_report(result: ReportResult, out: Path, plots: bool = True) -> list[Path]:
    """report.json, report.csv, summary.txt and (if plots) PNG figures under `out` (made by
    make_out_dir), all or none of them."""
    files: dict[str, bytes | str] = {
        "report.json": json_text(
            {
                "store": str(result.store),
                "steps": result.steps,
                "null_samples": result.null_samples,
                "seed": result.seed,
                "support_fraction": sum(t.support for t in result.tensors)
                / max(1, sum(t.numel for t in result.tensors)),
                "model": _stats_json(result.model),
                "tensors": [
                    {
                        "name": t.name,
                        "layer": t.layer,
                        "module": t.module,
                        "numel": t.numel,
                        "support": t.support,
                        **_stats_json(t.stats),
                    }
                    for t in result.tensors
                ],
            },
        )
    }
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(result.tensors[0].row()))
    writer.writeheader()
    writer.writerows(t.row() for t in result.tensors)
    files["report.csv"] = table.getvalue()
    files["summary.txt"] = "\n".join(result.lines()) + "\n"
    if plots:
        files |= _report_plots(result)
    return write_files(out, files, REPORT_FILES)


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


def _report_plots(result: ReportResult) -> dict[str, bytes]:
    """coefficients.png, histograms.png, by_layer.png and by_module.png: name -> PNG bytes."""
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
        tops = finite_values(
            [getattr(t.stats.null, band)[2] for t in result.tensors if t.stats.null]
        )
        return float(torch.tensor(tops).median()) if tops else math.nan

    layers = [t.layer for t in result.tensors]
    numels = [t.numel for t in result.tensors]
    return (
        plots.drawn("coefficients.png", lambda: plots.coefficient_trajectories(panels))
        | plots.drawn("histograms.png", lambda: plots.histograms(
            explained, r_squared, null_median("explained_variance"), null_median("r_squared")))
        | plots.drawn("by_layer.png",
                      lambda: plots.by_layer(layers, modules, numels, explained, r_squared))
        | plots.drawn("by_module.png",
                      lambda: plots.by_module(modules, numels, explained, r_squared))
    )
