"""Builders for verl-style FSDP checkpoints: real ones from gloo ranks on CPU, and crafted ones.

Real checkpoints: `build_fsdp_fixture(root)` starts WORLD = 4 gloo ranks on CPU (plain processes
meeting through a FileStore; no torchrun launcher, to save a torch import) that train a tiny
Qwen2-like model (torch.nn modules with Qwen2 tensor names, see tests/fixtures.qwen2_shapes) with
Adam and save it the way verl's FSDPCheckpointManager does:

    root/<run>/global_step_N/actor/model_world_size_4_rank_R.pt   model.state_dict() of rank R
                                   optim_world_size_4_rank_R.pt, extra_state_world_size_4_rank_R.pt
                                   fsdp_config.json, huggingface/ (config + tokenizer files)
    root/<run>/full/step_N.safetensors                             gathered full fp32 weights

Four ranks rather than two because HSDP needs a 2x2 mesh, and one world of four costs less than
a world of two plus a world of four. Runs: "fsdp2" (fully_shard on a 1-D mesh of 4, steps 2/4/6,
and step 0 = the initial weights in full/ only), "fsdp1" (FullyShardedDataParallel with a device
mesh), "hsdp2" and "hsdp1" (FSDP2 / FSDP1 HYBRID_SHARD on a 2x2 ("ddp", "fsdp") mesh), and
one-step variants: "placement_fn" (verl >= 0.6's shard_placement_fn, which picks Shard(1) for the
11-row embedding), "partial", "plain", "uneven" (pieces that cover 4 of 5 rows), and "bf16"
(bf16 and f16 DTensors, readable). The vocabulary has 11 rows (pieces 3,3,3,2 over 4 ranks; 6,5
over an HSDP shard group of 2) and `score.weight` (a one-label value head, as verl critics have)
has one row (pieces 1,0,0,0).

Crafted rank files: `dtensor`, `dtensor_pickle` and `write_rank_file` write a DTensor state
dict's data.pkl from scratch (DeviceMesh as torch 2.9 pickles it, with a `mesh` tensor, or as
torch 2.13 does, with `_layout`) inside a torch-style zip, so tests can make any malformed or
hostile variant without starting processes.

For comparing a run over FSDP directories with a run over safetensors: `FsdpRun.write_hf_dir(
step, out, dtype)` writes a step's full weights as a Hugging Face safetensors directory with the
run's config (step 0 gives a base model), e.g. for s in run.steps: run.write_hf_dir(s, hf_runs /
f"global_step_{s}"). `shared_fsdp_fixture(tmp_path_factory)` builds everything once per session.
"""

from __future__ import annotations

import copyreg
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.fixtures import AUX_FILES, EMBED, qwen2_config, qwen2_shapes, write_model_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB = 11  # pieces of 3,3,3,2 rows over 4 ranks, 6,5 over 2
VALUE_HEAD = "score.weight"  # one row: all ranks but the first hold an empty piece
STEPS = (2, 4, 6)
LR = 1e-2
WORLD = 4  # ranks: a 1-D mesh of 4, or a 2x2 ("ddp", "fsdp") mesh for HSDP
ONE_STEP_RUNS = ("fsdp1", "hsdp2", "hsdp1")
VARIANTS = ("placement_fn", "partial", "plain", "uneven", "bf16")


def fsdp_shapes() -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tiny model: one-layer Qwen2 plus a one-row value head."""
    return {**qwen2_shapes(VOCAB), VALUE_HEAD: (1, 16)}


def fsdp_config_json() -> dict:
    """The huggingface/config.json verl writes next to the shards (fp32: verl's actor dtype)."""
    return qwen2_config(VOCAB, torch.float32, tied=False)


# ---------------------------------------------------------------------------------------------
# Paths of what was built.


@dataclass(frozen=True)
class FsdpRun:
    """One training run's checkpoints: root/<name>/global_step_N/actor and full weights."""

    root: Path
    world_size: int
    steps: tuple[int, ...]

    @property
    def runs(self) -> Path:
        """The directory holding global_step_N/ (what `--runs` would point to)."""
        return self.root

    def step_dir(self, step: int) -> Path:
        return self.root / f"global_step_{step}"

    def actor(self, step: int) -> Path:
        return self.step_dir(step) / "actor"

    def full_file(self, step: int) -> Path:
        """Gathered full weights at `step` (step 0: the initial weights, for a base model)."""
        return self.root / "full" / f"step_{step}.safetensors"

    def full_state(self, step: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.full_file(step)))

    def write_hf_dir(self, step: int, out: Path, dtype: torch.dtype | None = None) -> Path:
        """Write step's full weights (cast to dtype if given) as an HF safetensors model dir."""
        tensors = self.full_state(step)
        if dtype is not None:
            tensors = {n: t.to(dtype) if t.is_floating_point() else t for n, t in tensors.items()}
        config = dict(fsdp_config_json(), torch_dtype=str(dtype or torch.float32)[6:])
        write_model_dir(out, tensors, config)
        return out


