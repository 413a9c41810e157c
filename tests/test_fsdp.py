"""verl FSDP checkpoints: real gloo-made shards read bit for bit, and every bad file refused."""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from relex_stream.errors import RelexError
from relex_stream.fsdp import (
    FsdpCheckpoint,
    find_fsdp_dir,
    fsdp_fingerprint,
    open_fsdp_checkpoint,
)
from relex_stream.safetensors_io import DTYPES
from relex_stream.tensor_files import TensorInfo, read_into
from tests.fsdp_fixtures import (
    EMBED,
    STEPS,
    VALUE_HEAD,
    WORLD,
    FsdpFixture,
    StorageRef,
    _Call,
    _mesh,
    _new,
    _TorchPickler,
    dtensor,
    dtensor_pickle,
    local_tensor,
    placement,
    shared_fsdp_fixture,
    write_fsdp_config,
    write_rank_file,
)

READABLE = [("fsdp2", s) for s in STEPS] + [("fsdp1", 3), ("hsdp2", 3), ("hsdp1", 3)]
BIAS = "model.layers.0.self_attn.k_proj.bias"


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> FsdpFixture:
    return shared_fsdp_fixture(tmp_path_factory)


def read_all(tensor: TensorInfo) -> torch.Tensor:
    """The whole tensor via read_into, as a torch tensor of its dtype and shape."""
    out = np.empty(tensor.numel, DTYPES[tensor.dtype][1])
    read_into(tensor, 0, out)
    return torch.from_numpy(out).view(DTYPES[tensor.dtype][0]).reshape(tensor.shape)


def bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def copy_actor(ckpts: FsdpFixture, run: str, step: int, dest: Path) -> Path:
    return Path(shutil.copytree(ckpts.runs[run].actor(step), dest / "actor"))


def refused(directory: Path) -> str:
    with pytest.raises(RelexError) as info:
        open_fsdp_checkpoint(directory)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# ---------------------------------------------------------------------------------------------
# Real checkpoints from gloo ranks.


@pytest.mark.parametrize("run,step", READABLE)
def test_real_checkpoints_read_bit_for_bit(ckpts: FsdpFixture, run: str, step: int) -> None:
    ckpt = open_fsdp_checkpoint(ckpts.runs[run].actor(step))
    full = ckpts.runs[run].full_state(step)
    assert set(ckpt.tensors) == set(full)
    assert (ckpt.world_size, ckpt.fsdp_version) == (WORLD, 1 if run.endswith("1") else 2)
    assert ckpt.config_dir == ckpts.runs[run].actor(step) / "huggingface"
    for name, tensor in ckpt.tensors.items():
        assert tensor.dtype == "F32", name  # verl's shards are fp32 master weights
        assert tensor.shape == tuple(full[name].shape)
        assert bits(read_all(tensor)) == bits(full[name]), f"{run} step {step}: {name}"


def test_steps_differ_so_the_comparison_can_fail(ckpts: FsdpFixture) -> None:
    first, last = (
        open_fsdp_checkpoint(ckpts.runs["fsdp2"].actor(s)) for s in (STEPS[0], STEPS[-1])
    )
    assert bits(read_all(first.tensors[EMBED])) != bits(read_all(last.tensors[EMBED]))


def test_equals_torch_load_weights_only_assembled(ckpts: FsdpFixture) -> None:
    import torch.distributed.tensor  # noqa: F401  (DTensor on torch's weights-only allow-list)

    for run, step in (("fsdp2", 4), ("hsdp2", 3)):
        ckpt = open_fsdp_checkpoint(ckpts.runs[run].actor(step))
        states = [torch.load(f, weights_only=True, mmap=True) for f in ckpt.files]
        assert list(ckpt.tensors) == list(states[0])  # the state dict's order
        for name, tensor in ckpt.tensors.items():
            locals_ = [s[name].to_local() for s in states]
            assert all(s[name].placements[-1].is_shard(0) for s in states)
            assert bits(torch.cat(locals_)) == bits(read_all(tensor)), name


def test_short_and_empty_pieces(ckpts: FsdpFixture) -> None:
    ckpt = open_fsdp_checkpoint(ckpts.runs["fsdp2"].actor(2))
    files = [ckpt.files.index(p.file) for p in ckpt.tensors[EMBED].pieces]
    assert files == [0, 1, 2, 3]  # rank order
    assert [p.numel for p in ckpt.tensors[EMBED].pieces] == [48, 48, 48, 32]  # 11 rows: 3,3,3,2
    assert [p.numel for p in ckpt.tensors[VALUE_HEAD].pieces] == [16]  # 1 row: 1,0,0,0
    assert [p.numel for p in ckpt.tensors[BIAS].pieces] == [2, 2, 2, 2]
    hsdp = open_fsdp_checkpoint(ckpts.runs["hsdp2"].actor(3))
    assert [p.numel for p in hsdp.tensors[EMBED].pieces] == [96, 80]  # 6 and 5 rows


