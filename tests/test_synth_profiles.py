"""relex_stream.synth profiles: 'planted' (default), realistic 'drift' and a pure random 'walk'."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from relex_stream.errors import RelexError
from relex_stream.synth import _base_and_directions, _bf16_exact, simulate, write_trajectory


def _bits(directory: Path) -> torch.Tensor:
    tensors = load_file(directory / "model.safetensors")
    return torch.cat([tensors[name].flatten().view(torch.int16) for name in sorted(tensors)])


def _load(out: Path, steps: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    base = _bits(out / "base")
    rows = torch.stack([_bits(out / "runs" / f"checkpoint-{s}") for s in steps])
    return base, rows


def test_planted_is_the_default(tmp_path: Path) -> None:
    steps = [10, 20, 30]
    write_trajectory(tmp_path / "a", steps, seed=4)
    write_trajectory(tmp_path / "b", steps, seed=4, profile="planted", noise=0.1)
    for name in ["base", "runs/checkpoint-10", "runs/checkpoint-30"]:
        assert (tmp_path / "a" / name / "model.safetensors").read_bytes() == (
            tmp_path / "b" / name / "model.safetensors"
        ).read_bytes()


def test_drift_changes_few_bf16_elements(tmp_path: Path) -> None:
    """Consecutive steps: >99% unchanged step to step, 70-97% never changed over 30 steps."""
    steps = list(range(1, 31))
    write_trajectory(tmp_path / "d", steps, seed=1, hidden=128, profile="drift")
    base, rows = _load(tmp_path / "d", steps)
    previous = torch.cat([base[None], rows[:-1]])
    unchanged_consecutive = (rows == previous).float().mean().item()
    never_changed = (rows == base).all(dim=0).float().mean().item()
    assert unchanged_consecutive > 0.99
    assert 0.7 < never_changed < 0.97
    assert never_changed < 1.0 and (rows[-1] != base).any()
    # the change is a drift: the last step moved further from the base than the first
    assert (rows[-1] != base).sum() > 3 * (rows[0] != base).sum()


def test_drift_base_is_the_planted_base(tmp_path: Path) -> None:
    write_trajectory(tmp_path / "p", [1, 2], seed=2)
    write_trajectory(tmp_path / "d", [1, 2], seed=2, profile="drift")
    assert torch.equal(_bits(tmp_path / "p" / "base"), _bits(tmp_path / "d" / "base"))


def test_walk_is_a_visible_random_walk(tmp_path: Path) -> None:
    steps = list(range(10, 81, 10))
    write_trajectory(tmp_path / "w", steps, seed=3, profile="walk")
    tensors = [
        load_file(tmp_path / "w" / "runs" / f"checkpoint-{s}" / "model.safetensors") for s in steps
    ]
    base = load_file(tmp_path / "w" / "base" / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    deltas = torch.stack([t[name].float() - base[name].float() for t in tensors]).flatten(1)
    rms = deltas.pow(2).mean(dim=1).sqrt()
    assert 1.5e-3 < rms[-1].item() < 2.6e-3  # ~2e-3 at the last step
    assert rms[0].item() < 0.6 * rms[-1].item()  # spreads like sqrt(t)
    assert abs(deltas[-1].mean().item()) < 0.05 * rms[-1].item()  # zero mean: no drift
    increments = deltas[1:] - deltas[:-1]
    cosine = torch.nn.functional.cosine_similarity(increments[1:], increments[:-1], dim=1)
    assert cosine.abs().max().item() < 0.1  # independent increments


def test_fast_path_matches_every_step_simulation() -> None:
    """Consecutive steps: the listed-steps shortcut and the step-by-step fp32 master agree."""
    g = torch.Generator().manual_seed(0)
    base, directions = _base_and_directions({"w": (1000, 200), "norm.weight": (200,)}, g)
    base = {name: _bf16_exact(w) for name, w in base.items()}
    steps = list(range(1, 11))
    runs = [
        [
            t
            for _, t in simulate(
                base,
                directions,
                steps,
                torch.Generator().manual_seed(1),
                "drift",
                lr=1e-6,
                every_step=every,
            )
        ]
        for every in (False, True)
    ]
    for fast, slow in zip(*runs, strict=True):
        for name in base:
            same = (fast[name].view(torch.int16) == slow[name].view(torch.int16)).float().mean()
            assert same.item() > 1 - 1e-4
    # strided steps: same distribution, different draws
    fast = [
        t["w"]
        for _, t in simulate(
            base, directions, [5, 10], torch.Generator().manual_seed(2), "drift", lr=1e-6
        )
    ]
    slow = [
        t["w"]
        for _, t in simulate(
            base,
            directions,
            [5, 10],
            torch.Generator().manual_seed(3),
            "drift",
            lr=1e-6,
            every_step=True,
        )
    ]
    for a, b in zip(fast, slow, strict=True):
        changed_a = (a != base["w"].to(torch.bfloat16)).float().mean().item()
        changed_b = (b != base["w"].to(torch.bfloat16)).float().mean().item()
        assert abs(changed_a - changed_b) < 0.01


def test_unknown_profile(tmp_path: Path) -> None:
    with pytest.raises(RelexError, match="profile"):
        write_trajectory(tmp_path / "x", [1, 2], profile="sine")
