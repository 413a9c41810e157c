"""The engine: discover → validate → store → Gram pass → weights → materialise → write.

This module wires the pieces together and owns no numerics or file formats of its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch

from . import store as trajectory_store
from .checkpoints import ModelLayout
from .distributed import (
    Ranks,
    assign,
    barrier,
    broadcast,
    device_for,
    gather,
    init_from_env,
    shutdown,
)
from .errors import RelexError
from .inputs import Sources, open_sources, open_store
from .kernels import GRAM_BLOCK_COLS, resolve_device
from .memory import budget_too_small, smallest_budget
from .methods import MethodSpec, build_spec, parse_method
from .outputs import OutputSpec, check_plan, plan_outputs, weight_plan
from .passes import GAP_WARNING, PassStats, TensorWork, plan_tensor, run_passes
from .progress import Progress
from .safetensors_io import DTYPES, FLOAT_CODES, read_into
from .units import (
    StepSelection,
    format_bytes,
    parse_bytes,
    parse_step_selection,
    parse_targets,
    step_label,
)
from .writer import ModelWriter, output_dtypes

log = logging.getLogger("relex_stream")

DTYPE_CHOICES = {"auto": None, "bfloat16": "BF16", "float16": "F16", "float32": "F32"}


@dataclass
class RunSummary:
    """What a run did, for the closing summary and for callers of the API."""

    outputs: list[Path]
    store: Path
    observed_steps: list[int]
    tensors: int = 0
    input_bytes: int = 0  # bytes of base + observed rows that the run needed
    bytes_read: int = 0  # bytes actually read from sources and store
    bytes_written: int = 0  # bytes of output tensors
    store_bytes_written: int = 0
    wall_seconds: float = 0.0
    peak_rss_bytes: int = 0  # the largest of any rank
    rank: int = 0  # this process's torchrun rank
    ranks: int = 1
    ill_conditioned: list[tuple[str, float]] = field(default_factory=list)

    def lines(self) -> list[str]:
        ratio = self.bytes_read / self.input_bytes if self.input_bytes else 0.0
        return [
            f"tensors: {self.tensors}; observed steps: {len(self.observed_steps)} "
            f"({self.observed_steps[0]}..{self.observed_steps[-1]})",
            f"read: {format_bytes(self.bytes_read)} ({ratio:.2f}x the input's "
            f"{format_bytes(self.input_bytes)}); written: {format_bytes(self.bytes_written)} "
            f"of outputs, {format_bytes(self.store_bytes_written)} into the store",
            f"wall time: {self.wall_seconds:.1f} s; peak RSS: {format_bytes(self.peak_rss_bytes)}"
            + (f" (largest of {self.ranks} ranks)" if self.ranks > 1 else ""),
            *(f"output: {path}" for path in self.outputs),
        ]


def _free_bytes(path: Path) -> tuple[Path, int]:
    probe = path
    while not probe.exists():
        probe = probe.parent
    return probe, shutil.disk_usage(probe).free


def _check_disk(path: Path, needed: int, what: str) -> None:
    probe, free = _free_bytes(path)
    if needed > free:
        raise RelexError(
            f"writing {what} takes about {format_bytes(needed)} but {probe} has "
            f"{format_bytes(free)} free; free space or choose another location"
        )


def _check_store_disk(path: Path, work: list[TensorWork], sources: Sources | None, codec: str):
    """Refuse up front when the store will not fit, its size estimated from a sample.

    The compressed size depends on the data (1% to 45% of the raw rows measured), so the
    first columns of the largest tensors are read and compressed as the store would.
    """
    building = [w for w in work if w.building]
    raw = sum(w.input_bytes for w in building)
    if not building or sources is None:
        return
    sample = sorted((w for w in building if w.is_float), key=lambda w: -w.numel)[:4]
    fraction = 1.0 if not sample else max(_sample_fraction(w, sources, codec) for w in sample)
    _check_disk(path, int(raw * min(1.0, fraction * 1.25)), "the trajectory store")


def _sample_fraction(w: TensorWork, sources: Sources, codec: str) -> float:
    cols = min(w.numel, GRAM_BLOCK_COLS)  # a few MiB per tensor, not counted in bytes read
    base = np.empty(cols, dtype=w.bits)
    rows = np.empty((w.n_rows, cols), dtype=w.bits)
    read_into(sources.base.tensors[w.name], 0, base)
    for k, ckpt in enumerate(sources.checkpoints):
        read_into(ckpt.model.tensors[w.name], 0, rows[k])
    return trajectory_store.compressed_fraction(base, rows, codec)


def _layout_bytes(layout: ModelLayout, dtypes: dict[str, str]) -> int:
    return sum(
        int(np.prod(shape, dtype=np.int64)) * DTYPES[dtypes[name]][1].itemsize
        for name, (_, shape) in layout.tensors.items()
    )


def _device_budget(device: torch.device, max_gpu_memory: str | int | None) -> int | None:
    """Bytes a tensor may keep on the device between the passes, or None for no residency.

    On CUDA: the flag, or free GPU memory less 10% and 1 GiB. On CPU only when the flag is
    given: the same code path then keeps a second copy in host memory (what the CPU tests use
    to cover the GPU path).
    """
    if max_gpu_memory is not None:
        return parse_bytes(max_gpu_memory)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * 0.9) - 2**30


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass(frozen=True)
class RunRequest:
    """Everything a run was asked for, checked and parsed."""

    out: Path
    targets: list[float]
    methods: list[MethodSpec]
    windows: list[int | None]  # last N observed steps per output group; None = all
    steps: StepSelection | None
    base: Path | None
    runs: Path | None
    ckpts: list[str] | None
    cache: Path | None
    device: str
    max_memory_bytes: int
    max_gpu_memory: str | int | None
    svd: str
    dtype: str
    overwrite: bool
    rebuild: bool
    allow_nonfinite: bool
    quiet: bool
    store_codec: str = "xor-zstd"

    @property
    def store_path(self) -> Path:
        return self.cache if self.cache is not None else self.out / "trajectory.zarr"

    @property
    def widest_window(self) -> int | None:
        return None if None in self.windows else max(self.windows)  # type: ignore[type-var]


def extrapolate(
    *,
    targets: list[float] | str,
    out: str | Path,
    base: str | Path | None = None,
    runs: str | Path | None = None,
    ckpts: list[str] | None = None,
    steps: StepSelection | str | None = None,
    window: int | list[int | None] | None = None,
    method: str | MethodSpec | list[str | MethodSpec] = "relex",
    mode: str = "extrapolate",
    cache: str | Path | None = None,
    device: str = "auto",
    max_memory: str | int = "4G",
    max_gpu_memory: str | int | None = None,
    svd: str = "auto",
    dtype: str = "auto",
    overwrite: bool = False,
    rebuild: bool = False,
    allow_nonfinite: bool = False,
    store_codec: str = "xor-zstd",
    quiet: bool = False,
) -> RunSummary:
    """Predict the checkpoint at each target step; write one model directory per output.

    Works from sources (base plus runs or ckpts) or, with neither, from the store at `cache`.
    Several methods (e.g. ["relex", "raw-ols", "two-point:from=10,to=40"]) and windows (last N
    observed steps) are materialised together in one pass. `mode` ("reconstruct",
    "fit-reconstruct") turns the relex method into the paper's reconstructions.
    """
    started = time.perf_counter()
    target_steps = (
        parse_targets(targets) if isinstance(targets, str) else [float(t) for t in targets]
    )
    if not target_steps:
        raise RelexError("give at least one --target step")
    if dtype not in DTYPE_CHOICES:
        raise RelexError(f"--dtype {dtype!r} is not one of {', '.join(DTYPE_CHOICES)}")
    if store_codec not in trajectory_store.CODECS:
        raise RelexError(
            f"--store-codec {store_codec!r} is not one of {', '.join(trajectory_store.CODECS)}"
        )
    if base is None and (runs is not None or ckpts):
        raise RelexError("--runs/--ckpt need --base, the checkpoint the run started from")
    methods = [method] if isinstance(method, (str, MethodSpec)) else list(method)
    specs = [m if isinstance(m, MethodSpec) else parse_method(m) for m in methods]
    if mode != "extrapolate":
        specs = [build_spec(s.name, mode, s.rank, s.fit) for s in specs]
    windows = window if isinstance(window, list) else [window]
    request = RunRequest(
        out=Path(out),
        targets=target_steps,
        methods=specs,
        windows=windows,
        steps=parse_step_selection(steps) if isinstance(steps, str) else steps,
        base=Path(base) if base is not None else None,
        runs=Path(runs) if runs is not None else None,
        ckpts=ckpts,
        cache=Path(cache) if cache is not None else None,
        device=device,
        max_memory_bytes=parse_bytes(max_memory),
        max_gpu_memory=max_gpu_memory,
        svd=svd,
        dtype=dtype,
        overwrite=overwrite,
        rebuild=rebuild,
        allow_nonfinite=allow_nonfinite,
        quiet=quiet,
        store_codec=store_codec,
    )
    ranks = init_from_env(device)
    try:
        summary = _execute(request, ranks)
    finally:
        shutdown(ranks)
    summary.wall_seconds = time.perf_counter() - started
    return summary


def _execute(request: RunRequest, ranks: Ranks) -> RunSummary:
    """The run proper, on one torchrun rank (or the only process)."""
    torch_device = resolve_device(device_for(request.device, ranks))
    if torch_device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Leave a core to the reader and store-writer threads: on 2 cores, 1 torch thread ran
        # the 100M/K=30 bench in ~25 s against ~29 s with 2 (bench/RESULTS.md).
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    device_budget = _device_budget(torch_device, request.max_gpu_memory)
    store_path = request.store_path
    sources = (
        open_sources(
            request.base, request.runs, request.ckpts, request.steps, request.widest_window
        )
        if request.base is not None
        else None
    )

    outputs = plan_outputs(request.out, request.targets, request.methods, request.windows)
    if sources is not None:  # catch option and budget mistakes before the store is touched
        check_plan(outputs, [c.step for c in sources.checkpoints])
        layout = sources.base.layout()
        everything = dict.fromkeys(layout.tensors, True)
        dtypes = output_dtypes(layout, DTYPE_CHOICES[request.dtype])
        _plan_work(layout, {}, dtypes, len(sources.checkpoints), len(outputs), everything,
                   request, device_budget)  # fmt: skip

    # Only rank 0 locks, creates or rebuilds the store; the others open it after a barrier.
    lock = trajectory_store.locked(store_path) if ranks.is_main else contextlib.nullcontext()
    with lock:
        opened = None
        if ranks.is_main:
            opened = open_store(
                store_path,
                sources,
                request.steps,
                request.widest_window,
                request.rebuild,
                request.store_codec,
            )
        barrier(ranks)
        if not ranks.is_main:
            opened = open_store(
                store_path, sources, request.steps, request.widest_window, rebuild=False
            )
        root, observed, row_ids = opened
        check_plan(outputs, observed)
        _check_outputs(request.out, outputs, request.overwrite, ranks)
        meta = trajectory_store.attrs(root)
        layout = ModelLayout.from_json(meta["layout"])
        aliases: dict[str, str] = meta["aliases"]
        dtypes = output_dtypes(layout, DTYPE_CHOICES[request.dtype])
        if ranks.is_main:
            _warn_about(outputs, observed, request.max_memory_bytes)
        building = {n: not trajectory_store.is_complete(root, n) for n in layout.tensors}
        if sources is None and any(building[n] for n in layout.tensors if n not in aliases):
            raise RelexError(
                f"the store at {store_path} is incomplete (an interrupted run?); rerun with "
                "--base and --runs to finish it"
            )
        work = _plan_work(layout, aliases, dtypes, len(observed), len(outputs), building,
                          request, device_budget)  # fmt: skip
        _check_store_disk(store_path, work, sources, request.store_codec)
        _check_disk(request.out, _layout_bytes(layout, dtypes) * len(outputs), "the outputs")

        summary = RunSummary(
            outputs=[o.directory for o in outputs], store=store_path, observed_steps=observed
        )
        summary.rank = ranks.rank
        summary.tensors = sum(len(w.out_names) for w in work)
        summary.input_bytes = sum(w.input_bytes for w in work)
        owners = assign([w.input_bytes for w in work], ranks.world_size)
        my_work = [w for w, owner in zip(work, owners, strict=True) if owner == ranks.rank]
        stats = PassStats()
        progress_totals = {
            "gram": sum(sum(j.nbytes for j in w.jobs() if j.stage == "gram") for w in work),
            "materialise": summary.input_bytes,
        }
        _write_outputs(
            request, ranks, outputs, layout, dtypes, my_work, progress_totals, sources, root,
            row_ids, observed, torch_device, stats, summary,
        )  # fmt: skip

    per_rank = gather(
        (
            stats.bytes_read,
            stats.bytes_written,
            stats.store_bytes_written,
            summary.ill_conditioned,
            _peak_rss_bytes(),
        ),
        ranks,
    )
    summary.bytes_read = sum(r[0] for r in per_rank)
    summary.bytes_written = sum(r[1] for r in per_rank)
    summary.store_bytes_written = sum(r[2] for r in per_rank)
    summary.ill_conditioned = [item for r in per_rank for item in r[3]]
    summary.peak_rss_bytes = max(r[4] for r in per_rank)
    summary.ranks = ranks.world_size
    if summary.ill_conditioned and ranks.is_main:
        worst = max(summary.ill_conditioned, key=lambda item: item[1])
        log.warning(
            "%d tensor(s) have σ₂/σ₁ above %.2f, so their rank-1 direction is ill-defined "
            "(worst: %s at %.3f)",
            len(summary.ill_conditioned),
            GAP_WARNING,
            *worst,
        )
    return summary


def _plan_work(
    layout: ModelLayout,
    aliases: dict[str, str],
    dtypes: dict[str, str],
    n_observed: int,
    n_outputs: int,
    building: dict[str, bool],
    request: RunRequest,
    device_budget: int | None,
) -> list[TensorWork]:
    """Chunking, residency and kernel of every tensor that is computed (aliases follow)."""
    needed = max(
        smallest_budget(
            int(np.prod(shape, dtype=np.int64)),
            n_observed if dtype in FLOAT_CODES else 0,
            DTYPES[dtype][1].itemsize,
            n_outputs,
            DTYPES[dtypes[name]][1].itemsize,
        )
        for name, (dtype, shape) in layout.tensors.items()
    )
    if needed > request.max_memory_bytes:
        raise budget_too_small(request.max_memory_bytes, n_observed, needed)
    return [
        plan_tensor(
            name,
            [name] + [a for a, src in aliases.items() if src == name],
            layout,
            DTYPES[dtypes[name]][1].itemsize,
            n_observed,
            n_outputs,
            building[name],
            request.max_memory_bytes,
            device_budget,
            request.svd,
        )
        for names in layout.shard_tensors.values()
        for name in names
        if name not in aliases
    ]


def _write_outputs(
    request: RunRequest,
    ranks: Ranks,
    outputs: list[OutputSpec],
    layout: ModelLayout,
    dtypes: dict[str, str],
    my_work: list[TensorWork],
    progress_totals: dict[str, int],
    sources: Sources | None,
    root,
    row_ids: list[int],
    observed: list[int],
    device: torch.device,
    stats: PassStats,
    summary: RunSummary,
) -> None:
    """Lay out the outputs (rank 0), run both passes over this rank's tensors, finalise."""
    plan = weight_plan(outputs, observed)
    run_id = broadcast(os.getpid(), ranks)
    progress = Progress(
        progress_totals,
        show=ranks.is_main and not request.quiet and _stderr_is_tty(),
        board=request.out / f".relex-progress-{run_id}" if ranks.distributed else None,
        rank=ranks.rank,
    )
    writers: list[ModelWriter] = []
    try:
        for spec in outputs if ranks.is_main else []:
            tmp = spec.directory.with_name(f".{spec.directory.name}.tmp-{run_id}")
            writers.append(ModelWriter(tmp, spec.directory, layout, dtypes))
        barrier(ranks)
        for spec in [] if ranks.is_main else outputs:
            tmp = spec.directory.with_name(f".{spec.directory.name}.tmp-{run_id}")
            writers.append(ModelWriter(tmp, spec.directory, layout, dtypes, create=False))
        run_passes(
            my_work,
            sources,
            root,
            row_ids,
            torch.tensor(observed, dtype=torch.float64),
            lambda name, gram: plan(gram),
            writers,
            device,
            stats,
            summary.ill_conditioned,
            progress=progress,
            allow_nonfinite=request.allow_nonfinite,
            observed_steps=observed,
        )
        progress.close()
        for writer in writers:
            writer.close()
        barrier(ranks)
        if ranks.is_main:
            progress.remove_board()
            if sources is not None:
                trajectory_store.mark_complete(root)
            aux = (
                sources.base.aux_files()
                if sources is not None
                else trajectory_store.aux_files(root)
            )
            for writer in writers:
                writer.finalize(aux, request.overwrite)
        writers = []
    except BaseException:
        for writer in writers:
            writer.abort()
        raise


