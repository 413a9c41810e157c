"""`watch`: follow an RL run while it trains, appending each checkpoint to the store once.

Each poll finds the step directories after the store's last step, takes one only when it is
complete (its model opens: index and every shard present, file sizes agree with their headers)
and nothing in it has changed for --settle, appends it, and adds a row to the store's timeline:
whole-model explained variance and R² against their random-walk null, the backtest reach, and
the prediction drift of every target, ‖Ŵ_T(k) − Ŵ_T(k−1)‖ / ‖Ŵ_T(k) − W₀‖, all exact from the
Gram matrices (no weight reads). A prediction that stops moving as checkpoints arrive says that
more RL steps add little about where the run is going.

Ctrl-C or SIGTERM stops it between checkpoints (a second one stops it at once); started again, it
continues from the store.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .backtest import reach
from .checkpoints import discover_runs, open_model
from .diagnostics import prediction_drift, tensor_stats
from .engine import extrapolate, update_store
from .envvars import torchrun_env
from .errors import NonfiniteOutput, NonfiniteRows, RelexError, SourceChanged, StoreBusy
from .jsonfile import loads_strict
from .methods import MethodSpec, combination_weights, parse_method
from .report import StoreGrams, load_grams
from .safefs import open_root, opened_dir, paths_overlap, read_small, write_atomic
from .store import TrajectoryStore
from .units import DEFAULT_MAX_MEMORY, StepSelection, step_label
from .writer import check_output_dir, is_prediction_dir

log = logging.getLogger("relex_stream")

TIMELINE_DIR = "timeline"
MAX_TIMELINE_BYTES = 64 * 2**20
NULL_SAMPLES = 200


# Polls closer than this only list the runs directory over and over: checkpoints take minutes.
MIN_POLL_INTERVAL_S = 0.1


@dataclass(frozen=True)
class WatchOptions:
    """What `watch` was asked for."""

    runs: Path
    cache: Path
    targets: tuple[float, ...]
    base: Path | None = None
    out: Path | None = None
    every: int = 1  # materialise the targets every N appended checkpoints (with --out)
    interval_s: float = 30.0
    settle_s: float = 10.0
    until: int | None = None  # stop once the store holds a checkpoint at or after this step
    method: str = "relex"
    holdout: int = 3
    max_memory: str = DEFAULT_MAX_MEMORY
    device: str = "auto"
    quiet: bool = False


@dataclass
class _Seen:
    """A step directory's files as last seen, and since when they have not changed."""

    snapshot: tuple
    since: float


