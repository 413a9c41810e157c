"""Synthetic RL trajectories, written with no network: planted rank-1, realistic drift, walk.

`write_trajectory` writes OUT/base and OUT/runs/checkpoint-N as a trainer does: one checkpoint at
a time, config first, each safetensors file front to back (with `delay_s`, in pieces with pauses,
so a watcher can see it half-written), the shard index last. Every random value is drawn from
the seed per (tensor, block of BLOCK elements, step), so a checkpoint is the same whether a run
is written in one go or grown later (`append=True`), and the generator holds only the fp32
master weights (profiles drift and walk: 4 bytes per parameter, 6.2 GB for a 1.5B model) and a
few blocks (~16 MB each), never a whole checkpoint. OUT/synth.json records what determines the
bytes and which steps are complete.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import re
import shutil
import struct
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil
import torch

from .errors import RelexError
from .jsonfile import load_json_object
from .safetensors_io import INDEX_NAME, SINGLE_NAME
from .units import format_bytes

log = logging.getLogger(__name__)

# dtype name -> (torch dtype, safetensors code)
DTYPES = {
    "bfloat16": (torch.bfloat16, "BF16"),
    "float16": (torch.float16, "F16"),
    "float32": (torch.float32, "F32"),
}
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
# Elements per seeded block. Part of what a seed means: changing it changes every value.
BLOCK = 1 << 22
SPEC_FILE = "synth.json"
MAX_EVERY_STEP = 1_000_000  # --every-step walks each step in turn (a list of them, and draws)
SPEC_FORMAT = "relex_stream.synth/1"
PIECES = 4  # with delay_s, each weight file is written in this many parts


def _check_profile(profile: str) -> None:
    if profile not in PROFILES:
        raise RelexError(f"unknown synth profile {profile!r}: use one of {', '.join(PROFILES)}")


def _check_dtype(name: str, what: str) -> torch.dtype:
    if name not in DTYPES:
        raise RelexError(f"synth {what} {name!r} is not supported: use one of {', '.join(DTYPES)}")
    return DTYPES[name][0]


# --------------------------------------------------------------------------- model shapes


def qwen2_config(
    hidden: int,
    layers: int,
    vocab: int,
    tied: bool,
    intermediate: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    head_dim: int | None = None,
    dtype: str = "bfloat16",
) -> dict:
    """A real Qwen2 config.json (transformers loads it); sizes not given follow small defaults.

    Defaults: intermediate 2·hidden, heads max(1, hidden // 16), kv_heads heads // 2 (heads when
    odd), head_dim hidden // heads. Qwen2.5-1.5B is hidden 1536, layers 28, intermediate 8960,
    heads 12, kv_heads 2 (head_dim 128), vocab 151936, tied.
    """
    heads = max(1, hidden // 16) if heads is None else heads
    if kv_heads is None:
        kv_heads = heads // 2 if heads % 2 == 0 else heads
    head_dim = hidden // max(1, heads) if head_dim is None else head_dim
    intermediate = 2 * hidden if intermediate is None else intermediate
    _check_sizes(hidden, layers, vocab, intermediate, heads, kv_heads, head_dim)
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
        "torch_dtype": dtype,
        "bos_token_id": 0,
        "eos_token_id": 1,
    }


MAX_SYNTH_LAYERS = 4096


def _check_sizes(hidden, layers, vocab, intermediate, heads, kv_heads, head_dim) -> None:
    sizes = {
        "hidden": hidden,
        "layers": layers,
        "vocab": vocab,
        "intermediate": intermediate,
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
    }
    for what, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise RelexError(f"synth {what} must be a positive integer, got {value!r}")
    if layers > MAX_SYNTH_LAYERS:
        # checked before the shapes are listed: 16M layers took 7 GB for the list alone
        raise RelexError(f"synth layers must be at most {MAX_SYNTH_LAYERS} (real models have "
                         f"a few hundred at most), got {layers}")
    if heads % kv_heads:
        raise RelexError(f"synth heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    if head_dim % 2:
        raise RelexError(f"synth head_dim must be even (rotary embeddings), got {head_dim}")


def qwen2_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape for a Qwen2 model, in the order transformers writes them."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.q_proj.bias": (q,),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, q),
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


# --------------------------------------------------------------------------- what the seed means


@dataclass(frozen=True)
class SynthSpec:
    """Everything that determines the bytes synth writes, apart from the steps.

    `lr` and `noise` are resolved (no None). `scale_step` is the planted profile's last step
    (its drift is scaled by step / scale_step); 0 for drift and walk.
    """

    config: dict
    seed: int = 0
    profile: str = "planted"
    lr: float = PLANTED_DRIFT
    noise: float = 0.1
    every_step: bool = False
    save_dtype: str = "bfloat16"
    base_dtype: str = "bfloat16"
    shard_bytes: int | None = None
    scale_step: int = 0


def make_spec(
    steps: list[int],
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    vocab: int = 512,
    noise: float | None = None,
    tied: bool = False,
    shard_bytes: int | None = None,
    profile: str = "planted",
    lr: float | None = None,
    every_step: bool = False,
    save_dtype: str = "bfloat16",
    base_dtype: str | None = None,
    intermediate: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    head_dim: int | None = None,
) -> SynthSpec:
    """The spec `write_trajectory` uses for these arguments (defaults resolved, all checked)."""
    _check_profile(profile)
    base_dtype = save_dtype if base_dtype is None else base_dtype
    _check_dtype(save_dtype, "save_dtype")
    _check_dtype(base_dtype, "base_dtype")
    if not steps or min(steps) < 0:
        raise RelexError("synth steps must be non-negative, and at least one is needed")
    if shard_bytes is not None and shard_bytes < 1:
        raise RelexError(f"synth shard size must be positive, got {shard_bytes}")
    if every_step and max(steps) > MAX_EVERY_STEP:
        raise RelexError(
            f"--every-step draws every step up to the last ({max(steps):,}); it takes steps up "
            f"to {MAX_EVERY_STEP:,}: drop --every-step or choose earlier steps"
        )
    lr, noise, scale = _dynamics(profile, lr, noise, max(steps))
    config = qwen2_config(
        hidden, layers, vocab, tied, intermediate, heads, kv_heads, head_dim, dtype=save_dtype
    )
    return SynthSpec(
        config=config,
        seed=seed,
        profile=profile,
        lr=lr,
        noise=noise,
        every_step=bool(every_step),
        save_dtype=save_dtype,
        base_dtype=base_dtype,
        shard_bytes=shard_bytes,
        scale_step=scale,
    )


def _dynamics(
    profile: str, lr: float | None, noise: float | None, t_max: int
) -> tuple[float, float, int]:
    """(lr, noise, scale_step) with the profile's defaults; planted ignores lr (PLANTED_DRIFT)."""
    if profile == "planted":  # the drift at the last step is PLANTED_DRIFT
        lr, noise, scale = PLANTED_DRIFT, 0.1 if noise is None else noise, max(1, t_max)
    else:
        walk_lr = PLANTED_DRIFT / max(1, t_max) ** 0.5  # ~PLANTED_DRIFT RMS at the last step
        lr = (DRIFT_LR if profile == "drift" else walk_lr) if lr is None else lr
        noise = (DRIFT_NOISE if profile == "drift" else 1.0) if noise is None else noise
        scale = 0
    for what, value in (("lr", lr), ("noise", noise)):
        if not math.isfinite(value) or value < 0:
            raise RelexError(f"synth {what} must be a finite non-negative number, got {value}")
    return float(lr), float(noise), scale