def test_random_ranges_across_piece_boundaries(ckpts: FsdpFixture) -> None:
    ckpt = open_fsdp_checkpoint(ckpts.runs["hsdp1"].actor(3))
    full = ckpts.runs["hsdp1"].full_state(3)
    rng = np.random.default_rng(0)
    for name in (EMBED, BIAS, VALUE_HEAD, "model.layers.0.mlp.down_proj.weight"):
        tensor, flat = ckpt.tensors[name], full[name].reshape(-1).numpy()
        edges = np.cumsum([p.numel for p in tensor.pieces])[:-1]
        ranges = [(0, tensor.numel), (0, 0), (tensor.numel, 0)]
        ranges += [(int(e) - 3, 7) for e in edges if e >= 3]  # straddles a boundary
        for _ in range(20):
            start = int(rng.integers(0, tensor.numel))
            ranges.append((start, int(rng.integers(0, tensor.numel - start + 1))))
        for start, length in ranges:
            out = np.full(length, np.nan, np.float32)
            read_into(tensor, start, out)
            assert out.tobytes() == flat[start : start + length].tobytes(), (name, start, length)


def test_bf16_and_f16_are_reported_and_read(ckpts: FsdpFixture) -> None:
    ckpt = open_fsdp_checkpoint(ckpts.variant("bf16"))
    full = ckpts.runs["bf16"].full_state(1)
    assert {n: t.dtype for n, t in ckpt.tensors.items()} == {"b": "BF16", "h": "F16"}
    for name, tensor in ckpt.tensors.items():
        assert bits(read_all(tensor)) == bits(full[name])
    out = np.empty(4, np.uint16)
    read_into(ckpt.tensors["b"], 5, out)
    assert out.tobytes() == bits(full["b"].reshape(-1)[5:9])


def test_hsdp_reads_only_replica_zero(ckpts: FsdpFixture, tmp_path: Path) -> None:
    actor = copy_actor(ckpts, "hsdp2", 3, tmp_path)
    for rank in (2, 3):  # replica 1: garbage must not matter, since it is never opened
        (actor / f"model_world_size_{WORLD}_rank_{rank}.pt").write_bytes(b"not a zip")
    ckpt = open_fsdp_checkpoint(actor)
    assert [f.name for f in ckpt.files] == [f"model_world_size_{WORLD}_rank_{r}.pt" for r in (0, 1)]
    full = ckpts.runs["hsdp2"].full_state(3)
    assert all(bits(read_all(t)) == bits(full[n]) for n, t in ckpt.tensors.items())
    (actor / f"model_world_size_{WORLD}_rank_1.pt").unlink()
    assert f"lacks model_world_size_{WORLD}_rank_1.pt" in refused(actor)


def test_find_fsdp_dir(ckpts: FsdpFixture, tmp_path: Path) -> None:
    run = ckpts.runs["fsdp2"]
    assert find_fsdp_dir(run.step_dir(2)) == run.actor(2)
    assert find_fsdp_dir(run.actor(2)) == run.actor(2)
    hf = run.write_hf_dir(2, tmp_path / "hf")
    assert find_fsdp_dir(hf) is None and find_fsdp_dir(tmp_path / "missing") is None
    actor = copy_actor(ckpts, "fsdp2", 2, tmp_path)
    (actor / "fsdp_config.json").unlink()
    assert find_fsdp_dir(actor.parent) == actor  # so that open can say what is missing
    assert "no fsdp_config.json" in refused(actor)