@dataclass
class Watcher:
    """The state of one `watch`: the store, the timeline, and what the last poll saw."""

    options: WatchOptions
    clock: Callable[[], float] = time.monotonic
    seen: dict[int, _Seen] = field(default_factory=dict)
    appended: int = 0
    stop_requested: bool = False
    passed_over: set[int] = field(default_factory=set)  # late steps already warned about
    # steps holding NaN or Inf, with the files refused: taken again only once those change
    refused: dict[int, tuple] = field(default_factory=dict)
    busy_reported: bool = False

    # ------------------------------------------------------------------ polling

    def ready_steps(self) -> list[int]:
        """Complete, settled step directories after the store's last step, in order."""
        stored = self._stored_steps()
        last = stored[-1] if stored else None
        found = discover_runs(self.options.runs, allow_none=True) if (
            self.options.runs.is_dir()) else {}  # a run that has not saved a checkpoint yet
        ready = []
        now = self.clock()
        for step, directory in sorted(found.items()):
            if last is not None and step <= last:
                if step not in stored and step not in self.passed_over | set(self.refused):
                    self.passed_over.add(step)  # rsync and cp deliver in name order: 100 < 30
                    log.warning("%s arrived after step %d was stored; a store grows in step "
                                "order, so it is left out (run --rebuild takes it in)",
                                directory, last)
                continue
            snapshot = _snapshot(directory)
            if self.refused.get(step) == snapshot:
                continue  # NaN or Inf, and not rewritten since
            seen = self.seen.get(step)
            if seen is None or seen.snapshot != snapshot:
                self.seen[step] = _Seen(snapshot, now)
                continue
            if now - seen.since < self.options.settle_s or not _opens(directory):
                continue
            ready.append(step)
        return ready

    def _stored_steps(self) -> tuple[int, ...]:
        if TrajectoryStore.probe(self.options.cache) != "store":
            return ()
        with TrajectoryStore.open(self.options.cache) as store:
            current = store.manifest.current
            return () if current is None else tuple(current.steps)

    def poll(self) -> list[str]:
        """Append what is ready (one checkpoint at a time; the first two build the store);
        returns the lines printed."""
        stored = self._stored_steps()
        lines = self._catch_up(stored)
        last = stored[-1] if stored else None
        if self.options.until is not None and last is not None and last >= self.options.until:
            self.stop_requested = True  # the store already holds the step asked for
            return lines
        ready = self.ready_steps()
        building = last is None
        while ready and not self.stop_requested:
            batch = ready[:2] if building else ready[:1]
            if building and len(batch) < 2:
                break  # a store needs two checkpoints
            ready = ready[len(batch):]
            try:
                changed = self._append(batch, building)
            except StoreBusy:  # another process holds the store, or appended meanwhile
                if not self.busy_reported:
                    log.warning("the store is in use by another process; watch appends once "
                                "it is free")
                    self.busy_reported = True
                break
            except NonfiniteRows as exc:  # a training blow-up: the store cannot keep it
                self._leave_out(exc, batch)
                break
            except SourceChanged as exc:  # rewritten while read: nothing of it was kept
                log.warning("%s; watch takes the step again once it has settled", exc)
                for step in batch:
                    self.seen.pop(step, None)
                break
            except RelexError:
                runs = self.options.runs
                found = discover_runs(runs, allow_none=True) if runs.is_dir() else {}
                gone = [s for s in batch if s not in found]
                if not gone:
                    raise
                # the trainer removed it between the poll and the read (checkpoint retention)
                log.warning("step %d was removed before it could be appended; it is left out",
                            gone[0])
                self.passed_over.update(gone)
                break
            self.busy_reported = False
            building = False
            if not changed:
                continue  # another process stored it first: not this watch's append
            self.appended += 1
            # the prediction before the timeline: a restart finding the timeline behind the
            # store (killed in between) materialises again (_catch_up)
            if self.options.out is not None and self.appended % self.options.every == 0:
                self._materialise()
            lines.append(self._record_timeline())
            if self.options.until is not None and batch[-1] >= self.options.until:
                self.stop_requested = True
        return lines

    def _leave_out(self, exc: NonfiniteRows, batch: list[int]) -> None:
        """A checkpoint holding NaN or Inf can never be appended (a store keeps finite values
        only): it is named and left out, as a late one is, until its files change (a trainer
        saving the step again). When no one step is to blame (the base), watch stops."""
        if exc.step not in batch:
            raise RelexError(
                f"{exc.fact}; a store keeps finite values only, so watch cannot go on: fix the "
                f"base, or move those checkpoints out of {self.options.runs}, and start watch "
                "again") from None
        self.refused[exc.step] = self.seen[exc.step].snapshot
        log.warning("%s; a store keeps finite values only, so step %d is left out (taken again "
                    "if its files change)", exc.fact, exc.step)
        if self.options.until is not None and exc.step >= self.options.until:
            self.stop_requested = True  # the step asked for came, and cannot be stored

    def _catch_up(self, stored: tuple[int, ...]) -> list[str]:
        """When the timeline's last row is not the store's last step (`stored`: a watch killed
        between its append and the timeline, or another process appended), --out is
        materialised and the timeline recorded now, not only after the next new checkpoint;
        the line printed."""
        if len(stored) < 2:
            return []
        rows = _load_rows(self.options)
        if rows and rows[-1]["step"] == stored[-1]:
            return []
        if self.options.out is not None:
            self._materialise()
        return [self._record_timeline()]

    def _append(self, steps: list[int], building: bool) -> bool:
        """Build the store from `steps` or append them; False when the store held them all."""
        options = self.options
        selection = None
        if not building:
            with TrajectoryStore.open(options.cache) as store:
                stored = store.steps
            selection = StepSelection((), tuple(stored + steps), ",".join(map(str, steps)))
        elif options.base is None:
            raise RelexError(f"no store at {options.cache} yet: give --base to build it")
        # the base is checked against the store's on appends too (another run's checkpoints
        # would otherwise land on this run's base)
        summary = update_store(cache=options.cache, base=options.base, runs=options.runs,
                               steps=selection if selection else _exact(steps),
                               max_memory=options.max_memory, device=options.device, quiet=True)
        return summary.store_change is not None

    def _materialise(self) -> None:
        options = self.options
        try:
            extrapolate(cache=options.cache, targets=list(options.targets), out=options.out,
                        method=options.method, max_memory=options.max_memory,
                        device=options.device, overwrite=True, quiet=True)
        except NonfiniteOutput as exc:  # its remedies are run's flags, which watch lacks
            nearer = "a nearer --target, or " if exc.cause == "target" else ""
            raise RelexError(
                f"{exc.fact}; watch cannot write it (the checkpoint is stored): start watch "
                f"again with {nearer}without --out (the timeline needs no weights)") from None

    # ------------------------------------------------------------------ the timeline

    def _record_timeline(self) -> str:
        rows = timeline_rows(self.options.cache, self.options.targets, self.options.method,
                             self.options.holdout, keep=_load_rows(self.options))
        _write_timeline(self.options, rows)
        return _line(rows[-1], self.options.targets) if rows else ""


