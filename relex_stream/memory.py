"""The memory budget: what the engine holds, and how many columns of a tensor fit at once.

--max-memory covers every buffer the engine allocates on the host:

    fixed scratch   per compute thread, one Gram block being computed: the rows' change mask,
                    their float64 deltas on the support and one panel's copy of them; one block
                    of outputs; and the store codec's per-chunk buffers
    read ring       the reader's buffers: base and rows of the chunks in flight (read, computed
                    on, written to the store), pinned on CUDA
    kept deltas     float64 deltas on the support kept between the two passes when they fit, so
                    the second pass neither reads nor widens them again

The fixed scratch comes first; the ring gets RING_SHARE of the rest and kept deltas the
remainder. A tensor whose base and rows fit the ring is one chunk: read once. Larger tensors are
read in chunks of a third of the ring (one being read, one computed on, one being stored), each
a whole number of the store's inner chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import RelexError
from .kernels import GRAM_BLOCK_COLS
from .units import format_bytes

RING_SHARE = 0.75
# A second compute thread on the CPU (block_pool.py) costs a second block scratch; it is taken
# only when that is at most this fraction of the budget, so small budgets keep their ring (at
# K = 30 a block scratch is 59 MB: two compute threads from --max-memory 448M up).
MAX_SCRATCH_SHARE = 0.125
CODEC_BUFFERS = 6  # inner chunks the store writer and reader hold at once (codes, frames)
CHUNKS_IN_FLIGHT = 3


def block_scratch_bytes(n_rows: int, n_outputs: int, block_cols: int = GRAM_BLOCK_COLS) -> int:
    """Bytes of kernels.Workspace for one Gram block: per row the change mask (1), gathered
    words (8), the float32 step of widening (4), deltas and one panel's copy (8 + 8); per output
    the float64 prediction and the output itself (8 + 8); the base in float64 (8); one block's
    panel products (K, K) float64."""
    return (block_cols * (n_rows * (1 + 8 + 4 + 8 + 8) + n_outputs * (8 + 8) + 8)
            + n_rows * n_rows * 8)


@dataclass(frozen=True)
class Budget:
    """How a --max-memory budget is spent (bytes)."""

    total: int
    fixed: int
    ring: int
    keep: int
    block_cols: int  # the widest Gram block of the model
    workspaces: int = 1  # compute threads, each with its own block scratch

    @staticmethod
    def split(
        total: int, n_rows: int, n_outputs: int, block_cols: int, inner_chunk_bytes: int,
        max_workspaces: int = 1,
    ) -> Budget:
        """block_cols: the widest Gram block of the model (a tensor may be smaller than one);
        inner_chunk_bytes: the store's largest inner chunk; max_workspaces: compute threads
        wanted (each takes a block scratch when it is at most MAX_SCRATCH_SHARE of total)."""
        scratch = block_scratch_bytes(n_rows, n_outputs, block_cols)
        extra = int(total * MAX_SCRATCH_SHARE) // max(1, scratch)  # workspaces beyond the first
        workspaces = 1 + max(0, min(max_workspaces - 1, extra))
        fixed = workspaces * scratch + CODEC_BUFFERS * inner_chunk_bytes
        rest = max(0, total - fixed)
        ring = int(rest * RING_SHARE)
        return Budget(total, fixed, ring, rest - ring, block_cols, workspaces)


def budget_too_small(total: int, n_rows: int, needed: int) -> RelexError:
    """The user error for a --max-memory below what one chunk needs."""
    return RelexError(
        f"--max-memory {format_bytes(total)} is too small to hold one chunk of {n_rows} "
        f"checkpoints; give at least {format_bytes(needed)}"
    )


def chunk_cols(
    numel: int, bytes_per_col: int, ring_bytes: int, align: int, budget: Budget, n_rows: int
) -> int:
    """Columns per chunk: the whole tensor when it fits the ring, else a third of the ring (at
    least one `align`ed unit, alone in the ring if need be), a multiple of `align`."""
    if numel * bytes_per_col <= ring_bytes:
        return numel
    cols = ring_bytes // CHUNKS_IN_FLIGHT // bytes_per_col // align * align
    if cols == 0:
        cols = align
    if cols * bytes_per_col > ring_bytes:
        needed = budget.fixed + int(align * bytes_per_col / RING_SHARE) + 1
        raise budget_too_small(budget.total, n_rows, needed)
    return min(cols, numel)


def smallest_unit(inner_chunk_cols: int) -> int:
    """Chunks start on store inner chunks, which are whole Gram blocks (or a small tensor)."""
    return max(inner_chunk_cols, GRAM_BLOCK_COLS)