def test_hf_dir_writer_casts_and_keeps_config(ckpts: FsdpFixture, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out = ckpts.runs["fsdp2"].write_hf_dir(4, tmp_path / "bf16", dtype=torch.bfloat16)
    tensors = load_file(str(out / "model.safetensors"))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    full = ckpts.runs["fsdp2"].full_state(4)
    assert all(torch.equal(tensors[n], full[n].bfloat16()) for n in full)


def test_fingerprint_hashes_the_pickle_and_changes_with_it(
    ckpts: FsdpFixture, tmp_path: Path
) -> None:
    actor = copy_actor(ckpts, "fsdp2", 2, tmp_path)
    ckpt = open_fsdp_checkpoint(actor)
    before = fsdp_fingerprint(ckpt)
    name = f"model_world_size_{WORLD}_rank_0.pt"
    assert sorted(before) == sorted(f.name for f in ckpt.files)
    with zipfile.ZipFile(actor / name) as zf:
        pkl = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
        assert before[name]["pickle_sha256"] == hashlib.sha256(zf.read(pkl)).hexdigest()
    assert before[name]["size"] == (actor / name).stat().st_size
    shutil.copy(ckpts.runs["fsdp2"].actor(4) / name, actor / name)  # same shapes, other save
    after = fsdp_fingerprint(ckpt)
    assert after[name]["pickle_sha256"] == before[name]["pickle_sha256"]  # data.pkl alike
    assert after[name]["serialization_id"] != before[name]["serialization_id"]
    other = f"model_world_size_{WORLD}_rank_1.pt"
    assert after[other] == before[other]


def test_read_into_rejects_a_wrong_buffer(ckpts: FsdpFixture) -> None:
    tensor = open_fsdp_checkpoint(ckpts.runs["fsdp2"].actor(2)).tensors[EMBED]
    with pytest.raises(ValueError):
        read_into(tensor, 0, np.empty(4, np.uint16))  # F32 needs 4-byte items
    with pytest.raises(ValueError):
        read_into(tensor, tensor.numel - 2, np.empty(4, np.float32))


# ---------------------------------------------------------------------------------------------
# Real refusals: placements, plain tensors, pieces that do not add up, directory problems.


@pytest.mark.parametrize(
    "variant,expected",
    [
        ("placement_fn", "placements [Shard(1)]: it is split on another dim"),
        ("partial", "placements [Partial(sum)]: each rank holds a partial sum"),
        ("plain", "tensor 'w' is a plain tensor, not a DTensor shard"),
        ("uneven", "has shape [1, 3] where [2, 3] was expected"),
    ],
)
def test_real_refusals(ckpts: FsdpFixture, variant: str, expected: str) -> None:
    message = refused(ckpts.variant(variant))
    assert expected in message, message


def test_missing_rank_file(ckpts: FsdpFixture, tmp_path: Path) -> None:
    actor = copy_actor(ckpts, "fsdp2", 2, tmp_path)
    (actor / f"model_world_size_{WORLD}_rank_2.pt").unlink()
    assert f"lacks model_world_size_{WORLD}_rank_2.pt" in refused(actor)


def test_world_size_disagrees_with_fsdp_config(ckpts: FsdpFixture, tmp_path: Path) -> None:
    actor = copy_actor(ckpts, "fsdp2", 2, tmp_path)
    write_fsdp_config(actor, world_size=8)
    assert "says world size 8 but the rank files are named for world size 4" in refused(actor)


def test_world_size_disagrees_with_the_mesh(ckpts: FsdpFixture, tmp_path: Path) -> None:
    actor = copy_actor(ckpts, "fsdp2", 2, tmp_path)
    for rank in range(WORLD):
        old = actor / f"model_world_size_{WORLD}_rank_{rank}.pt"
        if rank < 2:
            old.rename(actor / f"model_world_size_2_rank_{rank}.pt")
        else:
            old.unlink()
    write_fsdp_config(actor, world_size=2)
    assert "lives on a mesh of shape [4] but fsdp_config.json says world size 2" in refused(actor)


def test_stale_rank_files(ckpts: FsdpFixture, tmp_path: Path) -> None:
    actor = copy_actor(ckpts, "fsdp2", 2, tmp_path)
    shutil.copy(
        actor / f"model_world_size_{WORLD}_rank_0.pt", actor / "model_world_size_8_rank_0.pt"
    )
    assert "named for world size 4, 8" in refused(actor)
    (actor / "model_world_size_8_rank_0.pt").rename(actor / f"model_world_size_{WORLD}_rank_9.pt")
    assert "rank file for rank 9, beyond world size 4" in refused(actor)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("[2, 4]", "holds a JSON array, not an object"),
        ('"fsdp"', "holds a JSON string, not an object"),
        ("{not json", "is not valid JSON"),
        ("[" * 100_000, "nested more than"),  # json.loads alone: a RecursionError traceback
        ('{"world_size": 2, "world_size": 4, "FSDP_version": 2}', "world_size"),  # given twice
        ('{"FSDP_version": 2, "world_size": "4"}', "world_size must be an integer from 1 to"),
        ('{"FSDP_version": 2, "world_size": true}', "world_size must be an integer from 1 to"),
        # a count of rank files to look for: 10**12 of them took GBs before the refusal
        ('{"FSDP_version": 2, "world_size": 1000000000000}', "from 1 to 1,048,576"),
        ('{"FSDP_version": 2, "world_size": 1048577}', "from 1 to 1,048,576"),
        ('{"FSDP_version": 3, "world_size": 4}', "FSDP_version must be 1 or 2"),
    ],
)
def test_bad_fsdp_config(ckpts: FsdpFixture, tmp_path: Path, text: str, expected: str) -> None:
    actor = copy_actor(ckpts, "fsdp2", 2, tmp_path)
    (actor / "fsdp_config.json").write_text(text)
    assert expected in refused(actor)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "legacy", "empty"])
