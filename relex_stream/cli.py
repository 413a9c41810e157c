"""The command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from typing import NoReturn

from .envvars import message_rank
from .errors import RelexError
from .report_cli import REPORT_HANDLERS, add_report_parsers
from .units import (
    DEFAULT_MAX_MEMORY,
    MAX_RANK,
    argtype,
    parse_duration,
    parse_float,
    parse_positive_int,
    parse_step,
    parse_steps,
    parse_windows,
)

log = logging.getLogger("relex_stream")


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="predict checkpoints at target steps from observed ones",
        description="Predict the checkpoint at each --target step from the observed checkpoints "
        "(RELEX rank-1). Works from sources (--base with --runs or --ckpt) or from a store "
        "(--cache) alone.",
    )
    p.add_argument("--base", help="the checkpoint the RL run started from (step 0)")
    p.add_argument(
        "--runs", help="directory of step checkpoints (checkpoint-N, global_step_N, ...)"
    )
    p.add_argument(
        "--ckpt",
        action="append",
        metavar="STEP=PATH",
        help="an observed checkpoint, named explicitly (repeatable; instead of --runs)",
    )
    p.add_argument("--target", required=True, help="target step(s): 500 or 500,750,1000")
    p.add_argument("--out", required=True, help="output directory; one step-T/ per target")
    p.add_argument("--steps", help="observed steps to use: ranges and lists, e.g. 1-75 or 10,20,40")
    p.add_argument(
        "--window",
        help="fit on the last N observed steps; several (e.g. 10,20,all) write one output each",
    )
    g = p.add_argument_group(
        "methods",
        "Every method is a linear combination of the observed deltas, so several methods, "
        "windows and targets share one pass over the weights.",
    )
    g.add_argument(
        "--method",
        action="append",
        help="relex (default), raw-ols, two-point, expo; options inline as in "
        "relex:rank=2,fit=poly:2 or two-point:from=10,to=40 or expo:alpha=0.5,from=40 "
        "(repeatable: one output directory per method)",
    )
    g.add_argument(
        "--mode",
        default="extrapolate",
        choices=["extrapolate", "reconstruct", "fit-reconstruct"],
        help="extrapolate (default); reconstruct: the rank-r projection of observed steps "
        "(targets must be observed); fit-reconstruct: the fitted line at observed steps",
    )
    g.add_argument("--rank", type=argtype(parse_positive_int, "--rank", MAX_RANK),
                   help="singular directions kept (relex; default 1)")
    g.add_argument("--fit", help="coefficient fit: linear (default) or poly:D")
    g.add_argument("--from", dest="from_step", type=argtype(parse_step, "--from"),
                   help="two-point/expo: first step")
    g.add_argument("--to", dest="to_step", type=argtype(parse_step, "--to"),
                   help="two-point: second step")
    g.add_argument("--alpha", type=argtype(parse_float, "--alpha"),
                   help="expo: extrapolation strength α")
    p.add_argument("--cache", help="trajectory store to use or build (default OUT/trajectory.zarr)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the store from the sources")
    p.add_argument(
        "--store-codec",
        default="xor-zstd",
        choices=["xor-zstd", "zstd", "none"],
        help="how a new store keeps rows: each XOR the previous then zstd (default, ~1%% of the "
        "raw bytes on consecutive RL steps), plain zstd, or uncompressed; all lossless",
    )
    p.add_argument("--device", default="auto",
                   help="auto (CUDA if present), cpu, cuda or cuda:N")
    p.add_argument("--max-memory", default=DEFAULT_MAX_MEMORY,
                   help=f"host memory budget for buffers (default {DEFAULT_MAX_MEMORY})")
    p.add_argument(
        "--max-gpu-memory",
        help="GPU memory the run may use (default: the card's memory less 10%%); on the CPU, "
        "host memory for deltas kept between the passes, on top of --max-memory",
    )
    p.add_argument(
        "--svd",
        default="auto",
        choices=["auto", "exact", "randomized"],
        help="rank-1 kernel: exact Gram matrix (auto, the default: report, backtest and appends "
        "need it), or randomized subspace iteration for tensors read once",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="output dtype of floating-point tensors (default: the base's)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing output directories")
    p.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="extrapolate even when a checkpoint holds NaN or Inf (refused by default)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary")


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write a small synthetic RL trajectory (no network)",
        description="Write OUT/base and OUT/runs/checkpoint-N: a tiny Qwen2-style model whose "
        "deltas follow a planted rank-1 direction with a linear coefficient plus noise.",
    )
    p.add_argument("--out", required=True, help="directory to create")
    p.add_argument("--steps", default="10-80:10", help="steps to write (default 10-80:10)")
    p.add_argument("--seed", type=argtype(parse_step, "--seed"), default=0)
    p.add_argument("--hidden", type=argtype(parse_positive_int, "--hidden", 1 << 24), default=64,
                   help="hidden size (default 64)")
    p.add_argument("--layers", type=argtype(parse_positive_int, "--layers", 1 << 24), default=2,
                   help="decoder layers (default 2)")
    p.add_argument("--vocab", type=argtype(parse_positive_int, "--vocab", 1 << 24), default=512,
                   help="vocabulary size (default 512)")
    p.add_argument("--intermediate", type=argtype(parse_positive_int, "--intermediate", 1 << 24),
                   help="MLP size (default 2 × hidden)")
    for flag, what in (("--heads", "attention heads (default hidden/16)"),
                       ("--kv-heads", "key/value heads"), ("--head-dim", "dimension of a head")):
        p.add_argument(flag, type=argtype(parse_positive_int, flag, 1 << 24), help=what)
    p.add_argument("--save-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the checkpoints (float32: the fp32 masters, as verl's hf_model "
                   "and TRL save them)")
    p.add_argument("--base-dtype", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the base (default: --save-dtype)")
    p.add_argument("--delay", default=None,
                   help="write checkpoints one by one, this long apart, each file in pieces "
                   "(e.g. 2s): a live run for `watch`")
    p.add_argument("--append", action="store_true",
                   help="add steps after the last one of an existing trajectory (reproducibly)")
    p.add_argument("--every-step", action="store_true",
                   help="simulate every training step in fp32, not only the saved ones")
    p.add_argument(
        "--noise",
        type=argtype(parse_float, "--noise"),
        default=None,
        help="noise level (defaults: planted 0.1 of the drift, drift 1.0, walk 1.0)",
    )
    p.add_argument(
        "--profile",
        default="planted",
        choices=["planted", "drift", "walk"],
        help="planted: rank-1 line plus noise at every saved step (default); drift: fp32 master "
        "weights taking small noisy steps, saved as bf16, so most elements stay unchanged like "
        "real RL; walk: a random walk with no drift",
    )
    p.add_argument("--lr", type=argtype(parse_float, "--lr"),
                   help="drift/walk step size (default: the profile's)")
    p.add_argument("--tied", action="store_true", help="tie lm_head to embed_tokens")
    p.add_argument(
        "--shard-size",
        default=None,
        help="split the model into shards of about this size (e.g. 2M)",
    )
    p.add_argument("--overwrite", action="store_true")


def _add_watch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "watch",
        help="follow a training run: append each new checkpoint to the store, track drift",
        description="Poll RUN_DIR for new checkpoints; append each complete one to the store "
        "(read once, kept after the trainer deletes it); add a row to STORE/timeline/ "
        "(explained variance and R² against their random-walk null, backtest reach, and how "
        "far each target's prediction moved); with --out, materialise the targets every N "
        "checkpoints. Ctrl-C or SIGTERM stops between checkpoints.",
    )
    p.add_argument("--runs", required=True, help="the run's directory of step checkpoints")
    p.add_argument("--cache", required=True, help="the trajectory store to build or extend")
    p.add_argument("--target", required=True, help="target step(s): 500 or 500,1000")
    p.add_argument("--base", help="the checkpoint the run started from (to build the store)")
    p.add_argument("--out", help="materialise the targets here (replaced each time)")
    p.add_argument("--every", default="1", help="materialise every N new checkpoints (default 1)")
    p.add_argument(
        "--interval", default="30s", help="time between polls (default 30s, at least 100ms)"
    )
    p.add_argument(
        "--settle", default="10s",
        help="a checkpoint must be unchanged this long (default 10s; 0 takes it once complete)",
    )
    p.add_argument("--until", help="stop after appending a checkpoint at or past this step")
    p.add_argument("--method", default="relex", help="prediction method for the drift (relex)")
    p.add_argument("--holdout", default="3", help="held-out steps of the backtest reach (3)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    p.add_argument("--max-memory", default=DEFAULT_MAX_MEMORY,
                   help=f"host memory budget for buffers (default {DEFAULT_MAX_MEMORY})")
    p.add_argument("--quiet", action="store_true", help="no lines per checkpoint")


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one `error:` line and exit 2, like every other one."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {one_line(message)}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m relex_stream",
        description="Extrapolate RLVR checkpoints along rank-1 trajectories, streaming.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_watch(sub)
    _add_synth(sub)
    add_report_parsers(sub)
    return parser


def _methods(args: argparse.Namespace) -> list:
    """--method values, with --rank/--fit/--from/--to/--alpha folded into a single one."""
    from .methods import parse_method

    texts = args.method or ["relex"]
    loose = {
        "rank": args.rank,
        "fit": args.fit,
        "from_step": args.from_step,
        "to_step": args.to_step,
        "alpha": args.alpha,
    }
    given = {key: value for key, value in loose.items() if value is not None}
    if not given:
        return texts
    if len(texts) > 1:
        raise RelexError(
            "with several --method values, give options inline, e.g. --method relex:rank=2"
        )
    return [parse_method(texts[0], **given)]


def _run(args: argparse.Namespace) -> None:
    from .engine import extrapolate

    summary = extrapolate(
        method=_methods(args),
        mode=args.mode,
        base=args.base,
        runs=args.runs,
        ckpts=args.ckpt,
        targets=args.target,
        out=args.out,
        steps=args.steps,
        window=parse_windows(args.window),
        cache=args.cache,
        device=args.device,
        max_memory=args.max_memory,
        max_gpu_memory=args.max_gpu_memory,
        svd=args.svd,
        dtype=args.dtype,
        overwrite=args.overwrite,
        rebuild=args.rebuild,
        allow_nonfinite=args.allow_nonfinite,
        store_codec=args.store_codec,
        quiet=args.quiet,
    )
    if not args.quiet and summary.rank == 0:
        for line in summary.lines():
            print(line)


def _watch(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .units import parse_step, parse_targets
    from .watch import MIN_POLL_INTERVAL_S, WatchOptions, run_watch

    options = WatchOptions(
        runs=Path(args.runs),
        cache=Path(args.cache),
        targets=tuple(parse_targets(args.target)),
        base=Path(args.base) if args.base else None,
        out=Path(args.out) if args.out else None,
        every=parse_positive_int(args.every, "--every", 1_000_000),
        interval_s=parse_duration(args.interval, "--interval", minimum=MIN_POLL_INTERVAL_S),
        settle_s=parse_duration(args.settle, "--settle", zero=True),
        until=parse_step(args.until, "--until") if args.until is not None else None,
        method=args.method,
        holdout=parse_positive_int(args.holdout, "--holdout", 1_000_000),
        max_memory=args.max_memory,
        device=args.device,
        quiet=args.quiet,
    )
    appended = run_watch(options, printer=(lambda line: None) if args.quiet else print)
    if not args.quiet:
        print(f"appended {appended} checkpoint(s) to {args.cache}")


def _synth(args: argparse.Namespace) -> None:
    from .synth import write_trajectory
    from .units import parse_bytes

    path = write_trajectory(
        args.out,
        steps=parse_steps(args.steps),
        seed=args.seed,
        hidden=args.hidden,
        layers=args.layers,
        vocab=args.vocab,
        noise=args.noise,
        profile=args.profile,
        lr=args.lr,
        tied=args.tied,
        shard_bytes=parse_bytes(args.shard_size, "--shard-size") if args.shard_size else None,
        overwrite=args.overwrite,
        every_step=args.every_step,
        save_dtype=args.save_dtype,
        base_dtype=args.base_dtype,
        intermediate=args.intermediate,
        heads=args.heads,
        kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        delay_s=parse_duration(args.delay, "--delay") if args.delay else 0.0,
        append=args.append,
    )
    print(f"wrote synthetic trajectory to {path} (base/ and runs/)")


def one_line(text: str) -> str:
    """The message as one printable line: names taken from files may hold newlines or terminal
    escapes, which are shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _print_error(message: str) -> None:
    """The one `error:` line on stderr (with the rank under torchrun, other than rank 0)."""
    rank = message_rank()
    print(f"error: {'' if rank == 0 else f'[rank {rank}] '}{one_line(message)}", file=sys.stderr)


