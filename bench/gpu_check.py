"""GPU check (issue 10): one run on a lent GPU that proves the CUDA paths and measures them.

Run by bench/gpu_check.sh. Each section runs in its own Python process (so a section's CUDA
context, caching allocator and any CUDA error die with it, and the GPU is free for the next),
under its own time limit; each prints one JSON line with "section" and "status" as soon as it
ends, and some print "part" lines before that. Sections, in order:

  env          card, memory, driver, CUDA, torch and package versions, CPU count, RAM, disk
  kernels      the engine's Gram kernel (changed_columns, block_deltas, gram_panels) and
               combine_block on one (K, 65536) block, K = 30 and 100, dense and ~7% support,
               against the raw float64 matmul; host→device copy rates (pageable, torch's pinned
               memory, and the read ring's cudaHostRegister); a probe of what a failed
               cudaHostRegister leaves behind
  cpu_vs_cuda  the CLI on CPU and CUDA over two synthetic trajectories (dense and sparse
               support), chunked and kept-delta paths: bytes compared, differing elements
               counted, each run against the dense float64 reference (one output ulp)
  end_to_end   `run` with default flags on a Qwen3-8B-shaped tensor set written by synth (hidden
               4096, intermediate 12288, vocab 151936, 2 layers, tied, drift profile, as many
               checkpoints as ~70 s allow), against the read floor of its files; the GPU's
               memory in use when it starts (it must be free)
  memory       the same trajectory under --max-memory 2G --max-gpu-memory 4G: peak host RSS and
               GPU memory against the budgets, output bytes against the default run's
  pytest       RELEX_TEST_DEVICE=cuda pytest tests/test_gpu_paths.py tests/test_reference_match.py

--dry-run runs every section on the CPU with tiny sizes (a typo cannot cost the GPU's time).
Lines go to stdout and to OUT/gpu_check.jsonl ($OUT, else bench/out/); the children's logs to
OUT/gpu_check.log, pytest's to OUT/pytest.log and OUT/pytest-junit.xml.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GIB = 2**30
MIB = 2**20


@dataclass(frozen=True)
class Section:
    name: str
    cap_s: float  # longest it may run
    floor_s: float  # shortest time worth starting it with (kept for the sections after)
    dry_cap_s: float  # the same two for --dry-run
    dry_floor_s: float

    def limits(self, dry: bool) -> tuple[float, float]:
        return (self.dry_cap_s, self.dry_floor_s) if dry else (self.cap_s, self.floor_s)


# pytest comes last: it takes the time the others leave (~200 s), and its log keeps every
# finished test's result if it is stopped.
SECTIONS = (
    Section("env", 30, 5, 30, 3),
    Section("kernels", 60, 15, 60, 3),
    Section("cpu_vs_cuda", 75, 25, 120, 10),
    Section("end_to_end", 150, 60, 60, 5),
    Section("memory", 75, 25, 45, 3),
    Section("pytest", 240, 60, 60, 5),
)
FULL_BUDGET_S = 480  # the whole check: 8 minutes
DRY_BUDGET_S = 300  # generous: ~40 s here; the caps only bound a hung section


# --------------------------------------------------------------------------- shared helpers


def emit(record: dict) -> None:
    """One JSON line on stdout, flushed (a child's output, relayed by the driver)."""
    print(json.dumps(_rounded(record), default=str, sort_keys=False), flush=True)


def _rounded(value):
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


@dataclass(frozen=True)
class Ctx:
    """What a section child knows."""

    dry: bool
    work: Path
    out: Path
    deadline: float  # time.time() by which the section must end

    @property
    def device(self) -> str:
        return "cpu" if self.dry else "cuda"

    def left(self) -> float:
        return self.deadline - time.time()


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def free_gpu() -> dict:
    """Drop this process's GPU memory (del first, then this): what is still held after."""
    gc.collect()
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return {}
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return {"gpu_allocated_after": torch.cuda.memory_allocated(),
            "gpu_reserved_after": torch.cuda.memory_reserved()}


def nvidia_smi(*fields: str) -> list[str] | None:
    """One GPU's fields from nvidia-smi, or None where there is none."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits",
             "-i", "0"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return [part.strip() for part in done.stdout.strip().splitlines()[0].split(",")]


def gpu_used_mib() -> int | None:
    found = nvidia_smi("memory.used")
    return int(found[0]) if found and found[0].isdigit() else None


def kill_group(proc: subprocess.Popen) -> None:
    """End a child started with start_new_session and everything it started."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class Monitor:
    """Peak RSS of a process tree (psutil) and peak GPU memory in use (nvidia-smi), sampled."""

    def __init__(self, pid: int, gpu: bool):
        import psutil

        try:
            self._proc = psutil.Process(pid)
        except psutil.Error:  # already gone: its own ru_maxrss still tells
            self._proc = None
        self.peak_rss = 0
        self.peak_gpu_mib: int | None = None
        self._stop = threading.Event()
        self._smi = None
        if gpu and shutil.which("nvidia-smi"):
            self._smi = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                 "-i", "0", "-lms", "200"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                text=True, start_new_session=True)
            threading.Thread(target=self._read_smi, daemon=True).start()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        while self._proc is not None and not self._stop.is_set():
            try:
                procs = [self._proc, *self._proc.children(recursive=True)]
                self.peak_rss = max(self.peak_rss, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            self._stop.wait(0.2)

    def _read_smi(self) -> None:
        for line in self._smi.stdout:
            if line.strip().isdigit():
                self.peak_gpu_mib = max(self.peak_gpu_mib or 0, int(line.strip()))

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        if self._smi is not None:
            kill_group(self._smi)
        return {"sampled_peak_rss": self.peak_rss, "sampled_peak_gpu_used_mib": self.peak_gpu_mib}


def cli(ctx: Ctx, *args: object, timeout: float, monitor: bool = False) -> dict:
    """`python -m relex_stream ARGS` through --cli-child (which reports its own peaks)."""
    stats = ctx.work / f"stats-{uuid.uuid4().hex}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--cli-child", str(stats), "--",
           *map(str, args)]
    log_line(ctx, f"$ relex_stream {' '.join(map(str, args))}")
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(), cwd=ROOT, start_new_session=True)
    watch = Monitor(proc.pid, gpu=not ctx.dry) if monitor else None
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        timed_out = True
        kill_group(proc)
        stdout, stderr = proc.communicate()
    record: dict = {"rc": proc.returncode, "wall_s": time.perf_counter() - started}
    if timed_out:
        record["timed_out"] = True
    if watch is not None:
        record |= watch.stop()
    if stats.exists():
        record |= json.loads(stats.read_text())
        stats.unlink()
    record["summary"] = [line for line in stdout.splitlines() if line.strip()][-8:]
    log_line(ctx, stdout + stderr)
    if proc.returncode != 0:
        record["stderr_tail"] = stderr[-1500:]
    return record


