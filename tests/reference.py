"""Independent float64 reference for the rank-1 extrapolation (uses no relex_stream code)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}
DTYPE_NAMES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def load_model_dir(path: Path) -> dict[str, torch.Tensor]:
    """Load every tensor from all *.safetensors files directly inside one model dir."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        part = load_file(str(file))
        overlap = tensors.keys() & part.keys()
        assert not overlap, f"tensor(s) {sorted(overlap)} stored twice in {path}"
        tensors.update(part)
    return tensors


def is_float(t: torch.Tensor) -> bool:
    """True for the floating-point dtypes the tool extrapolates."""
    return t.dtype in FLOAT_DTYPES


def _fit_one(
    w0: torch.Tensor, ws: list[torch.Tensor], steps: list[float], targets: list[float]
) -> list[torch.Tensor]:
    """Float64 prediction of one tensor for each target (rank-1 SVD + OLS line in real steps)."""
    base = w0.to(torch.float64).flatten()
    d = torch.stack([w.to(torch.float64).flatten() - base for w in ws])  # K x n
    if not bool(d.any()):
        return [base.reshape(w0.shape).clone() for _ in targets]
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    c = s[0] * u[:, 0]
    t = torch.tensor(steps, dtype=torch.float64)
    tm, cm = t.mean(), c.mean()
    a = ((t - tm) * (c - cm)).sum() / ((t - tm) ** 2).sum()
    b = cm - a * tm
    return [(base + (a * tgt + b) * vh[0]).reshape(w0.shape) for tgt in targets]


def reference_predict(
    base: Mapping[str, torch.Tensor],
    ckpts: Mapping[int, Mapping[str, torch.Tensor]],
    targets: Iterable[float],
) -> dict[float, dict[str, torch.Tensor]]:
    """Per target: float64 predictions for float tensors, exact base copies for the others."""
    steps = sorted(ckpts)
    targets = [float(t) for t in targets]
    out: dict[float, dict[str, torch.Tensor]] = {t: {} for t in targets}
    for name, w0 in base.items():
        if not is_float(w0):
            for tgt in targets:
                out[tgt][name] = w0.clone()
            continue
        preds = _fit_one(w0, [ckpts[s][name] for s in steps], [float(s) for s in steps], targets)
        for tgt, pred in zip(targets, preds, strict=True):
            out[tgt][name] = pred
    return out


def reference_from_dirs(
    base_dir: Path, ckpt_dirs: Mapping[int, Path], targets: Iterable[float]
) -> dict[float, dict[str, torch.Tensor]]:
    """Load base and checkpoint model dirs from disk and run the reference."""
    base = load_model_dir(base_dir)
    ckpts = {step: load_model_dir(p) for step, p in ckpt_dirs.items()}
    return reference_predict(base, ckpts, targets)


def ulp(x: torch.Tensor) -> torch.Tensor:
    """Float64 gap from |x| to the next representable value of x's dtype."""
    a = x.abs()
    nxt = (a.view(INT_VIEW[a.element_size()]) + 1).view(a.dtype)
    return nxt.to(torch.float64) - a.to(torch.float64)


def assert_within_one_ulp(
    out: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype, name: str, ulps: int = 1
):
    """Assert out has dtype/shape and every element is within `ulps` ulp of ref64 rounded."""
    assert out.dtype == dtype, f"{name}: dtype {out.dtype}, expected {dtype}"
    assert tuple(out.shape) == tuple(ref64.shape), f"{name}: shape {tuple(out.shape)}"
    ref = ref64.to(dtype)
    assert bool(torch.isfinite(ref).all()), f"{name}: reference not finite"
    diff = (out.to(torch.float64) - ref.to(torch.float64)).abs()
    bound = ulps * ulp(ref)
    bad = ~(diff <= bound)
    if bool(bad.any()):
        idx = bad.flatten().nonzero()[:3].flatten().tolist()
        worst = float((diff / bound).nan_to_num(float("inf")).max())
        samples = [
            (i, float(out.flatten()[i]), float(ref.flatten()[i]), float(ref64.flatten()[i]))
            for i in idx
        ]
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{out.numel()} elements beyond {ulps} ulp ({dtype}); "
            f"worst {worst * ulps:.3g} ulp; (index, out, ref_rounded, ref64): {samples}"
        )


