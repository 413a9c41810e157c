"""End-to-end benchmark of `run` against its floors, on one generated trajectory, in one run.

Measures, in one process tree on one machine:
  read floor, cold  every input file read once after dropping the page cache (a user's
                    checkpoints do not sit in RAM): the faster of 16 MiB reads through the
                    page cache and 4 MiB reads past it (O_DIRECT); both are recorded
  read floor, warm  the same read again, from the page cache
  Gram floor        K²·nnz multiply-adds at this device's measured float64 rate of the Gram
                    kernel's shape, nnz the support (elements that change over the observed steps,
                    from the run's summary), and the same on all n elements (the dense floor)
  run, cold / warm  `python -m relex_stream run --rebuild` under /usr/bin/time (wall, peak RSS),
                    after dropping the page cache, and again without dropping it
and prints each run against the larger of its floors. Dropping the page cache needs root.

    python bench/bench_run.py --hidden 1024 --layers 8 --vocab 12288 --steps 1-30 --profile drift
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
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
    tag = (f"{args.profile}-h{args.hidden}-l{args.layers}-v{args.vocab}-s{args.steps}"
           f"-{args.save_dtype}" + ("-tied" if args.tied else "")
           + "".join(f"-{flag}{value}" for flag, value in _shape_flags(args)))
    path = Path(args.work) / f"traj-{tag}"
    if not (path / "runs").exists():
        cmd = [sys.executable, "-m", "relex_stream", "synth", "--out", str(path), "--steps",
               args.steps, "--hidden", str(args.hidden), "--layers", str(args.layers),
               "--vocab", str(args.vocab), "--profile", args.profile, "--save-dtype",
               args.save_dtype, "--overwrite"]
        if args.base_dtype:
            cmd += ["--base-dtype", args.base_dtype]
        for flag, value in _shape_flags(args):
            cmd += [f"--{flag}", str(value)]
        if args.tied:
            cmd.append("--tied")
        started = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=sys.stderr)
        print(f"generated {path} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return path


def _shape_flags(args: argparse.Namespace) -> list[tuple[str, int]]:
    """synth's optional shape flags that were given (intermediate, heads, kv-heads, head-dim)."""
    names = ("intermediate", "heads", "kv_heads", "head_dim")
    return [(n.replace("_", "-"), getattr(args, n)) for n in names if getattr(args, n)]


