"""What a run writes: one output per (method, window, target), and their combination weights.

All outputs of a run share one materialise pass: each output's K weights are zero outside its
window, so the same observed rows feed every method and window at once.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoints import check_window
from .errors import RelexError
from .methods import MethodSpec, combination_weights
from .units import step_label


@dataclass(frozen=True)
class OutputSpec:
    """One predicted checkpoint: target step, method, window (last N observed) and directory."""

    target: float
    method: MethodSpec
    window: int | None  # None: every observed step
    directory: Path


def _label(method: MethodSpec, window: int | None, n_methods: int, n_windows: int) -> str:
    parts = []
    if n_methods > 1:
        parts.append(re.sub(r"[:,]", "_", str(method)).replace("=", "-"))
    if n_windows > 1:
        parts.append(f"window-{window if window is not None else 'all'}")
    return "_".join(parts)


def plan_outputs(
    out: Path, targets: list[float], methods: list[MethodSpec], windows: list[int | None]
) -> list[OutputSpec]:
    """OUT/step-T for a single method and window, else OUT/<method>_window-N/step-T."""
    if len(set(methods)) != len(methods) or len(set(windows)) != len(windows):
        raise RelexError("the same --method or --window is given twice")
    specs = []
    for method in methods:
        for window in windows:
            label = _label(method, window, len(methods), len(windows))
            for target in targets:
                directory = (
                    out / label / f"step-{step_label(target)}"
                    if label
                    else (out / f"step-{step_label(target)}")
                )
                specs.append(OutputSpec(target, method, window, directory))
    _check_distinct(specs)
    return specs


def _check_distinct(specs: list[OutputSpec]) -> None:
    """No two outputs share a directory: a target given twice, or two methods whose labels are
    the same (labels tell every two alphas apart; the check stays for whatever else might
    not)."""
    seen: dict[Path, OutputSpec] = {}
    for spec in specs:
        first = seen.setdefault(spec.directory, spec)
        if first is spec:
            continue
        if (first.method, first.window) == (spec.method, spec.window):
            raise RelexError("--target lists the same step twice")
        raise RelexError(
            f"--method {first.method.exact()} and --method {spec.method.exact()} would both "
            f"write {spec.directory.parent}; run them one at a time with different --out"
        )


def output_weights(
    outputs: list[OutputSpec], observed_steps: list[int]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function from a tensor's Gram matrix (K, K) to its weights (n_outputs, K), float64."""
    steps = torch.tensor(observed_steps, dtype=torch.float64)
    n_observed = len(observed_steps)
    groups: dict[tuple[MethodSpec, int | None], list[int]] = {}
    for i, spec in enumerate(outputs):
        groups.setdefault((spec.method, spec.window), []).append(i)

    def plan(gram: torch.Tensor) -> torch.Tensor:
        weights = torch.zeros((len(outputs), n_observed), dtype=torch.float64)
        for (method, window), rows in groups.items():
            keep = slice(n_observed - (window or n_observed), n_observed)
            targets = [outputs[i].target for i in rows]
            weights[rows, keep] = combination_weights(
                method, gram[keep, keep], steps[keep], targets
            )
        return weights

    return plan


def check_plan(outputs: list[OutputSpec], observed_steps: list[int]) -> None:
    """Surface option mistakes (e.g. reconstructing an unobserved step) before any read."""
    for window in {s.window for s in outputs}:
        if window is not None:
            check_window(window)
            if window > len(observed_steps):
                raise RelexError(
                    f"--window {window} is larger than the {len(observed_steps)} observed steps"
                )
    output_weights(outputs, observed_steps)(torch.eye(len(observed_steps), dtype=torch.float64))