def output_dtype(base_tensor: torch.Tensor, dtype_flag: str | None) -> torch.dtype:
    """Expected output dtype of one tensor for a --dtype value (None/'auto' = base dtype)."""
    if not is_float(base_tensor) or dtype_flag in (None, "auto"):
        return base_tensor.dtype
    return DTYPE_NAMES[dtype_flag]


def assert_matches_reference(
    out: Mapping[str, torch.Tensor],
    ref: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    dtype_flag: str | None = None,
    skip: Iterable[str] = (),
    ulps: int = 1,
) -> None:
    """Check every output tensor against the reference (exact for non-float tensors)."""
    skip = set(skip)
    assert set(out) == set(base), (
        f"tensor names differ: missing {sorted(set(base) - set(out))}, "
        f"extra {sorted(set(out) - set(base))}"
    )
    for name, w0 in base.items():
        if name in skip:
            continue
        if not is_float(w0):
            assert out[name].dtype == w0.dtype, f"{name}: dtype {out[name].dtype}"
            assert torch.equal(out[name], w0), f"{name}: non-float tensor not copied exactly"
            continue
        assert_within_one_ulp(out[name], ref[name], output_dtype(w0, dtype_flag), name, ulps)


# --- Dense float64 references of every method (docs/DESIGN.md §1), built from the deltas D. ---
# Independent of relex_stream: SVD of D (not the Gram matrix), np.polyfit against the real step
# numbers, and each method's formula written out in weight space.

REFERENCE_METHODS = ("relex", "reconstruct", "fit-reconstruct", "raw-ols", "two-point", "expo")