def log_line(ctx: Ctx, text: str) -> None:
    with open(ctx.out / "gpu_check.log", "a") as log:
        log.write(text.rstrip() + "\n")


def safetensors_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def differing_elements(a: Path, b: Path) -> dict:
    """Bytes and elements that differ between the safetensors files of two model dirs."""
    import torch
    from safetensors.torch import load_file

    files_a, files_b = safetensors_files(a), safetensors_files(b)
    if [f.name for f in files_a] != [f.name for f in files_b]:
        return {"same_bytes": False, "error": "different files"}
    if all(_same_file(x, y) for x, y in zip(files_a, files_b, strict=True)):
        return {"same_bytes": True, "differing_elements": 0, "elements": None}
    words = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    total = differ = 0
    by_tensor = {}
    for fa, fb in zip(files_a, files_b, strict=True):
        left, right = load_file(str(fa)), load_file(str(fb))
        for name, x in left.items():
            y = right.get(name)
            if y is None or y.dtype != x.dtype or y.shape != x.shape:
                by_tensor[name] = "missing or reshaped"
                continue
            word = words[x.element_size()]
            n = int((x.view(word) != y.view(word)).sum())
            total += x.numel()
            differ += n
            if n:
                by_tensor[name] = n
        del left, right
    return {"same_bytes": False, "differing_elements": differ, "elements": total,
            "by_tensor": dict(sorted(by_tensor.items())[:20])}


def _same_file(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(16 * MIB), fb.read(16 * MIB)
            if x != y:
                return False
            if not x:
                return True


def read_floor(paths: list[Path]) -> dict:
    """Read every file once, 16 MiB at a time (the I/O floor a run cannot beat)."""
    buffer = memoryview(bytearray(16 * MIB))
    total = 0
    started = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while got := f.readinto(buffer):
                total += got
    seconds = time.perf_counter() - started
    return {"bytes": total, "seconds": seconds, "GBps": total / seconds / 1e9 if seconds else None}


def synth(ctx: Ctx, out: Path, steps: str, shape: list[str], profile: str,
          timeout: float) -> None:
    cmd = [sys.executable, "-m", "relex_stream", "synth", "--out", str(out), "--steps", steps,
           *shape, "--profile", profile, "--overwrite"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), cwd=ROOT,
                          timeout=timeout)
    log_line(ctx, done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"synth failed: {done.stderr[-1500:]}")


# --------------------------------------------------------------------------- env


def section_env(ctx: Ctx) -> dict:
    import platform

    import psutil

    info: dict = {
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "ram_gib": psutil.virtual_memory().total / GIB,
        "disk_free_gib_work": shutil.disk_usage(ctx.work).free / GIB,
        "git_commit": _git_commit(),
    }
    smi = nvidia_smi("name", "memory.total", "memory.used", "driver_version")
    if smi:
        info["nvidia_smi"] = dict(zip(("name", "memory_total_mib", "memory_used_mib", "driver"),
                                      smi, strict=False))
    import numpy
    import torch

    info |= {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
             "numpy": numpy.__version__, "cuda_available": torch.cuda.is_available()}
    for module in ("numcodecs", "google_crc32c", "safetensors", "pytest", "pytest_timeout",
                   "psutil"):
        try:
            info[module] = getattr(__import__(module), "__version__", "present")
        except ImportError as exc:
            info[module] = f"missing: {exc}"
    try:
        import relex_stream.cli  # noqa: F401

        info["relex_stream_imports"] = True
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        info["relex_stream_imports"] = f"no: {exc!r}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info(0)
        info["device"] = {"name": props.name, "total_memory": props.total_memory,
                          "capability": f"{props.major}.{props.minor}",
                          "multiprocessors": props.multi_processor_count,
                          "free_at_start": free, "total": total,
                          "cudnn": torch.backends.cudnn.version()}
    ok = info["relex_stream_imports"] is True and (ctx.dry or info["cuda_available"])
    info["status"] = "ok" if ok else "fail"
    return info


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return None


