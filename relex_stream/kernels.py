"""Device numerics on raw checkpoint rows: support, deltas, Gram panels, combination.

Everything here takes tensors (on the CPU or a GPU), never paths. Rows arrive in the
checkpoint's dtype and become float64 deltas only on their support: the columns of a block where
some row's bits differ from the base's. A column outside the support adds nothing to the Gram
matrix nor to any prediction, and the output there is the base's value, bit for bit.

Determinism. The Gram matrix is a sum over a fixed grid of GRAM_BLOCK_COLS columns of each
tensor, in order, so it does not depend on how a run chunks the tensor (--max-memory) or on
torchrun ranks. Within a block, rows are taken in panels of PANEL_ROWS (aligned to the row
index); panel p gives G[p, :end of p] from the columns where a row of p changed. A panel's
entries depend only on its rows and the rows before it, so appending rows recomputes only the
last, partial panel, and the Gram of a store built in steps equals, bit for bit, the Gram of the
same rows built at once.

Precision: deltas and Gram products are float64. float32 products (even short ones) left output
elements near zero up to 140 bf16 ulps off the float64 reference (README, Numerics). TF32 is off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import RelexError
from .store_layout import PANEL_ROWS

GRAM_BLOCK_COLS = 1 << 16  # columns of one block of the fixed Gram grid
_SIGNED_WORDS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise RelexError(f"--device {name!r} is not one of auto, cpu, cuda, cuda:N")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RelexError(
                "--device cuda was asked for but torch sees no CUDA GPU; use --device cpu"
            )
        index = name.partition(":")[2]
        if index and not (index.isascii() and index.isdigit()
                          and int(index) < torch.cuda.device_count()):
            raise RelexError(
                f"--device {name!r}: this machine has {torch.cuda.device_count()} GPU(s), "
                "numbered from 0"
            )
    return torch.device(name)


def exact_matmul() -> None:
    """TF32 would round the deltas to 10 mantissa bits before the Gram product."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def as_words(values: torch.Tensor) -> torch.Tensor:
    """The same memory as signed integer words (bit comparisons, any float dtype)."""
    return values.view(_SIGNED_WORDS[values.element_size()])


@dataclass
class BlockDeltas:
    """One block's float64 deltas on its support (the columns where some row changed)."""

    columns: torch.Tensor | None  # (m,) int64 positions in the block; None: every column
    deltas: torch.Tensor  # (K, m) float64
    width: int  # columns of the block

    @property
    def support(self) -> int:
        return self.width if self.columns is None else int(self.columns.numel())

    @property
    def nbytes(self) -> int:
        extra = 0 if self.columns is None else self.columns.numel() * 8
        return self.deltas.numel() * 8 + extra


