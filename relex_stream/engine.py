"""The engine: check → decide → store → Gram pass → weights → materialise → commit → finalise.

This module wires the pieces together and owns no numerics or file formats of its own. Every
check runs before the first byte is written: a refused run leaves nothing behind.
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

from .block_pool import BlockPool
from .distributed import Ranks, barrier, broadcast, device_for, gather, init_from_env, shutdown
from .envvars import omp_num_threads_is_set
from .errors import RelexError, SourceChanged, StoreBusy
from .fit import GAP_WARNING
from .inputs import RunInputs, gather_inputs
from .jsonfile import show
from .kernels import GRAM_BLOCK_COLS, Workspace
from .memory import Budget
from .outputs import OutputSpec, check_plan, output_weights, plan_outputs
from .passes import GroupWork, PassContext, PassStats, jobs_for, run_passes
from .plan import assign, chunking, device_budget, group_work
from .progress import Progress
from .reader import ALIGN_BYTES, Ring
from .request import RunRequest, make_request
from .safefs import open_root, paths_overlap, remove_tree
from .safetensors_io import DTYPES
from .sources import RowOrigin, RowReader, Sources
from .store import TrajectoryStore, compressed_sample_fraction, stored_row_fraction
from .store_layout import Generation, Group
from .units import DEFAULT_MAX_MEMORY, format_bytes, step_label
from .writer import (
    ModelWriter,
    abort_all,
    check_output_dir,
    new_run_id,
    output_dtypes,
    output_names,
    remove_leftovers,
)

log = logging.getLogger("relex_stream")


@dataclass
class RunSummary:
    """What a run did, for the closing summary and for callers of the API."""

    outputs: list[Path]
    store: Path
    observed_steps: list[int]
    tensors: int = 0
    appended_steps: list[int] = field(default_factory=list)
    store_change: str | None = None  # 'build', 'append', or None: the store was only read
    input_bytes: int = 0  # bytes of base + observed rows that the run needed
    bytes_from_sources: int = 0
    bytes_from_store: int = 0  # stored bytes read from the store
    bytes_decoded: int = 0  # raw bytes those decoded to
    bytes_written: int = 0  # bytes of output tensors
    store_bytes_written: int = 0
    # changed elements ÷ elements, over the observed steps (None: no output was computed)
    support_fraction: float | None = None
    wall_seconds: float = 0.0
    peak_rss_bytes: int = 0  # the largest of any rank
    compute_threads: int = 1  # threads computing Gram blocks (per rank)
    rank: int = 0  # this process's torchrun rank
    ranks: int = 1
    ill_conditioned: list[tuple[str, float]] = field(default_factory=list)

    @property
    def bytes_read(self) -> int:
        return self.bytes_from_sources + self.bytes_from_store

    def lines(self) -> list[str]:
        ratio = self.bytes_from_sources / self.input_bytes if self.input_bytes else 0.0
        appended = (
            f"; appended {len(self.appended_steps)} step(s) "
            f"({self.appended_steps[0]}..{self.appended_steps[-1]})"
            if self.appended_steps else ""
        )
        return [
            f"tensors: {self.tensors}; observed steps: {len(self.observed_steps)} "
            f"({self.observed_steps[0]}..{self.observed_steps[-1]}){appended}",
            f"read: {format_bytes(self.bytes_from_sources)} from checkpoints ({ratio:.2f}x the "
            f"input's {format_bytes(self.input_bytes)}), {format_bytes(self.bytes_from_store)} "
            f"from the store (decoded to {format_bytes(self.bytes_decoded)}); written: "
            f"{format_bytes(self.bytes_written)} of outputs, "
            f"{format_bytes(self.store_bytes_written)} into the store",
            *([] if self.support_fraction is None else [
                f"support: {100 * self.support_fraction:.1f}% of elements changed over the "
                "observed steps"]),
            f"wall time: {self.wall_seconds:.1f} s on {self.compute_threads} compute "
            f"thread{'s' if self.compute_threads > 1 else ''}"
            + (" per rank" if self.ranks > 1 else "")
            + f"; peak RSS: {format_bytes(self.peak_rss_bytes)}"
            + (f" (largest of {self.ranks} ranks)" if self.ranks > 1 else ""),
            *(f"output: {path}" for path in self.outputs),
        ]


def extrapolate(**kwargs) -> RunSummary:
    """Predict the checkpoint at each target step; write one model directory per output.

    Keyword arguments as `request.make_request`: targets, out, base, runs or ckpts, steps,
    window, method, mode, cache, device, max_memory, max_gpu_memory, svd, dtype, overwrite,
    rebuild, allow_nonfinite, store_codec, quiet. Works from sources (base plus runs or ckpts)
    or, with neither, from the store at `cache`. Several methods and windows are materialised
    together in one pass.
    """
    started = time.perf_counter()
    return _run(make_request(**kwargs), started)


def update_store(
    *,
    cache: str | Path,
    base: str | Path | None = None,
    runs: str | Path | None = None,
    ckpts: list[str] | None = None,
    steps: str | None = None,
    max_memory: str | int = DEFAULT_MAX_MEMORY,
    device: str = "auto",
    store_codec: str = "xor-zstd",
    quiet: bool = False,
) -> RunSummary:
    """Build the store at `cache`, or append the checkpoints after its last step; no outputs."""
    started = time.perf_counter()
    request = make_request(targets=[], out=Path(cache).parent, base=base, runs=runs,
                           ckpts=ckpts, steps=steps, cache=cache, device=device,
                           max_memory=max_memory, store_codec=store_codec, quiet=quiet,
                           store_only=True)
    return _run(request, started)


def _run(request: RunRequest, started: float) -> RunSummary:
    """Execute a checked request in this process's rank; its wall time counts from `started`."""
    ranks = init_from_env(request.device)
    try:
        summary = _execute(request, ranks)
    finally:
        shutdown(ranks)
    summary.wall_seconds = time.perf_counter() - started
    return summary