def _check_watch_output(options: WatchOptions, directory: Path) -> None:
    """Before the first append: OUT/step-T must be writable, apart from the store, and either
    absent or a prediction relex_stream wrote (watch replaces it each time, without asking:
    a user's own model there would be lost)."""
    if paths_overlap(options.cache, directory):
        raise RelexError(f"--cache {options.cache} and the prediction {directory} overlap; keep "
                         "the store outside --out's step directories")
    check_output_dir(directory, overwrite=True)  # a link in its place, an unwritable OUT
    if directory.exists() and not is_prediction_dir(directory):
        raise RelexError(f"{directory} exists and is not a prediction relex_stream wrote; "
                         "watch replaces it at every prediction: move it away or choose "
                         "another --out")


def _exact(steps: list[int]) -> StepSelection:
    return StepSelection((), tuple(steps), ",".join(map(str, steps)))


def _snapshot(directory: Path) -> tuple:
    """(relative path, size, mtime) of every file below a step directory (links not followed;
    walked with a stack of its own: a directory nested thousands deep is just files)."""
    files = []
    pending = [directory]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(folder) as found:
                entries = list(found)  # the whole list is sorted at the end
        except OSError:
            continue  # removed or unreadable while we looked: the next poll sees it
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    if not entry.name.startswith("."):
                        pending.append(Path(entry.path))
                    continue
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            files.append((os.path.relpath(entry.path, directory), info.st_size,
                          info.st_mtime_ns))
    return tuple(sorted(files))


def _opens(directory: Path) -> bool:
    """True when the checkpoint's model opens: every file present and as long as it says."""
    try:
        open_model(directory)
    except RelexError:
        return False
    return True


def timeline_rows(
    cache: Path, targets: tuple[float, ...], method: str, holdout: int,
    keep: list[dict] | None = None,
) -> list[dict]:
    """One row per stored step from the second on: statistics of the first k steps.

    keep: rows computed before (same targets and method); one is reused only when it was
    computed from the same first k steps, Gram values and holdout (its "inputs" digest) and
    its own checksum holds, else it is computed again (a store rebuilt from another run, or a
    timeline damaged in the shared store).
    """
    data = load_grams(cache)
    spec = parse_method(method)
    digests = _prefix_digests(data, holdout)
    kept = {row["step"]: row for row in keep or []}
    rows = []
    for k in range(2, len(data.steps) + 1):
        old = kept.get(data.steps[k - 1])
        if (old is None or old["rows"] != k or old["inputs"] != digests[k - 1]
                or old["sha256"] != _row_sha256(old)):
            old = _row(data, spec, targets, holdout, k)
            old["inputs"] = digests[k - 1]
            old["sha256"] = _row_sha256(old)
        rows.append(old)
    return rows


def _prefix_digests(data: StoreGrams, holdout: int) -> list[str]:
    """Per k, the sha256 of what the row of the first k steps is computed from: the holdout,
    the steps and every tensor's Gram G[:k, :k] (G is symmetric: its rows up to the diagonal,
    chained, so all K digests cost one pass over half of each G)."""
    chain = hashlib.sha256(f"holdout={holdout};".encode())
    names = sorted(data.grams)
    digests = []
    for i, step in enumerate(data.steps):
        chain.update(f"step={step};".encode())
        for name in names:
            chain.update(name.encode("utf-8", "surrogatepass"))
            row = data.grams[name][i, : i + 1].contiguous().numpy()  # (i + 1,) float64
            chain.update(row.astype("<f8", copy=False).tobytes())
        digests.append(chain.copy().hexdigest())
    return digests


