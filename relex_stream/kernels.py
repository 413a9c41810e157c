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

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .errors import RelexError
from .store_layout import GRAM_BLOCK_COLS, PANEL_DENSE_FRACTION, PANEL_ROWS

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
        return torch.device("cuda", int(index)) if index else torch.device("cuda")
    return torch.device(name)


# float32 bits a float32 → dtype rounding drops, and the pattern of a midpoint among them
_MIDPOINT_BITS = {torch.bfloat16: (0xFFFF, 0x8000), torch.float16: (0x1FFF, 0x1000)}
_FLOAT16_SMALLEST_NORMAL = 2.0**-14  # below it float16 drops more bits: every value is checked


def round_to(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 `values` rounded to nearest even into `dtype`, once; any shape, same device.

    torch converts float64 to bfloat16 and float16 through float32, rounding twice: 1 + 2⁻⁸ +
    2⁻²⁶ came out 1.0, not 1.0078125. The second rounding goes wrong only where the first lands
    exactly on a midpoint of `dtype` (all of them are float32 values). There, the float32 is
    rounded *to odd* instead (toward zero, last bit set when inexact), which never lands on a
    midpoint; float32 keeps at least two more bits than either dtype, so its rounding to `dtype`
    is then the correct one (Boldo and Melquiond, IEEE Trans. Computers 57(4), 2008).
    """
    if values.dtype != torch.float64 or dtype not in _MIDPOINT_BITS:
        return values.to(dtype)
    single = values.to(torch.float32).contiguous()
    bits = single.view(torch.int32).view(-1)
    mask, midpoint = _MIDPOINT_BITS[dtype]
    suspects = (bits & mask) == midpoint
    if dtype == torch.float16:
        suspects |= single.view(-1).abs() < _FLOAT16_SMALLEST_NORMAL
    where = torch.nonzero(suspects).flatten()
    if where.numel():
        exact = values.reshape(-1)[where]  # float64
        nearest = bits[where]
        back = nearest.view(torch.float32).to(torch.float64)
        inexact = back != exact  # a NaN too: its bits stay a NaN
        # toward zero: one float32 ulp down in magnitude where rounding went away from zero
        nearest -= (back.abs() > exact.abs()).to(torch.int32)
        bits[where] = nearest | inexact.to(torch.int32)
    return single.to(dtype)


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


class Workspace:
    """Preallocated scratch for one Gram block on the compute device: the kernels write into it
    instead of allocating (no allocator churn: peak memory is what --max-memory counts).

    A BlockDeltas made in the workspace is valid until the next block (block_deltas can place
    one in storage of its own instead).
    """

    def __init__(self, n_rows: int, n_outputs: int, block_cols: int, device: torch.device):
        cells = max(1, n_rows * block_cols)

        def buffer(dtype: torch.dtype, n: int = cells) -> torch.Tensor:
            return torch.empty(n, dtype=dtype, device=device)

        self.changed = buffer(torch.bool)
        self.words = buffer(torch.int64)  # gathered row words (any width) before widening
        self.narrow = buffer(torch.float32)  # 2-byte floats widen through float32
        self.deltas = buffer(torch.float64)
        self.panel = buffer(torch.float64)
        self.base = buffer(torch.float64, block_cols)
        self.predicted = buffer(torch.float64, max(1, n_outputs * block_cols))
        self.out = buffer(torch.float64, max(1, n_outputs * block_cols))  # any output dtype
        self.gram_block = torch.zeros((n_rows, n_rows), dtype=torch.float64, device=device)

    @staticmethod
    def view(flat: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous (shape) tensor of `dtype` at the start of a scratch buffer."""
        n = 1
        for d in shape:
            n *= d
        itemsize = torch.empty((), dtype=dtype).element_size()
        raw = flat.view(torch.uint8)[: n * itemsize]
        return raw.view(dtype).view(shape)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (
            self.changed, self.words, self.narrow, self.deltas, self.panel, self.base,
            self.predicted, self.out, self.gram_block))


def changed_columns(rows: torch.Tensor, reference: torch.Tensor, ws: Workspace) -> torch.Tensor:
    """(K, s) bool: where each row's bits differ from the reference row's (base widened)."""
    out = Workspace.view(ws.changed, tuple(rows.shape), torch.bool)
    if rows.device.type == "cpu":  # numpy compares ~4x faster than torch here (same result)
        np.not_equal(as_words(rows).numpy(), as_words(reference).numpy()[None, :],
                     out=out.numpy())
    else:
        torch.ne(as_words(rows), as_words(reference)[None, :], out=out)
    return out