def _git_commit() -> str | None:
    if shutil.which("git") is None:
        return None
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() or None


# --------------------------------------------------------------------------- kernels


def section_kernels(ctx: Ctx) -> dict:
    import torch

    from relex_stream.kernels import exact_matmul

    device = torch.device(ctx.device)
    exact_matmul()
    results = []
    for n_rows in (4, 12) if ctx.dry else (30, 100):
        for support in (1.0, 0.07):
            record = _block_rates(ctx, device, n_rows, support)
            emit({"section": "kernels", **record})
            results.append(record)
            free_gpu()
    chunk = _chunk_rate(ctx, device, 4 if ctx.dry else 30, 4 if ctx.dry else 32, 0.07)
    emit({"section": "kernels", **chunk})
    free_gpu()
    copies = _copy_rates() if device.type == "cuda" else {"skipped": "no CUDA (dry run)"}
    emit({"section": "kernels", "part": "host_to_device", **copies})
    free_gpu()
    probe = _register_probe() if device.type == "cuda" else {"skipped": "no CUDA (dry run)"}
    emit({"section": "kernels", "part": "register_probe", **probe})
    return {"blocks": len(results), "copies": copies, "register_probe": probe}


def _timed(fn, device, at_least: float) -> float:
    """Seconds per call of fn (after one warm-up), synchronizing the GPU around each."""
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    fn()
    sync()
    n, started = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        sync()
        elapsed = time.perf_counter() - started
        if elapsed >= at_least or n >= 2000:
            return elapsed / n


def _synthetic_rows(n_rows: int, n_cols: int, support: float):
    """bf16 rows (K, n) equal to the base outside a random `support` share of the columns."""
    import torch

    gen = torch.Generator().manual_seed(n_rows)
    base = (0.02 * torch.randn(n_cols, generator=gen)).to(torch.bfloat16)
    rows = base.repeat(n_rows, 1)
    picked = torch.randperm(n_cols, generator=gen)[: int(support * n_cols)]
    noise = 0.02 * torch.randn(n_rows, picked.numel(), generator=gen)
    rows[:, picked] = noise.to(torch.bfloat16)
    return rows, base


def _block_rates(ctx: Ctx, device, n_rows: int, support: float) -> dict:
    """The first pass (changed_columns, block_deltas, gram_panels) and the second
    (combine_block) on one (K, 65536) block already on the device, and the raw float64
    (K, 65536) @ (65536, K) matmul the Gram panels are made of."""
    import torch

    from relex_stream.kernels import (
        GRAM_BLOCK_COLS,
        Workspace,
        add_panels,
        any_row,
        block_deltas,
        changed_columns,
        combine_block,
        gram_panels,
    )
    from relex_stream.store_layout import PANEL_DENSE_FRACTION, PANEL_ROWS

    cols = GRAM_BLOCK_COLS
    at_least = 0.05 if ctx.dry else 0.4
    rows, base = (t.to(device) for t in _synthetic_rows(n_rows, cols, support))
    ws = Workspace(n_rows, 1, cols, device)
    gram = torch.zeros(n_rows, n_rows, dtype=torch.float64, device=device)
    weights = torch.full((1, n_rows), 1.0 / n_rows, dtype=torch.float64, device=device)
    holder = {}

    def first_pass() -> None:
        changed = changed_columns(rows, base, ws)
        holder["block"] = block_deltas(rows, base, changed, ws)
        add_panels(gram, ws, gram_panels(changed, holder["block"], 0, ws))

    per_block = _timed(first_pass, device, at_least)
    combine = _timed(lambda: combine_block(weights, holder["block"], base, torch.bfloat16, ws),
                     device, at_least)
    changed = changed_columns(rows, base, ws)
    macs = 0  # multiply-adds of the panels, as gram_panels forms them
    for r0 in range(0, n_rows, PANEL_ROWS):
        r1 = min(n_rows, r0 + PANEL_ROWS)
        count = int(any_row(changed[r0:r1]).sum())
        macs += (r1 - r0) * r1 * (cols if count >= PANEL_DENSE_FRACTION * cols else count)
    a = torch.randn(n_rows, cols, dtype=torch.float64, device=device)
    matmul = _timed(lambda: a @ a.T, device, at_least)
    return {
        "part": "gram_block", "K": n_rows, "support": support,
        "first_pass_block_s": per_block,
        "first_pass_rows_GBps": n_rows * cols * 2 / per_block / 1e9,
        "first_pass_GMACps": macs / per_block / 1e9,
        "combine_block_s": combine,
        "raw_fp64_matmul_block_s": matmul,
        "raw_fp64_matmul_GMACps": n_rows * n_rows * cols / matmul / 1e9,
        "first_pass_over_matmul": per_block / matmul,
        "gram_pass_s_per_1e9_params": per_block * 1e9 / cols,
        "combine_s_per_1e9_params": combine * 1e9 / cols,
    }