@dataclass(frozen=True)
class FsdpFixture:
    """Everything build_fsdp_fixture wrote: training runs and one-checkpoint variants."""

    root: Path
    runs: dict[str, FsdpRun] = field(default_factory=dict)

    def variant(self, name: str) -> Path:
        """The actor dir of a one-checkpoint variant (see VARIANTS)."""
        return self.runs[name].actor(self.runs[name].steps[-1])


def _layout(root: Path) -> FsdpFixture:
    runs = {"fsdp2": FsdpRun(root / "fsdp2", WORLD, STEPS)}
    runs.update({name: FsdpRun(root / name, WORLD, (3,)) for name in ONE_STEP_RUNS})
    runs.update({name: FsdpRun(root / name, WORLD, (1,)) for name in VARIANTS})
    return FsdpFixture(root, runs)


def _spawn(root: Path, rank: int) -> subprocess.Popen[str]:
    """One gloo rank; no torchrun launcher (one torch import less on a 2-core machine)."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "tests.fsdp_fixtures", str(root), str(rank)]
    return subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def build_fsdp_fixture(root: Path) -> FsdpFixture:
    """Run the WORLD gloo ranks and return what they wrote (about 30 CPU-seconds)."""
    root.mkdir(parents=True, exist_ok=True)
    ranks = [_spawn(root, rank) for rank in range(WORLD)]
    failed = []
    for rank, proc in enumerate(ranks):
        out, _ = proc.communicate(timeout=300)
        if proc.returncode != 0:
            failed.append(f"rank {rank} exited {proc.returncode}:\n{out[-3000:]}")
    (root / ".store").unlink(missing_ok=True)
    if failed:
        raise RuntimeError("FSDP fixture ranks failed:\n" + "\n".join(failed))
    return _layout(root)


_CACHE: dict[str, FsdpFixture] = {}


def shared_fsdp_fixture(tmp_path_factory: object) -> FsdpFixture:
    """build_fsdp_fixture once per test session (pass pytest's tmp_path_factory)."""
    if "fixture" not in _CACHE:
        root = tmp_path_factory.mktemp("fsdp_ckpts")  # type: ignore[attr-defined]
        _CACHE["fixture"] = build_fsdp_fixture(root)
    return _CACHE["fixture"]


# ---------------------------------------------------------------------------------------------
# The model and the training jobs (run inside torchrun; everything below `_worker` is rank code).


class _RMSNorm(torch.nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class _Attention(torch.nn.Module):
    def __init__(self, hidden: int = 16, head: int = 8, kv_heads: int = 1) -> None:
        super().__init__()
        self.head, self.heads = head, hidden // head
        self.q_proj = torch.nn.Linear(hidden, hidden)
        self.k_proj = torch.nn.Linear(hidden, kv_heads * head)
        self.v_proj = torch.nn.Linear(hidden, kv_heads * head)
        self.o_proj = torch.nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head).transpose(1, 2)
        k = self.k_proj(x).view(b, t, 1, self.head).transpose(1, 2)
        v = self.v_proj(x).view(b, t, 1, self.head).transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class _Mlp(torch.nn.Module):
    def __init__(self, hidden: int = 16, inter: int = 32) -> None:
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.up_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.down_proj = torch.nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class _DecoderLayer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn, self.mlp = _Attention(), _Mlp()
        self.input_layernorm, self.post_attention_layernorm = _RMSNorm(16), _RMSNorm(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class _Body(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(VOCAB, 16)
        self.layers = torch.nn.ModuleList([_DecoderLayer()])
        self.norm = _RMSNorm(16)


class TinyQwen2(torch.nn.Module):
    """A one-layer Qwen2-shaped causal LM with a one-label value head (verl critic style)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _Body()
        self.lm_head = torch.nn.Linear(16, VOCAB, bias=False)
        self.score = torch.nn.Linear(16, 1, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Next-token cross entropy plus a small value-head loss, so every weight moves."""
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x)
        x = self.model.norm(x)
        logits = self.lm_head(x)[:, :-1]
        lm = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        return lm + self.score(x).pow(2).mean()


def _new_model() -> TinyQwen2:
    """The same initial weights on every rank; shapes checked against qwen2_shapes."""
    torch.manual_seed(0)
    model = TinyQwen2()
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    assert shapes == fsdp_shapes(), shapes
    return model


def _batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (4, 6), generator=g)


def _full(state: dict) -> dict[str, torch.Tensor]:
    """Gather a sharded state dict (collective: every rank calls it)."""
    from torch.distributed.tensor import DTensor

    return {
        n: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone().contiguous()
        for n, v in state.items()
    }


def _write_full(run_dir: Path, step: int, state: dict) -> None:
    full = _full(state)
    if torch.distributed.get_rank() == 0:
        (run_dir / "full").mkdir(parents=True, exist_ok=True)
        save_file(full, str(run_dir / "full" / f"step_{step}.safetensors"))


def _save_verl(actor: Path, state: dict, optim: dict | None, fsdp_version: int) -> None:
    """What verl's FSDPCheckpointManager.save_checkpoint writes for one step."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    actor.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    torch.save(state, actor / f"model_world_size_{world}_rank_{rank}.pt")
    torch.save(optim or {}, actor / f"optim_world_size_{world}_rank_{rank}.pt")
    extra = {"lr_scheduler": None, "rng": {"cpu": torch.get_rng_state()}}
    torch.save(extra, actor / f"extra_state_world_size_{world}_rank_{rank}.pt")
    if rank == 0:
        hf = actor / "huggingface"
        hf.mkdir(exist_ok=True)
        (hf / "config.json").write_text(json.dumps(fsdp_config_json(), indent=2))
        for name, text in AUX_FILES.items():
            (hf / name).write_text(text)
        config = {"FSDP_version": fsdp_version, "world_size": world}
        (actor / "fsdp_config.json").write_text(json.dumps(config, indent=4))
    torch.distributed.barrier()


def _train_fsdp2(run_dir: Path, mesh: object, steps: Sequence[int], **shard_kw: object) -> None:
    """fully_shard each decoder layer and the root (as verl's apply_fsdp2), then Adam."""
    from torch.distributed.fsdp import fully_shard

    model = _new_model()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, **shard_kw)
    fully_shard(model, mesh=mesh, **shard_kw)
    _train(model, run_dir, steps, lambda: model.state_dict(), fsdp_version=2)


def _train_fsdp1(run_dir: Path, mesh: object, steps: Sequence[int], hybrid: bool) -> None:
    """FSDP1 with a device mesh and SHARDED_STATE_DICT, as verl's fsdp_workers set it up."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardedStateDictConfig, ShardingStrategy, StateDictType
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    strategy = ShardingStrategy.HYBRID_SHARD if hybrid else ShardingStrategy.FULL_SHARD
    model = FSDP(
        _new_model(),
        device_mesh=mesh,
        sharding_strategy=strategy,
        auto_wrap_policy=ModuleWrapPolicy({_DecoderLayer}),
        device_id=torch.device("cpu"),
    )

    def sharded_state() -> dict:
        config = ShardedStateDictConfig(offload_to_cpu=False)
        with FSDP.state_dict_type(model, StateDictType.SHARDED_STATE_DICT, config):
            return model.state_dict()

    _train(model, run_dir, steps, sharded_state, fsdp_version=1)


def _train(
    model: torch.nn.Module, run_dir: Path, steps: Sequence[int], state: object, fsdp_version: int
) -> None:
    """Adam over steps 1..max(steps), saving a verl checkpoint and full weights at `steps`."""
    optim = torch.optim.Adam(model.parameters(), lr=LR)
    _write_full(run_dir, 0, state())  # type: ignore[operator]
    for step in range(1, max(steps) + 1):
        model(_batch(step)).backward()
        optim.step()
        optim.zero_grad()
        if step in steps:
            current = state()  # type: ignore[operator]
            actor = run_dir / f"global_step_{step}" / "actor"
            _save_verl(actor, current, optim.state_dict(), fsdp_version)
            _write_full(run_dir, step, current)


def _verl_shard_placement_fn(fsdp_size: int) -> object:
    """verl >= 0.6's get_shard_placement_fn: the first dim that fsdp_size divides."""
    from torch.distributed.tensor import Shard

    def placement(param: torch.Tensor) -> object:
        for dim, size in enumerate(param.shape):
            if size % fsdp_size == 0:
                return Shard(dim)
        return Shard(0)

    return placement


def _save_variant(root: Path, name: str, state: dict) -> None:
    run_dir = root / name
    _save_verl(run_dir / "global_step_1" / "actor", state, None, fsdp_version=2)
    _write_full(run_dir, 1, state)


def _variants(root: Path, mesh: object) -> None:
    """One-checkpoint variants on the 2-rank mesh: refusals and a bf16/f16 readable one."""
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

    fn = _verl_shard_placement_fn(WORLD)
    _train_fsdp2(root / "placement_fn", mesh, (1,), shard_placement_fn=fn)
    g = torch.Generator().manual_seed(7)
    w = torch.randn(5, 3, generator=g)
    rank = torch.distributed.get_rank()
    part = DTensor.from_local(w.clone(), mesh, [Partial()], run_check=False)
    _save_verl(root / "partial/global_step_1/actor", {"w": part}, None, fsdp_version=2)
    plain = {"w": w.clone(), EMBED: distribute_tensor(w.clone(), mesh, [Shard(0)])}
    _save_verl(root / "plain/global_step_1/actor", plain, None, fsdp_version=2)
    # one row on each rank of a five-row tensor: the pieces cover only four rows
    uneven = DTensor.from_local(w[rank : rank + 1].clone(), mesh, [Shard(0)],
                                run_check=False, shape=w.shape, stride=w.stride())  # fmt: skip
    _save_verl(root / "uneven/global_step_1/actor", {"w": uneven}, None, fsdp_version=2)
    mixed = {
        "b": distribute_tensor(w.to(torch.bfloat16), mesh, [Shard(0)]),
        "h": distribute_tensor(torch.randn(3, generator=g).half(), mesh, [Shard(0)]),
    }
    _save_variant(root, "bf16", mixed)


def _jobs(root: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    flat = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("fsdp",))
    hybrid = init_device_mesh("cpu", (2, WORLD // 2), mesh_dim_names=("ddp", "fsdp"))
    _train_fsdp2(root / "fsdp2", flat, STEPS)
    _train_fsdp1(root / "fsdp1", flat, (3,), hybrid=False)
    _train_fsdp2(root / "hsdp2", hybrid, (3,))
    _train_fsdp1(root / "hsdp1", hybrid, (3,), hybrid=True)
    _variants(root, flat)


def _worker(root: Path, rank: int) -> None:
    import warnings

    warnings.filterwarnings("ignore")  # FSDP1's deprecation warnings, once per rank
    torch.set_num_threads(1)
    store = f"file://{root / '.store'}"
    torch.distributed.init_process_group("gloo", init_method=store, rank=rank, world_size=WORLD)
    try:
        _jobs(root)
    finally:
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Crafted rank files: a DTensor state dict's pickle written from scratch, wrapped in a zip.


@dataclass(frozen=True)
class StorageRef:
    """Pickles as torch.save's persistent id for storage `key` (numel elements of dtype)."""

    key: str
    dtype: torch.dtype
    numel: int


class _Call:
    """Pickles as `func(*args)`, then BUILD with `state` when given."""

    def __init__(self, func: object, args: tuple, state: object = None) -> None:
        self.func, self.args, self.state = func, args, state

    def __reduce__(self) -> tuple:
        if self.state is None:
            return (self.func, self.args)
        return (self.func, self.args, self.state)


class _NewObj(_Call):
    """A _Call of copyreg.__newobj__, which pickle writes as NEWOBJ; it must look like a cls."""

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # pickle checks obj.__class__ is args[0]
        return self.args[0]


def _new(cls: type, state: object, *args: object) -> _Call:
    """Pickles as NEWOBJ cls(*args) + BUILD state, the way dataclasses and NamedTuples pickle."""
    return _NewObj(copyreg.__newobj__, (cls, *args), state)


_STORAGE_CLASSES = {
    torch.float32: "FloatStorage",
    torch.float64: "DoubleStorage",
    torch.float16: "HalfStorage",
    torch.bfloat16: "BFloat16Storage",
    torch.int64: "LongStorage",
    torch.int32: "IntStorage",
}


class _TorchPickler(pickle.Pickler):
    """A protocol-2 pickler that writes StorageRef as torch.save's persistent ids."""

    def persistent_id(self, obj: object) -> object:
        if isinstance(obj, StorageRef):
            storage_class = getattr(torch, _STORAGE_CLASSES.get(obj.dtype, "ByteStorage"))
            return ("storage", storage_class, obj.key, "cpu", obj.numel)
        return None


def local_tensor(
    storage: StorageRef, shape: Sequence[int], offset: int = 0, stride: Sequence[int] | None = None
) -> _Call:
    """A plain tensor as torch pickles it: _rebuild_tensor_v2(storage, offset, size, stride)."""
    from torch._utils import _rebuild_tensor_v2

    if stride is None:
        stride = [1] * len(shape)
        for i in range(len(shape) - 2, -1, -1):
            stride[i] = stride[i + 1] * shape[i + 1]
    return _Call(
        _rebuild_tensor_v2, (storage, offset, tuple(shape), tuple(stride), False, OrderedDict())
    )


def _mesh(shape: tuple[int, ...], coordinate: tuple[int, ...] | None, style: str) -> _Call:
    """A DeviceMesh as torch 2.9 ("mesh" tensor) or torch 2.10+ ("_layout") pickles it."""
    from torch.distributed.device_mesh import DeviceMesh

    world = 1
    for size in shape:
        world *= size
    ranks = local_tensor(StorageRef("mesh", torch.int32, world), shape)
    state: dict = {"device_type": "cpu", "_thread_id": None, "_hash": None}
    if style == "2.9":
        state.update(mesh=ranks, mesh_dim_names=("ddp", "fsdp")[-len(shape) :])
    else:
        from torch.distributed._mesh_layout import _FlatLayout, _MeshLayout

        strides = [1] * len(shape)
        for i in range(len(shape) - 2, -1, -1):
            strides[i] = strides[i + 1] * shape[i + 1]
        axes = tuple(
            _new(_FlatLayout, {"shape": (s,) if s > 1 else (), "stride": (d,) if s > 1 else ()})
            for s, d in zip(shape, strides, strict=True)
        )
        layout = _new(_MeshLayout, {"axes": axes})
        names = ("ddp", "fsdp")[-len(shape) :]
        state.update(_layout=layout, _rank_map=ranks, _mesh_dim_names=names)
    if coordinate is not None:
        state["_coordinate_on_dim"] = coordinate
    return _new(DeviceMesh, state)


def placement(kind: str, dim: int = 0) -> _Call:
    """A placement as pickled: Shard(dim), Replicate(), Partial() or _StridedShard(dim)."""
    from torch.distributed.tensor import placement_types as pt

    if kind == "Shard":
        return _new(pt.Shard, {"dim": dim})
    if kind == "Replicate":
        return _new(pt.Replicate, None)
    if kind == "Partial":
        return _new(pt.Partial, {"reduce_op": "sum"})
    return _new(pt._StridedShard, {"dim": dim, "split_factor": 2})


def dtensor(
    local: _Call,
    dtype: torch.dtype,
    shape: Sequence[int],
    placements: Sequence[_Call],
    mesh: _Call,
) -> _Call:
    """A DTensor as torch.save pickles it: _rebuild_from_type_v2 of a wrapper subclass."""
    from torch._tensor import _rebuild_from_type_v2
    from torch._utils import _rebuild_wrapper_subclass
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

    shape = tuple(shape)
    stride = tuple(local.args[3]) if len(shape) == len(local.args[2]) else ()
    meta = _new(TensorMeta, None, torch.Size(shape), stride, dtype)
    spec = _new(DTensorSpec, {"mesh": mesh, "placements": tuple(placements), "tensor_meta": meta})
    args = (DTensor, dtype, shape, stride, 0, torch.strided, torch.device("cpu"), False)
    state = (None, {"_local_tensor": local, "_spec": spec})
    return _Call(_rebuild_from_type_v2, (_rebuild_wrapper_subclass, DTensor, args, state))


def dtensor_pickle(entries: dict[str, object]) -> bytes:
    """data.pkl bytes for an OrderedDict of (crafted) entries, as torch.save writes it."""
    buf = io.BytesIO()
    _TorchPickler(buf, protocol=2).dump(OrderedDict(entries))
    return buf.getvalue()


def write_rank_file(
    path: Path,
    data_pkl: bytes,
    storages: dict[str, bytes],
    compress: Sequence[str] = (),
    zip64: bool = False,
) -> Path:
    """A torch-style zip: <stem>/data.pkl, <stem>/data/<key>, byteorder.

    compress: members (e.g. "data/0") to deflate instead of store; zip64: write zip64 local
    headers, as torch does for members over 4 GiB.
    """
    prefix = path.stem
    members = {"data.pkl": data_pkl, "byteorder": b"little", "version": b"3\n"}
    members.update({f"data/{key}": data for key, data in storages.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(f"{prefix}/{name}")
            info.compress_type = zipfile.ZIP_DEFLATED if name in compress else zipfile.ZIP_STORED
            with zf.open(info, "w", force_zip64=zip64) as member:
                member.write(data)
    return path


def write_fsdp_config(actor: Path, world_size: int, version: int = 2) -> None:
    actor.mkdir(parents=True, exist_ok=True)
    config = {"FSDP_version": version, "world_size": world_size}
    (actor / "fsdp_config.json").write_text(json.dumps(config, indent=4))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), int(sys.argv[2]))