def _execute(request: RunRequest, ranks: Ranks) -> RunSummary:
    """The run proper, on one torchrun rank (or the only process)."""
    device = _device(request, ranks)
    inputs = gather_inputs(
        request.store_path, request.base, request.runs, request.ckpts, request.steps,
        request.widest_window, request.rebuild, request.store_codec,
    )
    outputs = plan_outputs(request.out, list(request.targets), list(request.methods),
                           list(request.windows))
    check_plan(outputs, inputs.observed)
    _check_paths(request, outputs)
    gen = inputs.target
    dtypes = output_dtypes(gen.layout, request.output_dtype)
    cores = _cores(ranks)
    budget = _budget(request, gen, len(outputs), _compute_threads_wanted(device, cores))
    _cpu_threads(device, budget.workspaces, cores)
    gpu_bytes = device_budget(device, request.max_gpu_memory_bytes)
    device_jobs = None if gpu_bytes is None else max(0, (gpu_bytes - budget.fixed) // 2)
    plan = chunking(inputs, budget, device_jobs)
    own_names = output_names(gen.layout, (aux.name for aux in gen.aux))
    for spec in outputs:
        check_output_dir(spec.directory, request.overwrite, own_names)
    if ranks.is_main:
        _check_disk(request, inputs, outputs, dtypes, budget)
        _warn_about(outputs, inputs.observed, request.max_memory_bytes)

    created = _missing_dirs([request.store_path, *{o.directory.parent for o in outputs}])
    store_names = _names(request.store_path) if inputs.store_state == "empty" else None
    try:
        store = _open_store(inputs, ranks, store_names)
        try:
            summary, per_rank = _run_on_store(request, ranks, inputs, store, outputs, dtypes,
                                              plan, device, budget, gpu_bytes)
        except BaseException:
            if ranks.is_main and not ranks.distributed:  # other ranks may have finished groups
                _remove_new_store(inputs, store, store_names)  # still locked
            raise
        finally:
            store.close()
    except BaseException:
        if ranks.is_main:
            for directory in created:  # OUT, and the store's parents, when empty again
                with contextlib.suppress(OSError):
                    os.rmdir(directory)
        raise
    _add_totals(summary, per_rank, ranks)
    if summary.ill_conditioned and ranks.is_main:
        worst = max(summary.ill_conditioned, key=lambda item: item[1])
        log.warning(
            "%d tensor(s) have σ₂/σ₁ above %.2f, so their rank-1 direction is ill-defined "
            "(worst: %s at %.3f)",
            len(summary.ill_conditioned), GAP_WARNING, *worst,
        )
    return summary


def _run_on_store(request: RunRequest, ranks: Ranks, inputs: RunInputs, store: TrajectoryStore,
                  outputs: list[OutputSpec], dtypes: dict[str, str], plan: dict,
                  device: torch.device, budget: Budget, gpu_bytes: int | None,
                  ) -> tuple[RunSummary, list[tuple]]:
    """Both passes of this rank's groups, then (rank 0) the store's commit and the outputs'
    finalisation; the summary and every rank's counters."""
    gen = inputs.target
    works = group_work(inputs, store, _my_groups(gen, ranks), plan, request.svd)
    # the records of the groups only read (finished by an earlier, interrupted run too) are
    # checked before any output is laid out (gather_inputs checked the rest)
    for gw in works:
        if not gw.write:
            store.record(gw.group, gen, gen.steps)
    aux = inputs.aux if inputs.aux is not None else store.aux_files(gen)
    summary = RunSummary([o.directory for o in outputs], request.store_path, inputs.observed)
    summary.rank = ranks.rank
    summary.compute_threads = budget.workspaces
    summary.appended_steps = inputs.new_steps if inputs.kind == "append" else []
    summary.store_change = inputs.kind
    all_groups = gen.groups()
    summary.tensors = sum(len(g.tensors) for g in all_groups) + len(gen.aliases)
    summary.input_bytes = _input_bytes(all_groups, inputs.observed, inputs.sources)
    keep = _keep_budget(request, budget, gpu_bytes)
    writers, stats, reader = _write_outputs(request, ranks, inputs, store, outputs, dtypes,
                                            works, device, keep, budget, summary)
    try:
        per_rank = gather(
            (reader.bytes_from_sources, reader.bytes_from_store, stats.bytes_written,
             stats.store_bytes_written, stats.support_observed, stats.elements_observed,
             summary.ill_conditioned, _peak_rss_bytes(), reader.bytes_decoded,
             stats.nonfinite, _changed_sources(inputs, reader)),
            ranks,
        )
        changed = next((r[10] for r in per_rank if r[10] is not None), None)
        if changed is not None:
            # rows of a file swapped during the reads are neither kept nor predicted from
            if ranks.is_main and inputs.kind is not None:
                store.abandon()
            raise SourceChanged(changed)
        if ranks.is_main:
            nonfinite = [name for r in per_rank for name in r[9]]
            if inputs.kind is not None and nonfinite:
                store.abandon()  # a store keeps finite Grams only (--allow-nonfinite got here)
                summary.store_change = None
                log.warning("the store at %s is left as it was: %s holds NaN or Inf values, and "
                            "a store keeps finite values only", request.store_path,
                            show(nonfinite[0]))
            elif inputs.kind is not None:
                store.commit()
            for writer in writers:  # all prepared before any is in place: a full disk
                writer.prepare(aux)    # leaves none of the outputs, not the first few
            for writer in writers:
                writer.put_in_place(aux, request.overwrite)
            writers = []
        barrier(ranks)
    finally:
        abort_all(writers)
    return summary, per_rank


def _changed_sources(inputs: RunInputs, reader: RowReader) -> str | None:
    """The message of a source file this rank read that changed since it was opened, if any."""
    if inputs.sources is None:
        return None
    try:
        inputs.sources.check_unchanged(reader.base_read, reader.steps_read)
    except RelexError as exc:
        return str(exc)
    return None


def _add_totals(summary: RunSummary, per_rank: list[tuple], ranks: Ranks) -> None:
    """The summary's counters: sums over the ranks (peak RSS: the largest)."""
    summary.bytes_from_sources = sum(r[0] for r in per_rank)
    summary.bytes_from_store = sum(r[1] for r in per_rank)
    summary.bytes_written = sum(r[2] for r in per_rank)
    summary.store_bytes_written = sum(r[3] for r in per_rank)
    elements = sum(r[5] for r in per_rank)
    summary.support_fraction = sum(r[4] for r in per_rank) / elements if elements else None
    summary.ill_conditioned = [item for r in per_rank for item in r[6]]
    summary.peak_rss_bytes = max(r[7] for r in per_rank)
    summary.bytes_decoded = sum(r[8] for r in per_rank)
    summary.ranks = ranks.world_size


def _budget(request: RunRequest, gen: Generation, n_outputs: int, compute_threads: int) -> Budget:
    groups = gen.groups()
    widest = max((n for g in groups for n in g.numels), default=1)
    chunk_bytes = max(g.chunk_cols * DTYPES[g.row_dtype or g.base_dtype][1].itemsize
                      for g in groups)
    return Budget.split(request.max_memory_bytes, len(gen.steps), n_outputs,
                        min(widest, GRAM_BLOCK_COLS), chunk_bytes, compute_threads)


def _keep_budget(request: RunRequest, budget: Budget, gpu_bytes: int | None) -> int:
    """Bytes of deltas that may stay on the compute device between the passes.

    On CUDA half of the GPU budget (the other half holds the chunk in work); on the CPU the
    host budget's share, or --max-gpu-memory when given: it then stands in for a GPU's memory,
    so that the CPU runs (and tests) the code path of a tensor kept on the device.
    """
    if gpu_bytes is not None:
        return max(0, gpu_bytes - budget.fixed) // 2
    if request.max_gpu_memory_bytes is not None:
        return request.max_gpu_memory_bytes
    return budget.keep


def _device(request: RunRequest, ranks: Ranks) -> torch.device:
    from .kernels import resolve_device

    device = resolve_device(device_for(request.device, ranks))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _cores(ranks: Ranks) -> int:
    """CPU cores this process may use: its affinity mask, shared by the ranks of a torchrun."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // ranks.world_size)


def _compute_threads_wanted(device: torch.device, cores: int) -> int:
    """Threads computing Gram blocks (block_pool.py): two on a CPU with two cores or more, one
    on a GPU (it runs the kernels; a second thread would only queue them)."""
    return 2 if device.type == "cpu" and cores >= 2 else 1


def _cpu_threads(device: torch.device, compute_threads: int, cores: int) -> None:
    """torch's threads per compute thread, out of the cores this process may use (its affinity
    mask: a batch job's share, not the machine's count), leaving a core to the reader and store
    writer: on 2 cores, 1 torch thread ran the 100M/K=30 bench in ~25 s against ~29 s with 2
    (bench/RESULTS.md). OMP_NUM_THREADS, when set, decides instead."""
    if device.type == "cpu" and not omp_num_threads_is_set():
        torch.set_num_threads(max(1, (cores - 1) // compute_threads))


def _open_store(inputs: RunInputs, ranks: Ranks, store_names: set[str] | None,
                ) -> TrajectoryStore:
    """Rank 0 creates or locks the store and records the pending change; the others follow.

    store_names: what the store's folder held before, when it was an empty one (a lock);
    a new store whose change cannot begin (a full disk) is removed, but for those."""
    path = inputs.store_path
    if ranks.is_main:
        if inputs.kind is None:
            store = TrajectoryStore.open(path, lock="shared")
            if store.manifest.current != inputs.target:  # an append committed meanwhile
                store.close()
                raise StoreBusy(  # watch polls again; run says to
                    f"the store at {path} changed while this run started; run it again"
                )
        elif inputs.store_state in ("absent", "empty", "old"):
            store = TrajectoryStore.create(path, replace=inputs.store_state == "old")
        else:
            store = TrajectoryStore.open(path, lock="exclusive")
        try:
            if inputs.kind is not None:
                current = store.manifest.current
                planned = inputs.committed_steps
                # another run committed between this run's look at the store and its lock: an
                # append would miss its rows, a build would replace its finished store
                changed = (current.steps if current else ()) != planned if (
                    inputs.kind == "append") else current is not None and (
                    inputs.store_state in ("absent", "empty")
                    or current.generation >= inputs.target.generation)
                if changed:
                    raise StoreBusy(  # watch polls again; run says to
                        f"the store at {path} changed while this run started; run it again"
                    )
                store.begin(inputs.kind, inputs.target)
                if inputs.kind == "build":
                    store.write_aux(inputs.target, inputs.aux)
        except BaseException:
            _remove_new_store(inputs, store, store_names)  # still locked
            store.close()
            raise
    barrier(ranks)
    if not ranks.is_main:
        store = TrajectoryStore.open(path)
    return store


def _missing_dirs(paths: list[Path]) -> list[Path]:
    """The directories among `paths` and their parents that do not exist yet, deepest first."""
    missing: set[Path] = set()
    for path in paths:
        path = Path(os.path.abspath(path))
        while not os.path.lexists(path) and path != path.parent:
            missing.add(path)
            path = path.parent
    return sorted(missing, key=lambda p: len(p.parts), reverse=True)


def _names(path: Path) -> set[str]:
    try:
        return set(os.listdir(path))
    except OSError:
        return set()


def _remove_new_store(inputs: RunInputs, store: TrajectoryStore,
                      store_names: set[str] | None) -> None:
    """After a failed run: a store this run created and finished no group in is removed (what
    it put into an empty directory, when the store was one). A store holding finished groups
    is kept: the same command continues from it."""
    if inputs.store_state in ("absent", "empty") and store.created and (
            store.manifest.current is None and store.finished_groups == 0):
        with contextlib.suppress(OSError):
            fd = open_root(store.path)
            try:
                for name in _names(store.path) - (store_names or set()):
                    remove_tree(fd, name)
            finally:
                os.close(fd)


def _my_groups(gen: Generation, ranks: Ranks) -> list[Group]:
    groups = gen.groups()
    sizes = [sum(g.numels) * (len(gen.steps) + 1) for g in groups]
    owners = assign(sizes, ranks.world_size)
    return [g for g, owner in zip(groups, owners, strict=True) if owner == ranks.rank]


def _input_bytes(groups: list[Group], observed: list[int], sources: Sources | None) -> int:
    """Bytes of the base and of the observed rows: each checkpoint's tensor in its own dtype
    (bf16 and fp32 steps of one run differ), a row only the store holds in its row dtype."""
    models = {c.step: c.model for c in sources.checkpoints} if sources is not None else {}
    total = 0
    for group in groups:
        for name, numel in zip(group.tensors, group.numels, strict=True):
            total += numel * DTYPES[group.base_dtype][1].itemsize
            if not group.has_rows:
                continue
            for step in observed:
                model = models.get(step)
                total += numel * (model.tensors[name].itemsize if model is not None
                                  else DTYPES[group.row_dtype][1].itemsize)
    return total


def _run_id(ranks: Ranks) -> str:
    """Rank 0's name part for the temporary outputs, shared by every rank."""
    return broadcast(new_run_id(), ranks) if ranks.distributed else new_run_id()