def _seed(seed: int, kind: str, name: str, block: int, step: int = 0) -> int:
    """A 63-bit generator seed for one (kind, tensor, block, step): counter-based, order-free."""
    key = f"{seed}/{kind}/{name}/{block}/{step}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def _normal(n: int, seed: int, kind: str, name: str, block: int, step: int = 0) -> np.ndarray:
    """(n,) fp32 N(0, 1) draws for one block (torch's CPU generator: stable per torch version)."""
    generator = torch.Generator().manual_seed(_seed(seed, kind, name, block, step))
    return torch.empty(n).normal_(generator=generator).numpy()


def _saved(values: np.ndarray, dtype_name: str) -> np.ndarray:
    """Finite fp32 values rounded to `dtype_name` (nearest even, as torch): bf16 as uint16 bits.

    numpy, on the calling thread (see `_trainer_step`). fp32 comes back as is (no copy).
    """
    if dtype_name == "float32":
        return values
    if dtype_name == "float16":
        with np.errstate(over="ignore"):  # beyond fp16's range is Inf, as in torch
            return values.astype(np.float16)
    bits = values.view(np.uint32)
    half_up = (bits >> 16) & np.uint32(1)  # ties to even
    half_up += np.uint32(0x7FFF)
    half_up += bits  # no wrap: finite values are below 0xFF800000
    half_up >>= 16
    return half_up.astype(np.uint16)


