"""PNG figures for the report and backtest commands; matplotlib is an optional extra.

Every function takes plain numbers (no store access) and returns one PNG's bytes: the caller
writes a command's files together (safefs.replace_files).
"""

from __future__ import annotations

import atexit
import io
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence

from .errors import RelexError

log = logging.getLogger(__name__)


def _private_config_dir() -> None:
    """Point matplotlib's config and font cache at a temporary directory removed at exit.

    Left alone, the first import writes ~/.config/matplotlib and ~/.cache/matplotlib: files
    outside OUT that the user did not ask for. Rebuilding the font list costs ~0.5 s of CPU. A
    user's own MPLCONFIGDIR is kept.
    """
    if "matplotlib" in sys.modules or os.environ.get("MPLCONFIGDIR"):
        return
    path = tempfile.mkdtemp(prefix="relex-stream-matplotlib-")
    atexit.register(shutil.rmtree, path, True)
    os.environ["MPLCONFIGDIR"] = path
    # atexit does not run when SIGTERM kills the process (a job's time limit): remove the
    # folder, then die of the signal as before
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL):
        def remove_then_die(signum: int, frame: object) -> None:
            shutil.rmtree(path, True)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

        signal.signal(signal.SIGTERM, remove_then_die)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or a RelexError saying how to get it."""
    _private_config_dir()
    # its INFO lines ("generated new fontManager") are not the user's business
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    # Agg is used whatever MPLBACKEND says; a value matplotlib does not know made its import
    # raise ValueError (a traceback)
    os.environ.pop("MPLBACKEND", None)
    try:
        import matplotlib
    except ImportError:
        raise RelexError(
            "plots need matplotlib: pip install 'relex_stream[plots]' (or matplotlib), "
            "or pass --no-plots"
        ) from None
    matplotlib.use("Agg")  # no display needed; must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, dpi=110, format="png")
    pyplot().close(fig)
    return image.getvalue()


def _horizontal() -> dict:
    """boxplot keyword for horizontal boxes: 'orientation' since matplotlib 3.10, 'vert' before."""
    import matplotlib

    major, minor = (int(x) for x in matplotlib.__version__.split(".")[:2])
    return {"orientation": "horizontal"} if (major, minor) >= (3, 10) else {"vert": False}


def coefficient_trajectories(
    panels: Sequence[tuple[str, Sequence[float], Sequence[float], float, float, float]],
) -> bytes:
    """One panel per (title, steps, coefficients, slope, intercept, R²): c_k vs t_k and its line."""
    plt = pyplot()
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        title, steps, coefficients, slope, intercept, r2 = panel
        ax.plot(steps, coefficients, "o", ms=4, label="σ₁u₁[k]")
        ends = [min(steps), max(steps)]
        fitted = [slope * t + intercept for t in ends]
        ax.plot(ends, fitted, "-", lw=1.2, label=f"line, R²={r2:.4f}")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel("rank-1 coefficient")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    return _png(fig)


def histograms(
    explained: Sequence[float],
    r_squared: Sequence[float],
    null_ev_hi: float,
    null_r2_hi: float,
) -> bytes:
    """Histograms of explained variance and R² over tensors, the median null 95% line dashed."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, values, null_hi, label in (
        (axes[0], explained, null_ev_hi, "explained variance λ₁/Σλ"),
        (axes[1], r_squared, null_r2_hi, "R² of the rank-1 coefficient line"),
    ):
        finite = [v for v in values if math.isfinite(v)]
        ax.hist(finite, bins=min(40, max(5, len(finite) // 3)), range=_bin_range(finite),
                color="tab:blue", alpha=0.8)
        if math.isfinite(null_hi):
            ax.axvline(null_hi, color="tab:red", ls="--", lw=1, label="random-walk null, 95%")
            ax.legend(fontsize=7)
        ax.set_xlabel(label)
        ax.set_ylabel("tensors")
    return _png(fig)


def _bin_range(values: Sequence[float]) -> tuple[float, float] | None:
    """The interval to bin `values` over: their own, widened about its middle when it is
    narrower than a millionth of their size (values a few ulps apart, such as explained
    variances that differ by rounding, left numpy no room for distinct bin edges: ValueError)."""
    if not values:
        return None
    low, high = min(values), max(values)
    half_width = 1e-6 * max(1.0, abs(low), abs(high))
    if high - low >= 2 * half_width:
        return low, high
    middle = low / 2 + high / 2
    return middle - half_width, middle + half_width


def drawn(name: str, draw: Callable[[], bytes]) -> dict[str, bytes]:
    """{name: the PNG `draw` makes}, or {} and a warning when matplotlib fails on the numbers:
    a figure is never worth the command's other files (nor a traceback). A missing matplotlib
    or memory is still the command's error."""
    try:
        return {name: draw()}
    except (RelexError, MemoryError):
        raise
    except Exception as exc:  # whatever matplotlib or numpy raise on odd data
        log.warning("%s is left out: drawing it failed (%s: %s); the other files are written",
                    name, type(exc).__name__, exc)
        pyplot().close("all")  # the half-drawn figure
        return {}


# A figure shows at most this many module types (those with the most elements): a shared store
# of 1,800 names outside the layer pattern made by_module.png 69,498 px tall (1.2 GB, a minute)
MAX_KINDS = 40


def largest_kinds(modules: Sequence[str], numels: Sequence[int],
                  limit: int = MAX_KINDS) -> tuple[list[str], int]:
    """(up to `limit` module types with the most elements, sorted by name; how many are left
    out), for the tensors' `modules` and element counts `numels`."""
    totals: dict[str, int] = {}
    for module, numel in zip(modules, numels, strict=True):
        totals[module] = totals.get(module, 0) + numel
    kept = sorted(totals, key=lambda kind: (-totals[kind], kind))[:limit]
    return sorted(kept), len(totals) - len(kept)


def _left_out_note(fig, left_out: int, figure: str) -> None:
    """Say on the figure, and in the log, how many module types it leaves out."""
    if left_out:
        note = (f"{left_out} module type(s) with the fewest elements left out (at most "
                f"{MAX_KINDS} shown)")
        fig.suptitle(note, fontsize=8)
        log.info("%s: %s", figure, note)


def by_layer(
    layers: Sequence[int | None],
    modules: Sequence[str],
    numels: Sequence[int],
    explained: Sequence[float],
    r_squared: Sequence[float],
) -> bytes:
    """Explained variance and R² against layer index, one colour per module type (those with
    the most elements, MAX_KINDS at most)."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    layered = [i for i, layer in enumerate(layers) if layer is not None]
    kinds, left_out = largest_kinds([modules[i] for i in layered], [numels[i] for i in layered])
    by_kind: dict[str, list[int]] = {kind: [] for kind in kinds}
    for i in layered:
        by_kind.get(modules[i], []).append(i)
    colours = plt.get_cmap("tab20")  # the default cycle repeats after 10 module types
    for n, (kind, picked) in enumerate(by_kind.items()):
        xs = [layers[i] for i in picked]
        style = {"ms": 3, "lw": 0.8, "color": colours(n % 20), "label": kind}
        axes[0].plot(xs, [explained[i] for i in picked], "o-", **style)
        axes[1].plot(xs, [r_squared[i] for i in picked], "o-", **style)
    axes[0].set_ylabel("explained variance")
    axes[1].set_ylabel("R² of line")
    axes[1].set_xlabel("layer")
    axes[1].xaxis.get_major_locator().set_params(integer=True)
    if kinds:
        axes[0].legend(fontsize=6, ncol=2)
    _left_out_note(fig, left_out, "by_layer.png")
    return _png(fig)


def by_module(
    modules: Sequence[str],
    numels: Sequence[int],
    explained: Sequence[float],
    r_squared: Sequence[float],
) -> bytes:
    """Box plots of explained variance and R² per module type (those with the most elements,
    MAX_KINDS at most: the figure's height follows their number)."""
    plt = pyplot()
    kinds, left_out = largest_kinds(modules, numels)
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.35 * len(kinds) + 1.8))
    for ax, values, label in (
        (axes[0], explained, "explained variance"),
        (axes[1], r_squared, "R²"),
    ):
        shown: dict[str, list[float]] = {kind: [] for kind in kinds}
        for module, value in zip(modules, values, strict=True):
            if math.isfinite(value):
                shown.get(module, []).append(value)
        ax.boxplot([found or [math.nan] for found in shown.values()], **_horizontal())
        ax.set_yticks(range(1, len(kinds) + 1), kinds, fontsize=7)
        ax.set_xlabel(label)
    _left_out_note(fig, left_out, "by_module.png")
    return _png(fig)


def backtest_errors(
    curves: Sequence[tuple[str, str, Sequence[float], Sequence[float]]],
    threshold: float,
) -> bytes:
    """Overall relative error against distance: (method, window, xs, errors), colour per method."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    methods = list(dict.fromkeys(method for method, _, _, _ in curves))
    windows = list(dict.fromkeys(window for _, window, _, _ in curves))
    colours = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    dashes = ("-", "--", ":", "-.")
    for method, window, distances, errors in curves:
        label = method if len(windows) == 1 else f"{method} [{window}]"
        ax.plot(
            distances,
            errors,
            marker="o",
            ms=4,
            label=label,
            color=colours(methods.index(method) % colours.N),
            ls=dashes[windows.index(window) % len(dashes)],
        )
    ax.axhline(threshold, color="black", ls="--", lw=0.8, label=f"threshold {threshold:g}")
    positive = [e for _, _, _, errors in curves for e in errors if math.isfinite(e) and e > 0]
    if positive and max(positive) / min(positive) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("extrapolation distance (steps past the window's last step)")
    ax.set_ylabel("‖Δ̂ − Δ‖ / ‖Δ‖ (all tensors)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def timeline_png(rows: Sequence[dict], targets: Sequence[str]) -> bytes:
    """A watched run, as PNG bytes (watch writes them inside the store itself): explained
    variance and R² with their null's 95% against the step, and the prediction drift of each
    target (log scale)."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    steps = [r["step"] for r in rows]
    for key, null_key, label in (
        ("explained_variance", "null_ev_p95", "explained variance"),
        ("r_squared", "null_r2_p95", "R² of the rank-1 line"),
    ):
        line = axes[0].plot(steps, [_nan(r[key]) for r in rows], "o-", ms=3, label=label)
        axes[0].plot(steps, [_nan(r[null_key]) for r in rows], "--", lw=0.8,
                     color=line[0].get_color(), label=f"{label}: random-walk null, 95%")
    axes[0].set_ylabel("whole model")
    axes[0].legend(fontsize=7)
    for target in targets:
        values = [_nan(r["drift"].get(target)) for r in rows]
        axes[1].plot(steps, values, "o-", ms=3, label=f"target {target}")
    if any(math.isfinite(v) and v > 0 for r in rows for v in map(_nan, r["drift"].values())):
        axes[1].set_yscale("log")
    axes[1].set_ylabel("prediction drift ‖ΔŴ_T‖ / ‖Ŵ_T − W₀‖")
    axes[1].set_xlabel("last observed step")
    axes[1].legend(fontsize=7)
    return _png(fig)


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)