def _write_outputs(
    request: RunRequest,
    ranks: Ranks,
    inputs: RunInputs,
    store: TrajectoryStore,
    outputs: list[OutputSpec],
    dtypes: dict[str, str],
    works: list[GroupWork],
    device: torch.device,
    keep_budget: int,
    budget: Budget,
    summary: RunSummary,
) -> tuple[list[ModelWriter], PassStats, RowReader]:
    """Lay out the outputs (rank 0), run both passes over this rank's groups; returns the
    closed writers, to be finalised once the store is committed."""
    gen = inputs.target
    run_id = _run_id(ranks)
    if ranks.is_main:
        for parent in {spec.directory.parent for spec in outputs}:
            remove_leftovers(parent)
    progress = Progress(
        _progress_totals(works, len(inputs.observed), len(gen.steps)),
        show=ranks.is_main and not request.quiet and _stderr_is_tty(),
        board=request.out / f".relex-progress-{run_id}" if ranks.distributed else None,
        rank=ranks.rank,
    )
    writers: list[ModelWriter] = []
    reader = RowReader(inputs.sources, store, gen, inputs.committed_steps)
    stats = PassStats()
    owner = ranks.is_main
    try:
        for spec in outputs if owner else []:
            ModelWriter.create(spec.directory, run_id, gen.layout, dtypes, made=writers)
        barrier(ranks)
        for spec in [] if owner else outputs:
            ModelWriter.attach(spec.directory, run_id, gen.layout, dtypes, made=writers)
        for gw in works:
            if gw.write:
                gw.open_writer = _writer_factory(store, gen, gw.group, inputs)
        ring = None
        try:
            # allocated here, where running out of device memory is one line, not a traceback
            keep_bytes = min(keep_budget, _keepable_bytes(works, len(gen.steps)))
            ctx = PassContext(
                reader=reader,
                writers=writers,
                out_dtypes={n: DTYPES[d][0] for n, d in dtypes.items()},
                device=device,
                plan_weights=output_weights(outputs, inputs.observed),
                observed_steps=inputs.observed,
                allow_nonfinite=request.allow_nonfinite,
                keep_ring=Ring(keep_bytes, device=device) if outputs and keep_bytes > 0 else None,
                materialise=bool(outputs),
                pool=BlockPool([Workspace(len(gen.steps), len(outputs), budget.block_cols, device)
                                for _ in range(budget.workspaces)]),
                progress=progress,
                stats=stats,
                ill_conditioned=summary.ill_conditioned,
            )
            ring = Ring(_read_ring_bytes(works, bool(outputs), budget.ring),
                        pin=device.type == "cuda")
            run_passes(works, ctx, ring)
        except torch.cuda.OutOfMemoryError:
            raise RelexError(
                "the GPU ran out of memory; lower --max-gpu-memory (or --max-memory), or run "
                "with --device cpu"
            ) from None
        finally:
            if ring is not None:
                ring.close()
        progress.close()
        for writer in writers:
            writer.close()
        barrier(ranks)
        if owner:
            progress.remove_board()
    except BaseException:
        abort_all(writers)
        raise
    finally:
        reader.close()
    return writers, stats, reader


