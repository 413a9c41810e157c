"""The engine: discover → validate → store → Gram pass → weights → materialise → write.

This module wires the pieces together and owns no numerics or file formats of its own.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch
from tqdm import tqdm

from . import store as trajectory_store
from .checkpoints import (
    Checkpoint,
    ModelFiles,
    ModelLayout,
    check_same_model,
    discover_runs,
    open_model,
    parse_ckpt_args,
    select_steps,
)
from .errors import RelexError
from .kernels import accumulate_gram, combine, resolve_device
from .memory import plan_chunk_cols
from .plan import fit_diagnostics, relex_weights
from .safetensors_io import DTYPES, FLOAT_CODES, bits_to_torch, read_into
from .units import format_bytes, parse_bytes, parse_targets, step_label
from .writer import ModelWriter, output_dtypes

log = logging.getLogger("relex_stream")

DTYPE_CHOICES = {"auto": None, "bfloat16": "BF16", "float16": "F16", "float32": "F32"}
GAP_WARNING = 0.9  # σ₂/σ₁ above this: the top direction is poorly defined


@dataclass
class RunSummary:
    """What a run did, for the closing summary and for callers of the API."""

    outputs: list[Path]
    store: Path
    observed_steps: list[int]
    tensors: int = 0
    input_bytes: int = 0  # bytes of base + observed rows that the run needed
    bytes_read: int = 0  # bytes actually read from sources and store
    bytes_written: int = 0  # bytes of output tensors
    store_bytes_written: int = 0
    wall_seconds: float = 0.0
    peak_rss_bytes: int = 0
    ill_conditioned: list[tuple[str, float]] = field(default_factory=list)

    def lines(self) -> list[str]:
        ratio = self.bytes_read / self.input_bytes if self.input_bytes else 0.0
        return [
            f"tensors: {self.tensors}; observed steps: {len(self.observed_steps)} "
            f"({self.observed_steps[0]}..{self.observed_steps[-1]})",
            f"read: {format_bytes(self.bytes_read)} ({ratio:.2f}x the input's "
            f"{format_bytes(self.input_bytes)}); written: {format_bytes(self.bytes_written)} "
            f"of outputs, {format_bytes(self.store_bytes_written)} into the store",
            f"wall time: {self.wall_seconds:.1f} s; peak RSS: {format_bytes(self.peak_rss_bytes)}",
            *(f"output: {path}" for path in self.outputs),
        ]


@dataclass(frozen=True)
class _Sources:
    base: ModelFiles
    checkpoints: list[Checkpoint]  # the observed ones, sorted by step

    def fingerprints(self) -> dict:
        return {
            "base": self.base.fingerprint(),
            "steps": {str(c.step): c.model.fingerprint() for c in self.checkpoints},
        }


def _open_sources(
    base: Path, runs: Path | None, ckpts: list[str] | None, steps: list[int] | None,
    window: int | None,
) -> _Sources:
    if runs is not None and ckpts:
        raise RelexError("give either --runs or --ckpt, not both")
    if runs is None and not ckpts:
        raise RelexError("give the observed checkpoints with --runs RUN_DIR or --ckpt STEP=PATH")
    found = discover_runs(Path(runs)) if runs is not None else parse_ckpt_args(list(ckpts or []))
    chosen = select_steps(list(found), steps, window)
    base_model = open_model(Path(base))
    checkpoints = [Checkpoint(step, open_model(found[step])) for step in chosen]
    check_same_model(base_model, checkpoints)
    return _Sources(base_model, checkpoints)


def _tied_aliases(layout: ModelLayout, aux_files: dict[str, bytes]) -> dict[str, str]:
    """{'lm_head.weight': 'model.embed_tokens.weight'} when the config ties them, else {}."""
    try:
        config = json.loads(aux_files.get("config.json", b"{}"))
    except json.JSONDecodeError:
        raise RelexError("the base's config.json is not valid JSON") from None
    head, embed = "lm_head.weight", "model.embed_tokens.weight"
    if (
        config.get("tie_word_embeddings") is True
        and head in layout.tensors
        and layout.tensors.get(embed) == layout.tensors[head]
    ):
        return {head: embed}
    return {}


def _open_store(
    path: Path, sources: _Sources | None, steps: list[int] | None, window: int | None,
    rebuild: bool,
):
    """Open or create the store; returns (zarr group, observed steps, their row ids)."""
    root = trajectory_store.open_existing(path)
    if root is not None and rebuild:
        if sources is None:
            raise RelexError("--rebuild needs the sources (--base and --runs/--ckpt)")
        log.info("removing the store at %s (--rebuild)", path)
        trajectory_store.remove(path)
        root = None
    if sources is None:
        if root is None:
            raise RelexError(
                f"no store at {path}; give --base and --runs (or --ckpt) to build one"
            )
        stored = list(root.attrs["steps"])
        chosen = select_steps(stored, steps, window)
        return root, chosen, [stored.index(s) for s in chosen]
    chosen = [c.step for c in sources.checkpoints]
    fingerprints = sources.fingerprints()
    if root is None:
        aux = sources.base.aux_files()
        layout = sources.base.layout()
        root = trajectory_store.create(
            path, layout, chosen, fingerprints, aux, _tied_aliases(layout, aux)
        )
        return root, chosen, list(range(len(chosen)))
    meta = trajectory_store.attrs(root)
    stored = list(meta["steps"])
    if meta["layout"] != sources.base.layout().to_json():
        raise RelexError(
            f"the store at {path} was built for another model layout; "
            "use --rebuild or another --cache"
        )
    missing = [s for s in chosen if s not in stored]
    if missing:
        raise RelexError(
            f"the store at {path} holds steps {stored[0]}..{stored[-1]} ({len(stored)}) but not "
            f"step(s) {missing[:5]}; use --rebuild to rebuild it, or another --cache"
        )
    old = meta["sources"]
    changed = _first_change(old["base"], fingerprints["base"], "base")
    for step in chosen:
        changed = changed or _first_change(
            old["steps"][str(step)], fingerprints["steps"][str(step)], f"step {step}"
        )
    if changed:
        raise RelexError(
            f"the store at {path} was built from other inputs ({changed}); "
            "use --rebuild to rebuild it, or another --cache"
        )
    return root, chosen, [stored.index(s) for s in chosen]


def _first_change(old: dict, new: dict, what: str) -> str | None:
    for shard in sorted(set(old) | set(new)):
        if old.get(shard) != new.get(shard):
            return f"{what} file {shard} differs"
    return None


def _check_disk(path: Path, needed: int, what: str) -> None:
    probe = path
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise RelexError(
            f"{what} needs about {format_bytes(needed)} but {probe} has "
            f"{format_bytes(free)} free; free space or choose another location"
        )


def _layout_bytes(layout: ModelLayout, dtypes: dict[str, str]) -> int:
    return sum(
        int(np.prod(shape, dtype=np.int64)) * DTYPES[dtypes[name]][1].itemsize
        for name, (_, shape) in layout.tensors.items()
    )


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def extrapolate(
    *,
    targets: list[float] | str,
    out: str | Path,
    base: str | Path | None = None,
    runs: str | Path | None = None,
    ckpts: list[str] | None = None,
    steps: list[int] | None = None,
    window: int | None = None,
    cache: str | Path | None = None,
    device: str = "auto",
    max_memory: str | int = "4G",
    dtype: str = "auto",
    overwrite: bool = False,
    rebuild: bool = False,
    quiet: bool = False,
) -> RunSummary:
    """Predict the checkpoint at each target step; write one model directory per target.

    Works from sources (base plus runs or ckpts) or, with neither, from the store at `cache`.
    """
    started = time.perf_counter()
    target_steps = parse_targets(targets) if isinstance(targets, str) else [float(t) for t in targets]
    if not target_steps:
        raise RelexError("give at least one --target step")
    if dtype not in DTYPE_CHOICES:
        raise RelexError(f"--dtype {dtype!r} is not one of {', '.join(DTYPE_CHOICES)}")
    torch_device = resolve_device(device)
    budget = parse_bytes(max_memory)
    out = Path(out)
    store_path = Path(cache) if cache is not None else out / "trajectory.zarr"

    if base is None and (runs is not None or ckpts):
        raise RelexError("--runs/--ckpt need --base, the checkpoint the run started from")
    sources = _open_sources(Path(base), runs, ckpts, steps, window) if base is not None else None

    final_dirs = [out / f"step-{step_label(t)}" for t in target_steps]
    if len(set(final_dirs)) != len(final_dirs):
        raise RelexError("--target lists the same step twice")
    for final in final_dirs:
        if final.exists() and not overwrite:
            raise RelexError(f"{final} already exists; pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise RelexError(f"cannot write to {out}: choose a writable --out")

    root, observed, row_ids = _open_store(store_path, sources, steps, window, rebuild)
    meta = trajectory_store.attrs(root)
    layout = ModelLayout.from_json(meta["layout"])
    aliases: dict[str, str] = meta["aliases"]
    dtypes = output_dtypes(layout, DTYPE_CHOICES[dtype])
    if sources is None and not meta["complete"]:
        raise RelexError(
            f"the store at {store_path} is incomplete (an interrupted run); rerun with --base "
            "and --runs to finish it"
        )

    last = observed[-1]
    for t in target_steps:
        if t <= last:
            log.warning(
                "target %s is not beyond the last observed step %d: this interpolates or "
                "reconstructs rather than extrapolates", step_label(t), last,
            )
    free_ram = psutil.virtual_memory().available
    if budget > free_ram:
        log.warning(
            "--max-memory %s is more than the %s of RAM available now",
            format_bytes(budget), format_bytes(free_ram),
        )

    n_stored = len(meta["steps"])
    float_names = [n for n, (d, _) in layout.tensors.items() if d in FLOAT_CODES]
    stored_raw = sum(
        int(np.prod(layout.tensors[n][1], dtype=np.int64)) * DTYPES[layout.tensors[n][0]][1].itemsize
        for n in float_names if n not in aliases
    )
    if sources is not None and not meta["complete"]:
        _check_disk(store_path, stored_raw * (n_stored + 1), "the trajectory store")
    _check_disk(out, _layout_bytes(layout, dtypes) * len(target_steps), "the outputs")

    summary = RunSummary(outputs=final_dirs, store=store_path, observed_steps=observed)
    steps_tensor = torch.tensor(observed, dtype=torch.float64)
    stale = sorted(out.glob(".step-*.tmp-*"))
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    writers: list[ModelWriter] = []
    try:
        for final in final_dirs:
            tmp = out / f".{final.name}.tmp-{os.getpid()}"
            writers.append(ModelWriter(tmp, final, layout, dtypes))
        names = [n for names in layout.shard_tensors.values() for n in names if n not in aliases]
        total_bytes = sum(
            int(np.prod(layout.tensors[n][1], dtype=np.int64)) * DTYPES[layout.tensors[n][0]][1].itemsize
            * (len(observed) + 1 if n in float_names else 1)
            for n in names
        )
        summary.input_bytes = total_bytes
        disable = quiet or not _stderr_is_tty()
        with tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                  desc="gram pass", disable=disable, position=0) as read_bar, \
             tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                  desc="materialise", disable=disable, position=1) as write_bar:
            for name in names:
                targets_of = [name] + [a for a, src in aliases.items() if src == name]
                _process_tensor(
                    name, targets_of, layout, dtypes, sources, root, row_ids, steps_tensor,
                    target_steps, writers, budget, torch_device, summary, read_bar, write_bar,
                )
                summary.tensors += len(targets_of)
        if sources is not None:
            trajectory_store.mark_complete(root)
        aux = sources.base.aux_files() if sources is not None else trajectory_store.aux_files(root)
        for writer in writers:
            writer.finalize(aux, overwrite)
        writers = []
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    if summary.ill_conditioned:
        worst = max(summary.ill_conditioned, key=lambda item: item[1])
        log.warning(
            "%d tensor(s) have σ₂/σ₁ above %.2f, so their rank-1 direction is ill-defined "
            "(worst: %s at %.3f)", len(summary.ill_conditioned), GAP_WARNING, *worst,
        )
    summary.wall_seconds = time.perf_counter() - started
    summary.peak_rss_bytes = _peak_rss_bytes()
    return summary


def _stderr_is_tty() -> bool:
    import sys

    return sys.stderr.isatty()


def _process_tensor(
    name: str,
    out_names: list[str],
    layout: ModelLayout,
    dtypes: dict[str, str],
    sources: _Sources | None,
    root,
    row_ids: list[int],
    steps_tensor: torch.Tensor,
    target_steps: list[float],
    writers: list[ModelWriter],
    budget: int,
    device: torch.device,
    summary: RunSummary,
    read_bar: tqdm,
    write_bar: tqdm,
) -> None:
    """Both passes over one tensor: Gram (and store) then materialise into every output."""
    dtype_code, shape = layout.tensors[name]
    numel = int(np.prod(shape, dtype=np.int64))
    bits = DTYPES[dtype_code][1]
    is_float = dtype_code in FLOAT_CODES
    n_rows = len(row_ids) if is_float else 0
    out_itemsize = DTYPES[dtypes[name]][1].itemsize
    store_chunk = trajectory_store.row_chunk_cols(dtype_code, numel)
    cols = plan_chunk_cols(
        numel, n_rows, bits.itemsize, len(writers), out_itemsize, budget, store_chunk
    )
    tensor_bytes = numel * bits.itemsize * (n_rows + 1)
    stored = trajectory_store.is_complete(root, name)
    building = not stored
    if building and sources is None:
        raise RelexError(f"the store lacks tensor {name!r}; rerun with --base and --runs")
    if building:
        trajectory_store.prepare_tensor(root, name, dtype_code, numel, is_float)

    rows_buf = np.empty((n_rows, min(cols, numel)), dtype=bits)
    base_buf = np.empty(min(cols, numel), dtype=bits)

    def read(start: int, stop: int, from_sources: bool) -> tuple[np.ndarray, np.ndarray]:
        width = stop - start
        if from_sources:
            read_into(sources.base.tensors[name], start, base_buf[:width])
            for k, ckpt in enumerate(sources.checkpoints[:n_rows]):
                read_into(ckpt.model.tensors[name], start, rows_buf[k, :width])
            base, rows = base_buf[:width], rows_buf[:, :width]
        else:
            base = trajectory_store.read_base(root, name, start, stop)
            rows = trajectory_store.read_rows(root, name, row_ids, start, stop) if n_rows else rows_buf
        summary.bytes_read += base.nbytes + (rows.nbytes if n_rows else 0)
        return base, rows

    chunks = [(s, min(s + cols, numel)) for s in range(0, numel, cols)]
    resident: tuple[np.ndarray, np.ndarray] | None = None

    # Pass 1: Gram matrix (and the store) unless the store already has this tensor.
    if building:
        gram = torch.zeros((n_rows, n_rows), dtype=torch.float64, device=device)
        for start, stop in chunks:
            base, rows = read(start, stop, from_sources=True)
            trajectory_store.write_chunk(root, name, start, base, rows if is_float else None)
            summary.store_bytes_written += base.nbytes + (rows.nbytes if is_float else 0)
            if is_float:
                accumulate_gram(
                    gram, bits_to_torch(rows, dtype_code), bits_to_torch(base, dtype_code), device
                )
            read_bar.update((stop - start) * bits.itemsize * (n_rows + 1))
            if len(chunks) == 1:
                resident = (base, rows)
        trajectory_store.finish_tensor(root, name, gram if is_float else None)
        gram = gram.cpu()
    else:
        full = trajectory_store.read_gram(root, name)
        gram = full[row_ids][:, row_ids]
        read_bar.update(tensor_bytes)

    # Plan: combination weights for every target from the K×K Gram matrix.
    if is_float:
        weights = relex_weights(gram, steps_tensor, target_steps)  # (T, K)
        fit = fit_diagnostics(gram, steps_tensor)
        if fit.sigma[0] > 0 and fit.spectral_gap > GAP_WARNING:
            summary.ill_conditioned.append((name, fit.spectral_gap))

    # Pass 2: materialise W_0 + w·D into every output.
    from_sources = sources is not None
    out_dtype = DTYPES[dtypes[name]][0]
    for start, stop in chunks:
        base, rows = resident if resident is not None else read(start, stop, from_sources)
        if is_float:
            predicted = combine(
                weights, bits_to_torch(rows, dtype_code), bits_to_torch(base, dtype_code),
                out_dtype, device,
            )  # (T, c)
            per_target = [_as_bits(predicted[i]) for i in range(len(writers))]
        else:
            per_target = [base] * len(writers)
        for writer, data in zip(writers, per_target):
            for out_name in out_names:
                writer.write(out_name, start, data)
                summary.bytes_written += data.nbytes
        write_bar.update((stop - start) * bits.itemsize * (n_rows + 1))


def _as_bits(tensor: torch.Tensor) -> np.ndarray:
    """Host numpy view of a tensor's bits (bf16 has no numpy dtype)."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy()
    return tensor.numpy()