def _held(saved: np.ndarray) -> np.ndarray:
    """Inverse view of `_saved`: the saved values (bf16 bits, fp16, fp32) exactly, in fp32."""
    if saved.dtype == np.uint16:
        return (saved.astype(np.uint32) << 16).view(np.float32)
    return saved.astype(np.float32)


def _bf16_exact(x: torch.Tensor) -> torch.Tensor:
    """x rounded to bf16 (nearest even) and held in fp32: where RL's fp32 master starts."""
    return x.to(torch.bfloat16).to(torch.float32)


def _trainer_step(
    master: np.ndarray,
    direction: np.ndarray | None,
    eps: np.ndarray,
    delta: int,
    lr: float,
    noise: float,
) -> None:
    """master += lr·(noise·sqrt(delta)·eps + delta·direction), in place, fp32 (n,) arrays.

    The update is formed in fp32 and added once, so the master rounds to fp32 at every step it
    takes, as a trainer's does (and drops updates under half an fp32 ulp). `eps` is consumed.
    delta > 1 takes the delta steps as one: the same distribution, one rounding instead of delta.
    numpy, not torch: its elementwise ops run on the calling thread, where torch's thread pool
    made small tensors 10x slower on this shared 2-core machine.
    """
    update = np.multiply(eps, np.float32(noise * delta**0.5), out=eps)
    if direction is not None:
        update += direction if delta == 1 else np.float32(delta) * direction
    update *= np.float32(lr)
    master += update


def _path(t_from: int, t_to: int, every_step: bool) -> list[tuple[int, int]]:
    """(step drawn at, steps it covers) taken from t_from to t_to."""
    if t_to <= t_from:
        return []
    if every_step:
        return [(s, 1) for s in range(t_from + 1, t_to + 1)]
    return [(t_to, t_to - t_from)]


