"""The store's file count (README's formula, store_layout.file_count) for real model shapes.

Builds each model's tensor layout from its shapes alone (nothing is written) and prints the
number of groups and the files of a committed store at several K:

    python bench/store_files.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relex_stream.checkpoints import ModelLayout  # noqa: E402
from relex_stream.store_layout import file_count, plan_groups  # noqa: E402

# name: (hidden, intermediate, vocab, layers, head_dim, heads, kv_heads, qk_norm, qkv_bias, tied,
#        model files kept with the store: config.json, generation_config.json, tokenizer files)
MODELS = {
    "Qwen3-8B": (4096, 12288, 151936, 36, 128, 32, 8, True, False, False, 8),
    "Qwen2.5-1.5B": (1536, 8960, 151936, 28, 128, 12, 2, False, True, True, 2),
}


def layout(hidden, inter, vocab, layers, head_dim, heads, kv_heads, qk_norm, bias, tied):
    """bf16 tensors as the Hugging Face Qwen2/Qwen3 models name and shape them."""
    tensors = {"model.embed_tokens.weight": ("BF16", (vocab, hidden))}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes = {
            "self_attn.q_proj.weight": (heads * head_dim, hidden),
            "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            "self_attn.o_proj.weight": (hidden, heads * head_dim),
            "mlp.gate_proj.weight": (inter, hidden),
            "mlp.up_proj.weight": (inter, hidden),
            "mlp.down_proj.weight": (hidden, inter),
            "input_layernorm.weight": (hidden,),
            "post_attention_layernorm.weight": (hidden,),
        }
        if qk_norm:
            shapes |= {f"self_attn.{x}_norm.weight": (head_dim,) for x in ("q", "k")}
        if bias:
            shapes |= {f"self_attn.{x}_proj.bias": (n * head_dim,)
                       for x, n in (("q", heads), ("k", kv_heads), ("v", kv_heads))}
        tensors |= {p + name: ("BF16", shape) for name, shape in shapes.items()}
    tensors["model.norm.weight"] = ("BF16", (hidden,))
    if not tied:
        tensors["lm_head.weight"] = ("BF16", (vocab, hidden))
    return ModelLayout(tensors, {"model.safetensors": tuple(tensors)}, False)


def main() -> None:
    for name, (*shape, n_aux) in MODELS.items():
        model = layout(*shape)
        groups = plan_groups(model, {n: "BF16" for n in model.tensors}, {})
        counts = ", ".join(f"K={k}: {file_count(groups, k, n_aux):,}" for k in (8, 30, 100))
        print(f"{name}: {len(model.tensors)} tensors, {len(groups)} groups, {n_aux} model "
              f"files; files: {counts}")


if __name__ == "__main__":
    main()