def _keepable_bytes(works: list, n_rows: int) -> int:
    """The most kept deltas the run could ever hold: every float tensor it computes, whole
    (rows and their column indices in float64/int64, plus each block's alignment). A small
    model does not reserve, on the GPU above all, a keep budget it can never fill."""
    total = 0
    for gw in works:
        for w in gw.tensors:
            if w.write and w.is_float:
                blocks = -(-w.numel // GRAM_BLOCK_COLS)
                total += (n_rows + 1) * w.numel * 8 + blocks * ALIGN_BYTES
    return total


def _read_ring_bytes(works: list, materialise: bool, budget_bytes: int) -> int:
    """The read ring: the budget's share, but no more than three of the run's largest reads
    (in flight, waiting, being filled), so that small models do not pin the whole share."""
    largest = max((job.nbytes for job in jobs_for(works, materialise)), default=0)
    return min(budget_bytes, 3 * (largest + 2 * ALIGN_BYTES))


def _writer_factory(store: TrajectoryStore, gen: Generation, group: Group, inputs: RunInputs):
    def make():
        return store.group_writer(gen, group, inputs.first_new_row,
                                  write_base=inputs.kind == "build")

    return make


def _progress_totals(works: list[GroupWork], n_observed: int, n_stored: int) -> dict[str, int]:
    gram = out = 0
    for gw in works:
        for w in gw.tensors:
            base = DTYPES[w.base_dtype][1].itemsize * w.numel
            rows = DTYPES[w.row_dtype][1].itemsize * w.numel if w.is_float else 0
            if w.write:
                gram += base + rows * n_stored
            out += base + rows * n_observed
    return {"gram": gram, "materialise": out}


# --------------------------------------------------------------------------- checks


def _check_paths(request: RunRequest, outputs: list[OutputSpec]) -> None:
    """The store, the outputs and the inputs must not lie inside each other: a replaced output
    would take the store or a checkpoint with it, and an output inside a run directory would be
    found as a checkpoint (step-T) by the next run."""
    inputs = [p for p in (request.base, request.runs) if p is not None]
    inputs += [Path(item.split("=", 1)[1]) for item in request.ckpts or () if "=" in item]
    for spec in outputs:
        if paths_overlap(request.store_path, spec.directory):
            raise RelexError(
                f"the store {request.store_path} and the output {spec.directory} overlap; give "
                "--cache a path outside the output directories"
            )
        for path in inputs:
            if paths_overlap(path, spec.directory):
                raise RelexError(
                    f"the output {spec.directory} and the input {path} overlap; give --out a "
                    "directory outside the checkpoints"
                )
    for path in inputs:
        if paths_overlap(request.store_path, path):
            raise RelexError(
                f"the store {request.store_path} and the input {path} overlap; give --cache a "
                "path outside the checkpoints"
            )


def _nearest_existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _free_bytes(path: Path) -> tuple[Path, int]:
    """The nearest existing folder at or above `path`, and its file system's free bytes."""
    probe = _nearest_existing(path)
    return probe, shutil.disk_usage(probe).free


def _check_disk(request: RunRequest, inputs: RunInputs, outputs: list[OutputSpec],
                dtypes: dict[str, str], budget: Budget) -> None:
    """Refuse up front when the outputs and the store's new rows will not fit on disk.

    Each output holds the tensors and a copy of the side files (a tokenizer.json is 7-35 MB).
    The store's size depends on the data (1% to 45% of the raw rows measured), so the first
    columns of the largest tensors are read and compressed as the store would.
    """
    gen = inputs.target
    aux_bytes = sum(aux.size for aux in gen.aux)
    tensor_bytes = sum(
        int(np.prod(shape, dtype=np.int64)) * DTYPES[dtypes[name]][1].itemsize
        for name, (_, shape) in gen.layout.tensors.items()
    )
    _require_space([
        (request.out, (tensor_bytes + aux_bytes) * len(outputs), "the outputs"),
        (request.store_path, _store_bytes(request, inputs, aux_bytes), "the store"),
    ])


def _store_bytes(request: RunRequest, inputs: RunInputs, aux_bytes: int) -> int:
    """About how many bytes the store grows by: its new rows (and base and side files on a
    build) as it keeps them; 0 when the run only reads it."""
    if inputs.kind is None or inputs.sources is None:
        return 0
    gen = inputs.target
    new_rows = len(gen.steps) - inputs.first_new_row
    raw = 0
    candidates = []
    for group in gen.groups():
        itemsize = DTYPES[group.row_dtype][1].itemsize if group.has_rows else 0
        for name, numel in zip(group.tensors, group.numels, strict=True):
            raw += numel * itemsize * new_rows
            if inputs.kind == "build":
                raw += numel * DTYPES[group.base_dtype][1].itemsize
            if group.has_rows and numel:
                candidates.append((numel, group, name))
    fraction = 1.0
    largest = sorted(candidates, key=lambda c: -c[0])[:4]
    if largest and inputs.kind == "build":
        fraction = max(_sample_fraction(inputs, group, name) for _, group, name in largest)
    elif inputs.kind == "append":  # the rows appended last are the best guess of the next
        measured = stored_row_fraction(request.store_path, gen, len(inputs.committed_steps))
        fraction = 1.0 if measured is None else measured
    kept_aux = aux_bytes if inputs.kind == "build" else 0  # the store keeps them uncompressed
    return int(raw * min(1.0, fraction * 1.25)) + kept_aux


def _sample_fraction(inputs: RunInputs, group: Group, name: str) -> float:
    """Stored size ÷ raw size of the first inner chunk of `name` in every row, as the store
    keeps it (read with the row reader; a few MiB, not counted in the run's bytes)."""
    cols = min(group.numels[group.tensors.index(name)], group.chunk_cols)
    steps = inputs.target.steps
    base = np.empty(cols, dtype=np.dtype(f"u{DTYPES[group.base_dtype][1].itemsize}"))
    rows = np.empty((len(steps), cols), dtype=np.dtype(f"u{DTYPES[group.row_dtype][1].itemsize}"))
    reader = RowReader(inputs.sources, None, inputs.target, ())
    try:
        reader.fill(group, name, 0, RowOrigin(False, (), tuple(steps), (None,) * len(steps)),
                    base, rows, None)
    finally:
        reader.close()
    return compressed_sample_fraction(base, rows, group, inputs.target.codec)


def _file_system(path: Path) -> int:
    """The device number of the file system that `path` (or its nearest existing parent) is on."""
    return os.stat(_nearest_existing(path)).st_dev


@dataclass
class _FileSystemNeed:
    """What a run will write to one file system, and the least free space seen on it."""

    probe: Path  # the first existing folder looked at on it
    free: int
    needed: int = 0
    what: list[str] = field(default_factory=list)


def _require_space(needs: list[tuple[Path, int, str]]) -> None:
    """Refuse when what goes to one file system, (path, bytes, what) summed over the paths on
    it, exceeds its free space: OUT and the store (OUT/trajectory.zarr by default) share one."""
    by_device: dict[int, _FileSystemNeed] = {}
    for path, needed, what in needs:
        if needed <= 0:
            continue
        probe, free = _free_bytes(path)
        need = by_device.setdefault(_file_system(path), _FileSystemNeed(probe, free))
        need.free = min(need.free, free)
        need.needed += needed
        need.what.append(what)
    for need in by_device.values():
        if need.needed > need.free:
            raise RelexError(
                f"writing {' and '.join(need.what)} takes about {format_bytes(need.needed)} "
                f"but {need.probe} has {format_bytes(need.free)} free; free space or choose "
                "another location"
            )


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _warn_about(outputs: list[OutputSpec], observed: list[int], budget: int) -> None:
    for target in sorted({spec.target for spec in outputs if spec.method.extrapolates}):
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

