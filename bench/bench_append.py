"""Appending one checkpoint to a store against rebuilding it, on one generated trajectory.

Measures, in one run, each after dropping the page cache (needs root):
  append   `run --cache S --runs R` where S holds steps 1..K and R also holds step K+1: only the
           new checkpoint is read from the sources, the old rows are decoded from the store
  rebuild  `run --base B --runs R --rebuild` over all K+1 steps
both writing the same prediction, and the same two without outputs (the store alone, as `watch`
does between predictions: `relex_stream.engine.update_store`), and prints wall time and bytes
read from the checkpoints.

    python bench/bench_append.py --steps 1-30 --profile drift
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_run import drop_caches, run_timed  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def _run(args: list[str]) -> dict:
    return _timed([sys.executable, "-m", "relex_stream", "run", *args])


def _update_store(**kwargs: str) -> dict:
    """update_store(**kwargs) in a fresh interpreter, its summary printed as `run` prints it."""
    code = ("from relex_stream.engine import update_store\n"
            f"summary = update_store(device='cpu', quiet=True, **{kwargs!r})\n"
            "print('\\n'.join(summary.lines()))")
    return _timed([sys.executable, "-c", code])


def _timed(cmd: list[str]) -> dict:
    drop_caches()
    wall, done, rss = run_timed(cmd)
    read = re.search(r"read: ([\d.]+) (\w+) from checkpoints", done.stdout)
    store = re.search(r"([\d.]+) (\w+) from the store", done.stdout)
    return {
        "command": " ".join(cmd),
        "wall_s": wall,
        "bytes_from_checkpoints": float(read.group(1)) * UNITS[read.group(2)] if read else None,
        "bytes_from_store": float(store.group(1)) * UNITS[store.group(2)] if store else None,
        "peak_rss_bytes": rss,
        "summary": done.stdout.strip().splitlines(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=12288)
    parser.add_argument("--steps", default="1-30", help="the store's steps (one more is added)")
    parser.add_argument("--profile", default="drift")
    parser.add_argument("--target", default="300")
    parser.add_argument("--max-memory", default="4G")
    parser.add_argument("--work", default=str(ROOT / "bench" / "out"))
    args = parser.parse_args()
    work = Path(args.work)
    first, last = (int(x) for x in args.steps.split("-"))
    traj = work / f"append-{args.profile}-h{args.hidden}-l{args.layers}-v{args.vocab}-{last + 1}"
    if not (traj / "runs" / f"checkpoint-{last + 1}").exists():
        subprocess.run([sys.executable, "-m", "relex_stream", "synth", "--out", str(traj),
                        "--steps", f"{first}-{last + 1}", "--hidden", str(args.hidden),
                        "--layers", str(args.layers), "--vocab", str(args.vocab), "--profile",
                        args.profile, "--overwrite"], check=True, cwd=ROOT, stdout=sys.stderr)
    common = ["--target", args.target, "--device", "cpu", "--max-memory", args.max_memory,
              "--overwrite"]
    store = work / "append-store.zarr"
    shutil.rmtree(store, ignore_errors=True)
    built = _run(["--base", str(traj / "base"), "--runs", str(traj / "runs"), "--steps",
                  args.steps, "--cache", str(store), "--out", str(work / "append-out0"),
                  *common])
    appended = _run(["--runs", str(traj / "runs"), "--cache", str(store), "--out",
                     str(work / "append-out1"), *common])
    rebuilt = _run(["--base", str(traj / "base"), "--runs", str(traj / "runs"), "--cache",
                    str(work / "append-rebuild.zarr"), "--rebuild", "--out",
                    str(work / "append-out2"), *common])
    store_only = work / "append-store-only.zarr"
    shutil.rmtree(store_only, ignore_errors=True)
    shutil.rmtree(work / "append-rebuild-only.zarr", ignore_errors=True)
    sources = {"base": str(traj / "base"), "runs": str(traj / "runs")}
    _update_store(cache=str(store_only), steps=args.steps, max_memory=args.max_memory, **sources)
    appended_only = _update_store(cache=str(store_only), runs=str(traj / "runs"),
                                  max_memory=args.max_memory)
    rebuilt_only = _update_store(cache=str(work / "append-rebuild-only.zarr"),
                                 max_memory=args.max_memory, **sources)
    same = all(
        a.read_bytes() == b.read_bytes()
        for a, b in zip(sorted((work / "append-out1").rglob("*.safetensors")),
                        sorted((work / "append-out2").rglob("*.safetensors")), strict=True)
    )
    checkpoint = sum(p.stat().st_size for p in (traj / "runs" / f"checkpoint-{last + 1}").glob(
        "*.safetensors"))
    result = {
        "trajectory": str(traj),
        "first_build": built,
        "append": appended,
        "rebuild": rebuilt,
        "new_checkpoint_bytes": checkpoint,
        "append_wall_fraction_of_rebuild": appended["wall_s"] / rebuilt["wall_s"],
        "store_only_append": appended_only,
        "store_only_rebuild": rebuilt_only,
        "store_only_append_wall_fraction": appended_only["wall_s"] / rebuilt_only["wall_s"],
        "append_source_bytes_over_checkpoint": appended["bytes_from_checkpoints"] / checkpoint,
        "outputs_identical": same,
    }
    print(json.dumps(result, indent=2))
    with open(work / "results.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