def test_damaged_rank_file(ckpts: FsdpFixture, tmp_path: Path, damage: str) -> None:
    actor = copy_actor(ckpts, "fsdp2", 2, tmp_path)
    path = actor / f"model_world_size_{WORLD}_rank_1.pt"
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(len(data)))
    elif damage == "legacy":  # torch's pre-1.6 format: a bare pickle stream, no zip
        torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(b"")
    assert "is not a readable zip-format torch checkpoint" in refused(actor)


def test_a_compressed_data_member_is_refused(ckpts: FsdpFixture, tmp_path: Path) -> None:
    actor = copy_actor(ckpts, "fsdp2", 2, tmp_path)
    path = actor / f"model_world_size_{WORLD}_rank_1.pt"
    with zipfile.ZipFile(path) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    with zipfile.ZipFile(path, "w") as zf:  # the same archive, its weights deflated
        for name, data in members.items():
            method = zipfile.ZIP_DEFLATED if "/data/" in name else zipfile.ZIP_STORED
            zf.writestr(name, data, compress_type=method)
    assert "is compressed, so its bytes cannot be read in place" in refused(actor)


# ---------------------------------------------------------------------------------------------
# Crafted rank files: layouts of other torch versions, malformed DTensors, hostile pickles.


def _crafted(
    directory: Path,
    rows: int = 5,
    style: str = "2.13",
    world: int = 2,
    replicas: int = 1,
    coordinate: bool = True,
    offset: int = 0,
    claim_offset: int | None = None,
    stored: int | None = None,
    numel: int | None = None,
    dtype: torch.dtype = torch.float32,
    stride: tuple[int, ...] | None = None,
    placements: tuple[_Call, ...] | None = None,
    compress: tuple[str, ...] = (),
    zip64: bool = False,
    drop_storage: bool = False,
    name: str = "w",
) -> tuple[Path, torch.Tensor]:
    """A `world`-rank checkpoint of one (rows, 3) DTensor, crafted from scratch; and its value.

    replicas > 1: HSDP, a (replicas, world // replicas) mesh with [Replicate(), Shard(0)].
    offset: elements of padding stored before each piece (and the storage offset saying so);
    claim_offset, stored, numel, drop_storage: what the pickle claims or the zip stores, to craft
    bad files.
    """
    full = torch.arange(rows * 3, dtype=torch.float32).reshape(rows, 3).to(dtype)
    actor = directory / "actor"
    write_fsdp_config(actor, world)
    shards = world // replicas
    chunk = -(-rows // shards)
    mesh_shape = (world,) if replicas == 1 else (replicas, shards)
    default = (
        (placement("Shard"),) if replicas == 1 else (placement("Replicate"), placement("Shard"))
    )
    for rank in range(world):
        where = (rank,) if replicas == 1 else divmod(rank, shards)
        piece = full[where[-1] * chunk : (where[-1] + 1) * chunk]
        data = piece.contiguous().view(torch.uint8).numpy().tobytes()
        count = piece.numel() if numel is None else numel
        storage = StorageRef("0", dtype, count + offset)
        claimed = offset if claim_offset is None else claim_offset
        local = local_tensor(storage, tuple(piece.shape), offset=claimed, stride=stride)
        mesh = _mesh(mesh_shape, where if coordinate else None, style)
        value = dtensor(local, dtype, full.shape, placements or default, mesh)
        stored_bytes = (bytes(offset * full.element_size()) + data)[:stored]
        write_rank_file(
            actor / f"model_world_size_{world}_rank_{rank}.pt",
            dtensor_pickle({name: value}),
            {"mesh": bytes(4 * world), **({} if drop_storage else {"0": stored_bytes})},
            compress=compress,
            zip64=zip64,
        )
    return actor, full


@pytest.mark.parametrize("style", ["2.9", "2.13"])
@pytest.mark.parametrize("coordinate", [True, False])
@pytest.mark.parametrize("zip64", [False, True])
def test_crafted_layouts_are_read(
    tmp_path: Path, style: str, coordinate: bool, zip64: bool
) -> None:
    actor, full = _crafted(tmp_path, style=style, coordinate=coordinate, offset=2, zip64=zip64)
    ckpt = open_fsdp_checkpoint(actor)
    assert isinstance(ckpt, FsdpCheckpoint) and ckpt.config_dir is None
    assert bits(read_all(ckpt.tensors["w"])) == bits(full)
    assert [p.numel for p in ckpt.tensors["w"].pieces] == [9, 6]


@pytest.mark.parametrize("style", ["2.9", "2.13"])
def test_crafted_hsdp_reads_replica_zero(tmp_path: Path, style: str) -> None:
    """A 3x2 mesh: the shard group is 2 ranks (a 2x3 reading would give other pieces)."""
    actor, full = _crafted(tmp_path, rows=7, style=style, world=6, replicas=3)
    ckpt = open_fsdp_checkpoint(actor)
    assert [f.name for f in ckpt.files] == [f"model_world_size_6_rank_{r}.pt" for r in (0, 1)]
    assert [p.numel for p in ckpt.tensors["w"].pieces] == [12, 9]
    assert bits(read_all(ckpt.tensors["w"])) == bits(full)


def test_crafted_files_load_with_torch_too(tmp_path: Path) -> None:
    """The crafting helpers write what torch itself reads: they model real files faithfully."""
    import torch.distributed.tensor  # noqa: F401

    actor, full = _crafted(tmp_path)
    ckpt = open_fsdp_checkpoint(actor)
    pieces = [torch.load(f, weights_only=True)["w"] for f in ckpt.files]
    assert all(p.shape == full.shape for p in pieces)
    assert bits(torch.cat([p.to_local() for p in pieces])) == bits(read_all(ckpt.tensors["w"]))


def test_a_wrong_mesh_coordinate_is_refused(tmp_path: Path) -> None:
    actor, _ = _crafted(tmp_path)
    ranks = [actor / f"model_world_size_2_rank_{r}.pt" for r in (0, 1)]
    tmp = ranks[0].with_suffix(".tmp")
    ranks[0].rename(tmp), ranks[1].rename(ranks[0]), tmp.rename(ranks[1])  # swapped names
    assert "sits at mesh coordinate [1], expected [0]" in refused(actor)


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        ({"claim_offset": 10**12}, "points outside its stored data"),
        ({"claim_offset": 1}, "points outside its stored data"),
        ({"stored": 8}, "points outside its stored data"),
        ({"numel": 10**9}, "points outside its stored data"),
        ({"claim_offset": -1}, "a tensor has a bad storage or storage offset"),
        ({"stride": (1, 3)}, "has strides [1, 3], not contiguous"),
        ({"dtype": torch.float8_e4m3fn}, "has dtype float8_e4m3fn, which relex_stream does not"),
        ({"placements": (placement("Shard", 1),)}, "placements [Shard(1)]"),
        ({"placements": (placement("Strided", 0),)}, "placements [_StridedShard(dim=0)]"),
        ({"placements": (placement("Replicate"),)}, "placements [Replicate()]"),
        ({"compress": ("data/0",)}, "member model_world_size_2_rank_0/data/0 is compressed"),
        ({"compress": ("data.pkl",)}, "data.pkl is compressed"),
        ({"drop_storage": True}, "lacks the data of tensor 'w' (storage 0)"),
    ],
)
def test_crafted_refusals(tmp_path: Path, kwargs: dict, expected: str) -> None:
    actor, _ = _crafted(tmp_path, **kwargs)
    message = refused(actor)
    assert expected in message, message


