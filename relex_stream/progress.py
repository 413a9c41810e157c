"""Progress bars in bytes for the two passes; under torchrun rank 0 shows every rank's work.

Ranks report through small files in a directory they all see (the output directory, which
torchrun runs already share): each rank rewrites its own count at most twice a second and
rank 0 adds them up. No collective call is needed, so ranks never wait on each other for it.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from tqdm import tqdm

from .envvars import library_variable_error
from .safefs import read_small_at, replace_file

STAGES = ("gram", "materialise")


class Progress:
    """Byte counts of the Gram and materialise passes, shown as two tqdm bars."""

    def __init__(
        self,
        totals: dict[str, int],
        show: bool,
        board: Path | None = None,
        rank: int = 0,
        interval_s: float = 0.5,
    ):
        self.done = dict.fromkeys(STAGES, 0)  # this rank's bytes
        self.shown = dict.fromkeys(STAGES, 0)  # what the bars show: every rank's, on rank 0
        self._board, self._rank, self._interval = board, rank, interval_s
        self._last = 0.0
        self._bars = _make_bars(totals, show)
        if board is not None:
            board.mkdir(parents=True, exist_ok=True)

    def add(self, stage: str, n_bytes: int) -> None:
        self.done[stage] += n_bytes
        if self._board is None:
            self._show(stage, self.done[stage])
            return
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            self._publish()

    def _publish(self) -> None:
        replace_file(self._board / str(self._rank), json.dumps(self.done))
        if self._rank != 0:
            return
        totals = dict.fromkeys(STAGES, 0)
        for path in self._board.iterdir():
            if path.name.isdigit():
                try:
                    counts = json.loads(read_small_at(path, 4096))
                except (OSError, ValueError, RecursionError):
                    continue  # being replaced right now; next time
                if not isinstance(counts, dict):
                    continue  # not a rank's counts
                for stage in STAGES:
                    value = counts.get(stage, 0)
                    totals[stage] += value if type(value) is int and value >= 0 else 0
        for stage in STAGES:
            self._show(stage, totals[stage])

    def _show(self, stage: str, value: int) -> None:
        self._bars[stage].update(value - self.shown[stage])
        self.shown[stage] = value

    def close(self) -> None:
        if self._board is not None:
            self._publish()
        for bar in self._bars.values():
            bar.close()

    def remove_board(self) -> None:
        """Rank 0, after the last barrier: delete the shared progress files."""
        if self._board is not None:
            shutil.rmtree(self._board, ignore_errors=True)


def _make_bars(totals: dict[str, int], show: bool) -> dict[str, tqdm]:
    """One tqdm bar per stage, drawn once here so that TQDM_* variables tqdm cannot use
    (TQDM_BAR_FORMAT='{nope}', TQDM_POSITION=x) are one error before the run, not mid-run."""
    style = dict(unit="B", unit_scale=True, unit_divisor=1024, disable=not show, file=sys.stderr,
                 write_bytes=False)
    try:
        bars = {
            stage: tqdm(total=totals[stage], desc=f"{stage} pass", position=i, **style)
            for i, stage in enumerate(STAGES)
        }
        for bar in bars.values():  # empty and full: what the run will draw
            bar.format_meter(**{**bar.format_dict, "n": 0})
            bar.format_meter(**{**bar.format_dict, "n": max(bar.total, 1) * 1024**3})
        return bars
    except Exception as exc:
        blamed = library_variable_error("tqdm", "progress bars failed", exc,
                                        "fix or unset them, or pass --quiet")
        if blamed is None:
            raise
        raise blamed from exc