class _Trajectory:
    """The values of one synthetic trajectory, one (tensor, block) at a time, in file order.

    planted: W_t = W_0 + drift·(t / scale_step)·v + noise·drift·ε_t, with W_0 = 0.02·N(0, 1)
    (norms 1), v a fixed N(0, 1) direction and fresh ε_t ~ N(0, 1); no state.
    drift:   fp32 master weights start at W_0 rounded to base_dtype (an RL run loads the
             published checkpoint) and step M_s = M_{s-1} + lr·(v + noise·ε_s) (`_trainer_step`).
    walk:    the same with no drift: M_s = M_{s-1} + lr·noise·ε_s.
    Checkpoints save the weights rounded to save_dtype (nearest even).
    """

    def __init__(self, spec: SynthSpec):
        self.spec = spec
        self.shapes = qwen2_shapes(spec.config)
        self.master: dict[str, np.ndarray] = {}  # drift, walk: name -> flat fp32 master
        self.at = 0  # the step the master holds

    def _blocks(self, name: str) -> Iterator[tuple[int, int, int]]:
        numel = math.prod(self.shapes[name])
        for block, lo in enumerate(range(0, numel, BLOCK)):
            yield block, lo, min(numel, lo + BLOCK)

    def _w0(self, name: str, block: int, n: int) -> np.ndarray:
        if name.endswith("norm.weight"):
            return np.ones(n, dtype=np.float32)
        w0 = _normal(n, self.spec.seed, "base", name, block)
        w0 *= np.float32(0.02)
        return w0

    def base(self) -> Iterator[tuple[str, np.ndarray]]:
        """(name, fp32 block of W_0) in file order; drift and walk start their master here."""
        stateful = self.spec.profile != "planted"
        for name in self.shapes:
            if stateful:
                self.master[name] = np.empty(math.prod(self.shapes[name]), dtype=np.float32)
            for block, lo, hi in self._blocks(name):
                w0 = self._w0(name, block, hi - lo)
                if stateful:
                    self.master[name][lo:hi] = _held(_saved(w0, self.spec.base_dtype))
                yield name, w0
        self.at = 0

    def checkpoint(self, step: int) -> Iterator[tuple[str, np.ndarray]]:
        """(name, fp32 block of the weights at `step`) in file order; steps must not go back.

        For drift and walk `base()` must have been consumed first; the blocks yielded are views
        of the master: cast them before the next block is asked for.
        """
        if self.spec.profile != "planted" and step < self.at:
            raise ValueError(f"synth steps go forward: at {self.at}, asked for {step}")
        for name in self.shapes:
            for block, lo, hi in self._blocks(name):
                if self.spec.profile == "planted":
                    yield name, self._planted(name, block, hi - lo, step)
                else:
                    yield name, self._advance(name, block, lo, hi, step)
        self.at = max(self.at, step)

    def _advance(self, name: str, block: int, lo: int, hi: int, step: int) -> np.ndarray:
        spec, master = self.spec, self.master[name][lo:hi]
        path = _path(self.at, step, spec.every_step)
        direction = None
        if path and spec.profile == "drift":  # drawn once per block, reused by every step
            direction = _normal(hi - lo, spec.seed, "direction", name, block)
        for drawn_at, delta in path:
            eps = _normal(hi - lo, spec.seed, "noise", name, block, drawn_at)
            _trainer_step(master, direction, eps, delta, spec.lr, spec.noise)
        return master

    def _planted(self, name: str, block: int, n: int, step: int) -> np.ndarray:
        spec = self.spec
        w = self._w0(name, block, n)
        direction = _normal(n, spec.seed, "direction", name, block)
        direction *= np.float32(spec.lr * step / spec.scale_step)
        w += direction
        eps = _normal(n, spec.seed, "noise", name, block, step)
        eps *= np.float32(spec.noise * spec.lr)
        w += eps
        return w


def iter_tensors(
    spec: SynthSpec, steps: list[int]
) -> Iterator[tuple[int | None, dict[str, torch.Tensor]]]:
    """In memory: (None, base tensors in base_dtype), then (step, tensors in save_dtype).

    The same values `write_trajectory` writes for `spec` and `steps` (sorted, deduplicated).
    Holds the master (drift, walk) and one checkpoint at a time.
    """
    trajectory = _Trajectory(spec)
    yield None, _gather(trajectory, trajectory.base(), spec.base_dtype)
    for step in sorted(set(steps)):
        yield step, _gather(trajectory, trajectory.checkpoint(step), spec.save_dtype)


