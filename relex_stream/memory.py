"""How many columns of a tensor to hold at once, from the --max-memory budget."""

from __future__ import annotations

from .errors import RelexError
from .kernels import GRAM_BLOCK_COLS
from .units import format_bytes


def chunk_bytes(cols: int, n_rows: int, itemsize: int, n_outputs: int, out_itemsize: int) -> int:
    """Host bytes the engine holds for one chunk of `cols` columns, scratch included.

    Base and rows sit in three read buffers (one being read, one computed on, one being
    written to the store) and once more while a store chunk is encoded or decoded; the float64
    delta scratch is bounded by the Gram block, not by the chunk.
    """
    block = min(cols, GRAM_BLOCK_COLS)
    scratch = block * (n_rows * (8 + 8) + n_outputs * 16)
    per_col = 4 * (n_rows + 1) * itemsize + n_outputs * out_itemsize
    return scratch + cols * per_col


def budget_too_small(budget_bytes: int, n_rows: int, needed_bytes: int) -> RelexError:
    """The user error for a --max-memory below what one chunk needs."""
    return RelexError(
        f"--max-memory {format_bytes(budget_bytes)} is too small to hold one chunk of "
        f"{n_rows} checkpoints; give at least {format_bytes(needed_bytes)}"
    )


def smallest_budget(
    numel: int, n_rows: int, itemsize: int, n_outputs: int, out_itemsize: int
) -> int:
    """The least --max-memory that holds one chunk of this tensor."""
    return chunk_bytes(min(GRAM_BLOCK_COLS, numel), n_rows, itemsize, n_outputs, out_itemsize)


def plan_chunk_cols(
    numel: int,
    n_rows: int,
    itemsize: int,
    n_outputs: int,
    out_itemsize: int,
    budget_bytes: int,
    store_chunk_cols: int,
) -> int:
    """Columns per chunk: the whole tensor when it fits (one read), else the most that fit.

    Chunks start on multiples of the store's chunk (or at least of the Gram block grid).
    """
    args = (n_rows, itemsize, n_outputs, out_itemsize)
    if chunk_bytes(numel, *args) <= budget_bytes:
        return numel
    smallest = min(GRAM_BLOCK_COLS, numel)
    needed = smallest_budget(numel, *args)
    if needed > budget_bytes:
        raise budget_too_small(budget_bytes, n_rows, needed)
    per_col = chunk_bytes(2, *args) - chunk_bytes(1, *args)
    fixed = needed - smallest * per_col
    cols = (budget_bytes - fixed) // per_col
    align = store_chunk_cols if cols >= store_chunk_cols else GRAM_BLOCK_COLS
    return max(smallest, cols // align * align)
