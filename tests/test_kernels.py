"""Gram panels on sparse blocks: a panel's entries depend only on its rows and those before it
(what makes an appended store's Gram equal a build at once), with or without a gather."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from relex_stream.kernels import (
    Workspace,
    add_panels,
    block_deltas,
    changed_columns,
    gather_columns,
    gram_panels,
    symmetric,
)
from relex_stream.store_layout import PANEL_ROWS

WIDTH = 65536  # one Gram block: supports of thousands of columns (MKL splits the sums)


def _rows(n_rows: int, late_from: int, dtype: torch.dtype,
          seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Base (s,) and rows (K, s) of `dtype`: 5% of the columns move from the first row on,
    another 3% only from row `late_from` on, the rest never (a sparse block, as RL leaves bf16
    weights). float32 rows make the Gram's sums round (bf16 products often add up exactly), so
    a change in what is summed, or in what order, shows in the bits."""
    rng = np.random.default_rng(seed)
    base = torch.from_numpy(rng.standard_normal(WIDTH)).to(dtype)
    columns = rng.permutation(WIDTH)
    early, late = columns[: WIDTH // 20], columns[WIDTH // 20 : WIDTH // 20 + WIDTH * 3 // 100]
    rows = base.double().repeat(n_rows, 1)
    steps = torch.arange(1, n_rows + 1, dtype=torch.float64)[:, None]
    rows[:, early] += 0.05 * steps * torch.from_numpy(rng.standard_normal(len(early)))
    moved = torch.from_numpy(rng.standard_normal(len(late)))
    rows[late_from:, late] += 0.05 * steps[late_from:] * moved
    return base, rows.to(dtype)


def _gram(base: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    ws = Workspace(rows.shape[0], 1, WIDTH, torch.device("cpu"))
    changed = changed_columns(rows, base, ws)
    block = block_deltas(rows, base, changed, ws)
    assert block.columns is not None, "the test wants a sparse block"
    gram = torch.zeros((rows.shape[0],) * 2, dtype=torch.float64)
    add_panels(gram, ws, gram_panels(changed, block, 0, ws))
    return symmetric(gram)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("late_from", [PANEL_ROWS, PANEL_ROWS + 3, 5])
def test_the_first_rows_give_the_same_bits_alone_or_with_later_ones(late_from, dtype):
    """Rows 0..PANEL_ROWS alone and with 6 more rows, some of which change columns the first
    ones never did: the first panel's entries are bit for bit the same."""
    base, rows = _rows(PANEL_ROWS + 6, late_from, dtype)
    alone = _gram(base, rows[:PANEL_ROWS])
    together = _gram(base, rows)
    assert torch.equal(alone, together[:PANEL_ROWS, :PANEL_ROWS])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("late_from", [PANEL_ROWS, 5, 0])
def test_sparse_panels_match_a_dense_float64_reference(late_from, dtype):
    base, rows = _rows(PANEL_ROWS + 6, late_from, dtype, seed=1)
    deltas = rows.double().numpy() - base.double().numpy()[None, :]
    reference = deltas @ deltas.T  # every column, float64
    got = _gram(base, rows).numpy()
    np.testing.assert_allclose(got, reference, rtol=1e-12, atol=1e-12 * np.abs(reference).max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_gather_columns_of_a_block_of_a_wider_chunk(dtype):
    """A block is a strided view of its chunk (rows far apart): gathered row by row, it picks
    the same words as a contiguous copy does, and the block's Gram keeps its bits."""
    rng = np.random.default_rng(3)
    chunk = torch.from_numpy(rng.standard_normal((6, 3 * 1000))).to(dtype)  # (K, c)
    block = chunk[:, 1000:2000]  # (K, s), not contiguous
    assert not block.is_contiguous()
    columns = torch.from_numpy(np.sort(rng.choice(1000, 137, replace=False)))
    out = torch.empty((6, 137), dtype=dtype)
    gather_columns(block, columns, out)
    assert torch.equal(out.view(torch.uint8), block.contiguous()[:, columns].view(torch.uint8))
    base, rows = _rows(20, 5, dtype if dtype != torch.float64 else torch.float32)
    wide = torch.cat([rows, rows, rows], dim=1)  # the block again in the middle of a chunk
    strided = wide[:, WIDTH : 2 * WIDTH]
    assert torch.equal(_gram(base, strided), _gram(base, rows))