def test_the_mesh_must_match_the_placements(tmp_path: Path) -> None:
    actor, _ = _crafted(tmp_path, placements=(placement("Replicate"), placement("Shard")))
    assert "has 2 placement(s) but a mesh of shape [2]; the file is corrupt" in refused(actor)


class _Hostile:
    """Pickles as func(*args): what an attacker would plant in a rank file."""

    def __init__(self, func: object, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return (self.func, self.args)


def _hostile(case: str, marker: Path) -> _Hostile:
    """A payload that would create `marker` if it ever ran."""
    write = f"open({str(marker)!r}, 'w').write('ran')"
    return {
        "os.system": lambda: _Hostile(os.system, f"touch {marker}"),
        "builtins.exec": lambda: _Hostile(builtins.exec, write),
        "builtins.eval": lambda: _Hostile(builtins.eval, write),
        "subprocess.Popen": lambda: _Hostile(subprocess.Popen, ["touch", str(marker)]),
    }[case]()


@pytest.mark.parametrize(
    "case", ["os.system", "builtins.exec", "builtins.eval", "subprocess.Popen"]
)
@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("where", ["top", "inside_dtensor"])
def test_hostile_pickles_never_run(tmp_path: Path, case: str, protocol: int, where: str) -> None:
    marker = tmp_path / "pwned"
    payload = _hostile(case, marker)
    if where == "top":
        obj: object = {"w": payload}
    else:  # a well-formed DTensor whose mesh carries the payload
        from torch.distributed.device_mesh import DeviceMesh

        local = local_tensor(StorageRef("0", torch.float32, 15), (5, 3))
        mesh = _new(DeviceMesh, payload)
        obj = {"w": dtensor(local, torch.float32, (5, 3), [placement("Shard")], mesh)}
    buf = io.BytesIO()
    _TorchPickler(buf, protocol=protocol).dump(obj)
    actor = tmp_path / "actor"
    write_fsdp_config(actor, 1)
    write_rank_file(actor / "model_world_size_1_rank_0.pt", buf.getvalue(), {"0": bytes(60)})
    message = refused(actor)
    # protocol 2 writes Python 2 names (posix.system, __builtin__.exec, commands.Popen)
    assert f".{case.split('.')[1]}, which a verl FSDP state dict never needs" in message, message
    assert "refusing to unpickle it" in message
    assert not marker.exists()
    if case == "builtins.exec" and where == "top":  # plain pickle runs these very bytes
        pickle.loads(buf.getvalue())
        assert marker.exists()


@pytest.mark.parametrize(
    "obj,expected",
    [
        (["w"], "does not hold a model state dict"),
        ({}, "does not hold a model state dict"),
        ({"w": 3}, "entry 'w' of its state dict is not a tensor"),
        ({1: local_tensor(StorageRef("0", torch.float32, 3), (3,))}, "non-string key 1"),
    ],
)
def test_pickles_that_are_not_state_dicts(tmp_path: Path, obj: object, expected: str) -> None:
    actor = tmp_path / "actor"
    write_fsdp_config(actor, 1)
    buf = io.BytesIO()
    _TorchPickler(buf, protocol=2).dump(obj)
    write_rank_file(actor / "model_world_size_1_rank_0.pt", buf.getvalue(), {"0": bytes(12)})
    assert expected in refused(actor)


def test_sharded_tensor_is_explained(tmp_path: Path) -> None:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    actor = tmp_path / "actor"
    write_fsdp_config(actor, 1)
    data = dtensor_pickle({"w": _new(ShardedTensor, {})})
    write_rank_file(actor / "model_world_size_1_rank_0.pt", data, {})
    assert "ShardedTensor values (FSDP1 without a device mesh)" in refused(actor)


def test_a_bad_persistent_id_is_refused(tmp_path: Path) -> None:
    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: object) -> object:
            return ("module", "os", "system") if obj == "x" else None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({"w": "x"})
    actor = tmp_path / "actor"
    write_fsdp_config(actor, 1)
    write_rank_file(actor / "model_world_size_1_rank_0.pt", buf.getvalue(), {})
    assert "refers to an object that is not a tensor storage" in refused(actor)