def _row_sha256(row: dict) -> str:
    """Checksum of a timeline row's own fields (damage in the shared store shows)."""
    body = {key: value for key, value in row.items() if key != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=False).encode()).hexdigest()


def _row(data: StoreGrams, spec: MethodSpec, targets: tuple[float, ...], holdout: int,
         k: int) -> dict:
    steps = torch.tensor(data.steps[:k], dtype=torch.float64)
    grams = [g[:k, :k] for g in data.grams.values()]
    whole = torch.stack(grams).sum(0)
    stats = tensor_stats(whole, steps, NULL_SAMPLES, seed=0)
    prefix = StoreGrams(data.path, data.steps[:k], {n: g[:k, :k] for n, g in data.grams.items()},
                        data.numel, data.support, data.approximate)
    held = min(holdout, k - 2)
    drift: dict[str, float | None] = {step_label(t): None for t in targets}
    if k >= 3:
        def weights_of(gram: torch.Tensor, m: int) -> torch.Tensor:
            return combination_weights(spec, gram, steps[:m], list(targets))

        try:
            moved, norm = prediction_drift(grams, weights_of, k)
        except RelexError:  # too few rows yet for the method (poly:2 or rank 3 at k - 1 = 2)
            moved = norm = torch.zeros(0)
        for t, a, b in zip(targets, moved.tolist(), norm.tolist(), strict=False):
            drift[step_label(t)] = _finite(a / b) if b > 0 else None  # inf / inf: None
    null = stats.null
    return {
        "step": data.steps[k - 1],
        "rows": k,
        "explained_variance": _finite(stats.fit.explained_variance),
        "r_squared": _finite(stats.fit.r_squared),
        "null_ev_p95": _finite(null.explained_variance[2]) if null else None,
        "null_r2_p95": _finite(null.r_squared[2]) if null else None,
        "straight": bool(stats.ev_above_null and stats.r2_above_null),
        "reach": _feasible(lambda: reach(prefix, held, spec)) if held >= 1 else None,
        "drift": drift,
    }


def _feasible(compute: Callable[[], float | None]) -> float | None:
    """compute(), or None when the method cannot run on so few rows yet (RelexError)."""
    try:
        return compute()
    except RelexError:
        return None


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _load_rows(options: WatchOptions) -> list[dict]:
    """Rows of an earlier watch of the same targets and method (else none: recomputed). The
    store is input: the file is read without following links, bounded, and a row is kept only
    when every field has the type the timeline writes (else it is computed again)."""
    labels = [step_label(t) for t in options.targets]
    try:
        root = open_root(options.cache)
        try:
            with opened_dir(root, (TIMELINE_DIR,), False, str(options.cache)) as fd:
                data = loads_strict(read_small(fd, "timeline.json", MAX_TIMELINE_BYTES)
                                    .decode("utf-8"))
        finally:
            os.close(root)
    except (OSError, ValueError, RelexError, RecursionError):
        return []
    if not (isinstance(data, dict) and data.get("targets") == labels
            and data.get("method") == options.method and isinstance(data.get("rows"), list)):
        return []
    return [r for r in data["rows"] if _is_row(r, labels)]


def _is_row(row: object, labels: list[str]) -> bool:
    """Whether `row` is a timeline row as _row makes them (for these target labels)."""
    def number(v: object) -> bool:
        return v is None or (type(v) in (int, float) and math.isfinite(v))

    def count(v: object) -> bool:
        return type(v) is int and 0 <= v <= 2**53

    def digest(v: object) -> bool:
        return isinstance(v, str) and len(v) == 64

    fields = ("explained_variance", "r_squared", "null_ev_p95", "null_r2_p95")
    return (isinstance(row, dict) and set(row) == {"step", "rows", "straight", "reach", "drift",
                                                      "inputs", "sha256", *fields}
            and digest(row["inputs"]) and digest(row["sha256"])
            and count(row["step"]) and count(row["rows"]) and type(row["straight"]) is bool
            and number(row["reach"])
            and all(number(row[f]) for f in fields)
            and isinstance(row["drift"], dict) and list(row["drift"]) == labels
            and all(number(v) for v in row["drift"].values()))