def _chunk_rate(ctx: Ctx, device, n_rows: int, n_blocks: int, support: float) -> dict:
    """One chunk as passes._first_pass_chunk meets it: rows and base in the read ring (pinned
    on CUDA), uploaded non_blocking, then every block's first pass, then a synchronize."""
    import torch

    from relex_stream.kernels import (
        GRAM_BLOCK_COLS,
        Workspace,
        add_panels,
        block_deltas,
        changed_columns,
        gram_panels,
    )
    from relex_stream.reader import Ring

    cols = GRAM_BLOCK_COLS * n_blocks
    rows_host, base_host = _synthetic_rows(n_rows, cols, support)
    ring = Ring(rows_host.numel() * 2 + base_host.numel() * 2 + 256, pin=device.type == "cuda")
    raw = ring._slab
    rows = raw[: rows_host.numel() * 2].view(torch.bfloat16).view(n_rows, cols)
    base = raw[rows_host.numel() * 2: (rows_host.numel() + cols) * 2].view(torch.bfloat16)
    rows.copy_(rows_host)
    base.copy_(base_host)
    ws = Workspace(n_rows, 1, GRAM_BLOCK_COLS, device)
    gram = torch.zeros(n_rows, n_rows, dtype=torch.float64, device=device)

    def chunk() -> None:
        rows_t, base_t = rows, base
        if device.type == "cuda":
            rows_t = rows.to(device, non_blocking=True)
            base_t = base.to(device, non_blocking=True)
        for a in range(0, cols, GRAM_BLOCK_COLS):
            b = a + GRAM_BLOCK_COLS
            changed = changed_columns(rows_t[:, a:b], base_t[a:b], ws)
            block = block_deltas(rows_t[:, a:b], base_t[a:b], changed, ws)
            add_panels(gram, ws, gram_panels(changed, block, 0, ws))

    try:
        per_chunk = _timed(chunk, device, 0.05 if ctx.dry else 1.0)
    finally:
        pinned = bool(ring._pinned)
        ring.close()
    return {"part": "chunk_with_upload", "K": n_rows, "blocks": n_blocks, "support": support,
            "ring_pinned": pinned, "chunk_s": per_chunk,
            "gram_pass_s_per_1e9_params": per_chunk * 1e9 / cols,
            "rows_GBps": n_rows * cols * 2 / per_chunk / 1e9}


def _copy_rates() -> dict:
    """Host→device GB/s from pageable memory, torch's pinned memory and the read ring's
    cudaHostRegister'ed slab (relex_stream.reader.Ring), each with non_blocking=True; how long
    the call takes to return tells whether the copy was asynchronous."""
    import torch

    from relex_stream.reader import Ring

    size = 512 * MIB
    dst = torch.empty(size, dtype=torch.uint8, device="cuda")
    out: dict = {"bytes": size}

    def rate(src: torch.Tensor, label: str) -> None:
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        returns, totals = [], []
        for _ in range(3):
            started = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            returned = time.perf_counter()
            torch.cuda.synchronize()
            returns.append(returned - started)
            totals.append(time.perf_counter() - started)
        best = min(totals)
        out[label] = {"GBps": size / best / 1e9, "call_returns_s": min(returns),
                      "is_pinned": bool(src.is_pinned())}

    rate(torch.empty(size, dtype=torch.uint8).fill_(1), "pageable")
    rate(torch.empty(size, dtype=torch.uint8, pin_memory=True).fill_(1), "torch_pinned")
    started = time.perf_counter()
    ring = Ring(size, pin=True)
    out["ring_register_s"] = time.perf_counter() - started
    out["ring_registered"] = bool(ring._pinned)
    ring._slab.fill_(1)
    rate(ring._slab, "ring_registered")
    started = time.perf_counter()
    ring.close()
    out["ring_unregister_s"] = time.perf_counter() - started
    return out


def _register_probe() -> dict:
    """What a failed cudaHostRegister leaves behind. reader.Ring ignores a failure (it falls
    back to pageable memory), but the CUDA runtime keeps the error as the thread's last error,
    and torch checks cudaGetLastError after its next kernel launch on that thread."""
    import torch

    cudart = torch.cuda.cudart()
    host = torch.empty(64 * MIB, dtype=torch.uint8)
    out: dict = {}
    first = cudart.cudaHostRegister(host.data_ptr(), host.numel(), 0)
    out["first_register_rc"] = int(first)

    def try_kernel(label: str) -> None:
        try:
            (torch.ones(4, device="cuda") + 1).sum().item()
            out[label] = "ok"
        except Exception as exc:  # noqa: BLE001 - the finding
            out[label] = f"raised: {str(exc).splitlines()[0][:200]}"

    # A second register of the same range fails (already registered), in a helper thread:
    # the error stays in that thread's state, and this thread's next kernel is fine.
    found = []
    helper = threading.Thread(target=lambda: found.append(int(
        cudart.cudaHostRegister(host.data_ptr(), host.numel(), 0))))
    helper.start()
    helper.join()
    out["failed_register_in_thread_rc"] = found[0] if found else None
    try_kernel("kernel_after_failed_register_in_other_thread")
    # The same failure on this thread, as reader.Ring would meet it.
    again = cudart.cudaHostRegister(host.data_ptr(), host.numel(), 0)
    out["failed_register_rc"] = int(again)
    out["failed_register_message"] = cudart.cudaGetErrorString(again)
    try_kernel("kernel_after_failed_register_same_thread")
    try_kernel("second_kernel_after_failed_register")
    out["unregister_rc"] = int(cudart.cudaHostUnregister(host.data_ptr()))
    try_kernel("kernel_after_unregister")
    return out