def _build_on_global(module: str, name: str, key: str, value: object) -> bytes:
    """A pickle that fetches a global and BUILDs it with slot state {key: value}."""
    body = pickle.dumps(key, 2)[2:-1] + pickle.dumps(value, 2)[2:-1]  # no PROTO, no STOP
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"N}" + body + b"s\x86b."


@pytest.mark.parametrize(
    "module,name,key,value,expected",
    [
        ("torch.distributed.tensor.placement_types", "Shard", "kind", "Replicate", "not parse"),
        ("torch._utils", "_rebuild_tensor_v2", "__defaults__", (1, 2), "tries to modify a"),
    ],
)
def test_a_pickle_cannot_modify_the_stand_ins(
    tmp_path: Path, module: str, name: str, key: str, value: object, expected: str
) -> None:
    from relex_stream import fsdp

    actor = tmp_path / "bad" / "actor"
    write_fsdp_config(actor, 1)
    data = _build_on_global(module, name, key, value)
    write_rank_file(actor / "model_world_size_1_rank_0.pt", data, {})
    assert expected in refused(actor)
    assert fsdp._SHARD.kind == "Shard"  # nothing leaked into later parses
    good, full = _crafted(tmp_path / "good")
    assert bits(read_all(open_fsdp_checkpoint(good).tensors["w"])) == bits(full)


def test_names_from_the_file_cannot_break_the_one_line_message(tmp_path: Path) -> None:
    actor = tmp_path / "actor"
    write_fsdp_config(actor, 1)
    data = b"\x80\x04\x8c\x02os\x8c\x0bsystem\nnext\x93."  # STACK_GLOBAL os."system\nnext"
    write_rank_file(actor / "model_world_size_1_rank_0.pt", data, {})
    assert "asks for 'os.system\\nnext'" in refused(actor)  # refused() checks: one line


# ---------------------------------------------------------------------------------------------
# Values a pickle or a zip directory can hold that no save writes (found by hand).


def _shared_tuple_pickle(levels: int, protocol: int, as_set: bool) -> bytes:
    """A pickle whose dict key (or frozenset element) is t_levels, t_i = (t_i-1, t_i-1): a few
    bytes per level, 2**levels nodes to hash (built by hand: building it in Python hashes it)."""
    data = bytes([0x80, protocol]) + b"})q\x00"  # EMPTY_DICT, EMPTY_TUPLE, BINPUT 0
    for i in range(1, levels + 1):
        get = b"h" + bytes([i - 1])  # BINGET i - 1
        data += get + get + b"\x86q" + bytes([i])  # TUPLE2, BINPUT i
    if as_set:
        return data + b"0(h" + bytes([levels]) + b"\x91."  # POP, MARK, BINGET, FROZENSET
    return data + b"K\x01s."  # BININT1 1, SETITEM