def _write_timeline(options: WatchOptions, rows: list[dict]) -> None:
    """timeline.json, .csv and .png in the store's timeline directory, each written under a
    temporary name and renamed, all through one descriptor of that directory: a link put in
    place of the directory meanwhile is never followed (the store is shared)."""
    labels = [step_label(t) for t in options.targets]
    body = {"targets": labels, "method": options.method, "rows": rows}
    columns = ["step", "rows", "explained_variance", "r_squared", "null_ev_p95", "null_r2_p95",
               "straight", "reach", *(f"drift_{label}" for label in labels)]
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(columns)
    for row in rows:
        writer.writerow([row[c] for c in columns[:8]] + [row["drift"][x] for x in labels])
    files = {"timeline.json": (json.dumps(body, indent=1, allow_nan=False) + "\n").encode(),
             "timeline.csv": table.getvalue().encode()}
    try:
        from .plots import timeline_png

        files["timeline.png"] = timeline_png(rows, labels)
    except RelexError as exc:  # no matplotlib: the JSON and CSV are the timeline
        log.debug("no timeline.png: %s", exc)
    where = str(options.cache)
    try:
        root = open_root(options.cache)
        try:
            with opened_dir(root, (TIMELINE_DIR,), True, where) as fd:
                for name, data in files.items():
                    write_atomic(fd, name, data, sync=False)
        finally:
            os.close(root)
    except OSError as exc:
        raise RelexError(f"cannot write the timeline in {where}/{TIMELINE_DIR}: "
                         f"{exc.strerror or exc}; free space or fix permissions") from None


def _line(row: dict, targets: tuple[float, ...]) -> str:
    def num(value: float | None, fmt: str = ".4f") -> str:
        return "n/a" if value is None else format(value, fmt)

    drift = ", ".join(f"T={label} {num(value, '.3g')}" for label, value in row["drift"].items())
    return (
        f"step {row['step']} ({row['rows']} observed): explained variance "
        f"{num(row['explained_variance'])} (null 95% {num(row['null_ev_p95'])}), R² "
        f"{num(row['r_squared'])} (null 95% {num(row['null_r2_p95'])}); reach "
        f"{'n/a' if row['reach'] is None else '+' + format(row['reach'], 'g')} steps; drift "
        f"{drift}"
    )


def run_watch(options: WatchOptions, printer: Callable[[str], None] = print) -> int:
    """The watch loop; returns the number of checkpoints appended."""
    if torchrun_env() is not None:
        # each poll would form and tear down a process group, and the ranks drift apart
        raise RelexError("watch runs in one process: start it without torchrun (unset "
                         "WORLD_SIZE, RANK and LOCAL_RANK); use torchrun for run")
    if options.every < 1:
        raise RelexError("--every must be at least 1")
    spec = parse_method(options.method)
    if not spec.extrapolates:
        raise RelexError(f"watch predicts steps the run has not reached, which {spec.name} "
                         "does not (it reproduces observed steps); use an extrapolating method")
    if len(set(options.targets)) != len(options.targets):
        raise RelexError("--target names a step twice; give each target once")
    if options.out is not None and options.out.resolve().is_relative_to(
            options.cache.resolve()):
        raise RelexError(f"--out {options.out} is inside the store {options.cache}; give "
                         "--out a directory outside it")
    # what can be refused now is refused before the first checkpoint is appended
    if options.runs.exists() and not options.runs.is_dir():
        raise RelexError(f"--runs {options.runs} is a file, not the run's directory")
    if options.out is not None and (options.out.is_symlink() or (
            options.out.exists() and not options.out.is_dir())):
        raise RelexError(f"--out {options.out} is not a directory; give a directory for the "
                         "predictions")
    for path in (options.runs, options.base):
        if options.out is not None and path is not None and paths_overlap(options.out, path):
            # an output inside the run directory would be taken for a checkpoint (step-T)
            raise RelexError(f"--out {options.out} and the input {path} overlap; give --out a "
                             "directory outside the checkpoints")
    if options.out is not None:
        for target in options.targets:
            _check_watch_output(options, options.out / f"step-{step_label(target)}")
    watcher = Watcher(options)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def stop(signum: int, frame: object) -> None:
        if watcher.stop_requested:
            raise KeyboardInterrupt
        watcher.stop_requested = True
        printer("stopping after the current checkpoint (again to stop now)")

    for sig in previous:
        signal.signal(sig, stop)
    try:
        while not watcher.stop_requested:
            for line in watcher.poll():
                printer(line)
            deadline = time.monotonic() + options.interval_s
            while not watcher.stop_requested and time.monotonic() < deadline:
                time.sleep(min(0.2, options.interval_s))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return watcher.appended
