"""The two streaming passes over every tensor: Gram (and store) then materialise.

Per tensor: the Gram pass reads its base and K rows chunk by chunk, appends them to the store
and accumulates G; the combination weights follow from G; the materialise pass writes
W_0 + wᵀD into every output. A tensor that fits the host budget is one chunk and is read once;
on CUDA a tensor that fits the GPU budget is kept there after the Gram pass and also read once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from . import store as trajectory_store
from .checkpoints import ModelLayout
from .errors import RelexError
from .kernels import GRAM_BLOCK_COLS, accumulate_gram, combine, randomized_gram
from .memory import plan_chunk_cols
from .plan import fit_diagnostics
from .progress import Progress
from .reader import ChunkRead, ChunkReader
from .safetensors_io import DTYPES, FLOAT_CODES, bits_to_torch, read_into
from .store_writer import StoreWriter, release_after
from .writer import ModelWriter

log = logging.getLogger(__name__)

GAP_WARNING = 0.9  # σ₂/σ₁ above this: the top direction is poorly defined
# Read buffers: one being read, one computed on, one being written to the store.
N_ARENAS = 3


@dataclass
class TensorWork:
    """Plan and running state of one tensor's passes."""

    name: str
    out_names: list[str]  # the tensor and its tied aliases
    dtype_code: str
    numel: int
    n_rows: int  # observed rows (0 for non-float tensors, which are copied)
    cols: int  # columns per host chunk
    building: bool  # not yet complete in the store: read sources, write store
    device_resident: bool  # kept on the GPU between the passes
    svd: str = "exact"  # "exact" Gram matrix or "randomized" subspace iteration
    keep_base: bool = False  # non-finite values and --allow-nonfinite: output the base
    gram: torch.Tensor | None = None
    weights: torch.Tensor | None = None  # (T, K) float64
    device_base: torch.Tensor | None = None  # (n,) on device when device_resident
    device_rows: torch.Tensor | None = None  # (K, n) on device when device_resident

    @property
    def is_float(self) -> bool:
        return self.n_rows > 0

    @property
    def bits(self) -> np.dtype:
        return DTYPES[self.dtype_code][1]

    @property
    def input_bytes(self) -> int:
        """Bytes of the base and the observed rows of this tensor."""
        return (self.n_rows + 1) * self.numel * self.bits.itemsize

    def chunks(self) -> list[tuple[int, int]]:
        return [(s, min(s + self.cols, self.numel)) for s in range(0, self.numel, self.cols)]

    def jobs(self) -> list[ChunkRead]:
        """Every read of this tensor, in order."""

        def make(stage: str) -> list[ChunkRead]:
            return [
                ChunkRead(self.name, stage, a, b, self.n_rows, self.bits) for a, b in self.chunks()
            ]

        if not self.building:
            return make("materialise")
        once = len(self.chunks()) == 1 or self.device_resident or not self.is_float
        return make("gram") + ([] if once else make("materialise"))


@dataclass
class PassStats:
    bytes_read: int = 0
    bytes_written: int = 0
    store_bytes_written: int = 0


def plan_tensor(
    name: str,
    out_names: list[str],
    layout: ModelLayout,
    output_itemsize: int,
    n_rows: int,
    n_outputs: int,
    building: bool,
    host_budget: int,
    device_budget: int | None,
    svd: str = "auto",
) -> TensorWork:
    """Chunking, residency and SVD kernel of one tensor under the memory budgets."""
    dtype_code, shape = layout.tensors[name]
    numel = int(np.prod(shape, dtype=np.int64))
    rows = n_rows if dtype_code in FLOAT_CODES else 0
    itemsize = DTYPES[dtype_code][1].itemsize
    cols = plan_chunk_cols(
        numel,
        rows,
        itemsize,
        n_outputs,
        output_itemsize,
        host_budget,
        trajectory_store.row_chunk_cols(dtype_code, numel),
    )
    # On the device a resident tensor is its rows and base once, plus one block's scratch.
    block_scratch = min(numel, GRAM_BLOCK_COLS) * (rows * (8 + 8) + n_outputs * 16)
    device_bytes = (rows + 1) * numel * itemsize + block_scratch
    device_resident = (
        device_budget is not None and rows > 0 and cols < numel and device_bytes <= device_budget
    )
    resident = cols == numel or device_resident
    return TensorWork(
        name,
        out_names,
        dtype_code,
        numel,
        rows,
        cols,
        building,
        device_resident,
        choose_svd(svd, rows, resident),
    )


RANDOMIZED_WIDTH, RANDOMIZED_ITERATIONS = 5, 3  # rank 1 + oversampling 4; subspace iterations