def dense_deltas(w0: torch.Tensor, ws: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened float64 base (n,) and stacked deltas D = [W_k − W_0] (K, n)."""
    base = w0.to(torch.float64).flatten()
    return base, torch.stack([w.to(torch.float64).flatten() - base for w in ws])


def dense_polyfit_at(
    steps: list[float], values: torch.Tensor, degree: int, at: list[float]
) -> torch.Tensor:
    """Least-squares polynomial of `degree` through each column of values (K, m) against the
    steps, evaluated at each point of `at`: (len(at), m) float64 (np.polyfit + Horner)."""
    import numpy as np

    y = values.to(torch.float64).numpy()
    coefficients = np.polyfit(np.asarray(steps, dtype=np.float64), y, degree)  # (deg+1, m)
    coefficients = coefficients.reshape(degree + 1, -1)
    rows = []
    for x in at:
        acc = np.zeros(coefficients.shape[1], dtype=np.float64)
        for c in coefficients:  # highest power first
            acc = acc * float(x) + c
        rows.append(acc)
    return torch.from_numpy(np.stack(rows))


def _dense_relex(
    base: torch.Tensor, d: torch.Tensor, steps: list[float], at: list[float], rank: int, degree: int
) -> list[torch.Tensor]:
    """W_0 + Σ_{j≤r} p_j(T) v_j, p_j the degree-D least-squares fit of c_j = σ_j u_j."""
    if not bool(d.any()):
        return [base.clone() for _ in at]
    assert rank <= d.shape[0], "reference: rank exceeds the observed steps"
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    c = u[:, :rank] * s[:rank]  # (K, r): c_j[k] = σ_j u_j[k] = D_k · v_j
    fitted = dense_polyfit_at(steps, c, degree, at)  # (T, r)
    return [base + fitted[i] @ vh[:rank] for i in range(len(at))]


def dense_method_one(
    w0: torch.Tensor,
    ws: list[torch.Tensor],
    steps: list[float],
    targets: list[float],
    method: str = "relex",
    rank: int = 1,
    degree: int = 1,
    from_step: float | None = None,
    to_step: float | None = None,
    alpha: float | None = None,
) -> list[torch.Tensor]:
    """Float64 output of one tensor for each target under `method` (shape of w0).

    relex: W_0 + Σ_j p_j(T) v_j (top-r SVD of D, c_j = σ_j u_j fitted in the real steps);
    reconstruct: W_0 + Σ_j σ_j u_j[k] v_j at observed step t_k = T;
    fit-reconstruct: relex evaluated at an observed step;
    raw-ols: per-element least-squares polynomial through (t_k, W_k), evaluated at T;
    two-point: W_A + (T − A)/(B − A) (W_B − W_A), W_0 being step 0 (defaults: first, last);
    expo: W_K + α (W_K − W_0) (default K: the last observed step).
    """
    assert method in REFERENCE_METHODS, method
    steps = [float(s) for s in steps]
    targets = [float(t) for t in targets]
    base, d = dense_deltas(w0, ws)
    if method in ("reconstruct", "fit-reconstruct"):
        missing = [t for t in targets if t not in steps]
        assert not missing, f"reference: {method} targets {missing} are not observed"
    if method == "relex" or method == "fit-reconstruct":
        flat = _dense_relex(base, d, steps, targets, rank, degree)
    elif method == "reconstruct":
        if not bool(d.any()):
            flat = [base.clone() for _ in targets]
        else:
            u, s, vh = torch.linalg.svd(d, full_matrices=False)
            c = u[:, :rank] * s[:rank]  # (K, r)
            flat = [base + c[steps.index(t)] @ vh[:rank] for t in targets]
    elif method == "raw-ols":
        raw = base + d  # (K, n): the checkpoints themselves
        fitted = dense_polyfit_at(steps, raw, degree, targets)
        flat = [fitted[i] for i in range(len(targets))]
    else:
        def weights_at(step: float) -> torch.Tensor:
            if step == 0.0:
                return base
            assert step in steps, f"reference: step {step:g} is not observed"
            return base + d[steps.index(step)]

        if method == "two-point":
            a = steps[0] if from_step is None else float(from_step)
            b = steps[-1] if to_step is None else float(to_step)
            assert a < b
            w_a, w_b = weights_at(a), weights_at(b)
            flat = [w_a + (t - a) / (b - a) * (w_b - w_a) for t in targets]
        else:  # expo
            assert alpha is not None
            k = steps[-1] if from_step is None else float(from_step)
            w_k = weights_at(k)
            flat = [w_k + alpha * (w_k - base) for _ in targets]
    return [x.reshape(w0.shape) for x in flat]


def reference_method_predict(
    base: Mapping[str, torch.Tensor],
    ckpts: Mapping[int, Mapping[str, torch.Tensor]],
    targets: Iterable[float],
    method: str = "relex",
    window: int | None = None,
    **options: object,
) -> dict[float, dict[str, torch.Tensor]]:
    """Per target: float64 outputs of `method` fitted on the last `window` observed steps (all
    when None); non-float tensors are exact base copies. options: rank, degree, from_step,
    to_step, alpha (as in dense_method_one)."""
    steps = sorted(ckpts)
    if window is not None:
        assert 1 <= window <= len(steps)
        steps = steps[len(steps) - window :]
    targets = [float(t) for t in targets]
    out: dict[float, dict[str, torch.Tensor]] = {t: {} for t in targets}
    for name, w0 in base.items():
        if not is_float(w0):
            for tgt in targets:
                out[tgt][name] = w0.clone()
            continue
        preds = dense_method_one(
            w0, [ckpts[s][name] for s in steps], [float(s) for s in steps], targets, method,
            **options,
        )
        for tgt, pred in zip(targets, preds, strict=True):
            out[tgt][name] = pred
    return out
