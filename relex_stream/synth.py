"""Synthetic RL trajectories, written with no network: planted rank-1, realistic drift, walk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import RelexError
from .safetensors_io import INDEX_NAME, SINGLE_NAME


def qwen2_config(hidden: int, layers: int, vocab: int, tied: bool) -> dict:
    """A real Qwen2 config.json for a tiny model, loadable by transformers."""
    heads = max(1, hidden // 16)
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "head_dim": hidden // heads,
        "vocab_size": vocab,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
        "bos_token_id": 0,
        "eos_token_id": 1,
    }


def qwen2_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape for a Qwen2 model, in the order transformers writes them."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes |= {
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.q_proj.bias": (h,),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    shapes["model.norm.weight"] = (h,)
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def _save_model(directory: Path, tensors: dict[str, torch.Tensor], shard_bytes: int | None) -> None:
    directory.mkdir(parents=True)
    if shard_bytes is None:
        save_file(tensors, directory / SINGLE_NAME, metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        n_bytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + n_bytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += n_bytes
    weight_map = {}
    for i, shard in enumerate(shards):
        file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / file_name, metadata={"format": "pt"})
        weight_map |= {name: file_name for name in shard}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2))


PROFILES = ("planted", "drift", "walk")
# planted: per-element RMS change at the last step, ~16 bf16 ulps of a 0.02 weight
PLANTED_DRIFT = 2e-3
# drift: fp32 master step per unit of drift direction (the order of an Adam step at lr 1e-7..1e-6).
# Tuned so that 0.02-scale weights saved as bf16 at 30 consecutive steps keep ~99.2% of elements
# unchanged between consecutive checkpoints and ~93% unchanged over the whole run, within what RL
# runs are measured to do (>99% and 70-95%). Saving every 10th step up to 300 gives ~94% and ~47%.
# See "Store compression (issue 3)" in bench/RESULTS.md.
DRIFT_LR = 2e-7
DRIFT_NOISE = 1.0  # drift: per-step noise RMS relative to the per-step drift RMS


def _check_profile(profile: str) -> None:
    if profile not in PROFILES:
        raise RelexError(f"unknown synth profile {profile!r}: use one of {', '.join(PROFILES)}")


def _bf16_exact(x: torch.Tensor) -> torch.Tensor:
    """x rounded to bf16 (nearest even) and held in fp32: where RL's fp32 master weights start."""
    return x.to(torch.bfloat16).to(torch.float32)


def simulate(
    base: dict[str, torch.Tensor],
    directions: dict[str, torch.Tensor],
    steps: list[int],
    generator: torch.Generator,
    profile: str = "drift",
    lr: float | None = None,
    noise: float | None = None,
    every_step: bool = False,
):
    """Yield (step, {name: bf16 tensor}) for the `steps` of one synthetic trajectory.

    'planted': see `write_trajectory` (`base` is then the unrounded fp32 base).

    'drift' and 'walk' (steps taken in sorted order): the fp32 master weights start at `base`
    (fp32 tensors holding bf16 values, as in an RL run that loads a bf16 checkpoint) and take one
    step per training step:

        drift:  M_s = M_{s-1} + lr · (v + noise · ε_s)      v: `directions` (fixed), ε_s ~ N(0, 1)
        walk:   M_s = M_{s-1} + lr · noise · ε_s            (a pure random walk, zero mean)

    and each listed step t saves bf16(M_t) (round to nearest even). With `every_step` every integer
    step 1..max(steps) is simulated in fp32 (cost: max(steps) Gaussian draws per element). The
    default (fast) path draws only at the listed steps: M_t = M_0 + lr · (t·v + noise · S_t), where
    the walk S_t = S_{t'} + sqrt(t − t')·ε is advanced from the previous listed step t'. A sum of
    t − t' independent N(0, 1) draws is exactly N(0, t − t'), and saving bf16 does not feed back
    into the master, so the saved checkpoints have the same joint distribution. What differs is
    only the fp32 rounding of the intermediate additions (each ≤ half an fp32 ulp of the weight,
    2^-17 of a bf16 ulp): with consecutive steps both paths use the same draws and 1.4e-6 of the
    saved elements differ. Not modelled: a real fp32 master drops updates under half an fp32 ulp
    (lr ~ 1e-7 on weights near 1.0); this path keeps them.
    """
    _check_profile(profile)
    t_max = max(steps)
    if profile == "planted":
        yield from _planted(base, directions, steps, generator, noise)
        return
    if lr is None:
        lr = DRIFT_LR if profile == "drift" else PLANTED_DRIFT / max(1, t_max) ** 0.5
    if noise is None:
        noise = DRIFT_NOISE if profile == "drift" else 1.0
    drift = 1.0 if profile == "drift" else 0.0
    ordered = sorted(set(steps))
    if ordered[0] < 0:
        raise RelexError("synth steps must be non-negative")
    if every_step:
        master = {name: w.clone() for name, w in base.items()}
        wanted = set(ordered)
        if 0 in wanted:
            yield 0, {name: m.to(torch.bfloat16) for name, m in master.items()}
        for step in range(1, t_max + 1):
            for name, m in master.items():
                update = torch.randn(m.shape, generator=generator).mul_(noise)
                if drift:
                    update.add_(directions[name], alpha=drift)
                m.add_(update.mul_(lr))  # fp32 master update, rounded in fp32 like a trainer's
            if step in wanted:
                yield step, {name: m.to(torch.bfloat16) for name, m in master.items()}
        return
    walk = {name: torch.zeros_like(w) for name, w in base.items()}
    previous = 0
    for step in ordered:
        scale = float(step - previous) ** 0.5
        previous = step
        tensors = {}
        for name, w in base.items():
            if scale:
                walk[name].add_(torch.randn(w.shape, generator=generator), alpha=scale)
            offset = torch.mul(walk[name], lr * noise)
            if drift:
                offset.add_(directions[name], alpha=lr * drift * step)
            tensors[name] = offset.add_(w).to(torch.bfloat16)
        yield step, tensors


