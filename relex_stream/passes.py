"""The two streaming passes over every tensor: Gram (and store) then materialise.

Per tensor: the first pass reads its base and rows chunk by chunk, appends the new rows to the
store and adds each Gram block's panels; the combination weights follow from the Gram matrix;
the second pass writes W_0 + wᵀD into every output, block by block, on the support only (the
base's bits everywhere else). A tensor that fits the read ring is one chunk, read once; the
deltas of a larger one are kept between the passes when they fit the budget, else its second
pass reads again, from the store or the checkpoints, whichever the cost model says is cheaper.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .block_pool import BlockPool
from .errors import NonfiniteOutput, NonfiniteRows, RelexError
from .fit import GAP_WARNING, fit_diagnostics
from .kernels import (
    GRAM_BLOCK_COLS,
    SMALLEST_LARGEST_DELTA,
    BlockDeltas,
    Workspace,
    add_panels,
    block_deltas,
    changed_columns,
    combine_block,
    gram_panels,
    largest_delta,
    panel_masks,
    randomized_gram,
    round_to,
    symmetric,
)
from .progress import Progress
from .reader import Chunk, ChunkReader, ReadJob, Ring
from .safetensors_io import DTYPES
from .sources import RowOrigin, RowReader
from .store import GroupRecord, GroupWriter
from .store_layout import Group
from .store_writer import StoreWriter, release_after
from .tensor_files import bits_to_torch, widest
from .writer import ModelWriter

log = logging.getLogger(__name__)

# Pass 2 reads the store rather than the checkpoints when the store keeps a tensor's rows in
# less than this fraction of their raw bytes: reading at R bytes/s and decoding at D raw bytes/s,
# the store costs ratio/R + 1/D against 1/R, so it wins below 1 − R/D. With R = 1.3 GB/s (a cold
# disk here) and D = 3 GB/s (the store's decoder on one core, bench/RESULTS.md): 0.57.
STORE_READ_CUTOFF = 0.55


@dataclass
class TensorWork:
    """Plan and running state of one tensor's passes."""

    name: str
    out_names: tuple[str, ...]  # the tensor and its tied aliases
    group: Group
    base_dtype: str
    row_dtype: str | None  # None: not floating point, copied from the base
    numel: int
    gram_cols: int  # columns per first-pass chunk
    out_cols: int  # columns per second-pass chunk
    write: bool  # the first pass runs: its group is written in this run
    svd: str  # "exact" (Gram panels) or "randomized" (subspace iteration, resident only)
    gram_origin: RowOrigin | None
    out_from_store: RowOrigin  # the second pass's rows read from the store
    out_from_sources: RowOrigin | None  # ... or from the checkpoints, when they hold them all
    n_rows: int  # rows of the first pass (every stored row)
    row_positions: list[int]  # rows of the outputs, as positions among the first pass's rows
    out_origin: RowOrigin | None = None  # chosen by the cost model (after the first pass)
    # running state
    gram: torch.Tensor | None = None
    weights: torch.Tensor | None = None  # (T, n_observed) float64
    kept: list[tuple[int, BlockDeltas]] | None = None  # (keep-ring token, deltas) per block
    keep_base: bool = False
    # a chunk read once for both passes: per block, whether the first pass found it dense (the
    # second then widens it without comparing its bits again)
    dense_blocks: list[bool] | None = None
    support_stored: int = 0
    support_observed: int = 0
    largest_delta: float = 0.0  # of the first pass's deltas; tracked for F64 values only
    first_pass_done: threading.Event = field(default_factory=threading.Event)

    @property
    def is_float(self) -> bool:
        return self.row_dtype is not None

    @property
    def holds_f64(self) -> bool:
        """Base or rows in float64: deltas may be too small to square (SMALLEST_LARGEST_DELTA)."""
        return "F64" in (self.base_dtype, self.row_dtype)

    @property
    def read_once(self) -> bool:
        return self.write and self.gram_cols >= self.numel

    def chunks(self, cols: int) -> list[tuple[int, int]]:
        if self.numel == 0:
            return [(0, 0)]
        return [(s, min(s + cols, self.numel)) for s in range(0, self.numel, cols)]