def store_files(store: Path) -> tuple[int, int]:
    """(files, bytes) of a store directory."""
    files = [p for p in store.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def input_files(trajectory: Path) -> list[Path]:
    return sorted(trajectory.rglob("*.safetensors"))


def read_floor_seconds(files: list[Path], cold: bool) -> tuple[float, int]:
    """Seconds to read every file once (after dropping the page cache when cold), bytes read."""
    if cold:
        drop_caches()
    buffer = bytearray(16 * 2**20)
    view = memoryview(buffer)
    total = 0
    started = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while got := f.readinto(view):
                total += got
    return time.perf_counter() - started, total


def system_seconds() -> float:
    """System CPU time of this process so far (the kernel's share of reading)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def read_floor_direct_seconds(files: list[Path]) -> float | None:
    """Seconds to read every file once past the page cache (O_DIRECT, 4 MiB reads) after
    dropping it: cheaper for the CPU and, on this machine, faster than through the cache. None
    where the file system refuses direct reads."""
    import mmap

    drop_caches()
    view = memoryview(mmap.mmap(-1, 4 * 2**20))  # page aligned, as O_DIRECT needs
    started = time.perf_counter()
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        except OSError:
            return None
        try:
            offset = 0
            while got := os.preadv(fd, [view], offset):
                offset += got
        except OSError:
            return None
        finally:
            os.close(fd)
    return time.perf_counter() - started


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


def add_small_model_args(parser: argparse.ArgumentParser, profile: str, max_memory: str) -> None:
    """The flags that the scripts comparing two ways to run one ~100M trajectory share."""
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=12288)
    parser.add_argument("--steps", default="1-30")
    parser.add_argument("--profile", default=profile)
    parser.add_argument("--max-memory", default=max_memory)
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each")
    parser.add_argument("--work", default=str(ROOT / "bench" / "out"))


def small_model_trajectory(args: argparse.Namespace) -> Path:
    """The trajectory add_small_model_args's flags name (generated once), other shapes default."""
    for name in ("intermediate", "heads", "kv_heads", "head_dim", "base_dtype"):
        setattr(args, name, None)
    args.tied, args.save_dtype = False, "bfloat16"
    return make_trajectory(args)


def run_timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess, int | None]:
    """(wall seconds, the finished process, peak RSS bytes from /usr/bin/time -v or None) of
    `cmd` run in the repository; exits with its stderr when it fails."""
    timer = ["/usr/bin/time", "-v"] if Path("/usr/bin/time").exists() else []
    started = time.perf_counter()
    done = subprocess.run(timer + cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{cmd[:4]} failed:\n{done.stderr[-3000:]}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    return wall, done, int(rss.group(1)) * 1024 if rss else None


def time_run(trajectory: Path, args: argparse.Namespace, cold: bool) -> dict:
    out = Path(args.work) / "run-out"
    cmd = [sys.executable, "-m", "relex_stream", "run", "--base", str(trajectory / "base"),
           "--runs", str(trajectory / "runs"), "--target", args.target, "--out", str(out),
           "--overwrite", "--rebuild", "--device", args.device, "--max-memory",
           args.max_memory, *args.extra]
    # the previous run's output and store are deleted untimed: a first run deletes nothing, and
    # unlinking a dense store (5.8 GiB) took ~1.3 s of the timed run's main thread
    shutil.rmtree(out, ignore_errors=True)
    if cold:
        drop_caches()
    wall, done, rss = run_timed(cmd)
    support = re.search(r"support: ([\d.]+)%", done.stdout)
    return {
        "command": " ".join(cmd),
        "wall_s": wall,
        "peak_rss_bytes": rss,
        "support_fraction": float(support.group(1)) / 100 if support else None,
        "summary": done.stdout.strip().splitlines(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=12288)
    parser.add_argument("--intermediate", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--kv-heads", type=int)
    parser.add_argument("--head-dim", type=int)
    parser.add_argument("--tied", action="store_true")
    parser.add_argument("--steps", default="1-30")
    parser.add_argument("--profile", default="planted")
    parser.add_argument("--save-dtype", default="bfloat16")
    parser.add_argument("--base-dtype")
    parser.add_argument("--target", default="300")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-memory", default="4G")
    parser.add_argument("--work", default=str(ROOT / "bench" / "out"))
    parser.add_argument("--skip-floors", action="store_true")
    parser.add_argument("--warm-only", action="store_true", help="skip the cold run")
    parser.add_argument("--delete-trajectory", action="store_true",
                        help="remove the generated trajectory (and the run's outputs) at the end")
    parser.add_argument("extra", nargs="*", help="extra arguments for run (after --)")
    args = parser.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    trajectory = make_trajectory(args)
    files = input_files(trajectory)
    n_rows = len(list((trajectory / "runs").iterdir()))
    result: dict = {"trajectory": str(trajectory), "K": n_rows, "cold_drops": drop_caches()}
    if not args.skip_floors:
        system_before = system_seconds()
        buffered_s, io_bytes = read_floor_seconds(files, cold=True)
        buffered_system_s = system_seconds() - system_before
        warm_s, _ = read_floor_seconds(files, cold=False)
        system_before = system_seconds()
        direct_s = read_floor_direct_seconds(files)
        direct_system_s = system_seconds() - system_before
        cold_s = min(buffered_s, direct_s or buffered_s)  # the stricter floor
        n = float_elements(trajectory)
        rate = matmul_rate(n_rows, args.device)
        result |= {
            "input_bytes": io_bytes,
            "float_elements": n,
            "read_floor_cold_s": cold_s,
            "read_floor_cold_buffered_s": buffered_s,
            "read_floor_cold_direct_s": direct_s,
            "read_floor_cold_buffered_system_s": buffered_system_s,
            "read_floor_cold_direct_system_s": direct_system_s,
            "read_floor_warm_s": warm_s,
            "read_cold_GBps": io_bytes / cold_s / 1e9,
            "matmul_GMACps": rate / 1e9,
            "gram_floor_dense_s": n_rows * n_rows * n / rate,
        }
    runs = {} if args.warm_only else {"cold": time_run(trajectory, args, cold=True)}
    runs["warm"] = time_run(trajectory, args, cold=False)
    result["runs"] = runs
    result["store_files"], result["store_bytes"] = store_files(
        Path(args.work) / "run-out" / "trajectory.zarr")
    if not args.skip_floors:
        support = runs["warm"]["support_fraction"] or 1.0
        result["gram_floor_support_s"] = result["gram_floor_dense_s"] * support
        for name, run in runs.items():
            read = result[f"read_floor_{name}_s"]
            run["ratio_to_read_floor"] = run["wall_s"] / read
            run["ratio_to_max_floor_support"] = run["wall_s"] / max(
                read, result["gram_floor_support_s"])
            run["ratio_to_max_floor_dense"] = run["wall_s"] / max(
                read, result["gram_floor_dense_s"])
    print(json.dumps(result, indent=2))
    with open(Path(args.work) / "results.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    if args.delete_trajectory:
        shutil.rmtree(trajectory)
        shutil.rmtree(Path(args.work) / "run-out")


if __name__ == "__main__":
    main()