class _GuardedOutput:
    """sys.stdout whose write failures are a user error that says it was the printing that
    failed (stdout on a full disk read as if the run's own files could not be written)."""

    def __init__(self, stream: object):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as exc:
            raise _output_failed(exc) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            raise _output_failed(exc) from None

    def __getattr__(self, name: str) -> object:
        return getattr(self._stream, name)


def _output_failed(exc: OSError) -> RelexError:
    return RelexError(f"cannot write to standard output ({exc.strerror or exc}); files the "
                      "command wrote are complete, only what it prints is lost: send standard "
                      "output to a file or disk that can take it")


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):
        # a path of undecodable bytes (a surrogate escape) is printed escaped, not a traceback
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else (logging.WARNING if quiet else logging.INFO),
        format="%(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    handlers = {"run": _run, "watch": _watch, "synth": _synth, **REPORT_HANDLERS}
    stdout = sys.stdout
    try:
        sys.stdout = _GuardedOutput(stdout)
        try:
            with _sigterm_stops():
                handlers[args.command](args)
            sys.stdout.flush()
        finally:
            sys.stdout = stdout
    except RelexError as exc:
        _print_error(str(exc))
        return 2
    except MemoryError:
        # an allocation the budget did not foresee (a limit set by ulimit or a cgroup below
        # what the machine shows, or a store whose metadata asks for more than it holds)
        logging.getLogger(__name__).debug("out of memory", exc_info=True)
        _print_error("out of memory: lower --max-memory (or raise the job's memory limit) and "
                     "rerun")
        return 2
    except OSError as exc:
        # a failure of the system the code did not foresee (a full disk, an I/O error): the
        # user's to fix, said in one line; the traceback stays available with --verbose
        logging.getLogger(__name__).debug("unexpected system error", exc_info=True)
        where = f" ({exc.filename})" if exc.filename else ""
        _print_error(f"{exc.strerror or exc}{where}: check the disk and the paths, then rerun "
                     "(--verbose shows where it happened)")
        return 2
    except KeyboardInterrupt as exc:
        how = "stopped (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        if args.command in ("run", "watch"):
            then = "finished tensors are kept in the store, so the same command continues " \
                   "where it stopped"
        elif args.command in ("report", "backtest"):
            then = "files in --out are left as they were; rerun the same command"
        else:
            then = "rerun the same command"
        print(f"error: {how}; {then}", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job's time limit, torchrun stopping a failed job's other ranks): unwinds like
    Ctrl-C, so temporary outputs are removed and the store is left as it was committed."""


@contextlib.contextmanager
def _sigterm_stops():
    """SIGTERM raises Terminated in the main thread while a command runs; a command that
    handles it itself (watch stops between checkpoints) installs its own handler inside."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
