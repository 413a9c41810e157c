"""Builders for tiny synthetic training trajectories (base + checkpoints) on disk."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

INT_BUFFER = "model.layers.0.some_buffer"
ZERO_DELTA = "model.layers.0.post_attention_layernorm.weight"
EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
DTYPE_STR = {
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float32: "float32",
    torch.float64: "float64",
}
LAYOUTS = (
    "checkpoint-{}",
    "global_step_{}",
    "global_step{}",
    "global_step{}_hf",
    "step_{}",
    "step-{}",
)
SUBDIRS = ("", "huggingface", "actor/huggingface")
AUX_FILES = {
    "generation_config.json": json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}
    ),
    "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}}}),
    "tokenizer_config.json": json.dumps(
        {"model_max_length": 64, "tokenizer_class": "Qwen2Tokenizer"}
    ),
    "special_tokens_map.json": json.dumps({"eos_token": "<|endoftext|>"}),
    "vocab.json": json.dumps({"a": 0, "b": 1}),
    "merges.txt": "#version: 0.2\na b\n",
}


def qwen2_shapes(vocab: int, hidden: int = 16, inter: int = 32, kv: int = 8) -> dict[str, tuple]:
    """Tensor names/shapes of a one-layer Qwen2 model (2 heads, 1 kv head of dim 8)."""
    p = "model.layers.0."
    return {
        EMBED: (vocab, hidden),
        p + "self_attn.q_proj.weight": (hidden, hidden),
        p + "self_attn.q_proj.bias": (hidden,),
        p + "self_attn.k_proj.weight": (kv, hidden),
        p + "self_attn.k_proj.bias": (kv,),
        p + "self_attn.v_proj.weight": (kv, hidden),
        p + "self_attn.v_proj.bias": (kv,),
        p + "self_attn.o_proj.weight": (hidden, hidden),
        p + "mlp.gate_proj.weight": (inter, hidden),
        p + "mlp.up_proj.weight": (inter, hidden),
        p + "mlp.down_proj.weight": (hidden, inter),
        p + "input_layernorm.weight": (hidden,),
        ZERO_DELTA: (hidden,),
        "model.norm.weight": (hidden,),
        LM_HEAD: (vocab, hidden),
    }


def qwen2_config(vocab: int, dtype: torch.dtype, tied: bool) -> dict:
    """A real-looking Qwen2 config.json matching qwen2_shapes."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "torch_dtype": DTYPE_STR[dtype],
        "use_cache": True,
    }


@dataclass
class Spec:
    """What trajectory to build."""

    steps: Sequence[int] = (10, 20, 30, 40, 50)
    dtype: torch.dtype = torch.bfloat16
    vocab: int = 64
    tied: bool = False
    lm_head: bool = True  # lm_head.weight present in the files
    lm_head_diverges: bool = False  # tied, but the stored lm_head differs from embed_tokens
    base_shards: int = 1
    ckpt_shards: int = 1
    layouts: Sequence[str] = ("checkpoint-{}",)  # cycled over the steps
    subdirs: Sequence[str] = ("",)  # cycled over the steps
    int_buffer: bool = True
    zero_delta: bool = True
    fp32_names: Sequence[str] = ()  # tensors stored as fp32 regardless of dtype
    seed: int = 0
    edit: Callable[[int, dict[str, torch.Tensor]], None] | None = None  # mutate ckpt tensors


@dataclass
class Trajectory:
    """Paths of a built trajectory."""

    root: Path
    base: Path
    runs: Path
    ckpt_dirs: dict[int, Path] = field(default_factory=dict)  # step -> model dir
    spec: Spec = field(default_factory=Spec)


def write_model_dir(
    path: Path, tensors: dict[str, torch.Tensor], config: dict, shards: int = 1, aux: bool = True
) -> None:
    """Write tensors (single file or N shards + index), config.json and tokenizer-ish files."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        names = list(tensors)
        per = math.ceil(len(names) / shards)
        weight_map = {}
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[i * per : (i + 1) * per]}
            save_file(part, str(path / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    if aux:
        for fname, text in AUX_FILES.items():
            (path / fname).write_text(text)


def _base_tensors(spec: Spec, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Float64 base weights (plus int buffer) for the spec."""
    out: dict[str, torch.Tensor] = {}
    for name, shape in qwen2_shapes(spec.vocab).items():
        if name == LM_HEAD and not spec.lm_head:
            continue
        if len(shape) == 1 and name.endswith("norm.weight"):
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
        else:
            out[name] = 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)
    if spec.tied and spec.lm_head:
        out[LM_HEAD] = out[EMBED].clone()
    if spec.int_buffer:
        out[INT_BUFFER] = torch.arange(6, dtype=torch.int64) * 1000 + 7
    return out


def _cast(name: str, t: torch.Tensor, spec: Spec) -> torch.Tensor:
    """Cast a float64 master tensor to its stored dtype."""
    if not t.is_floating_point():
        return t
    return t.to(torch.float32 if name in spec.fp32_names else spec.dtype)


def build_trajectory(root: Path, spec: Spec | None = None) -> Trajectory:
    """Write root/base and root/runs/<step dirs> with planted rank-1 linear drift plus noise."""
    spec = spec or Spec()
    g = torch.Generator().manual_seed(spec.seed)
    master = _base_tensors(spec, g)
    base = {n: _cast(n, t, spec) for n, t in master.items()}
    traj = Trajectory(root=root, base=root / "base", runs=root / "runs", spec=spec)
    config = qwen2_config(spec.vocab, spec.dtype, spec.tied)
    write_model_dir(traj.base, base, config, shards=spec.base_shards)

    rate = 0.3 / max(spec.steps)
    directions = {
        n: torch.randn(t.shape, generator=g, dtype=torch.float64)
        for n, t in master.items()
        if t.is_floating_point()
    }
    traj.runs.mkdir(parents=True, exist_ok=True)
    for i, step in enumerate(spec.steps):
        tensors: dict[str, torch.Tensor] = {}
        for name, w0 in master.items():
            if not w0.is_floating_point():
                tensors[name] = w0 + step  # must NOT leak into the output
            elif spec.zero_delta and name == ZERO_DELTA:
                tensors[name] = base[name].clone()
            else:
                noise = 0.002 * torch.randn(w0.shape, generator=g, dtype=torch.float64)
                tensors[name] = _cast(name, w0 + rate * step * directions[name] + noise, spec)
        if spec.tied and spec.lm_head and not spec.lm_head_diverges:
            tensors[LM_HEAD] = tensors[EMBED].clone()
        if spec.edit is not None:
            spec.edit(step, tensors)
        layout = spec.layouts[i % len(spec.layouts)]
        sub = spec.subdirs[i % len(spec.subdirs)]
        model_dir = traj.runs / layout.format(step) / sub
        write_model_dir(model_dir, tensors, config, shards=spec.ckpt_shards, aux=False)
        traj.ckpt_dirs[step] = model_dir
    return traj