@dataclass
class GroupWork:
    """A group of tensors written (or only read) by this run."""

    group: Group
    write: bool
    first_row: int  # rows from here on are new
    first_panel_row: int  # Gram panels recomputed from this row (a multiple of PANEL_ROWS)
    old_record: GroupRecord | None
    old_grams: np.ndarray | None  # (T, K, K) of the rows the store held
    tensors: list[TensorWork]
    open_writer: Callable[[], GroupWriter] | None = None
    writer: GroupWriter | None = None
    pending: int = 0  # tensors whose first pass is not done


@dataclass
class PassStats:
    bytes_written: int = 0
    store_bytes_written: int = 0
    support_stored: int = 0
    support_observed: int = 0
    elements_observed: int = 0
    nonfinite: list[str] = field(default_factory=list)  # tensors whose Gram is not finite


@dataclass
class PassContext:
    """What both passes need: where rows come from, where outputs go, how weights are made."""

    reader: RowReader
    writers: list[ModelWriter]
    out_dtypes: dict[str, torch.dtype]
    device: torch.device
    plan_weights: Callable[[torch.Tensor], torch.Tensor]  # G (n_obs, n_obs) -> (T, n_obs)
    observed_steps: list[int]
    allow_nonfinite: bool
    keep_ring: Ring | None  # storage of deltas kept between the passes (None: keep nothing)
    materialise: bool  # False: only the store is written (no outputs)
    progress: Progress
    stats: PassStats
    pool: BlockPool  # computes Gram blocks, each thread in its own workspace
    ill_conditioned: list[tuple[str, float]]
    steps_tensor: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.steps_tensor = torch.tensor(self.observed_steps, dtype=torch.float64)


def jobs_for(groups: list[GroupWork], materialise: bool = True) -> list[ReadJob]:
    """Every read of the run, in order: per tensor its first pass, then (when the run writes
    outputs) its second."""
    jobs: list[ReadJob] = []
    for gw in groups:
        for w in gw.tensors:
            base_size = _itemsize(w.base_dtype)
            row_size = _itemsize(w.row_dtype) if w.is_float else 0
            n_out = len(w.row_positions) if w.is_float else 0
            if w.write:
                stage = "both" if w.read_once and materialise else "gram"
                for a, b in w.chunks(w.gram_cols):
                    jobs.append(ReadJob(len(jobs), w.name, stage, a, b, base_size,
                                        w.n_rows if w.is_float else 0, row_size))
                if w.read_once:
                    continue
            if not materialise:
                continue
            for a, b in w.chunks(w.out_cols):
                jobs.append(ReadJob(len(jobs), w.name, "out", a, b, base_size, n_out, row_size))
    return jobs


def _itemsize(code: str | None) -> int:
    from .safetensors_io import DTYPES

    return DTYPES[code][1].itemsize if code else 0


def run_passes(groups: list[GroupWork], ctx: PassContext, ring: Ring) -> None:
    """Both passes over every tensor of `groups`, writing outputs and the store's new groups."""
    by_name = {w.name: (gw, w) for gw in groups for w in gw.tensors}
    for gw in groups:
        gw.pending = sum(1 for w in gw.tensors if w.write)
    jobs = jobs_for(groups, ctx.materialise)
    aborted = threading.Event()

    def fill(job: ReadJob, base: np.ndarray, rows: np.ndarray) -> None:
        gw, w = by_name[job.tensor]
        origin = w.gram_origin if job.stage in ("gram", "both") else w.out_origin
        if not w.is_float or job.n_rows == 0:
            origin = RowOrigin(origin.base_from_store, (), (), ())
        ctx.reader.fill(gw.group, w.name, job.start, origin, base, rows, gw.writer)

    def wait(job: ReadJob) -> ReadJob:
        """The second pass of a tensor waits for its first; kept deltas: read the base only."""
        gw, w = by_name[job.tensor]
        if job.stage != "out" or not w.write:
            return job
        while not w.first_pass_done.wait(0.2):
            if aborted.is_set():
                raise RuntimeError("aborted")
        return job if w.kept is None else replace(job, n_rows=0)

    base_dtypes = {w.name: _words(w.base_dtype) for gw in groups for w in gw.tensors}
    row_dtypes = {w.name: _words(w.row_dtype or w.base_dtype) for gw in groups
                  for w in gw.tensors}
    store_writer = StoreWriter()
    reader = ChunkReader(jobs, ring, fill, wait, base_dtypes, row_dtypes)
    try:
        for gw in groups:
            if gw.write and gw.writer is None:
                gw.writer = gw.open_writer()
        for chunk in reader:
            gw, w = by_name[chunk.job.tensor]
            _process(chunk, gw, w, ctx, store_writer)
        store_writer.close()
    except BaseException:
        aborted.set()
        for gw in groups:
            for w in gw.tensors:
                w.first_pass_done.set()
        raise
    finally:
        store_writer.close(raise_errors=False)
        reader.close()
        ctx.pool.close()
        for gw in groups:
            if gw.writer is not None:
                gw.writer.abort()


