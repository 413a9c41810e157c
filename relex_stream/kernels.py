"""Device numerics on raw checkpoint rows: Gram accumulation, eigendecomposition, combination.

Everything here takes tensors, never paths. Rows arrive in the checkpoint dtype (bf16 rows stay
bf16 until they are on the device) and become deltas there.

Precision: deltas and the Gram products are float64. DESIGN.md proposed float32 products over
short blocks; measured against the float64 reference that leaves output elements near zero
(|w| ~ 1e-9) off by up to 140 bf16 ulps, because the Gram error (~1e-7 relative) moves the
prediction by ~1e-10 absolute. float64 costs nothing that matters: the CPU pass is bound by
reading, and an H100 runs FP64 on tensor cores at the same rate as non-TF32 FP32.
"""

from __future__ import annotations

import torch

# Columns per partial Gram product. A fixed grid (relative to the start of the tensor) keeps
# each dot short and makes the sum independent of how the tensor was chunked, so output bytes
# do not depend on --max-memory.
GRAM_BLOCK_COLS = 1 << 16


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without a GPU is a user error."""
    from .errors import RelexError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RelexError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise RelexError(f"--device {name!r} is not one of auto, cpu, cuda")
    return torch.device(name)


def _exact_matmul() -> None:
    # TF32 would round the deltas to 10 mantissa bits before the Gram product.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def block_deltas(rows: torch.Tensor, base: torch.Tensor, device: torch.device) -> torch.Tensor:
    """D = rows − base in float64 on `device`: rows (K, s), base (s,) in the checkpoint dtype."""
    # Widen then subtract in place: one (K, s) float64 buffer, no broadcast temporary
    # (measured 4.2 G elements/s on 2 CPU cores, 5x numpy's casting subtract).
    # Upload in the checkpoint dtype (bf16 is a quarter of float64), widen on the device.
    # copy=True: for float64 rows the widening is a no-op and would hand back the caller's
    # buffer, which the in-place subtraction must not change.
    deltas = rows.to(device, non_blocking=True).to(torch.float64, copy=True)  # (K, s)
    deltas -= base.to(device, non_blocking=True).double()
    return deltas


def accumulate_gram(
    gram: torch.Tensor, rows: torch.Tensor, base: torch.Tensor, device: torch.device
) -> None:
    """Add D Dᵀ (float64) of one column chunk to `gram` in place.

    gram: (K, K) float64 on `device`; rows: (K, c) checkpoint dtype; base: (c,) same dtype.
    The chunk must start on a multiple of GRAM_BLOCK_COLS within its tensor.
    """
    _exact_matmul()
    n_cols = rows.shape[1]
    for start in range(0, n_cols, GRAM_BLOCK_COLS):
        stop = min(start + GRAM_BLOCK_COLS, n_cols)
        deltas = block_deltas(rows[:, start:stop], base[start:stop], device)  # (K, s)
        gram += deltas @ deltas.T


def eigh_descending(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (K,) clipped at 0 and eigenvectors (K, K) as columns, largest first; float64."""
    eigenvalues, eigenvectors = torch.linalg.eigh(gram.detach().to("cpu", torch.float64))
    order = torch.arange(eigenvalues.numel() - 1, -1, -1)
    return eigenvalues[order].clamp_min(0.0), eigenvectors[:, order]


def combine(
    weights: torch.Tensor,
    rows: torch.Tensor,
    base: torch.Tensor,
    out_dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """W_0 + weights @ D for one column chunk, rounded to nearest even in `out_dtype`.

    weights: (T, K) float64; rows: (K, c) checkpoint dtype; base: (c,). Returns (T, c) on host.
    The combination is done in float64 so the only rounding that matters is the final one.
    """
    weights = weights.to(device, torch.float64)
    n_cols = rows.shape[1]
    out = torch.empty((weights.shape[0], n_cols), dtype=out_dtype)
    for start in range(0, n_cols, GRAM_BLOCK_COLS):
        stop = min(start + GRAM_BLOCK_COLS, n_cols)
        deltas = block_deltas(rows[:, start:stop], base[start:stop], device)  # (K, s)
        base_block = base[start:stop].to(device, non_blocking=True).double()  # (s,) read only
        predicted = torch.addmm(base_block, weights, deltas)  # (T, s)
        out[:, start:stop] = predicted.to(out_dtype).cpu()
    return out


def gram_times(rows: torch.Tensor, base: torch.Tensor, basis: torch.Tensor, device: torch.device):
    """G·Q = D (Dᵀ Q) without forming G: (K, p) float64 from rows (K, n), base (n,), Q (K, p)."""
    _exact_matmul()
    basis = basis.to(device, torch.float64)
    product = torch.zeros_like(basis)
    n_cols = rows.shape[1]
    for start in range(0, n_cols, GRAM_BLOCK_COLS):
        stop = min(start + GRAM_BLOCK_COLS, n_cols)
        deltas = block_deltas(rows[:, start:stop], base[start:stop], device)  # (K, s)
        product += deltas @ (deltas.T @ basis)  # (K, p)
    return product


def randomized_gram(
    rows: torch.Tensor,
    base: torch.Tensor,
    device: torch.device,
    rank: int = 1,
    oversample: int = 4,
    iterations: int = 3,
    seed: int = 0,
) -> torch.Tensor:
    """Rank-(rank+oversample) approximation Q (QᵀGQ) Qᵀ of G = D Dᵀ by subspace iteration.

    rows: (K, n) checkpoint dtype; base: (n,). Returns (K, K) float64 on the CPU whose top
    eigenvectors are the Rayleigh-Ritz estimates of D's top left singular vectors. Costs
    (2·iterations + 1)·2·p·K·n multiply-adds against K²·n for the exact Gram matrix, with a
    fixed seed so repeated runs give the same bytes.
    """
    n_rows = rows.shape[0]
    width = min(n_rows, rank + oversample)
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(n_rows, width, generator=generator, dtype=torch.float64)  # (K, p)
    for _ in range(iterations):
        basis, _ = torch.linalg.qr(gram_times(rows, base, basis, device).cpu())
    projected = gram_times(rows, base, basis, device).cpu()  # (K, p) = G Q
    small = basis.T @ projected  # (p, p) = Qᵀ G Q
    small = (small + small.T) / 2
    return basis @ small @ basis.T  # (K, K)
