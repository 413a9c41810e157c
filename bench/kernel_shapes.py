"""One-core rates of the two dense kernels of the first pass, for the choices made in kernels.py.

  panels   the Gram matrix's panel products, gram[r0:r1, :r1] += D[r0:r1] @ D[:r1].T over a
           block of 65,536 columns, for panels of 8, 16, 32 rows and one panel of all K rows
  deltas   bf16 rows → float64 deltas (rows − base) written to storage that is not in cache
           (as kept deltas are): widen then subtract (three passes) against kernels.deltas_into
           (float32, then one numpy pass that widens and subtracts)

Seconds are scaled to 100M columns (the bench model's size). One torch thread, as `run` uses
on two cores.

    python bench/kernel_shapes.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relex_stream.kernels import Workspace, deltas_into  # noqa: E402

BLOCK = 1 << 16
PER_100M = 100e6 / BLOCK


def panels(k: int, rows_per_panel: int, repeats: int = 20) -> tuple[float, float]:
    """(seconds per 100M columns, GMAC/s) of the panel products for K = k."""
    deltas = torch.randn(k, BLOCK, dtype=torch.float64)
    gram = torch.zeros(k, k, dtype=torch.float64)

    def once() -> None:
        for r0 in range(0, k, rows_per_panel):
            r1 = min(k, r0 + rows_per_panel)
            gram[r0:r1, :r1] += deltas[r0:r1] @ deltas[:r1].T

    once()
    started = time.perf_counter()
    for _ in range(repeats):
        once()
    seconds = (time.perf_counter() - started) / repeats
    macs = sum(min(rows_per_panel, k - r0) * min(k, r0 + rows_per_panel)
               for r0 in range(0, k, rows_per_panel)) * BLOCK
    return seconds * PER_100M, macs / seconds / 1e9


def deltas(k: int = 30, n_blocks: int = 40, repeats: int = 3) -> dict[str, float]:
    """Seconds per 100M columns of bf16 rows → float64 deltas into out-of-cache storage."""
    storage = torch.ones(n_blocks, k, BLOCK, dtype=torch.float64)  # ~630 MB: not in cache
    row_sets = [(torch.randn(k, BLOCK) * 0.01).to(torch.bfloat16) for _ in range(4)]
    base = (torch.randn(BLOCK) * 0.01).to(torch.bfloat16)
    ws = Workspace(k, 1, BLOCK, torch.device("cpu"))
    narrow = torch.empty(k, BLOCK, dtype=torch.float32)
    base64 = base.double()

    def three_passes(rows: torch.Tensor, out: torch.Tensor) -> None:
        narrow.copy_(rows)
        out.copy_(narrow)
        out -= base64

    def one_pass(rows: torch.Tensor, out: torch.Tensor) -> None:
        deltas_into(rows, base64, out, ws)

    results = {}
    for name, kernel in (("widen then subtract", three_passes), ("deltas_into", one_pass)):
        started = time.perf_counter()
        for _ in range(repeats):
            for i in range(n_blocks):
                kernel(row_sets[i % 4], storage[i])
        seconds = (time.perf_counter() - started) / (repeats * n_blocks)
        expected = row_sets[1].double() - base64
        assert torch.equal(storage[5], expected), f"{name} gave other bits"
        results[name] = seconds * PER_100M
    return results


def main() -> None:
    torch.set_num_threads(1)
    np.random.seed(0)
    torch.manual_seed(0)
    for k in (30, 100):
        for rows in (8, 16, 32, k):
            seconds, rate = panels(k, rows)
            label = f"{rows} rows" if rows != k else f"all {k} rows"
            print(f"panels K={k:3d} {label:>12}: {seconds:6.2f} s per 100M columns, "
                  f"{rate:5.1f} GMAC/s")
    for name, seconds in deltas().items():
        print(f"deltas K=30 {name:>20}: {seconds:5.2f} s per 100M columns")


if __name__ == "__main__":
    main()