def choose_svd(requested: str, n_rows: int, resident: bool) -> str:
    """The kernel for one tensor; 'auto' compares multiply-adds of the two.

    Exact costs K²·n. Randomized costs (2·iterations + 1)·2·p·K·n and needs the rows in memory
    (a chunked tensor would be re-read once per iteration), so auto picks it only for resident
    tensors with K > 2·p·(2·iterations + 1) = 70.
    """
    if requested not in ("auto", "exact", "randomized"):
        raise RelexError(f"--svd {requested!r} is not one of auto, exact, randomized")
    if requested == "exact" or n_rows == 0:
        return "exact"
    if requested == "randomized":
        return "randomized" if resident else "exact"
    cheaper = n_rows > 2 * RANDOMIZED_WIDTH * (2 * RANDOMIZED_ITERATIONS + 1)
    return "randomized" if cheaper and resident else "exact"


def run_passes(
    work: list[TensorWork],
    sources,
    root,
    row_ids: list[int],
    steps: torch.Tensor,
    plan_weights: Callable[[str, torch.Tensor], torch.Tensor],
    writers: list[ModelWriter],
    device: torch.device,
    stats: PassStats,
    ill_conditioned: list[tuple[str, float]],
    progress: Progress,
    allow_nonfinite: bool,
    observed_steps: list[int],
) -> None:
    """Run both passes over every tensor in `work`, writing into `writers`.

    plan_weights(name, gram (K, K)) gives the (outputs, K) float64 combination weights.
    """

    def weights_for(w: TensorWork) -> None:
        if not bool(torch.isfinite(w.gram).all()):
            if not allow_nonfinite:
                _refuse_nonfinite(w, observed_steps)
            log.warning(
                "%s holds NaN or Inf; --allow-nonfinite: it keeps the base's values", w.name
            )
            w.keep_base = True
            w.weights = torch.zeros((len(writers), len(observed_steps)), dtype=torch.float64)
            return
        w.weights = plan_weights(w.name, w.gram)
        fit = fit_diagnostics(w.gram, steps)
        if fit.sigma[0] > 0 and fit.spectral_gap > GAP_WARNING:
            ill_conditioned.append((w.name, fit.spectral_gap))

    by_name = {w.name: w for w in work}
    jobs = [job for w in work for job in w.jobs()]

    def fill(job: ChunkRead, base: np.ndarray, rows: np.ndarray) -> None:
        if sources is not None:
            read_into(sources.base.tensors[job.tensor], job.start, base)
            for k, ckpt in enumerate(sources.checkpoints[: job.n_rows]):
                read_into(ckpt.model.tensors[job.tensor], job.start, rows[k])
        else:
            trajectory_store.read_base(root, job.tensor, job.start, base)
            if job.n_rows:
                trajectory_store.read_rows(root, job.tensor, row_ids, job.start, base, rows)
        stats.bytes_read += job.nbytes

    reader = ChunkReader(jobs, fill, n_arenas=N_ARENAS, pin_memory=device.type == "cuda")
    store_writer = StoreWriter()
    try:
        for chunk in reader:
            job, w = chunk.job, by_name[chunk.job.tensor]
            release = chunk.release
            if job.stage == "gram":
                # the buffer goes back once both the store write and the compute are done
                release = release_after(2, chunk.release)
                _gram_step(w, chunk.base, chunk.rows, job, root, device, stats, store_writer,
                           release)  # fmt: skip
                progress.add("gram", job.nbytes)
                if not w.is_float:
                    _write(w, writers, job.start, [chunk.base] * len(writers), stats)
                    progress.add("materialise", job.nbytes)
                last = job.stop == w.numel
                if last and w.is_float:
                    weights_for(w)
                    if len(w.chunks()) == 1:
                        _materialise(w, chunk.base, chunk.rows, job.start, writers, device, stats)
                        progress.add("materialise", job.nbytes)
                    elif w.device_resident:
                        _materialise_resident(w, writers, device, stats)
                        progress.add("materialise", w.input_bytes)
            else:
                if w.is_float:
                    if w.weights is None:
                        full = trajectory_store.read_gram(root, w.name)
                        w.gram = full[row_ids][:, row_ids]
                        weights_for(w)
                    _materialise(w, chunk.base, chunk.rows, job.start, writers, device, stats)
                else:
                    _write(w, writers, job.start, [chunk.base] * len(writers), stats)
                progress.add("materialise", job.nbytes)
            if device.type == "cuda":
                torch.cuda.current_stream(device).synchronize()  # uploads from the arena done
            release()
        store_writer.close()
    finally:
        store_writer.close(raise_errors=False)  # after an error elsewhere: just stop it
        reader.close()