def _gather(trajectory: _Trajectory, blocks, dtype_name: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, group in itertools.groupby(blocks, key=lambda item: item[0]):
        flat = np.concatenate([_saved(values, dtype_name) for _, values in group])
        tensor = torch.from_numpy(flat.view(np.int16) if flat.dtype == np.uint16 else flat)
        tensors[name] = tensor.view(DTYPES[dtype_name][0]).reshape(trajectory.shapes[name])
    return tensors


# --------------------------------------------------------------------------- writing files


def _shard_plan(
    shapes: dict[str, tuple[int, ...]], itemsize: int, shard_bytes: int | None
) -> list[tuple[str, list[str]]]:
    """[(file name, tensor names)]: tensors in order, a new shard when the next would overflow."""
    if shard_bytes is None:
        return [(SINGLE_NAME, list(shapes))]
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        n_bytes = math.prod(shape) * itemsize
        if shards[-1] and size + n_bytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n_bytes
    total = len(shards)
    return [(f"model-{i + 1:05d}-of-{total:05d}.safetensors", s) for i, s in enumerate(shards)]


def _header(shapes: dict[str, tuple[int, ...]], names: list[str], dtype_name: str) -> bytes:
    """The safetensors header (length prefix and JSON, space-padded to 8 bytes) for `names`."""
    code, itemsize = DTYPES[dtype_name][1], DTYPES[dtype_name][0].itemsize
    entries: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        end = offset + math.prod(shapes[name]) * itemsize
        entries[name] = {"dtype": code, "shape": list(shapes[name]), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class _PacedFile:
    """A file written front to back; with `pause` > 0 it stops PIECES − 1 times for `pause` s.

    At each stop the bytes so far are flushed, so a watcher sees a valid header and part of the
    data, as while a trainer writes a shard.
    """

    def __init__(self, path: Path, total: int, pause: float):
        self.file = open(path, "wb")  # closed by close()
        self.pause = pause
        self.marks = [total * i // PIECES for i in range(1, PIECES)] if pause > 0 else []
        self.done = 0

    def write(self, data: memoryview) -> None:
        while self.marks and self.done + len(data) >= self.marks[0]:
            cut = self.marks.pop(0) - self.done
            self.file.write(data[:cut])
            self.done += cut
            data = data[cut:]
            self.file.flush()
            time.sleep(self.pause)
        self.file.write(data)
        self.done += len(data)

    def close(self) -> None:
        self.file.close()


def _write_model(
    directory: Path,
    trajectory: _Trajectory,
    blocks: Iterator[tuple[str, np.ndarray]],
    dtype_name: str,
    pause: float,
) -> int:
    """config files, then every weight file in order, then the index (sharded); returns bytes."""
    spec, shapes = trajectory.spec, trajectory.shapes
    itemsize = DTYPES[dtype_name][0].itemsize
    directory.mkdir(parents=True)
    config = dict(spec.config, torch_dtype=dtype_name)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": 0, "eos_token_id": 1}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    plan = _shard_plan(shapes, itemsize, spec.shard_bytes)
    by_name = itertools.groupby(blocks, key=lambda item: item[0])
    total = 0
    for file_name, names in plan:
        header = _header(shapes, names, dtype_name)
        data = sum(math.prod(shapes[n]) for n in names) * itemsize
        out = _PacedFile(directory / file_name, len(header) + data, pause)
        try:
            out.write(memoryview(header))
            for name in names:
                got, group = next(by_name)
                assert got == name, (got, name)  # the plan and the trajectory share one order
                for _, values in group:
                    out.write(memoryview(_saved(values, dtype_name).view(np.uint8)))
        finally:
            out.close()
        total += data
    if len(plan) > 1 or spec.shard_bytes is not None:
        weight_map = {name: file_name for file_name, names in plan for name in names}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2))
    return total


def _record(out: Path, spec: SynthSpec, steps: list[int]) -> None:
    """OUT/synth.json: the spec and the complete steps, replaced atomically."""
    body = {
        "format": SPEC_FORMAT,
        "spec": asdict(spec),
        "steps": steps,
        "torch": torch.__version__,
        "block": BLOCK,
    }
    tmp = out / (SPEC_FILE + ".tmp")
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    os.replace(tmp, out / SPEC_FILE)


def _recorded(out: Path) -> tuple[SynthSpec, list[int]]:
    """The spec and complete steps of an existing synth trajectory; RelexError if there is none."""
    try:
        # bounded, strict, never a FIFO: the record is read as every JSON input is
        body = load_json_object(out / SPEC_FILE, f"synth's record {SPEC_FILE}")
        if body["format"] != SPEC_FORMAT or body.get("block") != BLOCK:
            raise ValueError(body["format"])
        recorded = SynthSpec(**body["spec"]), [int(s) for s in body["steps"]]
    except (RelexError, ValueError, KeyError, TypeError):
        raise RelexError(
            f"{out} exists but has no {SPEC_FILE} from this version of synth, so it cannot be "
            "appended to; pass overwrite to write it again"
        ) from None
    if body.get("torch") != torch.__version__:  # its generator draws the values
        log.warning(
            "synth: %s was written with torch %s, this is %s: appended checkpoints may not "
            "match a run written in one go",
            out,
            body.get("torch"),
            torch.__version__,
        )
    return recorded


def _steps_to_append(out: Path, spec: SynthSpec, steps: list[int]) -> tuple[list[int], list[int]]:
    """(steps already complete, steps to write) for appending `steps` to the trajectory at out."""
    recorded, done = _recorded(out)
    if recorded.profile == "planted" or spec.profile == "planted":
        raise RelexError(
            "profile 'planted' scales every checkpoint by the last step, so a planted run cannot "
            "grow; use profile drift or walk to append"
        )
    if recorded != spec:
        theirs, ours = asdict(recorded), asdict(spec)
        field = next(k for k in ours if ours[k] != theirs[k])
        hint = " (walk's default lr depends on the last step: give lr explicitly)" * (
            field == "lr" and spec.profile == "walk"
        )
        raise RelexError(
            f"{out} was written with {field}={theirs[field]!r}, this call gives "
            f"{ours[field]!r}{hint}: append with the same options it was written with"
        )
    written = set(done)
    todo = [s for s in steps if s not in written]
    last = max(done, default=-1)
    if todo and todo[0] <= last:
        raise RelexError(
            f"{out} holds steps up to {last}; appended steps must come after it (got {todo[0]})"
        )
    for step in todo:
        if (out / "runs" / f"checkpoint-{step}").exists():
            raise RelexError(
                f"{out}/runs/checkpoint-{step} exists but synth did not finish it; delete it and "
                "append again"
            )
    return done, todo


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
    save_dtype: str = "bfloat16",
    base_dtype: str | None = None,
    intermediate: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    head_dim: int | None = None,
    delay_s: float = 0.0,
    append: bool = False,
) -> Path:
    """Write OUT/base and OUT/runs/checkpoint-N for each step; returns OUT.

    profile 'planted' (default): each tensor moves as W_t = W_0 + (t / t_max)·drift·v +
    noise·drift·ε_t with v a fixed random direction per tensor and ε_t fresh Gaussian noise per
    step: rank-1, linear, plus noise (noise default 0.1, relative to the drift at the last step).

    profile 'drift' (realistic RL): fp32 master weights start at the base as saved (rounded to
    base_dtype) and take small noisy steps lr·(v + noise·ε) along v, one fp32 addition per step as
    an optimizer does; a checkpoint saves the master rounded to save_dtype, so in bf16 most
    elements do not change between checkpoints, and in fp32 (verl's hf_model and TRL saves) almost
    all change a little (lr default DRIFT_LR, noise default 1.0: per-step noise RMS relative to
    the per-step drift). Between listed steps t' < t the master takes one step of t − t' (the same
    distribution); `every_step` takes every integer step (cost: two draws per element per step).
    With consecutive steps both are the same.

    profile 'walk': a pure random walk, M_t = M_{t-1} + lr·noise·ε_t, no drift (lr default
    2e-3 / sqrt(max(steps)): ~2e-3 per-element RMS at the last step, like 'planted').

    save_dtype ('bfloat16', 'float16', 'float32') is the checkpoints' dtype; base_dtype (default:
    save_dtype) the base's. Sizes not given follow `qwen2_config`.

    delay_s > 0 sleeps delay_s before each checkpoint and writes every weight file in PIECES
    parts with delay_s / PIECES pauses, so another process can watch a run grow.

    append=True grows an existing trajectory (one written by synth, OUT/synth.json): steps
    already written are skipped, the others must come after the last one and every other option
    must be as before. The result is byte-identical to writing all steps in one go: every value
    is drawn per (seed, tensor, block, step), and the master is rebuilt by replaying the written
    steps (as costly as generating them, without the writing). Not for 'planted' (its scale
    depends on the last step), nor for 'walk' with its default lr (give lr). Needs the same torch
    version (its generator draws the values). Without OUT, append writes a new trajectory.
    """
    out = Path(out)
    steps = sorted(set(steps))
    options = dict(seed=seed, hidden=hidden, layers=layers, vocab=vocab, noise=noise, tied=tied)
    options |= dict(shard_bytes=shard_bytes, profile=profile, lr=lr, every_step=every_step)
    options |= dict(save_dtype=save_dtype, base_dtype=base_dtype, intermediate=intermediate)
    spec = make_spec(steps, heads=heads, kv_heads=kv_heads, head_dim=head_dim, **options)
    if not (math.isfinite(delay_s) and delay_s >= 0):
        raise RelexError(f"synth delay must be a non-negative number of seconds, got {delay_s}")
    if append and overwrite:
        raise RelexError("synth: pass either append or overwrite, not both")
    growing = append and out.exists()
    if not growing and len(steps) < 2 and not append:
        raise RelexError("synth needs at least two --steps")
    _check_capacity(out, spec, len(steps))
    trajectory = _Trajectory(spec)
    pause = delay_s / PIECES
    if growing:
        done, todo = _steps_to_append(out, spec, steps)
        _replay(trajectory, done)
    else:
        _fresh(out, overwrite)
        start = time.perf_counter()
        size = _write_model(out / "base", trajectory, trajectory.base(), spec.base_dtype, pause)
        _log_written(out / "base", size, start)
        done, todo = [], steps
        _record(out, spec, done)
    for step in todo:
        if delay_s:
            time.sleep(delay_s)
        start = time.perf_counter()
        directory = out / "runs" / f"checkpoint-{step}"
        blocks = trajectory.checkpoint(step)
        size = _write_model(directory, trajectory, blocks, spec.save_dtype, pause)
        done.append(step)
        _record(out, spec, done)
        _log_written(directory, size, start)
    return out


