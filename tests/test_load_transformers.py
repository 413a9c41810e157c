"""Outputs load with transformers.AutoModelForCausalLM and give finite logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.fixtures import Spec, Trajectory
from tests.helpers import check_against_reference, run_cli, run_traj, step_dir

transformers = pytest.importorskip("transformers")


def tiny_qwen2_trajectory(root: Path, tied: bool, steps: tuple[int, ...]) -> Trajectory:
    """Save a random tiny Qwen2 (bf16) with save_pretrained, plus drifted checkpoints."""
    cfg = transformers.Qwen2Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).eval()
    model.save_pretrained(root / "base", safe_serialization=True)
    start = {k: v.detach().to(torch.float64).clone() for k, v in model.state_dict().items()}
    direction = {k: torch.randn_like(v) * 0.02 for k, v in start.items()}
    traj = Trajectory(
        root=root, base=root / "base", runs=root / "runs", spec=Spec(tied=tied, zero_delta=False)
    )
    for step in steps:
        drift = step / max(steps)
        new = {
            k: (v + drift * direction[k] + 0.001 * torch.randn_like(v)).to(torch.bfloat16)
            for k, v in start.items()
        }
        if tied:
            new["lm_head.weight"] = new["model.embed_tokens.weight"]
        model.load_state_dict(new)
        model.save_pretrained(root / "runs" / f"checkpoint-{step}", safe_serialization=True)
        traj.ckpt_dirs[step] = root / "runs" / f"checkpoint-{step}"
    return traj


def load_and_forward(model_dir: Path) -> None:
    """Load a model dir with transformers, check no missing keys, forward a few ids."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, output_loading_info=True
    )
    assert not info.get("missing_keys"), info
    assert not info.get("unexpected_keys"), info
    assert not info.get("mismatched_keys"), info
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 2, 7]])).logits
    assert logits.shape[-1] == model.config.vocab_size
    assert bool(torch.isfinite(logits).all()), "non-finite logits"


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_tiny_qwen2_roundtrip(tmp_path: Path, tied: bool) -> None:
    """save_pretrained trajectory -> run -> from_pretrained works and matches the reference."""
    traj = tiny_qwen2_trajectory(tmp_path / "traj", tied, (10, 20, 30, 40))
    out = tmp_path / "out"
    run_traj(traj, out, [80])
    check_against_reference(traj, out, [80])
    load_and_forward(step_dir(out, 80))


def test_synth_then_run(tmp_path: Path) -> None:
    """`relex_stream synth` output extrapolates and the result loads with transformers."""
    synth = tmp_path / "synth"
    run_cli("synth", "--out", synth, "--steps", "10-80:10", "--seed", "3")
    steps = list(range(10, 81, 10))
    assert sorted(p.name for p in (synth / "runs").iterdir()) == sorted(
        f"checkpoint-{s}" for s in steps
    )
    load_and_forward(synth / "base")
    out = tmp_path / "out"
    args = ["run", "--base", synth / "base", "--runs", synth / "runs", "--target", "160"]
    run_cli(*args, "--out", out, "--device", "cpu", "--quiet")
    cfg = json.loads((synth / "base" / "config.json").read_text())
    traj = Trajectory(
        root=synth,
        base=synth / "base",
        runs=synth / "runs",
        ckpt_dirs={s: synth / "runs" / f"checkpoint-{s}" for s in steps},
        spec=Spec(tied=bool(cfg.get("tie_word_embeddings")), zero_delta=False),
    )
    check_against_reference(traj, out, [160])
    load_and_forward(step_dir(out, 160))