# --------------------------------------------------------------------------- cpu vs cuda


SMALL_SHAPE = ["--hidden", "64", "--intermediate", "128", "--layers", "1", "--vocab", "16384",
               "--heads", "4", "--kv-heads", "2", "--head-dim", "16"]
SMALL_STEPS = "3,7,20,22,50"


def section_cpu_vs_cuda(ctx: Ctx) -> dict:
    """The CLI on both devices; embed_tokens and lm_head have 16384 × 64 = 1M elements (two
    inner chunks), so --max-memory 32M reads them in chunks."""
    from tests.reference import assert_matches_reference, load_model_dir, reference_from_dirs

    other = "cpu" if ctx.dry else "cuda"  # the dry run compares the CPU with itself
    paths = {
        # on CUDA the device budget caps the chunks: 32M uploads 512K-column chunks, keeps none
        "chunked": ["--max-memory", "32M", "--max-gpu-memory", "32M"],
        "kept": ["--max-memory", "32M", "--max-gpu-memory", "1G"],
    }
    cases = [("planted", "chunked"), ("planted", "kept"), ("drift", "kept")]
    target = 120
    findings, results = [], []
    references: dict = {}
    for profile in ("planted", "drift"):
        traj = ctx.work / f"small-{profile}"
        synth(ctx, traj, SMALL_STEPS, SMALL_SHAPE, profile, timeout=max(5, ctx.left() - 5))
        steps = [int(s) for s in SMALL_STEPS.split(",")]
        ckpts = {s: traj / "runs" / f"checkpoint-{s}" for s in steps}
        references[profile] = (reference_from_dirs(traj / "base", ckpts, [float(target)]),
                               load_model_dir(traj / "base"))
    devices = ("cpu", other)
    for profile, path in cases:
        traj = ctx.work / f"small-{profile}"
        outs = []
        record: dict = {"part": "compare", "profile": profile, "path": path}
        for i, device in enumerate(devices):
            out = ctx.work / f"small-{profile}-{path}-{i}-{device}"
            run = cli(ctx, "run", "--base", traj / "base", "--runs", traj / "runs", "--target",
                      target, "--out", out, "--device", device, *paths[path],
                      timeout=max(5, ctx.left() - 5))
            label = f"{device}{i}"
            record[f"{label}_rc"] = run["rc"]
            record[f"{label}_wall_s"] = run["wall_s"]
            record[f"{label}_read"] = next((s for s in run["summary"] if s.startswith("read:")),
                                           None)
            if run["rc"] != 0:
                findings.append(f"{profile}/{path} on {device} failed: "
                                f"{run.get('stderr_tail', '')[-300:]}")
                continue
            ref, base = references[profile]
            try:
                assert_matches_reference(load_model_dir(out / f"step-{target}"),
                                         ref[float(target)], base, None)
                record[f"{label}_within_one_ulp"] = True
            except AssertionError as exc:
                record[f"{label}_within_one_ulp"] = False
                findings.append(f"{profile}/{path} on {device}: {str(exc)[:300]}")
            outs.append(out / f"step-{target}")
        if len(outs) == 2:
            record |= differing_elements(*outs)
        emit({"section": "cpu_vs_cuda", **record})
        results.append(record)
    # within one device, chunked and kept give the same bytes
    for i, device in enumerate(devices):
        dirs = [ctx.work / f"small-planted-{path}-{i}-{device}" / f"step-{target}"
                for path in ("chunked", "kept")]
        if all(d.exists() for d in dirs):
            same = differing_elements(*dirs)
            emit({"section": "cpu_vs_cuda", "part": "paths_same_device", "device": f"{device}{i}",
                  "profile": "planted", **same})
            if not same["same_bytes"]:
                findings.append(f"planted on {device}: chunked and kept differ")
    return {"status": "fail" if findings else "ok", "findings": findings,
            "cpu_vs_other_same_bytes": {f"{r['profile']}/{r['path']}": r.get("same_bytes")
                                        for r in results},
            "differing_elements": {f"{r['profile']}/{r['path']}": r.get("differing_elements")
                                   for r in results}}


# --------------------------------------------------------------------------- pytest