@pytest.mark.parametrize("as_set", [False, True])
def test_a_shared_tuple_as_a_key_is_refused_before_it_is_hashed(tmp_path: Path,
                                                                 as_set: bool) -> None:
    """Loading hashed the key in C, walking 2**100 nodes: a hang no signal could stop. The
    opcodes are now read first (pickle_guard); the same shape 10 levels deep, and pickles of
    every protocol with shared tuple keys, pass the guard."""
    from relex_stream.pickle_guard import costly_key

    actor = tmp_path / "actor"
    write_fsdp_config(actor, 1)
    write_rank_file(actor / "model_world_size_1_rank_0.pt",
                    _shared_tuple_pickle(100, 4 if as_set else 2, as_set), {})
    assert "to hash (a deeply shared structure)" in refused(actor)
    assert costly_key(_shared_tuple_pickle(10, 2, as_set)) is None
    shared = ("a", ("b", 1))
    obj = {shared: [shared, {"x": (1, 2)}], "k": frozenset({(1, 2), shared}), 3: 1.5}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        assert costly_key(pickle.dumps(obj, protocol=protocol)) is None


def test_a_mesh_layout_sharing_one_tuple_is_refused_not_walked() -> None:
    """A few pickle bytes can share one tuple 100 times per level, 8 levels deep (100**8
    leaves): refused at once, as is a product beyond MAX_WORLD_SIZE; real layouts pass."""
    from relex_stream import fsdp

    leaf: object = 1
    for _ in range(8):
        leaf = (leaf,) * 100
    for shape in (leaf, (fsdp.MAX_WORLD_SIZE, 2), 10**5000, (1, "2"), -1):
        with pytest.raises(fsdp._Refused, match="device mesh layout"):
            fsdp._flat_size(shape)
    assert fsdp._flat_size((2, (2, 3))) == 12
    assert fsdp._flat_size(8) == 8


def test_integers_beyond_str_and_shapes_beyond_the_format() -> None:
    """A 5,000-digit integer (no str() at all past 4,300 digits) is shown by its size; a shape
    or coordinate with a dimension over 2**62 or more than 16 dimensions is refused."""
    from relex_stream import fsdp

    assert fsdp._printable(10**5000) == f"<an integer of {(10**5000).bit_length()} bits>"
    assert fsdp._quoted(10**5000).startswith("<an integer")
    assert len(fsdp._printable("x" * 10_000)) <= 80
    assert fsdp._quoted("w") == "'w'"
    for value in ((1, 10**5000), (2**62 + 1,), (1,) * 17, (True,), (-1,)):
        with pytest.raises(fsdp._Refused, match="at most 16 integers"):
            fsdp._int_tuple(value, "a tensor's shape")
    assert fsdp._int_tuple((0, 2**62), "a tensor's shape") == (0, 2**62)


@pytest.mark.parametrize("offset", [2**64 - 1, 2**63, 10**6])
def test_a_zip_member_placed_outside_the_file_is_one_error(tmp_path: Path, offset: int) -> None:
    """A zip64 header offset past the file (2**64 - 1 made os.pread raise OverflowError)."""
    from relex_stream import fsdp

    path = tmp_path / "model_world_size_1_rank_0.pt"
    path.write_bytes(b"\0" * 4096)
    info = zipfile.ZipInfo("archive/data/0")
    info.header_offset, info.compress_type = offset, zipfile.ZIP_STORED
    info.file_size = info.compress_size = 8
    archive = fsdp._Archive(path, b"", {"0": info}, 4096, None)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(RelexError, match="outside the file"):
            fsdp._member_offset(fd, info, archive)
    finally:
        os.close(fd)


def test_a_fingerprint_without_serialization_id_is_read_back() -> None:
    """torch < 2.6 writes no .data/serialization_id: the fingerprint holds None, and the store
    must read back what it wrote (the next run refused its own store as malformed)."""
    from relex_stream.store_layout import _fingerprints

    entry = {"model_world_size_1_rank_0.pt": {"size": 10, "serialization_id": None}}
    assert _fingerprints(entry, "the base's fingerprints") == entry


def _raw_rank_file(tmp_path: Path, data: bytes) -> Path:
    actor = tmp_path / "actor"
    write_fsdp_config(actor, 1)
    write_rank_file(actor / "model_world_size_1_rank_0.pt", data, {})
    return actor


_COLLIDING = b"".join(  # ints k·(2^61 − 1) all hash to 0: building the dict is quadratic
    b"\x8a" + bytes([len(v)]) + v + b"N"
    for v in ((k * (2**61 - 1)).to_bytes(((k * (2**61 - 1)).bit_length() + 8) // 8, "little",
                                          signed=True) for k in range(1, 5001)))