def changed_columns(rows: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(K, s) bool: where each row's bits differ from the reference row's (base widened)."""
    return as_words(rows) != as_words(reference)[None, :]


def block_deltas(
    rows: torch.Tensor, base: torch.Tensor, changed: torch.Tensor
) -> BlockDeltas:
    """Deltas rows − base in float64 on the block's support.

    rows: (K, s) row dtype; base: (s,) base dtype; changed: (K, s) bool from changed_columns.
    """
    width = rows.shape[1]
    mask = changed.any(0)  # (s,)
    if bool(mask.all()):
        deltas = rows.to(torch.float64, copy=True)  # (K, s); copy: never change the read buffer
        deltas -= base.double()
        return BlockDeltas(None, deltas, width)
    columns = mask.nonzero().flatten()  # (m,)
    deltas = rows.index_select(1, columns).double()  # (K, m)
    deltas -= base.index_select(0, columns).double()
    return BlockDeltas(columns, deltas, width)


def add_gram_panels(
    gram: torch.Tensor, changed: torch.Tensor, block: BlockDeltas, first_row: int
) -> None:
    """Add one block's panels from row `first_row` (a multiple of PANEL_ROWS) to gram (K, K).

    Panel [r0, r1) adds D_p[r0:r1] D_pᵀ to gram[r0:r1, :r1], with D_p the deltas of rows
    0..r1 on the columns where a row of the panel changed; the upper triangle is filled by
    symmetric() at the end.
    """
    exact_matmul()
    n_rows = changed.shape[0]
    for r0 in range(first_row, n_rows, PANEL_ROWS):
        r1 = min(n_rows, r0 + PANEL_ROWS)
        panel = changed[r0:r1].any(0)  # (s,)
        if block.columns is not None:
            panel = panel.index_select(0, block.columns)  # (m,)
        if not bool(panel.any()):
            continue
        deltas = block.deltas[:r1] if bool(panel.all()) else block.deltas[:r1, panel]  # (r1, m_p)
        gram[r0:r1, :r1] += deltas[r0:r1] @ deltas.T


def symmetric(gram: torch.Tensor) -> torch.Tensor:
    """The full Gram matrix from its lower triangle (what the panels computed)."""
    lower = torch.tril(gram)
    return lower + torch.tril(gram, -1).T


def combine_block(
    weights: torch.Tensor, block: BlockDeltas, base: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """W_0 + weights @ D for one block, rounded to nearest even into `out_dtype`; (T, s) host.

    weights: (T, K) float64 on the block's device; base: (s,). Outside the support every
    output is the base's value (cast to out_dtype when that differs).
    """
    n_out = weights.shape[0]
    out = base.to(out_dtype).expand(n_out, -1).contiguous()  # (T, s)
    if block.support == 0:
        return out.cpu()
    base_support = base.double() if block.columns is None else base.index_select(
        0, block.columns).double()
    predicted = torch.addmm(base_support, weights, block.deltas).to(out_dtype)  # (T, m)
    if block.columns is None:
        out = predicted
    else:
        out[:, block.columns] = predicted
    return out.cpu()


def eigh_descending(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (K,) clipped at 0 and eigenvectors (K, K) as columns, largest first; float64."""
    eigenvalues, eigenvectors = torch.linalg.eigh(gram.detach().to("cpu", torch.float64))
    order = torch.arange(eigenvalues.numel() - 1, -1, -1)
    return eigenvalues[order].clamp_min(0.0), eigenvectors[:, order]


def gram_times(rows: torch.Tensor, base: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """G·Q = D (Dᵀ Q) without forming G: (K, p) float64 from rows (K, n), base (n,), Q (K, p)."""
    exact_matmul()
    basis = basis.to(rows.device, torch.float64)
    product = torch.zeros_like(basis)
    n_cols = rows.shape[1]
    for start in range(0, n_cols, GRAM_BLOCK_COLS):
        stop = min(start + GRAM_BLOCK_COLS, n_cols)
        deltas = rows[:, start:stop].to(torch.float64, copy=True)  # (K, s)
        deltas -= base[start:stop].double()
        product += deltas @ (deltas.T @ basis)  # (K, p)
    return product


def randomized_gram(
    rows: torch.Tensor,
    base: torch.Tensor,
    rank: int = 1,
    oversample: int = 4,
    iterations: int = 3,
    seed: int = 0,
) -> torch.Tensor:
    """Rank-(rank+oversample) approximation Q (QᵀGQ) Qᵀ of G = D Dᵀ by subspace iteration.

    rows: (K, n) checkpoint dtype; base: (n,), both on the compute device. Returns (K, K)
    float64 on the CPU whose top eigenvectors are the Rayleigh-Ritz estimates of D's top left
    singular vectors. Costs (2·iterations + 1)·2·p·K·n multiply-adds against K²·n for the
    exact Gram matrix, with a fixed seed so repeated runs give the same bytes.
    """
    n_rows = rows.shape[0]
    width = min(n_rows, rank + oversample)
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(n_rows, width, generator=generator, dtype=torch.float64)  # (K, p)
    for _ in range(iterations):
        basis, _ = torch.linalg.qr(gram_times(rows, base, basis).cpu())
    projected = gram_times(rows, base, basis).cpu()  # (K, p) = G Q
    small = basis.T @ projected  # (p, p) = Qᵀ G Q
    small = (small + small.T) / 2
    return basis @ small @ basis.T  # (K, K)