def any_row(changed: torch.Tensor) -> torch.Tensor:
    """(s,) bool: columns where some row of changed (R, s) is set. (torch's bool any(0) is ~18x
    slower on the CPU than amax over the same bytes.)"""
    return changed.view(torch.uint8).amax(0).view(torch.bool)


def panel_masks(changed: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per panel of PANEL_ROWS rows, the (s,) bool columns where one of its rows changed, and
    their union (the block's support): one pass over changed (K, s) instead of two."""
    n_rows = changed.shape[0]
    masks = [any_row(changed[r0 : r0 + PANEL_ROWS]) for r0 in range(0, n_rows, PANEL_ROWS)]
    union = masks[0]
    for mask in masks[1:]:
        union = union | mask
    return masks, union


def count_true(mask: torch.Tensor) -> int:
    """Set entries of a bool tensor (numpy counts ~4x faster than torch's sum on the CPU)."""
    if mask.device.type == "cpu":
        return int(np.count_nonzero(mask.numpy()))
    return int(mask.sum())


def true_positions(mask: torch.Tensor) -> torch.Tensor:
    """(m,) int64 positions of the set entries of a 1-D bool tensor, in order (numpy's
    flatnonzero ~1.5x faster than torch's nonzero on the CPU)."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()).astype(np.int64, copy=False))
    return mask.nonzero().flatten()


def gather_columns(values: torch.Tensor, columns: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """values[:, columns] into `out` (K, m) of values' dtype (contiguous), any dtype."""
    if values.device.type == "cpu":  # numpy's take is ~10x faster than torch's index_select
        words, picked, target = as_words(values).numpy(), columns.numpy(), as_words(out).numpy()
        if words.flags.c_contiguous:
            words.take(picked, axis=1, out=target, mode="clip")
        else:
            # a block of a wider chunk: take would first copy all of it (5.7x slower here);
            # each row alone is contiguous and only the picked columns are read
            for row, into in zip(words, target, strict=True):
                row.take(picked, out=into, mode="clip")
        return out
    return torch.index_select(values, 1, columns, out=out)


def widen_into(values: torch.Tensor, out: torch.Tensor, ws: Workspace) -> torch.Tensor:
    """values copied into `out` (float64, same shape). 2-byte floats go through float32 (exact
    both ways): on the CPU ~1.6x faster than torch's direct bf16 → float64."""
    if values.element_size() == 2 and values.device.type == "cpu":
        narrow = Workspace.view(ws.narrow, tuple(values.shape), torch.float32)
        narrow.copy_(values)
        return out.copy_(narrow)
    return out.copy_(values)


def deltas_into(rows: torch.Tensor, base64: torch.Tensor, out: torch.Tensor,
                ws: Workspace) -> torch.Tensor:
    """rows − base in float64 into `out` (K, m): rows (K, m) any float dtype, base64 (m,) float64.

    The same bits as widening rows then subtracting (both are exact widenings followed by one
    float64 subtraction). On the CPU numpy widens and subtracts in one pass over `out`: with
    `out` in the keep ring (not in cache) that writes 16 instead of 32 bytes per element: 4.8
    against 6.3 s per 100M columns at K = 30 (bench/kernel_shapes.py)."""
    if rows.device.type != "cpu":
        return out.copy_(rows).sub_(base64)
    if rows.element_size() == 2:
        narrow = Workspace.view(ws.narrow, tuple(rows.shape), torch.float32)
        rows = narrow.copy_(rows)
    # Inf − Inf is NaN, as on the GPU path; the Gram's diagonal reports it (no numpy warning)
    with np.errstate(invalid="ignore"):
        np.subtract(rows.numpy(), base64.numpy()[None, :], out=out.numpy(), dtype=np.float64)
    return out


def block_deltas(
    rows: torch.Tensor, base: torch.Tensor, changed: torch.Tensor | None, ws: Workspace,
    storage: Callable[[int], torch.Tensor | None] | None = None,
    support: torch.Tensor | None = None,
) -> BlockDeltas:
    """Deltas rows − base in float64 on the block's support, in the workspace or in storage.

    rows: (K, s) row dtype; base: (s,) base dtype; changed: (K, s) bool from changed_columns,
    or None for a block already found dense (every column: the first pass saw it).
    storage: called with the bytes the deltas (and their column indices) take; a uint8 tensor
    of that size on the block's device puts them there, to outlive the workspace (kept for the
    second pass, with no copy), None leaves them in the workspace.
    support: (s,) bool, any_row(changed) when the caller has it already (panel_masks).
    """
    n_rows, width = rows.shape
    if changed is None:
        mask, count = None, width
    else:
        mask = any_row(changed) if support is None else support  # (s,)
        count = count_true(mask)
    dense = count * 2 >= width  # dense enough: every column (no gather)
    m = width if dense else count
    delta_bytes = n_rows * m * 8
    place = storage(delta_bytes + (0 if dense else m * 8)) if storage is not None else None
    if place is None:
        out = Workspace.view(ws.deltas, (n_rows, m), torch.float64)
    else:
        out = place[:delta_bytes].view(torch.float64).view(n_rows, m)
    base64 = Workspace.view(ws.base, (width,), torch.float64)
    if dense:
        widen_into(base, base64, ws)
        return BlockDeltas(None, deltas_into(rows, base64, out, ws), width)
    columns = true_positions(mask)  # (m,)
    if place is not None:
        columns = place[delta_bytes:].view(torch.int64).copy_(columns)
    picked = gather_columns(rows, columns, Workspace.view(ws.words, (n_rows, m), rows.dtype))
    widen_into(base.index_select(0, columns), base64[:m], ws)
    return BlockDeltas(columns, deltas_into(picked, base64[:m], out, ws), width)


# Deltas of float64 values may be too small to square: below 2⁻⁵³⁷ a square is 0, below 2⁻⁵¹¹
# a subnormal that keeps few bits. A Gram entry of at least 2⁻⁹⁷⁰ keeps its 53 bits against a
# subnormal's absolute 2⁻¹⁰⁷⁴ error, so a tensor whose largest delta is below 2⁻⁴⁸⁵ (~1e-146)
# is refused: its Gram would be zeros or noise and its prediction, silently, the base. Only F64
# values come that close (an F32 subnormal is 1.4e-45, its square 2e-90).
SMALLEST_LARGEST_DELTA = 2.0**-485


def largest_delta(block: BlockDeltas) -> float:
    """The largest |delta| of a block (0.0 when it has none; NaN when one is NaN)."""
    if block.deltas.numel() == 0:
        return 0.0
    return float(torch.linalg.vector_norm(block.deltas, float("inf")))


def gram_panels(
    changed: torch.Tensor, block: BlockDeltas, first_row: int, ws: Workspace,
    masks: list[torch.Tensor] | None = None,
) -> list[tuple[int, int]]:
    """One block's panel products, from row `first_row` (a multiple of PANEL_ROWS), into
    ws.gram_block (K, K) float64; returns the panels [r0, r1) it computed (add_panels adds them).

    Panel [r0, r1) gives D_p[r0:r1] D_pᵀ for gram[r0:r1, :r1], with D_p the deltas of rows
    0..r1 on the panel's columns: every column of the block when a row of the panel changed in
    at least PANEL_DENSE_FRACTION of them, else just those. Both follow from the panel's rows
    alone, so an appended store computes the same bits as one built at once. The upper
    triangle is filled by symmetric() at the end. Products are stored, not added to zeros, so
    that adding them to the Gram matrix gives the bits of adding them directly (signed zeros).
    masks: the panels' column masks from panel_masks(changed), when the caller has them.
    """
    exact_matmul()
    n_rows = changed.shape[0]
    computed = []
    for r0 in range(first_row, n_rows, PANEL_ROWS):
        r1 = min(n_rows, r0 + PANEL_ROWS)
        panel = any_row(changed[r0:r1]) if masks is None else masks[r0 // PANEL_ROWS]  # (s,)
        count = count_true(panel)
        if count == 0:
            continue
        # a dense panel (then the block's deltas are dense too), or one that changed every
        # column of the block's support: its deltas are the block's, in the same order
        if count >= PANEL_DENSE_FRACTION * block.width or count == block.support:
            deltas = block.deltas[:r1]  # (r1, m)
        else:
            if block.columns is not None:
                panel = panel.index_select(0, block.columns)  # (m,)
            picked = true_positions(panel)
            deltas = gather_columns(block.deltas[:r1], picked, Workspace.view(
                ws.panel, (r1, picked.numel()), torch.float64))  # (r1, m_p)
        ws.gram_block[r0:r1, :r1] = deltas[r0:r1] @ deltas.T
        computed.append((r0, r1))
    return computed


def add_panels(gram: torch.Tensor, ws: Workspace, panels: list[tuple[int, int]]) -> None:
    """gram[r0:r1, :r1] += the products gram_panels left in ws.gram_block, for each panel."""
    for r0, r1 in panels:
        gram[r0:r1, :r1] += ws.gram_block[r0:r1, :r1]


def symmetric(gram: torch.Tensor) -> torch.Tensor:
    """The full Gram matrix from its lower triangle (what the panels computed)."""
    lower = torch.tril(gram)
    return lower + torch.tril(gram, -1).T


def combine_block(
    weights: torch.Tensor, block: BlockDeltas, base: torch.Tensor, out_dtype: torch.dtype,
    ws: Workspace,
) -> torch.Tensor:
    """W_0 + weights @ D for one block, rounded to nearest even into `out_dtype`; (T, s) on the
    host (in the workspace: valid until the next block).

    weights: (T, K) float64 on the block's device; base: (s,). Outside the support every
    output is the base's value (cast to out_dtype when that differs).
    """
    n_out, width = weights.shape[0], block.width
    out = Workspace.view(ws.out, (n_out, width), out_dtype)
    out.copy_(round_to(base, out_dtype).expand(n_out, -1))  # the base's values, in out_dtype
    if block.support == 0:
        return out.cpu()
    m = block.deltas.shape[1]
    base64 = Workspace.view(ws.base, (width,), torch.float64)
    if block.columns is None:
        base64.copy_(base)
        base_support = base64
    else:
        base_support = base64[:m].copy_(base.index_select(0, block.columns))
    predicted = Workspace.view(ws.predicted, (n_out, m), torch.float64)
    torch.addmm(base_support.expand(n_out, -1), weights, block.deltas, out=predicted)
    if block.columns is None:
        out.copy_(round_to(predicted, out_dtype))
        _keep_negative_zeros(out, base64, block.deltas)
    else:
        out[:, block.columns] = round_to(predicted, out_dtype)
    return out.cpu()


def _keep_negative_zeros(out: torch.Tensor, base64: torch.Tensor, deltas: torch.Tensor) -> None:
    """In a dense block an unchanged -0.0 of the base came out +0.0 (-0.0 + 0.0): put the base's
    bits back there, as a sparse block leaves them. out: (T, s); base64: (s,); deltas: (K, s)."""
    negative_zero = (base64 == 0) & torch.signbit(base64)  # (s,)
    if not bool(negative_zero.any()):
        return
    columns = torch.nonzero(negative_zero).flatten()
    unchanged = columns[(deltas[:, columns] == 0).all(dim=0)]
    out[:, unchanged] = base64[unchanged].to(out.dtype)


# A Gram matrix D Dᵀ has no negative eigenvalue; rounding leaves ones of ~K·ε·λ_max. One
# below -PSD_TOLERANCE·λ_max cannot come from deltas: a matrix forged with its checksums
# recomputed passes every cheaper check (finite, symmetric, Cauchy-Schwarz), not this one.
PSD_TOLERANCE = 1e-6


def eigh_descending(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (K,) clipped at 0 and eigenvectors (K, K) as columns, largest first; float64.

    RelexError for a matrix no deltas give (an eigenvalue below -PSD_TOLERANCE·λ_max): only a
    damaged or forged store can hand one over.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(gram.detach().to("cpu", torch.float64))
    if eigenvalues.numel() and float(eigenvalues[0]) < -PSD_TOLERANCE * max(
            float(eigenvalues[-1]), 0.0):
        raise RelexError(
            f"a Gram matrix has a negative eigenvalue ({float(eigenvalues[0]):.3g} against a "
            f"largest of {float(eigenvalues[-1]):.3g}), which no checkpoints give: the store it "
            "comes from is damaged or forged; rebuild it with --rebuild (or use another --cache)"
        )
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
