"""Benchmark of the verl FSDP reader on a generated checkpoint: open cost, read rate, memory.

Writes a W-rank checkpoint of Llama-shaped fp32 tensors (crafted rank files, as torch 2.13
pickles DTensors; see tests/fsdp_fixtures.py), then measures:
  open      open_fsdp_checkpoint: fsdp_config.json, each rank's zip directory and data.pkl
  read      read_into over every tensor in column chunks of --chunk elements (MB/s)
  rss       growth of the process's resident memory across the reads (no mmap: about one chunk)
  torch     for comparison, torch.load(weights_only=True, mmap=True) of every rank file and
            a copy of each local tensor out of the mapping: its time and RSS growth

    python bench/bench_fsdp.py --hidden 1024 --layers 8 --vocab 32000 --ranks 8
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relex_stream.fsdp import open_fsdp_checkpoint  # noqa: E402
from relex_stream.tensor_files import read_into  # noqa: E402
from tests.fsdp_fixtures import (  # noqa: E402
    StorageRef,
    _mesh,
    dtensor,
    dtensor_pickle,
    local_tensor,
    placement,
    write_fsdp_config,
    write_rank_file,
)


def shapes(hidden: int, layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """Llama-like tensor names and shapes (MLP 4x hidden, biases on q/k/v)."""
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            out[f"{p}self_attn.{proj}_proj.weight"] = (hidden, hidden)
        for proj in ("q", "k", "v"):
            out[f"{p}self_attn.{proj}_proj.bias"] = (hidden,)
        out[f"{p}mlp.gate_proj.weight"] = (4 * hidden, hidden)
        out[f"{p}mlp.up_proj.weight"] = (4 * hidden, hidden)
        out[f"{p}mlp.down_proj.weight"] = (hidden, 4 * hidden)
        out[f"{p}input_layernorm.weight"] = (hidden,)
        out[f"{p}post_attention_layernorm.weight"] = (hidden,)
    out["model.norm.weight"] = (hidden,)
    out["lm_head.weight"] = (vocab, hidden)
    return out


def write_checkpoint(actor: Path, tensor_shapes: dict, ranks: int) -> int:
    """Write `ranks` rank files of fp32 dim-0 pieces; total bytes of weights."""
    write_fsdp_config(actor, ranks)
    rng = np.random.default_rng(0)
    total = 0
    for rank in range(ranks):
        entries, storages = {}, {}
        for key, (name, shape) in enumerate(tensor_shapes.items()):
            chunk = -(-shape[0] // ranks)
            rows = max(0, min(shape[0], (rank + 1) * chunk) - rank * chunk)
            local_shape = (rows, *shape[1:])
            numel = int(np.prod(local_shape))
            data = rng.standard_normal(numel, dtype=np.float32).tobytes()
            storages[str(key)] = data
            total += len(data)
            local = local_tensor(StorageRef(str(key), torch.float32, numel), local_shape)
            mesh = _mesh((ranks,), (rank,), "2.13")
            entries[name] = dtensor(local, torch.float32, shape, [placement("Shard")], mesh)
        storages["mesh"] = bytes(4 * ranks)
        path = actor / f"model_world_size_{ranks}_rank_{rank}.pt"
        write_rank_file(path, dtensor_pickle(entries), storages)
    return total


def rss() -> int:
    return psutil.Process().memory_info().rss


def bench_reader(actor: Path, chunk: int) -> dict:
    t0 = time.perf_counter()
    ckpt = open_fsdp_checkpoint(actor)
    opened = time.perf_counter() - t0
    buf = np.empty(chunk, np.float32)
    before, peak, nbytes = rss(), 0, 0
    t0 = time.perf_counter()
    for tensor in ckpt.tensors.values():
        for start in range(0, tensor.numel, chunk):
            out = buf[: min(chunk, tensor.numel - start)]
            read_into(tensor, start, out)
            nbytes += out.nbytes
        peak = max(peak, rss() - before)
    read = time.perf_counter() - t0
    return {"open_s": opened, "read_s": read, "bytes": nbytes, "rss_growth": peak}


def bench_torch(actor: Path) -> dict:
    import torch.distributed.tensor  # noqa: F401  (DTensor on the weights-only allow-list)

    before = rss()
    t0 = time.perf_counter()
    states = [
        torch.load(p, weights_only=True, mmap=True)
        for p in sorted(actor.glob("model_world_size_*_rank_*.pt"))
    ]
    opened = time.perf_counter() - t0
    t0 = time.perf_counter()
    for state in states:
        for value in state.values():
            value.to_local().clone()  # touches the mapped pages, as a reader must
    return {"open_s": opened, "read_s": time.perf_counter() - t0, "rss_growth": rss() - before}


def report(what: str, result: dict, mib: float) -> None:
    print(
        f"{what}: open {result['open_s'] * 1e3:.0f} ms, read {mib / result['read_s']:.0f} MiB/s, "
        f"rss growth {result['rss_growth'] / 2**20:.0f} MiB"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=1 << 20, help="elements per read")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "fsdp")
    args = ap.parse_args()
    actor = args.out / f"h{args.hidden}-l{args.layers}-v{args.vocab}-w{args.ranks}" / "actor"
    tensor_shapes = shapes(args.hidden, args.layers, args.vocab)
    if not (actor / "fsdp_config.json").is_file():
        total = write_checkpoint(actor, tensor_shapes, args.ranks)
        print(f"wrote {total / 2**20:.0f} MiB in {args.ranks} rank files to {actor}")
    ours = bench_reader(actor, args.chunk)
    mib = ours["bytes"] / 2**20
    print(f"tensors {len(tensor_shapes)}, ranks {args.ranks}, {mib:.0f} MiB of weights")
    report("reader", ours, mib)
    report("torch.load(mmap)", bench_torch(actor), mib)


if __name__ == "__main__":
    main()
