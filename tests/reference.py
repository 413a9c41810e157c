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


def assert_within_one_ulp(out: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype, name: str):
    """Assert out has dtype/shape and every element is within one ulp of ref64 rounded."""
    assert out.dtype == dtype, f"{name}: dtype {out.dtype}, expected {dtype}"
    assert tuple(out.shape) == tuple(ref64.shape), f"{name}: shape {tuple(out.shape)}"
    ref = ref64.to(dtype)
    assert bool(torch.isfinite(ref).all()), f"{name}: reference not finite"
    diff = (out.to(torch.float64) - ref.to(torch.float64)).abs()
    bound = ulp(ref)
    bad = ~(diff <= bound)
    if bool(bad.any()):
        idx = bad.flatten().nonzero()[:3].flatten().tolist()
        worst = float((diff / bound).nan_to_num(float("inf")).max())
        samples = [
            (i, float(out.flatten()[i]), float(ref.flatten()[i]), float(ref64.flatten()[i]))
            for i in idx
        ]
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{out.numel()} elements beyond 1 ulp ({dtype}); "
            f"worst {worst:.3g} ulp; (index, out, ref_rounded, ref64): {samples}"
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
        assert_within_one_ulp(out[name], ref[name], output_dtype(w0, dtype_flag), name)
