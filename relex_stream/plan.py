"""The run plan: for every tensor, how it is chunked, where its rows come from, which kernel.

This is the one place that turns a run's inputs and budgets into work: `chunking` is decided
before anything is written (a budget mistake fails first), `group_work` once the store is open
(it knows which groups an interrupted run already finished).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import RelexError
from .inputs import RunInputs
from .jsonfile import show
from .memory import Budget, budget_too_small, chunk_cols, smallest_unit
from .passes import GroupWork, TensorWork
from .safetensors_io import DTYPES
from .sources import RowOrigin
from .store import GroupRecord, TrajectoryStore
from .store_layout import PANEL_ROWS, Group
from .units import format_bytes


@dataclass(frozen=True)
class Chunking:
    """Columns per chunk of one tensor in each pass."""

    gram_cols: int
    out_cols: int


def _bytes_per_col(group: Group, n_rows: int) -> int:
    base = DTYPES[group.base_dtype][1].itemsize
    rows = DTYPES[group.row_dtype][1].itemsize if group.has_rows else 0
    return base + n_rows * rows


def chunking(inputs: RunInputs, budget: Budget, device_bytes: int | None) -> dict[str, Chunking]:
    """Chunk columns of every stored tensor for both passes; RelexError when a budget (host or
    device) cannot hold one unit of a tensor."""
    gen = inputs.target
    n_stored, n_observed = len(gen.steps), len(inputs.observed)
    ring = budget.ring if device_bytes is None else min(budget.ring, device_bytes)
    device_limits = device_bytes is not None and device_bytes < budget.ring
    plan: dict[str, Chunking] = {}
    for group in gen.groups():
        align = smallest_unit(group.chunk_cols)
        for name, numel in zip(group.tensors, group.numels, strict=True):
            n_rows = (n_stored, n_observed) if group.has_rows else (0, 0)
            cols = []
            for k in n_rows:
                per_col = _bytes_per_col(group, k)
                try:
                    cols.append(chunk_cols(max(numel, 1), per_col, ring, align, budget, k))
                except RelexError:
                    if not device_limits:
                        raise
                    # the GPU's budget is what is short: half of it (less the workspace) holds
                    # the chunk in work
                    needed = budget.fixed + 2 * min(numel, align) * per_col
                    raise RelexError(
                        f"--max-gpu-memory is too small to hold one chunk of {k} checkpoints of "
                        f"{show(name)} on the GPU; give at least {format_bytes(needed)}, or run "
                        "with --device cpu"
                    ) from None
            plan[name] = Chunking(*cols)
    return plan


def svd_kernel(requested: str, read_once: bool, appending: bool) -> str:
    """The Gram kernel of one tensor. 'auto' is the exact Gram matrix: report, backtest and
    appends need it, and the randomized kernel's (2q+1)·2p·K·n = 70·K·n multiply-adds only beat
    the exact K²·n (on the support) past K = 70, by little. 'randomized' is used for tensors read
    once, when building (an append extends exact Gram matrices)."""
    if requested == "randomized" and read_once and not appending:
        return "randomized"
    return "exact"


def group_work(
    inputs: RunInputs,
    store: TrajectoryStore,
    groups: list[Group],
    plan: dict[str, Chunking],
    svd: str,
) -> list[GroupWork]:
    """The work of each group of this rank: written (new rows) or only read for the outputs."""
    gen = inputs.target
    steps = gen.steps
    observed_rows = inputs.row_ids
    first_new = inputs.first_new_row
    sources = inputs.sources
    hold_all = sources is not None and set(inputs.observed) <= set(sources.steps)
    aliases = gen.aliases
    works = []
    for group in groups:
        write = inputs.kind is not None and not store.has_record(group, gen, steps)
        old_record = old_grams = None
        if write and inputs.kind == "append" and group.has_rows:
            old_record = store.record(group, gen, inputs.committed_steps)
            old_grams = store.grams(group, gen, inputs.committed_steps)
            if _randomized(old_record):
                raise RelexError(
                    f"the store at {store.path} keeps randomized Gram matrices (--svd randomized); "
                    "appending needs exact ones: rebuild it with --rebuild"
                )
        elif write and inputs.kind == "append":
            old_record = store.record(group, gen, inputs.committed_steps)
        if not write and group.has_rows and svd != "randomized":
            _refuse_randomized(store, store.record(group, gen, steps), svd)
        ratio = 0.0 if write else _stored_fraction(store, group, gen)
        stored_grams = None if write or not group.has_rows else store.grams(group, gen, steps)
        gram_origin = None
        if write:
            gram_origin = RowOrigin(
                base_from_store=inputs.kind == "append",
                store_rows=tuple(range(first_new)),
                source_steps=tuple(steps[first_new:]),
                verify_rows=(None,) * (len(steps) - first_new),
            )
        from_store = RowOrigin(True, tuple(observed_rows), (), ())
        from_sources = (  # the base from the store when no base was given (an append)
            RowOrigin(sources.base is None, (), tuple(inputs.observed), tuple(observed_rows))
            if hold_all else None
        )
        tensors = []
        for name, numel in zip(group.tensors, group.numels, strict=True):
            chunks = plan[name]
            read_once = write and chunks.gram_cols >= numel
            work = TensorWork(
                name=name,
                out_names=(name, *[a for a, src in aliases.items() if src == name]),
                group=group,
                base_dtype=group.base_dtype,
                row_dtype=group.row_dtype,
                numel=numel,
                gram_cols=max(1, chunks.gram_cols),
                out_cols=max(1, chunks.out_cols),
                write=write,
                svd=svd_kernel(svd, read_once, inputs.kind == "append"),
                gram_origin=gram_origin,
                out_from_store=from_store,
                out_from_sources=from_sources,
                n_rows=len(steps) if group.has_rows else 0,
                row_positions=list(observed_rows),
            )
            if not write:
                cheaper = from_sources is not None and ratio >= _cutoff()
                work.out_origin = from_sources if cheaper else from_store
                if stored_grams is not None:
                    work.gram = torch.from_numpy(stored_grams[group.tensors.index(name)].copy())
            tensors.append(work)
        first_panel = (first_new // PANEL_ROWS) * PANEL_ROWS if inputs.kind == "append" else 0
        works.append(GroupWork(group, write, first_new, first_panel, old_record, old_grams,
                               tensors))
    return works


def _randomized(record: GroupRecord) -> list[str]:
    """The tensors of a group whose stored Gram matrix is randomized (--svd randomized)."""
    return [name for name, kind in record.kinds.items() if kind != "exact"]


def _refuse_randomized(store: TrajectoryStore, record: GroupRecord, svd: str) -> None:
    """RelexError when a group this run only reads keeps a randomized Gram matrix: a low-rank
    approximation, which a run asking for exact results (--svd exact, or auto) would use as
    exact (a window, --rank above 1 or a reconstruction then come out wrong, silently)."""
    randomized = _randomized(record)
    if randomized:
        asked = "--svd exact" if svd == "exact" else f"--svd {svd} (exact)"
        raise RelexError(
            f"the store at {store.path} keeps randomized (approximate) Gram matrices, made with "
            f"--svd randomized (e.g. {show(randomized[0])}), and this run asks for {asked}: "
            "rebuild the store with --base, --runs and --rebuild for exact results, or pass "
            "--svd randomized to use the approximate ones"
        )


def _cutoff() -> float:
    from .passes import STORE_READ_CUTOFF

    return STORE_READ_CUTOFF


def _stored_fraction(store: TrajectoryStore, group: Group, gen) -> float:
    """Bytes of a finished group's row shards ÷ the raw bytes of its rows (its tensors share it)."""
    if not group.has_rows:
        return 1.0
    record = store.record(group, gen)
    itemsize = DTYPES[group.row_dtype][1].itemsize
    raw = len(record.rows) * group.width * itemsize
    return sum(r.size for r in record.rows) / raw if raw else 1.0


def assign(sizes: list[int], world_size: int) -> list[int]:
    """Rank for each item: largest first onto the least loaded rank (balanced by bytes)."""
    loads = [0] * world_size
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owner[i] = rank
        loads[rank] += sizes[i]
    return owner


def device_budget(device: torch.device, requested: int | None) -> int | None:
    """Bytes of GPU memory the engine may hold, or None on the CPU.

    The flag, else the device's total memory less 10%: never the memory free at start, which
    varies from run to run (the choices it drives do not change output bytes either way).
    """
    if device.type != "cuda":
        return None
    if requested is not None:
        return requested
    return int(torch.cuda.get_device_properties(device).total_memory * 0.9)


def check_budget_fits(budget: Budget, total: int, n_rows: int) -> None:
    if budget.ring <= 0:
        raise budget_too_small(total, n_rows, budget.fixed * 2)
