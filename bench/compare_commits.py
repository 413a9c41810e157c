"""`run` at two commits on the same trajectory, alternated, warm or cold: which code is faster.

Each commit's package is exported with `git archive` into bench/out/src-<commit>/ and run from
there, so the working tree can change meanwhile. Runs alternate (A, B, A, B, ...) so that drift
in the machine's speed hits both alike; the medians and their ratio are printed and appended to
bench/out/results.jsonl.

    python bench/compare_commits.py 7bcfad1 HEAD --profile drift --pairs 3
    python bench/compare_commits.py 7bcfad1 HEAD --profile planted --pairs 3 --cold
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_run import (  # noqa: E402
    ROOT,
    add_small_model_args,
    drop_caches,
    small_model_trajectory,
)


def export(commit: str, work: Path) -> Path:
    """The package at `commit`, in work/src-<hash>/ (exported once)."""
    full = subprocess.run(["git", "rev-parse", "--short", commit], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout.strip()
    target = work / f"src-{full}"
    if not (target / "relex_stream").exists():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", full, "relex_stream"], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def timed(src: Path, flags: list[str]) -> tuple[float, float, float]:
    """(wall s, user + system CPU s, peak RSS GiB) of one `run` of the package in src."""
    env = dict(os.environ, PYTHONPATH=str(src))
    cmd = ["/usr/bin/time", "-f", "%U %S %M", sys.executable, "-m", "relex_stream", *flags]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"run from {src} failed:\n{done.stderr[-3000:]}")
    user, system, rss_kb = re.findall(r"^([\d.]+) ([\d.]+) (\d+)$", done.stderr, re.M)[-1]
    return wall, float(user) + float(system), int(rss_kb) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("a", help="the first commit (git revision)")
    parser.add_argument("b", help="the second commit")
    add_small_model_args(parser, profile="drift", max_memory="2G")
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    work = Path(args.work)
    trajectory = small_model_trajectory(args)
    # by their short hashes: a name such as HEAD means another commit tomorrow
    sources = {path.name.removeprefix("src-"): path
               for path in (export(args.a, work), export(args.b, work))}
    first, second = sources
    out = work / "compare-out"
    flags = ["run", "--base", str(trajectory / "base"), "--runs", str(trajectory / "runs"),
             "--target", "300", "--out", str(out), "--overwrite", "--rebuild", "--device", "cpu",
             "--max-memory", args.max_memory, "--quiet"]
    if not args.cold:  # warm: every input in the page cache before the first run
        for path in sorted(trajectory.rglob("*.safetensors")):
            path.read_bytes()
    figures: dict[str, list[tuple[float, float, float]]] = {name: [] for name in sources}
    for _ in range(args.pairs):
        for name, src in sources.items():
            shutil.rmtree(out, ignore_errors=True)  # untimed
            if args.cold:
                drop_caches()
            figures[name].append(timed(src, flags))
            wall, cpu, rss = figures[name][-1]
            print(f"{name:>10}: {wall:6.2f} s wall, {cpu:6.2f} s CPU, {rss:.2f} GiB peak",
                  flush=True)
    medians = {name: statistics.median(w for w, _, _ in runs) for name, runs in figures.items()}
    print(f"median wall: {first} {medians[first]:.2f} s, {second} {medians[second]:.2f} s; "
          f"{second} / {first} = {medians[second] / medians[first]:.3f}")
    record = {"compare": [first, second], "trajectory": str(trajectory), "cold": args.cold,
              "max_memory": args.max_memory, "runs": figures, "median_wall_s": medians}
    with open(work / "results.jsonl", "a") as results:
        results.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
