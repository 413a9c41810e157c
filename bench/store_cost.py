"""What the trajectory store adds to `run`: the same run with and without the store's row writes.

`run` always keeps a store, so the run "without" is `bench/_run_no_store_writes.py`: the same
CLI with the store's chunk encoding and writing replaced by a no-op (the store's metadata and
Gram arrays are still written). It is only a fair comparison when the second pass reads nothing
from the store (the default budget on the 100M bench model: every tensor is read once); the
script checks that in both summaries and stops otherwise.

Runs alternate (with, without, with, ...) so that drift in the machine's speed hits both alike;
each is timed warm (inputs in the page cache) and, with --cold, after dropping the page cache.

    python bench/store_cost.py --profile planted --repeats 3 --cold
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_run import (  # noqa: E402
    ROOT,
    add_small_model_args,
    drop_caches,
    run_timed,
    small_model_trajectory,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_small_model_args(parser, profile="planted", max_memory="4G")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    trajectory = small_model_trajectory(args)
    out = Path(args.work) / "store-cost-out"
    flags = ["run", "--base", str(trajectory / "base"), "--runs", str(trajectory / "runs"),
             "--target", "300", "--out", str(out), "--overwrite", "--rebuild", "--device", "cpu",
             "--max-memory", args.max_memory]
    variants = {
        "with store": [sys.executable, "-m", "relex_stream", *flags],
        "without row writes": [sys.executable, str(ROOT / "bench" / "_run_no_store_writes.py"),
                               *flags],
    }
    walls: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, cmd in variants.items():
            shutil.rmtree(out, ignore_errors=True)  # untimed: a first run deletes nothing
            if args.cold:
                drop_caches()
            wall, done, _ = run_timed(cmd)
            if not re.search(r", 0 B from the store", done.stdout):
                sys.exit(f"{name}: the second pass read from the store; the comparison does not "
                         f"hold at --max-memory {args.max_memory}:\n{done.stdout}")
            walls[name].append(wall)
            print(f"{name}: {wall:.2f} s", file=sys.stderr)
    with_store = statistics.median(walls["with store"])
    without = statistics.median(walls["without row writes"])
    result = {
        "trajectory": str(trajectory), "cold": args.cold, "max_memory": args.max_memory,
        "commands": {name: " ".join(cmd) for name, cmd in variants.items()},
        "walls_s": walls, "median_with_s": with_store, "median_without_s": without,
        "store_adds": with_store / without - 1,
    }
    print(json.dumps(result, indent=2))
    print(f"the store adds {100 * result['store_adds']:.1f}% (median of {args.repeats}: "
          f"{with_store:.2f} s against {without:.2f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