def _check_capacity(out: Path, spec: SynthSpec, n_checkpoints: int) -> None:
    """Refuse, before a byte is written, a trajectory the disk cannot hold or (drift, walk) a
    master the memory cannot hold."""
    n_params = sum(math.prod(shape) for shape in qwen2_shapes(spec.config).values())
    size = n_params * (DTYPES[spec.base_dtype][0].itemsize
                       + n_checkpoints * DTYPES[spec.save_dtype][0].itemsize)
    probe = Path(os.path.abspath(out))
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if size > free:
        raise RelexError(
            f"synth would write {format_bytes(size)} ({n_params:,} parameters, "
            f"{n_checkpoints} checkpoints and the base) but {probe} has {format_bytes(free)} "
            "free; choose smaller shapes or fewer --steps"
        )
    master = 4 * n_params if spec.profile != "planted" else 0
    available = psutil.virtual_memory().available
    if master > available:
        raise RelexError(
            f"the {spec.profile} profile keeps fp32 master weights, {format_bytes(master)} for "
            f"{n_params:,} parameters, but {format_bytes(available)} of memory is available; "
            "choose smaller shapes or --profile planted"
        )


def _log_written(directory: Path, size: int, start: float) -> None:
    seconds = time.perf_counter() - start
    log.info("synth: wrote %s (%.2f GB of weights) in %.1f s", directory, size / 1e9, seconds)