def _check_outputs(out: Path, outputs: list[OutputSpec], overwrite: bool, ranks: Ranks) -> None:
    """Refuse existing output directories unless `overwrite`; make sure OUT is writable."""
    for spec in outputs:
        if spec.directory.exists() and not overwrite:
            raise RelexError(f"{spec.directory} already exists; pass --overwrite to replace it")
    try:
        for parent in {spec.directory.parent for spec in outputs}:
            parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RelexError(f"cannot create {out}: {exc.strerror}; choose another --out") from None
    if not os.access(out, os.W_OK):
        raise RelexError(f"cannot write to {out}: choose a writable --out")
    if ranks.is_main:
        for parent in {spec.directory.parent for spec in outputs}:
            _remove_leftovers(parent)


def _remove_leftovers(directory: Path) -> None:
    """Remove what killed runs left: temporary outputs of dead processes, replaced outputs."""
    for stale in directory.glob(".step-*.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and psutil.pid_exists(int(pid)):
            continue  # another live run writing into the same OUT
        shutil.rmtree(stale, ignore_errors=True)
    for replaced in directory.glob("step-*.replaced-tmp"):
        shutil.rmtree(replaced, ignore_errors=True)


def _warn_about(outputs: list[OutputSpec], observed: list[int], budget: int) -> None:
    for target in sorted({spec.target for spec in outputs if spec.method.name != "reconstruct"}):
        if target <= observed[-1]:
            log.warning(
                "target %s is not beyond the last observed step %d: this interpolates or "
                "reconstructs rather than extrapolates",
                step_label(target),
                observed[-1],
            )
    free_ram = psutil.virtual_memory().available
    if budget > free_ram:
        log.warning(
            "--max-memory %s is more than the %s of RAM available now",
            format_bytes(budget),
            format_bytes(free_ram),
        )


def _stderr_is_tty() -> bool:
    import sys

    return sys.stderr.isatty()
