"""End-to-end benchmark of `run` against the I/O and compute floors, on one generated trajectory.

Measures, in one process tree on one machine:
  io_floor      reading every input byte (base + K checkpoints) once, 16 MiB reads
  compute_floor K²·n multiply-adds (the Gram product) at this device's measured float64 rate
  run           `python -m relex_stream run` end to end under /usr/bin/time (wall, peak RSS)
and prints run / max(floors). With --cold the page cache is dropped before each timed read
(needs root); otherwise the floors and the run all read from the page cache.

    python bench/bench_run.py --hidden 1024 --layers 8 --vocab 12288 --steps 1-30
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def drop_caches() -> bool:
    """Drop the page cache so reads hit the disk; False when not permitted."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def make_trajectory(args: argparse.Namespace) -> Path:
    tag = f"{args.profile}-h{args.hidden}-l{args.layers}-v{args.vocab}-s{args.steps}"
    path = Path(args.work) / f"traj-{tag}"
    if not (path / "runs").exists():
        cmd = [
            sys.executable,
            "-m",
            "relex_stream",
            "synth",
            "--out",
            str(path),
            "--steps",
            args.steps,
            "--hidden",
            str(args.hidden),
            "--layers",
            str(args.layers),
            "--vocab",
            str(args.vocab),
            "--overwrite",
        ]
        if args.profile != "planted":
            cmd += ["--profile", args.profile]
        started = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=sys.stderr)
        print(f"generated {path} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return path


def input_files(trajectory: Path) -> list[Path]:
    return sorted(trajectory.rglob("*.safetensors"))


def io_floor_seconds(files: list[Path], cold: bool) -> tuple[float, int]:
    """Seconds to read every file once, and the bytes read."""
    if cold:
        drop_caches()
    buffer = bytearray(16 * 2**20)
    view = memoryview(buffer)
    total = 0
    started = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while True:
                got = f.readinto(view)
                if not got:
                    break
                total += got
    return time.perf_counter() - started, total


def float_elements(trajectory: Path) -> int:
    """n: floating-point elements of the model (from the base's header)."""
    sys.path.insert(0, str(ROOT))
    from relex_stream.checkpoints import open_model

    model = open_model(trajectory / "base")
    return sum(t.numel for t in model.tensors.values() if t.is_float)


def matmul_rate(n_rows: int, device: str) -> float:
    """Measured float64 multiply-adds per second of (K, B) @ (B, K), the Gram kernel's shape."""
    block = 1 << 16
    a = torch.randn(n_rows, block, dtype=torch.float64, device=device)
    for _ in range(3):
        a @ a.T
    repeats = 20
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ a.T
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return repeats * n_rows * n_rows * block / (time.perf_counter() - started)


def time_run(trajectory: Path, args: argparse.Namespace, cold: bool) -> dict:
    out = Path(args.work) / "run-out"
    cmd = [
        sys.executable,
        "-m",
        "relex_stream",
        "run",
        "--base",
        str(trajectory / "base"),
        "--runs",
        str(trajectory / "runs"),
        "--target",
        args.target,
        "--out",
        str(out),
        "--overwrite",
        "--rebuild",
        "--device",
        args.device,
        "--max-memory",
        args.max_memory,
    ] + args.extra
    if cold:
        drop_caches()
    timer = ["/usr/bin/time", "-v"] if Path("/usr/bin/time").exists() else []
    started = time.perf_counter()
    done = subprocess.run(timer + cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"run failed:\n{done.stderr[-3000:]}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    read = re.search(r"read: .*", done.stdout)
    return {
        "command": " ".join(cmd),
        "wall_s": wall,
        "peak_rss_bytes": int(rss.group(1)) * 1024 if rss else None,
        "summary": done.stdout.strip().splitlines(),
        "read_line": read.group(0) if read else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=12288)
    parser.add_argument("--steps", default="1-30")
    parser.add_argument("--profile", default="planted")
    parser.add_argument("--target", default="300")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-memory", default="4G")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before reads")
    parser.add_argument("--work", default=str(ROOT / "bench" / "out"))
    parser.add_argument("--skip-floors", action="store_true")
    parser.add_argument("extra", nargs="*", help="extra arguments for run (after --)")
    args = parser.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    trajectory = make_trajectory(args)
    files = input_files(trajectory)
    n_rows = len(list((trajectory / "runs").iterdir()))
    result: dict = {"trajectory": str(trajectory), "K": n_rows, "cold": args.cold}
    if not args.skip_floors:
        io_s, io_bytes = io_floor_seconds(files, args.cold)
        n = float_elements(trajectory)
        rate = matmul_rate(n_rows, args.device)
        result |= {
            "input_bytes": io_bytes,
            "float_elements": n,
            "io_floor_s": io_s,
            "io_GBps": io_bytes / io_s / 1e9,
            "matmul_GMACps": rate / 1e9,
            "compute_floor_s": n_rows * n_rows * n / rate,
        }
    result["run"] = time_run(trajectory, args, args.cold)
    if not args.skip_floors:
        floor = max(result["io_floor_s"], result["compute_floor_s"])
        result["ratio_run_to_floor"] = result["run"]["wall_s"] / floor
    print(json.dumps(result, indent=2))
    with open(Path(args.work) / "results.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