def _fresh(out: Path, overwrite: bool) -> None:
    """An empty `out`: --overwrite replaces only what synth wrote (OUT/synth.json, base/, runs/),
    never a directory of anything else."""
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise RelexError(f"{out} already exists; pass --overwrite to replace it")
        if not out.is_dir() or out.is_symlink():
            raise RelexError(f"{out} is not a directory synth wrote; choose another --out")
        entries = {p.name: p for p in out.iterdir()}
        ours = {SPEC_FILE, "base", "runs"}
        foreign = sorted(set(entries) - ours) or ([] if SPEC_FILE in entries else [
            f"no {SPEC_FILE}"])
        if entries and (foreign or any(p.is_symlink() for p in entries.values())):
            raise RelexError(
                f"{out} holds files synth did not write ({', '.join(foreign) or 'a link'}); "
                "synth --overwrite replaces only its own trajectories: choose another --out"
            )
        strangers = [p for name in ("base", "runs") if name in entries
                     for p in _not_written_by_synth(entries[name], name == "runs")]
        if strangers:
            more = f" and {len(strangers) - 1} more" if len(strangers) > 1 else ""
            raise RelexError(
                f"{strangers[0]}{more} was not written by synth; synth --overwrite replaces "
                "only its own trajectories: move it away or choose another --out"
            )
        for path in entries.values():
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


