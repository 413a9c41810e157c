"""Command-line parsers and handlers for `report` and `backtest` (hooked into cli.py)."""

from __future__ import annotations

import argparse

from .backtest import DEFAULT_METHODS, DEFAULT_THRESHOLD
from .request import usable_path
from .units import argtype, parse_count, parse_float, parse_positive_int, parse_step, parse_windows

METHOD_HELP = (
    "methods to compare (default: relex raw-ols two-point): relex[:rank=R,fit=linear|poly:D], "
    "raw-ols[:fit=...], two-point[:from=A,to=B] (0 = base; default first and last step of the "
    "window), expo:alpha=X[,from=K] (default K: the window's last step)"
)


def add_report_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the `report` and `backtest` subcommands to the main parser's subparsers."""
    p = sub.add_parser(
        "report",
        help="diagnose a stored trajectory: is it a straight rank-1 line? (no weight reads)",
        description="From the store's Gram matrices alone, per tensor and for the whole model: "
        "explained variance λ₁/Σλ, spectral gap σ₂/σ₁, the rank-1 coefficient trajectory and "
        "the R² of its line, path efficiency, and a random-walk null (the same increments with "
        "random signs) for explained variance and R².",
    )
    p.add_argument("store", help="trajectory store (OUT/trajectory.zarr of a run, or OUT)")
    p.add_argument("--out", type=argtype(usable_path, "--out"),
                   help="write report.json, report.csv, summary.txt and PNGs here")
    p.add_argument(
        "--null-samples",
        type=argtype(parse_count, "--null-samples", 100_000),
        default=200,
        help="random-sign walks per tensor for the null (default 200; 0: none)",
    )
    p.add_argument("--seed", type=argtype(parse_step, "--seed"), default=0,
                   help="seed of the null's signs (default 0)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs (no matplotlib needed)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace report files already in --out (a rerun's)")

    p = sub.add_parser(
        "backtest",
        help="measure held-out prediction error of each method from the store (no weight reads)",
        description="Predict each of the last --holdout observed checkpoints from the steps "
        "before them, for every method and window, and report the relative weight-space error "
        "‖Δ̂ − Δ‖/‖Δ‖, computed exactly from the stored Gram matrices.",
    )
    p.add_argument("store", help="trajectory store (OUT/trajectory.zarr of a run, or OUT)")
    p.add_argument(
        "--holdout", type=argtype(parse_positive_int, "--holdout", 1_000_000), required=True,
        help="number of last observed steps to predict"
    )
    p.add_argument(
        "--windows",
        default="all",
        help="fit on the last N steps before the held-out ones: e.g. 4,8,all (default all)",
    )
    p.add_argument(
        "--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="METHOD", help=METHOD_HELP
    )
    p.add_argument(
        "--threshold",
        type=argtype(parse_float, "--threshold"),
        default=DEFAULT_THRESHOLD,
        help=f"largest acceptable relative error for the verdict (default {DEFAULT_THRESHOLD})",
    )
    p.add_argument("--out", type=argtype(usable_path, "--out"),
                   help="write backtest.json, backtest.txt and backtest.png here")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG (no matplotlib needed)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace backtest files already in --out (a rerun's)")


def run_report(args: argparse.Namespace) -> None:
    """Handler of `report`: compute, print the summary, write files when --out is given."""
    from .report import report

    result = report(args.store, args.out, args.null_samples, args.seed, not args.no_plots,
                    args.overwrite)
    for line in result.lines():
        print(line)
    if result.files:
        print(f"wrote {len(result.files)} files to {args.out}")
    else:
        print("pass --out DIR to write JSON, CSV and plots")


def run_backtest(args: argparse.Namespace) -> None:
    """Handler of `backtest`: compute, print the table and verdicts, write files with --out."""
    from .backtest import backtest

    result = backtest(
        args.store,
        holdout=args.holdout,
        windows=parse_windows(args.windows, "--windows"),
        methods=args.methods,
        threshold=args.threshold,
        out_dir=args.out,
        plots=not args.no_plots,
        overwrite=args.overwrite,
    )
    for line in result.lines():
        print(line)
    if result.files:
        print(f"wrote {len(result.files)} files to {args.out}")


REPORT_HANDLERS = {"report": run_report, "backtest": run_backtest}