def section_pytest(ctx: Ctx) -> dict:
    files = ["tests/test_gpu_paths.py", "tests/test_reference_match.py"]
    log = ctx.out / "pytest.log"
    junit = ctx.out / "pytest-junit.xml"
    env = child_env(RELEX_TEST_DEVICE="cpu" if ctx.dry else "cuda", RELEX_GPU_CHECK_CHILD="1")
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *files]
    if ctx.dry:  # the command and the collection, not the tests (CI runs those)
        cmd += ["--collect-only", "-q"]
    else:
        cmd += ["-v", "-rfE", "--durations=15", f"--junitxml={junit}", "-o", "junit_family=legacy"]
        if _has_module("pytest_timeout"):
            cmd += ["--timeout", "170"]
    started = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=max(5, ctx.left() - 5))
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc)
    text = log.read_text(errors="replace")
    record: dict = {"rc": proc.returncode, "wall_s": time.perf_counter() - started,
                    "command": " ".join(cmd[1:])}
    if timed_out:
        record["timed_out"] = True
    if ctx.dry:
        found = re.search(r"(\d+) tests? collected", text)
        record["collected"] = int(found.group(1)) if found else None
        ok = proc.returncode == 0 and bool(found)
    else:
        record["passed"] = len(re.findall(r" PASSED", text))
        record["failed"] = re.findall(r"(\S+::\S+) FAILED", text)
        record["errors"] = re.findall(r"(\S+::\S+) ERROR", text)
        record["skipped"] = len(re.findall(r" SKIPPED", text))
        final = [line for line in text.splitlines() if re.match(r"=+ .*(passed|failed)", line)]
        record["final_line"] = final[-1] if final else None
        record["properties"] = _junit_properties(junit)
        slowest = text.partition("slowest")[2].splitlines()[1:12]
        record["slowest"] = [line.strip() for line in slowest if line.strip()]
        ok = proc.returncode == 0 and not timed_out
    if not ok:
        record["log_tail"] = text[-2500:]
    record["status"] = "ok" if ok else "fail"
    return record


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _junit_properties(junit: Path) -> dict:
    if not junit.exists():
        return {}
    import xml.etree.ElementTree as ET

    found = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        for prop in case.iter("property"):
            try:
                found[prop.get("name")] = json.loads(prop.get("value"))
            except (TypeError, ValueError):
                found[prop.get("name")] = prop.get("value")
    return found


# --------------------------------------------------------------------------- end to end


QWEN3_8B_SHAPE = ["--hidden", "4096", "--intermediate", "12288", "--layers", "2",
                  "--vocab", "151936", "--heads", "32", "--kv-heads", "8", "--head-dim", "128",
                  "--tied"]
TINY_SHAPE = ["--hidden", "64", "--intermediate", "128", "--layers", "1", "--vocab", "4096",
              "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--tied"]


def _e2e_paths(ctx: Ctx) -> tuple[Path, Path]:
    return ctx.work / "e2e-traj", ctx.work / "e2e-default"


def section_end_to_end(ctx: Ctx) -> dict:
    traj, out = _e2e_paths(ctx)
    gen = _grow_trajectory(ctx, traj)
    emit({"section": "end_to_end", "part": "synth", **gen})
    steps = gen["steps"]
    if len(steps) < 2:
        return {"status": "fail", "error": "fewer than two checkpoints were written in time",
                **gen}
    files = safetensors_files(traj / "base") + [
        f for s in steps for f in safetensors_files(traj / "runs" / f"checkpoint-{s}")]
    floor = read_floor(files)
    emit({"section": "end_to_end", "part": "read_floor", **floor})
    used_before = gpu_used_mib()
    target = 4 * steps[-1]
    run = cli(ctx, "run", "--base", traj / "base", "--runs", traj / "runs", "--target", target,
              "--out", out, "--device", ctx.device, timeout=ctx.left() - 5, monitor=True)
    (ctx.work / "e2e-target").write_text(str(target))
    record = {
        "K": len(steps), "gpu_used_mib_before_run": used_before,
        "gpu_free_at_run_start": used_before is None or used_before < 1024,
        "read_floor_s": floor["seconds"], "read_floor_GBps": floor["GBps"],
        "input_bytes": floor["bytes"], "run": run,
        "run_to_floor": run["wall_s"] / floor["seconds"] if floor["seconds"] else None,
    }
    if "main_s" in run:
        record["run_main_to_floor"] = run["main_s"] / floor["seconds"]
    record["status"] = "ok" if run["rc"] == 0 else "fail"
    return record