def _words(code: str) -> np.dtype:
    from .tensor_files import word_dtype

    return word_dtype(code)


def _process(chunk: Chunk, gw: GroupWork, w: TensorWork, ctx: PassContext,
             store_writer: StoreWriter) -> None:
    job = chunk.job
    release = chunk.release
    # one upload per chunk (on the CPU: views), for both passes
    device_rows = _upload(chunk.rows, chunk.base, w, ctx.device) if w.is_float else None
    if job.stage in ("gram", "both"):
        # the buffer goes back once both the store write and the computation are done
        release = release_after(2, chunk.release)
        _first_pass_chunk(chunk, gw, w, ctx, store_writer, release, device_rows)
        ctx.progress.add("gram", job.nbytes)
    if job.stage in ("out", "both"):
        _materialise_chunk(chunk, w, ctx, device_rows)
        ctx.progress.add("materialise", job.nbytes)
    if ctx.device.type == "cuda":
        torch.cuda.current_stream(ctx.device).synchronize()  # uploads from the ring are done
    release()


# --------------------------------------------------------------------------- first pass


def _first_pass_chunk(chunk: Chunk, gw: GroupWork, w: TensorWork, ctx: PassContext,
                      store_writer: StoreWriter, written: Callable[[], None],
                      device_rows: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    job, base, rows = chunk.job, chunk.base, chunk.rows
    writer = gw.writer
    store_rows = rows if w.is_float else None
    store_writer.submit(lambda: _store(ctx, writer.write(w.name, job.start, base, store_rows)),
                        written)
    if not w.is_float:
        if job.stop == w.numel:
            _first_pass_done(gw, w, ctx, store_writer)
        return
    if job.start == 0:
        w.gram = torch.zeros((w.n_rows, w.n_rows), dtype=torch.float64, device=ctx.device)
        if gw.old_grams is not None and gw.first_panel_row:
            old = torch.from_numpy(gw.old_grams[gw.group.tensors.index(w.name)])
            p = gw.first_panel_row
            w.gram[:p, :p] = torch.tril(old[:p, :p]).to(ctx.device)
        every_row = w.row_positions == list(range(w.n_rows))
        w.kept = [] if ctx.materialise and every_row else None
    rows_t, base_t = device_rows
    if w.svd == "randomized":
        w.gram = randomized_gram(rows_t, base_t)
    else:
        w.dense_blocks = [] if job.stage == "both" else None
        _gram_blocks(rows_t, base_t, gw, w, ctx)
    if job.stop == w.numel:
        w.gram = symmetric(w.gram).cpu() if w.svd != "randomized" else w.gram.cpu()
        if ctx.materialise:
            _weights(w, ctx)
        _first_pass_done(gw, w, ctx, store_writer)


@dataclass
class _GramBlock:
    """What a compute thread made of one Gram block: its deltas, the panels it computed (in its
    workspace) and, when the deltas went to the keep ring, that allocation's token."""

    block: BlockDeltas
    panels: list[tuple[int, int]]
    token: int | None
    largest: float  # |delta|, F64 values only (else 0.0)


def _gram_blocks(rows_t: torch.Tensor, base_t: torch.Tensor, gw: GroupWork, w: TensorWork,
                 ctx: PassContext) -> None:
    """Add a chunk's Gram blocks to w.gram, in block order, keeping their deltas when the keep
    ring has room. rows_t: (K, c); base_t: (c,)."""

    def task(a: int, b: int) -> Callable[[Workspace], _GramBlock]:
        def compute(ws: Workspace) -> _GramBlock:
            rows_b, base_b = rows_t[:, a:b], base_t[a:b]  # (K, s), (s,)
            changed = _changed(rows_b, base_b, w, ws)
            tokens: list[int] = []

            def keep_storage(n_bytes: int) -> torch.Tensor | None:
                """Kept deltas go straight into the keep ring (no copy), when it has room."""
                found = ctx.keep_ring.try_tensor(n_bytes) if w.kept is not None else None
                if found is None:
                    return None
                tokens.append(found[0])
                return found[1]

            keeping = w.kept is not None and ctx.keep_ring is not None
            masks, support = panel_masks(changed)
            block = block_deltas(rows_b, base_b, changed, ws, keep_storage if keeping else None,
                                 support)
            panels = gram_panels(changed, block, gw.first_panel_row, ws, masks)
            largest = largest_delta(block) if w.holds_f64 else 0.0
            return _GramBlock(block, panels, tokens[0] if tokens else None, largest)

        return compute

    width = rows_t.shape[1]
    tasks = (task(a, min(a + GRAM_BLOCK_COLS, width)) for a in range(0, width, GRAM_BLOCK_COLS))
    for result, ws in ctx.pool.in_order(tasks):
        add_panels(w.gram, ws, result.panels)
        w.support_stored += result.block.support
        w.largest_delta = max(w.largest_delta, result.largest)  # NaN: the Gram reports it
        if w.dense_blocks is not None:
            w.dense_blocks.append(result.block.columns is None)
        if w.kept is None:  # not kept, or the keep ring filled up at an earlier block
            if result.token is not None:
                ctx.keep_ring.free(result.token)
        elif result.token is None:  # the budget for kept deltas is spent: read again
            _drop_kept(w, ctx)
        else:
            w.kept.append((result.token, result.block))


def _store(ctx: PassContext, n_bytes: int) -> None:
    ctx.stats.store_bytes_written += n_bytes


def _drop_kept(w: TensorWork, ctx: PassContext) -> None:
    for token, _ in w.kept or []:
        ctx.keep_ring.free(token)
    w.kept = None


def _first_pass_done(gw: GroupWork, w: TensorWork, ctx: PassContext,
                     store_writer: StoreWriter) -> None:
    """Let the second pass start once the store writer has written the tensor; close the group
    (its Gram array and record) once every tensor of it is done."""
    if w.is_float and not bool(torch.isfinite(w.gram).all()):
        # a store keeps finite Grams only (its readers refuse others as damaged): a store-only
        # append refuses here; run --allow-nonfinite writes its outputs, then leaves the store
        # as it was (engine)
        if not (ctx.materialise and ctx.allow_nonfinite):
            _refuse_nonfinite(w.name, w.gram, list(gw.writer.gen.steps), stored=True)
        ctx.stats.nonfinite.append(w.name)
    elif 0.0 < w.largest_delta < SMALLEST_LARGEST_DELTA:
        raise RelexError(
            f"tensor {w.name!r} moves at most {w.largest_delta:.3g} from the base over the "
            "stored steps: the squares of float64 deltas below ~1e-146 underflow, so its "
            "prediction would silently be the base; relex_stream cannot extrapolate it (rescale "
            "the tensor in the checkpoints)"
        )
    gw.pending -= 1

    def flushed() -> None:
        gw.writer.flush()  # direct writes hold each shard's unaligned end until now
        if not w.read_once:
            w.out_origin = _cheaper_origin(gw, w)
        w.first_pass_done.set()

    store_writer.submit(flushed)
    if gw.pending == 0:
        grams = {t.name: t.gram.numpy() for t in gw.tensors if t.is_float}
        kinds = {t.name: t.svd for t in gw.tensors if t.is_float}
        support = {t.name: t.support_stored for t in gw.tensors if t.is_float}
        writer = gw.writer
        store_writer.submit(lambda: writer.finish(grams, kinds, support, gw.old_record))
        for t in gw.tensors:
            ctx.stats.support_stored += t.support_stored


def _cheaper_origin(gw: GroupWork, w: TensorWork) -> RowOrigin:
    """The second pass's rows: from the store when it keeps them compactly enough (or the
    checkpoints do not hold them all), else from the checkpoints. Runs on the store writer,
    once the tensor's new rows are written."""
    if w.out_from_sources is None or w.kept is not None or not w.is_float:
        return w.out_from_store
    if gw.writer.stored_fraction(w.name) < STORE_READ_CUTOFF:
        return w.out_from_store
    return w.out_from_sources


def _weights(w: TensorWork, ctx: PassContext) -> None:
    """Combination weights from the Gram matrix; NaN or Inf in the rows shows on its diagonal."""
    positions = torch.tensor(w.row_positions)
    gram = w.gram[positions][:, positions]
    if not bool(torch.isfinite(gram).all()):
        if not ctx.allow_nonfinite:
            _refuse_nonfinite(w.name, gram, ctx.observed_steps)
        log.warning("%s holds NaN or Inf; --allow-nonfinite: it keeps the base's values", w.name)
        w.keep_base = True
        w.weights = torch.zeros((len(ctx.writers), len(positions)), dtype=torch.float64)
        return
    w.weights = ctx.plan_weights(gram)
    fit = fit_diagnostics(gram, ctx.steps_tensor)
    if fit.sigma[0] > 0 and fit.spectral_gap > GAP_WARNING:
        ctx.ill_conditioned.append((w.name, fit.spectral_gap))


def _refuse_nonfinite(name: str, gram: torch.Tensor, steps: list[int],
                      stored: bool = False) -> None:
    diagonal = torch.diagonal(gram)
    bad = [steps[k] for k in range(len(steps)) if not diagonal[k].isfinite()]
    step = bad[0] if bad and len(bad) < len(steps) else None
    where = "the base or every step" if step is None else f"step {step}"
    fix = ("a store keeps finite values only, so it is left as it was: fix that checkpoint, or "
           "leave its step out with --steps" if stored else "fix the checkpoint, or pass "
           "--allow-nonfinite to keep the base's values for this tensor")
    raise NonfiniteRows(
        f"tensor {name!r} holds NaN or Inf values at {where} (or deltas beyond ~1e150, whose "
        "squares overflow float64)", fix, step)


# --------------------------------------------------------------------------- second pass


def _materialise_chunk(chunk: Chunk, w: TensorWork, ctx: PassContext,
                       device_rows: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    job, base = chunk.job, chunk.base
    if not w.is_float:
        for i in range(len(ctx.writers)):
            _write(w, ctx, i, job.start, base)
        return
    if w.weights is None:  # a tensor the store already holds: its Gram matrix is stored
        _weights(w, ctx)
    rows_t, base_t = device_rows
    # blocks the first pass found dense over the same rows need no second bit compare
    dense_blocks = w.dense_blocks if job.stage == "both" else None
    w.dense_blocks = None
    if job.stage == "both" and w.row_positions != list(range(rows_t.shape[0])):
        rows_t = rows_t[torch.tensor(w.row_positions, device=ctx.device)]
        dense_blocks = None  # fewer rows: a block may be sparse over them
    weights = w.weights.to(ctx.device)
    out_dtype = ctx.out_dtypes[w.name]
    width = base_t.shape[0]
    starts = range(0, width, GRAM_BLOCK_COLS)
    # the first pass's deltas, block by block in order (the chunk holds the base)
    kept = [w.kept.pop(0) if w.kept else None for _ in starts]

    def task(a: int, entry: tuple[int, BlockDeltas] | None) -> Callable[[Workspace], _Emitted]:
        def compute(ws: Workspace) -> _Emitted:
            b = min(a + GRAM_BLOCK_COLS, width)
            base_b = base_t[a:b]  # (s,)
            if entry is not None:
                block = entry[1]
            elif dense_blocks is not None and dense_blocks[a // GRAM_BLOCK_COLS]:
                block = block_deltas(rows_t[:, a:b], base_b, None, ws)
            else:
                changed = _changed(rows_t[:, a:b], base_b, w, ws)
                block = block_deltas(rows_t[:, a:b], base_b, changed, ws)
            if w.keep_base:
                out = round_to(base_b, out_dtype).expand(weights.shape[0], -1).cpu()
                return _Emitted(out, True, block.support, block.width, base_b)
            out = combine_block(weights, block, base_b, out_dtype, ws)  # (T, s) host
            return _Emitted(out, bool(torch.isfinite(out).all()), block.support, block.width,
                            base_b)

        return compute

    tasks = (task(a, entry) for a, entry in zip(starts, kept, strict=True))
    for (emitted, _), a, entry in zip(ctx.pool.in_order(tasks), starts, kept, strict=True):
        _emit_block(w, ctx, emitted, job.start + a)
        if entry is not None:
            ctx.keep_ring.free(entry[0])
    if job.stop == w.numel:
        _drop_kept(w, ctx)


@dataclass
class _Emitted:
    """One block of outputs (T, s) host, in its compute thread's workspace, and its counts."""

    out: torch.Tensor
    finite: bool
    support: int
    width: int
    base: torch.Tensor  # (s,) the block's base, base dtype, on the compute device


def _emit_block(w: TensorWork, ctx: PassContext, emitted: _Emitted, start: int) -> None:
    if not emitted.finite and not ctx.allow_nonfinite:
        _refuse_nonfinite_output(w, ctx, emitted, start)
    ctx.stats.support_observed += emitted.support
    ctx.stats.elements_observed += emitted.width
    for i in range(len(ctx.writers)):
        _write(w, ctx, i, start, _as_bits(emitted.out[i]))


def _refuse_nonfinite_output(w: TensorWork, ctx: PassContext, emitted: _Emitted,
                             start: int) -> None:
    """NonfiniteOutput naming the first element of the block whose output is NaN or Inf, and
    why: a target too far, a base value the output dtype cannot hold, or the base's own."""
    out_dtype = ctx.out_dtypes[w.name]
    bad = ~torch.isfinite(emitted.out)  # (T, s)
    i = int(bad.any(1).nonzero()[0])
    j = int(bad[i].nonzero()[0])
    base = emitted.base[j : j + 1].to("cpu", torch.float64)  # exact
    where = f"tensor {w.name!r} (element {start + j})"
    output = ctx.writers[i].final_dir.name
    dtype = _dtype_name(out_dtype)
    if not bool(torch.isfinite(base).all()):
        raise NonfiniteOutput(
            f"the base of {where} holds {float(base[0])}, which its prediction for {output} "
            "keeps", "no target changes that: fix the base, or pass --allow-nonfinite to write "
            "it as it is", "base")
    if not bool(torch.isfinite(round_to(base, out_dtype)).all()):
        raise NonfiniteOutput(
            f"the base of {where} holds {float(base[0]):g}, beyond what {dtype} holds, and so "
            f"does its prediction for {output}", "no target changes that: write a --dtype "
            "that holds it (auto keeps each tensor's base dtype), or pass --allow-nonfinite "
            "to write Inf there", "dtype")
    wider = ", write --dtype float32" if out_dtype.itemsize < 4 else ""
    raise NonfiniteOutput(
        f"the prediction of {where} for {output} overflows {dtype}",
        f"pick a nearer --target{wider}, or pass --allow-nonfinite to write it anyway",
        "target")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _write(w: TensorWork, ctx: PassContext, i: int, start: int, values: np.ndarray) -> None:
    for out_name in w.out_names:
        ctx.writers[i].write(out_name, start, values)
        ctx.stats.bytes_written += values.nbytes


# --------------------------------------------------------------------------- helpers


def _upload(rows: np.ndarray, base: np.ndarray, w: TensorWork,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (K, c) and base (c,) as torch tensors of their float dtypes on the device; one
    contiguous copy each from the (pinned) ring on CUDA, views on the CPU."""
    rows_t = bits_to_torch(rows, w.row_dtype)
    base_t = bits_to_torch(base, w.base_dtype)
    if device.type != "cpu":
        rows_t = rows_t.to(device, non_blocking=True)
        base_t = base_t.to(device, non_blocking=True)
    return rows_t, base_t


def _changed(rows: torch.Tensor, base: torch.Tensor, w: TensorWork,
             ws: Workspace) -> torch.Tensor:
    """(K, s) bool: where a row's value differs from the base's, compared bit by bit in a dtype
    that holds both exactly (the rows' usually: a bf16 base with fp32 rows; the base's for an
    fp32 base with bf16 rows, since rounding the base would hide changes; fp32 for bf16 and
    fp16)."""
    if w.row_dtype == w.base_dtype:
        return changed_columns(rows, base, ws)
    common = DTYPES[widest([w.row_dtype, w.base_dtype])][0]
    rows = rows if rows.dtype == common else rows.to(common)
    return changed_columns(rows, base.to(common), ws)


def _as_bits(tensor: torch.Tensor) -> np.ndarray:
    """Host numpy view of a tensor's bits (bf16 has no numpy dtype)."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy()
    return tensor.numpy()