@pytest.mark.parametrize("data, expected", [
    (b"\x80\x02\x8b" + (-5).to_bytes(4, "little", signed=True), "a negative length"),
    (b"\x80\x02T" + (-5).to_bytes(4, "little", signed=True), "a negative length"),
    (b"\x80\x02\x8b" + (-100).to_bytes(4, "little", signed=True), "a negative length"),
    (b"\x80\x02Nr" + (0x10000000).to_bytes(4, "little") + b".", "memo index out of sequence"),
    (b"\x80\x02}(" + _COLLIDING + b"u.", "that are not strings"),
    (b"\x80\x04" + b"\x8f" * (2**17 + 8) + b".", "more objects at once"),
], ids=["long4-back-onto-itself", "binstring-back", "long4-before-the-start", "memo-4-GB",
        "colliding-int-keys", "a-flood-of-sets"])  # fmt: skip
def test_pickles_that_would_hang_or_flood_memory_are_refused_first(tmp_path: Path, data: bytes,
                                                                   expected: str) -> None:
    """A 7-byte data.pkl looped the guard for ever (a negative length walked back onto its own
    opcode) or raised IndexError; 10 bytes made the unpickler size its memo at 4.4 GB; 1.9 MB
    of colliding int keys hung the load in C; 8 MiB of EMPTY_SETs took 2.2 GB. The opcode
    pass refuses each before the unpickler sees it; torch.save's own pickles pass it."""
    from relex_stream.pickle_guard import costly_key

    assert expected in refused(_raw_rank_file(tmp_path, data))
    for protocol in (2, 4):
        state = {f"layer.{i}.weight": (i, "x", [1.5]) for i in range(3000)}
        assert costly_key(pickle.dumps(state, protocol=protocol)) is None


@pytest.mark.parametrize("alias", [
    "model_world_size_2_rank_01.pt", "model_world_size_2_rank_1.pt\n",
    "model_world_size_2_rank_\u0661.pt", "model_world_size_02_rank_1.pt"])
def test_names_that_only_look_like_a_rank_file_are_not_one(tmp_path: Path, alias: str) -> None:
    """rank_01.pt, a name ending in a newline, or another script's digit stood in for rank 1
    (the last one listed won): a stale copy gave another step's piece, silently. verl writes
    one spelling, and only that one is a rank file."""
    actor, full = _crafted(tmp_path)
    (actor / alias).write_bytes(b"not a rank file")
    assert bits(read_all(open_fsdp_checkpoint(actor).tensors["w"])) == bits(full)
    (actor / "model_world_size_2_rank_1.pt").unlink()
    assert "model_world_size_2_rank_1.pt" in refused(actor)


def test_a_fifo_for_a_rank_file_is_not_waited_on(tmp_path: Path) -> None:
    """zipfile opened a rank file in blocking mode: a FIFO under its name hung the run."""
    from relex_stream import fsdp

    actor, _ = _crafted(tmp_path)
    fifo = actor / "model_world_size_2_rank_1.pt"
    fifo.unlink()
    os.mkfifo(fifo)
    assert "model_world_size_2_rank_1.pt" in refused(actor)
    with pytest.raises(RelexError, match="not a regular file"):
        fsdp._open_archive(fifo)  # listed as a file, swapped for a FIFO before it is opened


@pytest.mark.parametrize("name", ["", "__metadata__"])
def test_tensor_names_no_safetensors_header_takes_are_refused(tmp_path: Path, name: str) -> None:
    """A rank file's tensor named '' or '__metadata__' went into the output header: neither the
    safetensors library nor relex_stream could open the prediction (exit 0)."""
    from relex_stream.checkpoints import open_model
    from relex_stream.safetensors_io import HeaderProblem, check_tensor

    _crafted(tmp_path, name=name)
    with pytest.raises(RelexError, match="safetensors reserves or refuses"):
        open_model(tmp_path)
    with pytest.raises(HeaderProblem, match="overflows"):
        check_tensor("w", "F32", (2**62, 2**62, 0))
    check_tensor("w", "F32", (0, 2**62, 2**62))  # the parser's left-to-right product


def test_an_offset_too_long_to_print_is_one_line(tmp_path: Path) -> None:
    """A storage offset of 10**5000 made the refusal itself raise (str() stops at 4,300
    digits): a traceback, exit 1."""
    actor, _ = _crafted(tmp_path, claim_offset=10**5000)
    assert "points outside its stored data (offset <an integer" in refused(actor)


def test_a_safetensors_model_beside_fsdp_shards_is_warned_about(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A step holding model.safetensors and actor/ shards was read from the safetensors file
    without a word (a merge into the step is fine; a stray copy is another model)."""
    from safetensors.torch import save_file

    from relex_stream.checkpoints import find_model_dir

    _, full = _crafted(tmp_path)
    save_file({"w": full}, str(tmp_path / "model.safetensors"))
    with caplog.at_level("WARNING"):
        assert find_model_dir(tmp_path)[0] == "safetensors"
        find_model_dir(tmp_path)
    assert sum("verl FSDP shards" in r.getMessage() for r in caplog.records) == 1