def _grow_trajectory(ctx: Ctx, traj: Path) -> dict:
    """synth as many checkpoints as the time allows (at most 12, at least 2): it records each
    complete step in synth.json; it is stopped once time is up and the partial one removed."""
    shape = TINY_SHAPE if ctx.dry else QWEN3_8B_SHAPE
    most = 4 if ctx.dry else 12
    started = time.time()
    # the rest of the section's time is the read floor's and the run's
    stop_at = started + (ctx.left() * 0.45 if not ctx.dry else ctx.left() - 20)
    cmd = [sys.executable, "-m", "relex_stream", "synth", "--out", str(traj), "--steps",
           f"1-{most}", *shape, "--profile", "drift", "--overwrite"]
    log = open(ctx.out / "gpu_check.log", "a")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(),
                            cwd=ROOT, start_new_session=True)
    steps: list[int] = []
    base_s = None
    try:
        while proc.poll() is None:
            time.sleep(0.5)
            steps = _recorded_steps(traj)
            if base_s is None and (traj / "synth.json").exists():
                base_s = time.time() - started
            enough = len(steps) >= 3 or (len(steps) >= 2 and time.time() > stop_at + 30)
            if (time.time() > stop_at and enough) or ctx.left() < 30 or _disk_short(traj):
                break
    finally:
        if proc.poll() is None:
            kill_group(proc)
        log.close()
    steps = _recorded_steps(traj)
    for directory in (traj / "runs").glob("checkpoint-*"):
        if int(directory.name.rpartition("-")[2]) not in steps:
            shutil.rmtree(directory)
    sizes = [sum(f.stat().st_size for f in safetensors_files(traj / "base"))] if steps else []
    return {"steps": steps, "synth_s": time.time() - started, "base_written_s": base_s,
            "checkpoint_bytes": sizes[0] if sizes else None, "shape": " ".join(shape),
            "profile": "drift"}


