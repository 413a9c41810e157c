"""A run request: every option of `run` (CLI or API) parsed and checked in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .checkpoints import check_window
from .errors import RelexError
from .methods import MethodSpec, build_spec, parse_method
from .store_layout import CODECS
from .units import (
    DEFAULT_MAX_MEMORY,
    StepSelection,
    parse_bytes,
    parse_step_selection,
    parse_targets,
)

DTYPE_CHOICES = {"auto": None, "bfloat16": "BF16", "float16": "F16", "float32": "F32"}
SVD_CHOICES = ("auto", "exact", "randomized")
MAX_TARGETS = 1024


@dataclass(frozen=True)
class RunRequest:
    """Everything a run was asked for, checked and parsed."""

    out: Path
    targets: tuple[float, ...]
    methods: tuple[MethodSpec, ...]
    windows: tuple[int | None, ...]  # last N observed steps per output group; None = all
    steps: StepSelection | None
    base: Path | None
    runs: Path | None
    ckpts: tuple[str, ...] | None
    cache: Path | None
    device: str
    max_memory_bytes: int
    max_gpu_memory_bytes: int | None
    svd: str
    dtype: str
    overwrite: bool
    rebuild: bool
    allow_nonfinite: bool
    quiet: bool
    store_codec: str
    store_only: bool = False  # build or append the store, write no outputs (watch)

    @property
    def store_path(self) -> Path:
        return self.cache if self.cache is not None else self.out / "trajectory.zarr"

    @property
    def widest_window(self) -> int | None:
        return None if None in self.windows else max(self.windows)  # type: ignore[type-var]

    @property
    def output_dtype(self) -> str | None:
        return DTYPE_CHOICES[self.dtype]


def usable_path(value: str | Path | None, flag: str) -> Path | None:
    """A path flag's value (None when not given); an empty or NUL-holding one is refused."""
    if value is None:
        return None
    text = str(value)
    if not text or "\x00" in text:
        raise RelexError(f"{flag} {text!r} is not a usable path")
    return Path(text)


def make_request(
    *,
    targets: list[float] | str,
    out: str | Path,
    base: str | Path | None = None,
    runs: str | Path | None = None,
    ckpts: list[str] | None = None,
    steps: StepSelection | str | None = None,
    window: int | list[int | None] | None = None,
    method: str | MethodSpec | list[str | MethodSpec] = "relex",
    mode: str = "extrapolate",
    cache: str | Path | None = None,
    device: str = "auto",
    max_memory: str | int = DEFAULT_MAX_MEMORY,
    max_gpu_memory: str | int | None = None,
    svd: str = "auto",
    dtype: str = "auto",
    overwrite: bool = False,
    rebuild: bool = False,
    allow_nonfinite: bool = False,
    store_codec: str = "xor-zstd",
    quiet: bool = False,
    store_only: bool = False,
) -> RunRequest:
    """A checked RunRequest from the keyword arguments of `extrapolate` (and the CLI)."""
    target_steps = (
        parse_targets(targets) if isinstance(targets, str) else [float(t) for t in targets]
    )
    if not target_steps and not store_only:
        raise RelexError("give at least one --target step")
    if len(target_steps) > MAX_TARGETS:
        raise RelexError(f"give at most {MAX_TARGETS} --target steps")
    if any(t != t or abs(t) > 2**53 for t in target_steps):
        raise RelexError("--target must be finite step numbers (at most 2**53)")
    if dtype not in DTYPE_CHOICES:
        raise RelexError(f"--dtype {dtype!r} is not one of {', '.join(DTYPE_CHOICES)}")
    if store_codec not in CODECS:
        raise RelexError(f"--store-codec {store_codec!r} is not one of {', '.join(CODECS)}")
    if svd not in SVD_CHOICES:
        raise RelexError(f"--svd {svd!r} is not one of {', '.join(SVD_CHOICES)}")
    if not isinstance(device, str) or not (device in ("auto", "cpu", "cuda") or (
            device.startswith("cuda:") and device[5:].isascii() and device[5:].isdigit())):
        raise RelexError(f"--device {device!r} is not one of auto, cpu, cuda, cuda:N")
    if runs is not None and ckpts:
        raise RelexError("give either --runs or --ckpt, not both")
    if base is not None and runs is None and not ckpts:
        raise RelexError("give the observed checkpoints with --runs RUN_DIR or --ckpt STEP=PATH")
    methods = [method] if isinstance(method, (str, MethodSpec)) else list(method)
    specs = [m if isinstance(m, MethodSpec) else parse_method(m) for m in methods]
    if mode != "extrapolate":
        specs = [build_spec(s.name, mode, s.rank, s.fit) for s in specs]
    windows = list(window) if isinstance(window, (list, tuple)) else [window]
    for w in windows:
        if w is not None:
            if type(w) is not int:
                raise RelexError(f"--window {w!r} must be a whole number of steps")
            check_window(w)
    if len(set(specs)) != len(specs) or len(set(windows)) != len(windows):
        raise RelexError("the same --method or --window is given twice")
    return RunRequest(
        out=usable_path(out, "--out"),
        targets=tuple(target_steps),
        methods=tuple(specs),
        windows=tuple(windows),
        steps=parse_step_selection(steps) if isinstance(steps, str) else steps,
        base=usable_path(base, "--base"),
        runs=usable_path(runs, "--runs"),
        ckpts=tuple(ckpts) if ckpts else None,
        cache=usable_path(cache, "--cache"),
        device=device,
        max_memory_bytes=parse_bytes(max_memory, "--max-memory"),
        max_gpu_memory_bytes=(
            parse_bytes(max_gpu_memory, "--max-gpu-memory") if max_gpu_memory is not None else None
        ),
        svd=svd,
        dtype=dtype,
        overwrite=bool(overwrite),
        rebuild=bool(rebuild),
        allow_nonfinite=bool(allow_nonfinite),
        quiet=bool(quiet),
        store_codec=store_codec,
        store_only=store_only,
    )