_SYNTH_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json"
                         r"|config\.json|generation_config\.json", re.ASCII)


def _not_written_by_synth(directory: Path, runs: bool) -> list[Path]:
    """Entries below base/ (or runs/checkpoint-N/) that synth does not write, links included."""
    if directory.is_symlink() or not directory.is_dir():
        return [directory]
    found = []
    for path in sorted(directory.iterdir()):
        if runs:
            if (re.fullmatch(r"checkpoint-\d+", path.name, re.ASCII) and path.is_dir()
                    and not path.is_symlink()):
                found += _not_written_by_synth(path, runs=False)
            else:
                found.append(path)
        elif (not _SYNTH_FILE.fullmatch(path.name) or path.is_symlink()
              or not path.is_file()):
            found.append(path)
    return found


def _replay(trajectory: _Trajectory, done: list[int]) -> None:
    """Rebuild the master at the last written step: the same draws and additions, no writing."""
    for _ in trajectory.base():
        pass
    for step in done:
        for _ in trajectory.checkpoint(step):
            pass


# --------------------------------------------------------------------------- in memory (legacy)


def simulate(
    base: dict[str, torch.Tensor],
    directions: dict[str, torch.Tensor],
    steps: list[int],
    generator: torch.Generator,
    profile: str = "drift",
    lr: float | None = None,
    noise: float | None = None,
    every_step: bool = False,
    save_dtype: str = "bfloat16",
):
    """Yield (step, {name: tensor in save_dtype}) for `steps` of one in-memory trajectory.

    The dynamics of `write_trajectory` (see `_Trajectory`), with the caller's `base` (fp32;
    for drift and walk the master's start, already rounded as wanted), `directions` and one
    sequential `generator` for the noise. Steps are taken in sorted order.
    """
    _check_profile(profile)
    dtype = _check_dtype(save_dtype, "save_dtype")
    if profile == "planted":
        for step, tensors in _planted(base, directions, steps, generator, noise):
            yield step, {name: t.to(dtype) for name, t in tensors.items()}
        return
    if not steps or min(steps) < 0:
        raise RelexError("synth steps must be non-negative, and at least one is needed")
    lr, noise, _ = _dynamics(profile, lr, noise, max(steps))
    master = {name: w.clone() for name, w in base.items()}
    at = 0
    for step in sorted(set(steps)):
        for _, delta in _path(at, step, every_step):
            for name, m in master.items():
                eps = torch.randn(m.shape, generator=generator)
                direction = directions[name].numpy() if profile == "drift" else None
                _trainer_step(m.numpy(), direction, eps.numpy(), delta, lr, noise)
        at = step
        yield step, {name: m.to(dtype) for name, m in master.items()}


def _planted(
    base: dict[str, torch.Tensor],
    directions: dict[str, torch.Tensor],
    steps: list[int],
    generator: torch.Generator,
    noise: float | None,
):
    """W_t = W_0 + (t / t_max)·drift·v + noise·drift·ε_t, in the order of `steps` (fp32)."""
    drift = PLANTED_DRIFT
    noise = 0.1 if noise is None else noise
    t_max = max(steps)
    for step in steps:
        yield (
            step,
            {
                name: base[name]
                + drift * (step / t_max) * directions[name]
                + noise * drift * torch.randn(base[name].shape, generator=generator)
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