def _recorded_steps(traj: Path) -> list[int]:
    try:
        return [int(s) for s in json.loads((traj / "synth.json").read_text())["steps"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _disk_short(traj: Path) -> bool:
    """Stop writing checkpoints while the runs' stores and outputs still fit (~6 checkpoints'
    worth) with 4 GiB to spare."""
    files = safetensors_files(traj / "base")
    if not files:
        return False
    size = sum(f.stat().st_size for f in files)
    return shutil.disk_usage(traj).free < 6 * size + 4 * GIB


# --------------------------------------------------------------------------- memory


def section_memory(ctx: Ctx) -> dict:
    traj, default_out = _e2e_paths(ctx)
    steps = _recorded_steps(traj)
    if len(steps) < 2 or not (ctx.work / "e2e-target").exists():
        return {"status": "skipped", "reason": "no end_to_end trajectory"}
    target = int((ctx.work / "e2e-target").read_text())
    host, gpu = ("32M", "16M") if ctx.dry else ("2G", "4G")
    from relex_stream.units import parse_bytes

    out = ctx.work / "memory-run"
    run = cli(ctx, "run", "--base", traj / "base", "--runs", traj / "runs", "--target", target,
              "--out", out, "--device", ctx.device, "--max-memory", host, "--max-gpu-memory", gpu,
              timeout=ctx.left() - 5, monitor=True)
    record: dict = {"max_memory": host, "max_gpu_memory": gpu, "K": len(steps), "run": run}
    findings = []
    if run["rc"] != 0:
        return {"status": "fail", **record}
    host_bytes, gpu_bytes = parse_bytes(host), parse_bytes(gpu)
    if "peak_rss" in run:
        engine = run["peak_rss"] - run.get("rss_after_init", 0)
        record["host_peak_over_init"] = engine
        record["host_within_budget"] = engine <= host_bytes
        if engine > host_bytes:
            findings.append(f"peak RSS grew {engine / GIB:.2f} GiB past start-up, over "
                            f"--max-memory {host}")
    if run.get("gpu_max_allocated") is not None:
        record["gpu_within_budget"] = run["gpu_max_allocated"] <= gpu_bytes
        if run["gpu_max_allocated"] > gpu_bytes:
            findings.append(f"GPU max allocated {run['gpu_max_allocated'] / GIB:.2f} GiB over "
                            f"--max-gpu-memory {gpu}")
    default_step = default_out / f"step-{target}"
    if default_step.exists():
        record["vs_default_run"] = differing_elements(default_step, out / f"step-{target}")
        if not record["vs_default_run"]["same_bytes"]:
            return {"status": "fail", "findings": ["budgets changed the bytes"], **record}
    record["findings"] = findings
    record["status"] = "ok"
    return record


# --------------------------------------------------------------------------- the CLI child


def cli_child(stats_path: str, args: list[str]) -> int:
    """Run the CLI in this process and record its peaks: host RSS (ru_maxrss) after start-up
    and at the end, and torch's GPU peak (max_memory_allocated / reserved)."""
    import resource

    started = time.perf_counter()
    import torch

    stats: dict = {}
    on_cuda = any(a.startswith("cuda") for a in args) and torch.cuda.is_available()
    if on_cuda:
        torch.cuda.init()
        free, total = torch.cuda.mem_get_info()
        stats |= {"gpu_free_at_start": free, "gpu_total": total}
    from relex_stream.cli import main

    stats["rss_after_init"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stats["startup_s"] = time.perf_counter() - started
    rc = None
    try:
        rc = main(args)
        return rc
    finally:
        stats["rc"] = rc
        stats["main_s"] = time.perf_counter() - started - stats["startup_s"]
        stats["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if on_cuda:
            stats["gpu_max_allocated"] = torch.cuda.max_memory_allocated()
            stats["gpu_max_reserved"] = torch.cuda.max_memory_reserved()
        Path(stats_path).write_text(json.dumps(stats))


# --------------------------------------------------------------------------- driver


SECTION_FUNCTIONS = {
    "env": section_env,
    "kernels": section_kernels,
    "cpu_vs_cuda": section_cpu_vs_cuda,
    "pytest": section_pytest,
    "end_to_end": section_end_to_end,
    "memory": section_memory,
}


def run_section_child(name: str, ctx: Ctx) -> int:
    """In the section's own process: run it, print its closing line, free the GPU."""
    started = time.perf_counter()
    try:
        record = SECTION_FUNCTIONS[name](ctx)
        status = record.pop("status", "ok")
    except BaseException as exc:  # noqa: BLE001 - every failure becomes the section's line
        status, record = "error", {"error": repr(exc)[:500],
                                   "traceback": traceback.format_exc()[-2500:]}
    with contextlib.suppress(Exception):
        record |= free_gpu()
    emit({"section": name, "status": status, "seconds": time.perf_counter() - started,
          **record})
    return 0


def drive(args: argparse.Namespace) -> int:
    out = Path(args.out or os.environ.get("OUT") or ROOT / "bench" / "out")
    out.mkdir(parents=True, exist_ok=True)
    temporary = args.work is None and args.dry_run
    work = Path(args.work or (tempfile.mkdtemp(prefix="relex-gpu-check-dry-") if temporary
                              else "/tmp/relex-gpu-check"))
    marker = work / ".relex-gpu-check"
    if work.exists() and any(work.iterdir()) and not marker.exists():
        sys.exit(f"{work} is not empty and not a gpu_check work directory; pass --work")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    marker.touch()
    (out / "gpu_check.log").write_text("")
    results = out / "gpu_check.jsonl"
    results.write_text("")
    budget = args.budget_s or (DRY_BUDGET_S if args.dry_run else FULL_BUDGET_S)
    started = time.time()
    deadline = started + budget
    wanted = [s for s in SECTIONS if not args.only or s.name in args.only.split(",")]
    statuses = {}

    def write(record: dict) -> None:
        line = json.dumps(_rounded(record), default=str)
        print(line, flush=True)
        with open(results, "a") as f:
            f.write(line + "\n")

    write({"section": "start", "dry_run": args.dry_run, "budget_s": budget, "work": str(work),
           "sections": [s.name for s in wanted], "gpu_used_mib": gpu_used_mib()})
    for i, section in enumerate(wanted):
        later = sum(s.limits(args.dry_run)[1] for s in wanted[i + 1:])
        cap, floor = section.limits(args.dry_run)
        limit = min(cap, deadline - time.time() - later)
        if limit < floor:
            statuses[section.name] = "skipped"
            write({"section": section.name, "status": "skipped",
                   "reason": f"{limit:.0f} s left for it, under its {floor:.0f} s"})
            continue
        statuses[section.name] = _run_child(section.name, args.dry_run, work, out, limit, write)
    write({"section": "summary", "statuses": statuses, "seconds": time.time() - started,
           "gpu_used_mib_at_end": gpu_used_mib()})
    if temporary:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(s == "ok" for s in statuses.values()) else 1


def _run_child(name: str, dry: bool, work: Path, out: Path, limit: float, write) -> str:
    """Run one section's process within `limit` seconds, relaying its JSON lines."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name,
           "--deadline", f"{time.time() + limit:.3f}", "--work", str(work), "--out", str(out)]
    if dry:
        cmd.append("--dry-run")
    env = child_env()
    if dry:
        env["CUDA_VISIBLE_DEVICES"] = ""
    started = time.time()
    with open(out / "gpu_check.log", "a") as log:
        log.write(f"\n===== {name} (limit {limit:.0f} s)\n")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT, start_new_session=True)
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True)
    reader.start()
    status = None
    timer = threading.Timer(limit + 10, kill_group, args=(proc,))  # the child has its deadline
    timer.start()
    try:
        for line in proc.stdout:
            try:
                record = json.loads(line)
            except ValueError:
                with open(out / "gpu_check.log", "a") as log:
                    log.write(line)
                continue
            write(record)
            if record.get("section") == name and "status" in record:
                status = record["status"]
        proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            kill_group(proc)
    reader.join(5)
    with open(out / "gpu_check.log", "a") as log:
        log.write("".join(stderr))
    if status is None:
        status = "timeout" if time.time() - started >= limit else "error"
        write({"section": name, "status": status, "rc": proc.returncode,
               "seconds": time.time() - started, "stderr_tail": "".join(stderr)[-2000:]})
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="every section on the CPU with tiny sizes (no GPU needed)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"seconds for the whole check (default {FULL_BUDGET_S}, dry "
                        f"{DRY_BUDGET_S})")
    parser.add_argument("--only", help="comma-separated sections to run (default: all)")
    parser.add_argument("--work", help="scratch directory (default /tmp/relex-gpu-check)")
    parser.add_argument("--out", help="where the JSON lines and logs go (default $OUT, else "
                        "bench/out)")
    parser.add_argument("--section", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--cli-child", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cli_child:
        rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
        return cli_child(args.cli_child, rest)
    if args.section:
        ctx = Ctx(args.dry_run, Path(args.work), Path(args.out), args.deadline)
        return run_section_child(args.section, ctx)
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
