"""Peak traced memory (tracemalloc: Python and numpy allocations) and CPU time of the report's
random-walk null for one (K, K) Gram, at K observed steps and N samples.

    python bench/null_memory.py [--k 40] [--samples 30000] [--src DIR]

--src runs the code of another checkout (e.g. a git worktree of an older commit).
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=40)
    parser.add_argument("--samples", type=int, default=30000)
    parser.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args()
    sys.path.insert(0, str(args.src.resolve()))
    import torch

    from relex_stream.diagnostics import tensor_stats

    walk = torch.randn(args.k, 500, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(0)).cumsum(0)  # (K, n)
    steps = torch.arange(1, args.k + 1, dtype=torch.float64)
    tracemalloc.start()
    start = time.process_time()
    stats = tensor_stats(walk @ walk.T, steps, null_samples=args.samples, seed=1)
    cpu_s = time.process_time() - start
    peak = tracemalloc.get_traced_memory()[1]
    print(f"K={args.k} samples={args.samples}: peak traced {peak / 2**20:.1f} MiB, "
          f"CPU {cpu_s:.1f} s, null EV quantiles {stats.null.explained_variance}")


if __name__ == "__main__":
    main()