def write_trajectory(
    out: str | Path,
    steps: list[int],
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    vocab: int = 512,
    noise: float | None = None,
    tied: bool = False,
    shard_bytes: int | None = None,
    overwrite: bool = False,
    profile: str = "planted",
    lr: float | None = None,
    every_step: bool = False,
) -> Path:
    """Write OUT/base and OUT/runs/checkpoint-N (bf16) for each step; returns OUT.

    profile 'planted' (default): each tensor moves as W_t = W_0 + (t / t_max)·drift·v +
    noise·drift·ε_t with v a fixed random direction per tensor and ε_t fresh Gaussian noise per
    step: rank-1, linear, plus noise (noise default 0.1, relative to the drift at the last step).

    profile 'drift' (realistic RL): fp32 master weights start at the bf16 base and take small
    noisy steps lr·(v + noise·ε) along v at every training step; each listed step saves bf16, so
    most bf16 elements do not change between checkpoints (lr default DRIFT_LR, noise default
    1.0: per-step noise RMS relative to the per-step drift). See `simulate`.

    profile 'walk': a pure random walk, M_t = M_{t-1} + lr·noise·ε_t, no drift (lr default
    2e-3 / sqrt(max(steps)): ~2e-3 per-element RMS at the last step, like 'planted').
    """
    _check_profile(profile)
    out = Path(out)
    if len(steps) < 2:
        raise RelexError("synth needs at least two --steps")
    if out.exists():
        if not overwrite:
            raise RelexError(f"{out} already exists; pass --overwrite to replace it")
        shutil.rmtree(out)
    config = qwen2_config(hidden, layers, vocab, tied)
    shapes = qwen2_shapes(config)
    generator = torch.Generator().manual_seed(seed)
    base, directions = _base_and_directions(shapes, generator)
    aux = {
        "config.json": json.dumps(config, indent=2),
        "generation_config.json": json.dumps({"bos_token_id": 0, "eos_token_id": 1}, indent=2),
    }

    def save(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
        _save_model(directory, {n: t.to(torch.bfloat16) for n, t in tensors.items()}, shard_bytes)
        for file_name, text in aux.items():
            (directory / file_name).write_text(text + "\n")

    save(out / "base", base)
    if profile != "planted":
        for name in base:  # the master weights start at the saved bf16 base
            base[name] = _bf16_exact(base[name])
    for step, tensors in simulate(
        base, directions, steps, generator, profile, lr=lr, noise=noise, every_step=every_step
    ):
        save(out / "runs" / f"checkpoint-{step}", tensors)
    return out


def _planted(
    base: dict[str, torch.Tensor],
    directions: dict[str, torch.Tensor],
    steps: list[int],
    generator: torch.Generator,
    noise: float | None,
):
    """W_t = W_0 + (t / t_max)·drift·v + noise·drift·ε_t, in the order of `steps`."""
    drift = PLANTED_DRIFT
    noise = 0.1 if noise is None else noise
    t_max = max(steps)
    for step in steps:
        yield (
            step,
            {
                name: (
                    base[name]
                    + drift * (step / t_max) * directions[name]
                    + noise * drift * torch.randn(base[name].shape, generator=generator)
                ).to(torch.bfloat16)
                for name in base
            },
        )


def _base_and_directions(
    shapes: dict[str, tuple[int, ...]], generator: torch.Generator
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """fp32 base weights (0.02·N(0, 1), norms 1) and one N(0, 1) direction per tensor."""
    base: dict[str, torch.Tensor] = {}
    directions: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            base[name] = torch.ones(shape)
        else:
            base[name] = 0.02 * torch.randn(shape, generator=generator)
        directions[name] = torch.randn(shape, generator=generator)
    return base, directions