def _gram_step(
    w: TensorWork,
    base: np.ndarray,
    rows: np.ndarray,
    job: ChunkRead,
    root,
    device: torch.device,
    stats: PassStats,
    store_writer: StoreWriter,
    written: Callable[[], None],
) -> None:
    """Gram pass over one chunk; the store write runs on `store_writer`, then `written()`."""
    if job.start == 0:
        store_writer.submit(
            lambda: trajectory_store.prepare_tensor(root, w.name, w.dtype_code, w.numel, w.is_float)
        )
        if w.is_float:
            w.gram = torch.zeros((w.n_rows, w.n_rows), dtype=torch.float64, device=device)
        if w.device_resident:
            torch_dtype = DTYPES[w.dtype_code][0]
            w.device_rows = torch.empty((w.n_rows, w.numel), dtype=torch_dtype, device=device)
            w.device_base = torch.empty((w.numel,), dtype=torch_dtype, device=device)
    float_rows = rows if w.is_float else None
    store_writer.submit(
        lambda: trajectory_store.write_chunk(root, w.name, job.start, base, float_rows), written
    )
    stats.store_bytes_written += base.nbytes + (rows.nbytes if w.is_float else 0)
    if not w.is_float:
        if job.stop == w.numel:
            store_writer.submit(lambda: trajectory_store.finish_tensor(root, w.name, None))
        return
    rows_t, base_t = bits_to_torch(rows, w.dtype_code), bits_to_torch(base, w.dtype_code)
    if w.device_resident:
        w.device_rows[:, job.start : job.stop].copy_(rows_t, non_blocking=True)
        w.device_base[job.start : job.stop].copy_(base_t, non_blocking=True)
        rows_t = w.device_rows[:, job.start : job.stop]
        base_t = w.device_base[job.start : job.stop]
    if w.svd == "exact":
        accumulate_gram(w.gram, rows_t, base_t, device)
    if job.stop == w.numel:
        if w.svd == "randomized":
            if w.device_resident:
                rows_t, base_t = w.device_rows, w.device_base
            w.gram = randomized_gram(
                rows_t,
                base_t,
                device,
                oversample=RANDOMIZED_WIDTH - 1,
                iterations=RANDOMIZED_ITERATIONS,
            )
        w.gram = gram = w.gram.cpu()
        store_writer.submit(lambda: trajectory_store.finish_tensor(root, w.name, gram, kind=w.svd))


def _refuse_nonfinite(w: TensorWork, observed_steps: list[int]) -> None:
    """NaN or Inf anywhere in a tensor's rows shows on the Gram diagonal; name tensor and step."""
    diagonal = torch.diagonal(w.gram)
    bad = [observed_steps[k] for k in range(len(observed_steps)) if not diagonal[k].isfinite()]
    where = f"step {bad[0]}" if bad and len(bad) < len(observed_steps) else "the base or every step"
    raise RelexError(
        f"tensor {w.name!r} holds NaN or Inf values at {where}; fix the checkpoint, or pass "
        "--allow-nonfinite to extrapolate anyway"
    )


def _materialise(
    w: TensorWork,
    base: np.ndarray,
    rows: np.ndarray,
    start: int,
    writers: list[ModelWriter],
    device: torch.device,
    stats: PassStats,
) -> None:
    out_dtype = DTYPES[writers[0].dtypes[w.name]][0]
    predicted = _predict(
        w, bits_to_torch(rows, w.dtype_code), bits_to_torch(base, w.dtype_code), out_dtype, device
    )  # (T, c)
    _write(w, writers, start, [_as_bits(predicted[i]) for i in range(len(writers))], stats)


def _materialise_resident(
    w: TensorWork, writers: list[ModelWriter], device: torch.device, stats: PassStats
) -> None:
    out_dtype = DTYPES[writers[0].dtypes[w.name]][0]
    for start, stop in w.chunks():
        predicted = _predict(
            w, w.device_rows[:, start:stop], w.device_base[start:stop], out_dtype, device
        )  # (T, c)
        _write(w, writers, start, [_as_bits(predicted[i]) for i in range(len(writers))], stats)
    w.device_rows = w.device_base = None  # free the GPU copy before the next tensor


def _predict(
    w: TensorWork, rows: torch.Tensor, base: torch.Tensor, out_dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:  # fmt: skip
    """(T, c) host tensor: W_0 + wᵀD, or W_0 for a tensor kept at the base."""
    if w.keep_base:
        return base.to("cpu", out_dtype).expand(w.weights.shape[0], -1).contiguous()
    return combine(w.weights, rows, base, out_dtype, device)


def _write(
    w: TensorWork,
    writers: list[ModelWriter],
    start: int,
    data: list[np.ndarray],
    stats: PassStats,
) -> None:
    for writer, values in zip(writers, data, strict=True):
        for out_name in w.out_names:
            writer.write(out_name, start, values)
            stats.bytes_written += values.nbytes


def _as_bits(tensor: torch.Tensor) -> np.ndarray:
    """Host numpy view of a tensor's bits (bf16 has no numpy dtype)."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy()
    return tensor.numpy()
