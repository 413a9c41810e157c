"""Reading verl FSDP checkpoints in place: where each tensor's bytes lie, found without running.

What verl writes (checked against verl's source: verl/utils/checkpoint/fsdp_checkpoint_manager.py
and verl/model_merger/fsdp_model_merger.py at v0.4.1, v0.5.0, v0.6.0, v0.7.0 and main as of
2026-01-29, 0.8.0.dev, whose sglang extra pins torch 2.9.1):

    global_step_N/actor/
        model_world_size_W_rank_R.pt         torch.save(model.state_dict()) of rank R, W = all ranks
        optim_world_size_W_rank_R.pt         optimizer shards (ignored here)
        extra_state_world_size_W_rank_R.pt   lr scheduler and RNG state (ignored here)
        fsdp_config.json                     {"FSDP_version": 1 or 2, "world_size": W}
        huggingface/                         config.json, generation_config.json (when the model
                                             has one), tokenizer or processor files, custom model
                                             code; full bf16 weights only with hf_model in
                                             checkpoint.save_contents
        lora_adapter/                        with LoRA only (not read here)

Each state dict maps names to DTensors: FSDP2 (`fully_shard`) always, FSDP1 because verl passes
a device mesh and SHARDED_STATE_DICT. verl's mesh is ("fsdp",) of W ranks, or ("ddp", "fsdp") of
(W // fsdp_size, fsdp_size) under HSDP, built row-major by init_device_mesh, so replica 0 is
ranks 0..fsdp_size-1 (the ranks verl's merger reads too). The shards are fp32 master weights.

Supported: FSDP1 and FSDP2; placements [Shard(0)] on a 1-D mesh, or [Replicate(), Shard(0)] on a
2-D (replicas, shards) mesh (HSDP), where only the files of replica 0 are opened. Shard(0) pieces
follow torch's ceil division, so the last ranks' pieces may be short or empty. Both ways torch
pickles a DeviceMesh are understood: with a `mesh` tensor (checked on files saved by torch 2.6
and 2.9.1) and with `_layout` (torch 2.13).

Refused with one line: other placements (Partial, tensor parallel, and Shard(1), which verl >= 0.6
FSDP2 uses for a tensor whose dim 0 the FSDP size does not divide but whose dim 1 it does),
ShardedTensor values (FSDP1 without a device mesh), plain tensors, checkpoints without
fsdp_config.json (verl before 0.4.1), compressed or non-zip files, and anything the pickle asks
for beyond the allow-list.

How: a rank file is an uncompressed zip holding data.pkl and data/<storage key> members. data.pkl
is parsed by a restricted unpickler: every global it names is looked up in a short allow-list of
torch rebuild functions, DTensor classes and placements (`_resolve_global`), each replaced by an
inert stand-in that only records its arguments; any other global stops the parse before it is
ever called. That yields, per tensor, its storage key and element offset, dtype, local shape and
stride, placements and global shape. The zip's own local headers then give the absolute byte
offset of each storage member, so the engine can pread exactly the bytes it needs.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import re
import stat
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import RelexError
from .jsonfile import load_json_object, show
from .pickle_guard import costly_key
from .safetensors_io import DTYPES, MAX_DIM, MAX_NDIM, TORCH_TO_CODE
from .tensor_files import Piece, TensorInfo

FSDP_CONFIG = "fsdp_config.json"
# the names verl writes (f"model_world_size_{W}_rank_{r}.pt") and nothing else: rank_01.pt,
# a trailing newline or another script's digits would otherwise stand in for rank 1
RANK_FILE_RE = re.compile(r"model_world_size_(0|[1-9][0-9]*)_rank_(0|[1-9][0-9]*)\.pt", re.ASCII)
# Ranks of one save: far above any training job (the largest run on ~10^5 GPUs); a world size
# from a file is a count of files to look for, so it is bounded before anything is listed.
MAX_WORLD_SIZE = 1 << 20
_STORAGE_KEY_RE = re.compile(r"[A-Za-z0-9_.]+")
_PICKLE_MEMBER_RE = re.compile(r"[^/]+/data\.pkl")
_MAX_PICKLE_BYTES = 64 * 2**20  # a 70B model's data.pkl is a few MB
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, (skipped fields), name length, extra length
_LOCAL_MAGIC = b"PK\x03\x04"
_MERGE_HINT = "convert it to Hugging Face safetensors first (python -m verl.model_merger merge)"


@dataclass(frozen=True)
class FsdpCheckpoint:
    """One verl FSDP checkpoint directory (step/actor): where every tensor's pieces lie."""

    directory: Path
    world_size: int
    fsdp_version: int
    tensors: dict[str, TensorInfo]  # in the state dict's order
    files: tuple[Path, ...]  # the rank files read: replica 0, in rank order
    config_dir: Path | None  # directory/huggingface when it holds config.json


# ---------------------------------------------------------------------------------------------
# The restricted unpickler: inert stand-ins for the few globals a DTensor state dict names.


def _printable(value: object) -> str:
    """Text from a file, safe in a one-line message: as is when printable, else its repr; cut
    short when long (an int of 5,000 digits has no str() at all)."""
    if isinstance(value, int) and abs(value) >= 10**30:
        return f"<an integer of {value.bit_length()} bits>"
    text = str(value) if isinstance(value, (str, int)) else type(value).__name__
    text = text if text.isprintable() else repr(text)
    return text if len(text) <= 80 else text[:76] + "..."


def _quoted(value: object) -> str:
    """A name from a file in a one-line message: a string quoted (repr, cut short), anything
    else as _printable shows it."""
    return show(value) if isinstance(value, str) else _printable(value)


class _Refused(Exception):
    """The pickle is not a verl DTensor state dict; the message says why (without the path)."""


class _Stub:
    """An object of an allowed class named by a pickle: its arguments and state, never run."""

    kind = "object"

    def __new__(cls, *args: object) -> _Stub:  # NEWOBJ: cls.__new__(cls, *args)
        obj = super().__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args: object) -> None:  # REDUCE: cls(*args); __new__ kept the args
        pass

    def __setstate__(self, state: object) -> None:  # BUILD (on a class: a TypeError, refused)
        self.state = state

    def fields(self) -> dict:
        """The attributes the pickle gave this object (dict state, slot state, or both)."""
        return _merge_state(self.state)


def _stub_class(kind: str) -> type[_Stub]:
    return type(f"_{kind}Stub", (_Stub,), {"kind": kind})


class _Inert:
    """A stand-in function handed to a pickle: callable, with no attributes it could change.

    BUILD on a plain function would set its attributes (__defaults__ even) for every later parse.
    """

    __slots__ = ("_fn",)

    def __init__(self, fn: Any) -> None:
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args: object) -> object:  # REDUCE passes positional arguments only
        return self._fn(*args)

    def __setattr__(self, name: str, value: object) -> None:
        raise _Refused("its pickle tries to modify a function")


_DTENSOR, _SPEC, _META, _MESH = (_stub_class(k) for k in ("DTensor", "Spec", "Meta", "Mesh"))
_LAYOUT, _FLAT, _ORDER, _DEVICE = (_stub_class(k) for k in ("Layout", "Flat", "Order", "Device"))
_SHARD, _REPLICATE, _PARTIAL = (_stub_class(k) for k in ("Shard", "Replicate", "Partial"))
_STRIDED = _stub_class("StridedShard")


@dataclass(frozen=True)
class _DType:
    """A torch dtype named by a pickle; code is None for dtypes relex_stream does not read."""

    name: str
    code: str | None


@dataclass(frozen=True)
class _StorageType:
    """A typed-storage class named by a pickle (torch.FloatStorage, ...)."""

    name: str
    code: str | None


@dataclass(frozen=True)
class _Storage:
    """A storage the pickle refers to: archive member data/<key> of `numel` elements."""

    key: str
    dtype: _StorageType
    numel: int


@dataclass(frozen=True)
class _Local:
    """A plain tensor (from _rebuild_tensor_v2): a strided view of a storage."""

    storage: _Storage
    offset: int  # in elements of the storage
    shape: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(frozen=True)
class _Wrapper:
    """_rebuild_wrapper_subclass's arguments: the DTensor's own (global) dtype and shape."""

    cls: object
    dtype: object
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _DTensorRecord:
    """A DTensor: its wrapper arguments and its state (_local_tensor and _spec)."""

    wrapper: _Wrapper
    state: object


def _merge_state(state: object) -> dict:
    """Pickled object state as one dict: a dict, (dict, slots dict), or None."""
    if state is None:
        return {}
    if isinstance(state, dict):
        return state
    if isinstance(state, tuple) and len(state) == 2:
        merged: dict = {}
        for part in state:
            if part is not None and not isinstance(part, dict):
                raise _Refused("an object's pickled state is not a dict")
            merged.update(part or {})
        return merged
    raise _Refused("an object's pickled state is not a dict")


def _int_tuple(value: object, what: str) -> tuple[int, ...]:
    """A tuple of at most MAX_NDIM non-negative ints up to MAX_DIM (the bounds of a safetensors
    shape), or refuse (bools are not sizes)."""
    if not isinstance(value, (tuple, list)) or len(value) > MAX_NDIM or not all(
            type(v) is int and 0 <= v <= MAX_DIM for v in value):
        raise _Refused(f"{what} is not a tuple of at most {MAX_NDIM} integers in [0, 2**62]")
    return tuple(value)


def _rebuild_tensor_v2(
    storage: object,
    offset: object,
    size: object,
    stride: object,
    requires_grad: object = False,
    hooks: object = None,
    metadata: object = None,
) -> _Local:
    """Stand-in for torch._utils._rebuild_tensor_v2: record where the tensor lies."""
    if not isinstance(storage, _Storage) or type(offset) is not int or offset < 0:
        raise _Refused("a tensor has a bad storage or storage offset")
    shape, strides = _int_tuple(size, "a tensor's shape"), _int_tuple(stride, "a tensor's stride")
    if len(shape) != len(strides):
        raise _Refused("a tensor's shape and stride have different lengths")
    return _Local(storage, offset, shape, strides)


def _rebuild_wrapper_subclass(cls: object, dtype: object, size: object, *_: object) -> _Wrapper:
    """Stand-in for torch._utils._rebuild_wrapper_subclass (a DTensor's outer tensor)."""
    return _Wrapper(cls, dtype, _int_tuple(size, "a DTensor's shape"))


_WRAPPER_FN = _Inert(_rebuild_wrapper_subclass)


def _rebuild_from_type_v2(func: object, new_type: object, args: object, state: object) -> object:
    """Stand-in for torch._tensor._rebuild_from_type_v2: only DTensor wrappers are accepted."""
    if func is not _WRAPPER_FN or new_type is not _DTENSOR:
        raise _Refused("it holds a tensor subclass other than DTensor")
    if not isinstance(args, tuple) or len(args) < 3:
        raise _Refused("a DTensor's arguments are malformed")
    return _DTensorRecord(_rebuild_wrapper_subclass(*args), state)


def _size(dims: object = ()) -> tuple[int, ...]:
    """Stand-in for torch.Size."""
    return _int_tuple(dims, "a torch.Size")


def _get_layout(name: object) -> object:
    """Stand-in for torch.serialization._get_layout: keep the layout's name."""
    return name


_SHARDED_TENSOR_HINT = (
    "it holds ShardedTensor values (FSDP1 without a device mesh), not DTensors; " + _MERGE_HINT
)

# Every global a verl DTensor state dict names (seen in files saved by torch 2.6, 2.9.1 and 2.13),
# plus the torch.distributed._tensor paths under which torch <= 2.4 defined the same classes.
_TENSOR_PKGS = ("torch.distributed.tensor", "torch.distributed._tensor")
_ALLOWED: dict[str, object] = {
    "collections.OrderedDict": OrderedDict,  # the state dict itself and empty hook dicts
    "torch._utils._rebuild_tensor_v2": _Inert(_rebuild_tensor_v2),
    "torch._utils._rebuild_wrapper_subclass": _WRAPPER_FN,
    "torch._tensor._rebuild_from_type_v2": _Inert(_rebuild_from_type_v2),
    "torch.Size": _Inert(_size),
    "torch.device": _DEVICE,
    "torch.serialization._get_layout": _Inert(_get_layout),
    "torch.distributed.tensor.DTensor": _DTENSOR,
    "torch.distributed._tensor.api.DTensor": _DTENSOR,
    "torch.distributed.device_mesh.DeviceMesh": _MESH,
    "torch.distributed._tensor.device_mesh.DeviceMesh": _MESH,
    "torch.distributed._mesh_layout._MeshLayout": _LAYOUT,
    "torch.distributed._mesh_layout._FlatLayout": _FLAT,
    **{
        f"{pkg}.{mod}.{name}": stub
        for pkg in _TENSOR_PKGS
        for mod in ("_dtensor_spec", "placement_types")
        for name, stub in (("DTensorSpec", _SPEC), ("TensorMeta", _META))
    },
    "torch.distributed.tensor._dtensor_spec.ShardOrderEntry": _ORDER,
    **{
        f"{pkg}.placement_types.{name}": stub
        for pkg in _TENSOR_PKGS
        for name, stub in (
            ("Shard", _SHARD),
            ("Replicate", _REPLICATE),
            ("Partial", _PARTIAL),
            ("_Partial", _PARTIAL),
            ("_StridedShard", _STRIDED),
        )
    },
}
_KNOWN_REFUSALS = {
    "torch.distributed._shard.sharded_tensor.api.ShardedTensor": _SHARDED_TENSOR_HINT,
    "torch.distributed._shard.sharded_tensor.ShardedTensor": _SHARDED_TENSOR_HINT,
}
_STORAGE_CODES = {
    "DoubleStorage": "F64",
    "FloatStorage": "F32",
    "HalfStorage": "F16",
    "BFloat16Storage": "BF16",
    "LongStorage": "I64",
    "IntStorage": "I32",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
}
# Names only (vars, not getattr, so no lazy torch submodule is imported while parsing).
_TORCH_DTYPES = {n: v for n, v in vars(torch).items() if isinstance(v, torch.dtype)}
_TORCH_STORAGES = frozenset(n for n in vars(torch) if n.endswith("Storage"))


def _resolve_global(module: str, name: str) -> object:
    """The inert stand-in for a global the pickle names, or refuse it (it is never imported)."""
    full = f"{module}.{name}"
    if full in _ALLOWED:
        return _ALLOWED[full]
    if module == "torch" and name in _TORCH_DTYPES:
        return _DType(name, TORCH_TO_CODE.get(_TORCH_DTYPES[name]))
    if module == "torch" and name in _TORCH_STORAGES:
        return _StorageType(name, _STORAGE_CODES.get(name))
    if full in _KNOWN_REFUSALS:
        raise _Refused(_KNOWN_REFUSALS[full])
    raise _Refused(
        f"its pickle asks for {_printable(full)}, which a verl FSDP state dict never needs; "
        "refusing to unpickle it (it could run code); check where this file came from"
    )


def _storage_from_pid(pid: object) -> _Storage:
    """torch.save's persistent id ('storage', storage type, key, location, numel) -> _Storage."""
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
        raise _Refused("it refers to an object that is not a tensor storage")
    _, storage_type, key, _location, numel = pid
    if not isinstance(storage_type, _StorageType) or not isinstance(key, str):
        raise _Refused("a storage reference is malformed")
    if type(numel) is not int or numel < 0 or not _STORAGE_KEY_RE.fullmatch(key):
        raise _Refused(f"storage {_quoted(key)} has a bad name or size")
    return _Storage(key, storage_type, numel)


class _Unpickler(pickle.Unpickler):
    """Unpickle with every global swapped for an inert stand-in from the allow-list."""

    def find_class(self, module: str, name: str) -> Any:
        return _resolve_global(module, name)

    def persistent_load(self, pid: Any) -> Any:
        return _storage_from_pid(pid)


def _unpickle(data: bytes, path: Path) -> object:
    """Parse data.pkl bytes with the restricted unpickler; any problem is a RelexError."""
    reason = costly_key(data)
    if reason is not None:
        raise RelexError(f"{path}: its pickle is not a state dict: {reason}; check where this "
                         "file came from")
    try:
        return _Unpickler(io.BytesIO(data)).load()
    except _Refused as exc:
        raise RelexError(f"{path}: {exc}") from None
    except Exception as exc:  # untrusted bytes: any failure to parse means a corrupt file
        raise RelexError(
            f"{path} is corrupt or truncated: its pickle does not parse ({type(exc).__name__}); "
            "re-copy it from the training run"
        ) from None


# ---------------------------------------------------------------------------------------------
# The zip archive around data.pkl: members, their absolute offsets, and checks.


@dataclass(frozen=True)
class _Archive:
    """A rank file's zip directory: data.pkl's bytes and the storage members by key."""

    path: Path
    pickle: bytes
    storages: dict[str, zipfile.ZipInfo]  # storage key -> member
    size: int
    serialization_id: str | None  # torch.save's id of this save (torch >= 2.6 writes one)


def _check_stored(info: zipfile.ZipInfo, path: Path) -> None:
    """Refuse a compressed, encrypted or inconsistent member: its bytes could not be pread."""
    if info.flag_bits & 0x1:
        raise RelexError(
            f"{path}: member {_printable(info.filename)} is encrypted; re-save the checkpoint"
        )
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        raise RelexError(
            f"{path}: member {_printable(info.filename)} is compressed, so its bytes cannot be "
            "read in place (torch.save never compresses); re-save the checkpoint with torch.save"
        )


def _pickle_member(zf: zipfile.ZipFile, path: Path) -> tuple[str, zipfile.ZipInfo]:
    """The archive's top folder and its data.pkl member (torch names it <stem>/data.pkl)."""
    found = [i for i in zf.infolist() if _PICKLE_MEMBER_RE.fullmatch(i.filename)]
    if len(found) != 1:
        raise RelexError(f"{path} is not a torch.save checkpoint: it has no single data.pkl")
    return found[0].filename.split("/")[0], found[0]


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, path: Path) -> bytes:
    """A small stored member's bytes (CRC-checked by zipfile)."""
    _check_stored(info, path)
    if info.file_size > limit:
        raise RelexError(
            f"{path}: {_printable(info.filename)} is implausibly large ({info.file_size} bytes)"
        )
    return zf.read(info)


def _open_archive(path: Path) -> _Archive:
    """Read a rank file's zip directory and data.pkl (no weight bytes)."""
    try:
        # never waited on: a FIFO swapped in for a rank file after it was listed
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        handle = os.fdopen(fd, "rb")
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            handle.close()
            raise RelexError(f"{path} is not a regular file; a torch rank file is expected")
        size = info.st_size
        with handle, zipfile.ZipFile(handle) as zf:
            prefix, pkl = _pickle_member(zf, path)
            data = _read_member(zf, pkl, _MAX_PICKLE_BYTES, path)
            members = {i.filename: i for i in zf.infolist()}
            order = members.get(f"{prefix}/byteorder")
            if order is not None and _read_member(zf, order, 16, path) != b"little":
                raise RelexError(f"{path} was saved on a big-endian machine; re-save it")
            save_id = members.get(f"{prefix}/.data/serialization_id")
            if save_id is not None:
                save_id = _read_member(zf, save_id, 64, path).decode("ascii", "replace")
    except OSError as exc:
        raise RelexError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError, struct.error):
        raise RelexError(
            f"{path} is not a readable zip-format torch checkpoint (truncated, corrupt, or saved "
            "by torch < 1.6); re-copy it from the training run"
        ) from None
    storage_dir = f"{prefix}/data/"
    storages = {
        name[len(storage_dir) :]: info
        for name, info in members.items()
        if name.startswith(storage_dir)
    }
    return _Archive(path, data, storages, size, save_id)


def _member_offset(fd: int, info: zipfile.ZipInfo, archive: _Archive) -> int:
    """Absolute byte offset of a stored member's data: after its local header, name and extra.

    The local header's extra field (torch pads it to align data) can differ from the central
    directory's, so it is read from the local header itself.
    """
    path = archive.path
    _check_stored(info, path)
    if not 0 <= info.header_offset <= archive.size - _LOCAL_HEADER.size:
        raise RelexError(f"{path} is corrupt: its zip directory places member "
                         f"{_printable(info.filename)} outside the file; re-copy it")
    raw = os.pread(fd, _LOCAL_HEADER.size, info.header_offset)
    if len(raw) < _LOCAL_HEADER.size:
        raise RelexError(f"{path} is truncated (member {_printable(info.filename)}); re-copy it")
    magic, name_len, extra_len = _LOCAL_HEADER.unpack(raw)
    name = os.pread(fd, name_len, info.header_offset + _LOCAL_HEADER.size)
    if magic != _LOCAL_MAGIC or name != info.orig_filename.encode("utf-8", "replace"):
        raise RelexError(f"{path} is corrupt: its zip directory disagrees with member data")
    start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    if start + info.file_size > archive.size:
        raise RelexError(f"{path} is truncated (member {_printable(info.filename)}); re-copy it")
    return start


# ---------------------------------------------------------------------------------------------
# From unpickled records to one rank's shard descriptions.


@dataclass(frozen=True)
class _Shard:
    """What one rank file says about one tensor: dtype, global shape, layout, local piece."""

    name: str
    dtype: str  # safetensors code
    shape: tuple[int, ...]  # global
    placements: tuple[str, ...]  # e.g. ("Replicate()", "Shard(0)")
    mesh_shape: tuple[int, ...] | None  # None when this torch's DeviceMesh is not understood
    coordinate: tuple[int, ...] | None  # this rank's place on the mesh
    local: _Local


def _placement(stub: object) -> str:
    """A placement as text: Shard(0), Replicate(), Partial(sum), _StridedShard(...)."""
    if not isinstance(stub, _Stub):
        raise _Refused("a DTensor placement is malformed")
    fields, args = stub.fields(), stub.args
    if stub.kind == "Replicate":
        return "Replicate()"
    if stub.kind == "Shard":
        return f"Shard({_printable(fields.get('dim', args[0] if args else '?'))})"
    if stub.kind == "Partial":
        return f"Partial({_printable(fields.get('reduce_op', args[0] if args else 'sum'))})"
    if stub.kind == "StridedShard":
        return f"_StridedShard(dim={_printable(fields.get('dim', '?'))})"
    raise _Refused(f"a DTensor placement is a {stub.kind}")


def _flat_size(shape: object) -> int:
    """Number of ranks along a _FlatLayout axis: the product of its (nested) shape.

    Walked with a budget of nodes: a pickle can share one tuple many times over, so a few
    bytes may describe 100**8 leaves (a budget on depth alone does not stop that)."""
    size, budget, stack = 1, 4096, [(shape, 0)]
    while stack:
        item, depth = stack.pop()
        budget -= 1
        if budget < 0 or depth > 8:
            raise _Refused("a device mesh layout is malformed")
        if type(item) is int and 0 <= item <= MAX_WORLD_SIZE:
            size *= item
            if size > MAX_WORLD_SIZE:
                raise _Refused("a device mesh layout is malformed")
        elif isinstance(item, tuple):
            stack.extend((child, depth + 1) for child in item)
        else:
            raise _Refused("a device mesh layout is malformed")
    return size


def _mesh_shape(fields: dict) -> tuple[int, ...] | None:
    """The mesh's shape: its `mesh` tensor (torch <= 2.9) or its `_layout` axes (2.10+)."""
    mesh, layout = fields.get("mesh"), fields.get("_layout")
    if isinstance(mesh, _Local):
        return mesh.shape
    if isinstance(layout, _Stub) and layout.kind == "Layout":
        axes = layout.fields().get("axes", layout.args[0] if layout.args else None)
        if isinstance(axes, tuple) and all(isinstance(a, _Stub) for a in axes):
            return tuple(_flat_size(a.fields().get("shape")) for a in axes)
    return None


def _mesh_info(mesh: object) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
    """(mesh shape, this rank's coordinate), each None when the pickle does not say."""
    if not isinstance(mesh, _Stub) or mesh.kind != "Mesh":
        raise _Refused("a DTensor's device mesh is malformed")
    fields = mesh.fields()
    coordinate = fields.get("_coordinate_on_dim")
    if coordinate is not None:
        coordinate = _int_tuple(coordinate, "a mesh coordinate")
    return _mesh_shape(fields), coordinate


def _dtype_code(dtype: object, name: str) -> str:
    """The safetensors code of a DTensor's dtype, or refuse an unsupported one."""
    if not isinstance(dtype, _DType):
        raise _Refused(f"tensor {_quoted(name)} has a malformed dtype")
    if dtype.code is None:
        raise _Refused(
            f"tensor {_quoted(name)} has dtype {dtype.name}, which relex_stream does not "
            "support; " + _MERGE_HINT
        )
    return dtype.code


def _shard_of(name: str, record: _DTensorRecord) -> _Shard:
    """One DTensor record -> _Shard, checking that its parts are what a DTensor holds."""
    state = _merge_state(record.state)
    local, spec = state.get("_local_tensor"), state.get("_spec")
    if record.wrapper.cls is not _DTENSOR or not isinstance(local, _Local):
        raise _Refused(f"tensor {_quoted(name)} is a malformed DTensor")
    if not isinstance(spec, _Stub) or spec.kind != "Spec":
        raise _Refused(f"tensor {_quoted(name)} is a malformed DTensor (no spec)")
    spec_fields = spec.fields()
    placements = spec_fields.get("placements")
    if not isinstance(placements, tuple) or not placements:
        raise _Refused(f"tensor {_quoted(name)} has no placements")
    mesh_shape, coordinate = _mesh_info(spec_fields.get("mesh"))
    meta = spec_fields.get("tensor_meta")
    if isinstance(meta, _Stub) and meta.args and _size(meta.args[0]) != record.wrapper.shape:
        raise _Refused(f"tensor {_quoted(name)} has two different global shapes in its DTensor")
    dtype = _dtype_code(record.wrapper.dtype, name)
    if local.storage.dtype.code != dtype:
        raise _Refused(
            f"tensor {_quoted(name)} is {dtype} but its storage is a {local.storage.dtype.name}"
        )
    return _Shard(
        name=name,
        dtype=dtype,
        shape=record.wrapper.shape,
        placements=tuple(_placement(p) for p in placements),
        mesh_shape=mesh_shape,
        coordinate=coordinate,
        local=local,
    )


def _shards_of(obj: object) -> dict[str, _Shard]:
    """The unpickled state dict -> tensor name -> _Shard, in the state dict's order."""
    if not isinstance(obj, dict) or not obj:
        raise _Refused("it does not hold a model state dict (a non-empty dict of tensors)")
    shards: dict[str, _Shard] = {}
    for name, value in obj.items():
        if not isinstance(name, str):
            raise _Refused(f"its state dict has a non-string key {_quoted(name)}")
        if isinstance(value, _Local):
            raise _Refused(
                f"tensor {_quoted(name)} is a plain tensor, not a DTensor shard, so how it is "
                f"split is unknown; {_MERGE_HINT}"
            )
        if not isinstance(value, _DTensorRecord):
            raise _Refused(f"entry {_quoted(name)} of its state dict is not a tensor")
        shards[name] = _shard_of(name, value)
    return shards


def _read_rank(path: Path) -> tuple[_Archive, dict[str, _Shard]]:
    """Open one rank file and describe its tensors (reads data.pkl only)."""
    archive = _open_archive(path)
    obj = _unpickle(archive.pickle, path)
    try:
        return archive, _shards_of(obj)
    except _Refused as exc:
        raise RelexError(f"{path}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# The checkpoint directory: fsdp_config.json, rank files, the replica group, the pieces.


def _read_fsdp_config(directory: Path) -> tuple[int, int]:
    """(FSDP_version, world_size) from directory/fsdp_config.json."""
    path = directory / FSDP_CONFIG
    example = '{"FSDP_version": 2, "world_size": W}'
    if not path.is_file():
        raise RelexError(
            f"{directory} has FSDP rank files but no {FSDP_CONFIG} (verl before 0.4.1 did not "
            f"write one); create it as {example} with W the number of ranks that saved it"
        )
    # bounded, strict, never waited on (a FIFO), nesting limited: as every JSON input is read
    config = load_json_object(path, "verl's FSDP config")
    version, world = config.get("FSDP_version"), config.get("world_size")
    if type(world) is not int or not 1 <= world <= MAX_WORLD_SIZE:
        raise RelexError(f"{path}: world_size must be an integer from 1 to {MAX_WORLD_SIZE:,}, "
                         f"got {_printable(world)}")
    if version not in (1, 2) or type(version) is not int:
        raise RelexError(f"{path}: FSDP_version must be 1 or 2, got {_printable(version)}")
    return version, world


def _rank_files(directory: Path, world_size: int) -> dict[int, Path]:
    """Rank -> model rank file, checking the file names agree with the configured world size."""
    found: dict[int, Path] = {}
    sizes: set[int] = set()
    for path in directory.iterdir():
        match = RANK_FILE_RE.fullmatch(path.name)
        if match and path.is_file():  # a FIFO under a rank file's name is not one
            sizes.add(int(match.group(1)))
            found[int(match.group(2))] = path
    if not found:
        raise RelexError(f"{directory} holds no model_world_size_*_rank_*.pt files")
    if sizes != {world_size}:
        named = ", ".join(str(s) for s in sorted(sizes))
        raise RelexError(
            f"{directory}: {FSDP_CONFIG} says world size {world_size} but the rank files are "
            f"named for world size {named}; remove stale rank files or fix {FSDP_CONFIG}"
        )
    if max(found) >= world_size:
        raise RelexError(
            f"{directory} has a rank file for rank {max(found)}, beyond world size "
            f"{world_size}; remove it or fix {FSDP_CONFIG}"
        )
    return found


def _require(files: dict[int, Path], ranks: range, directory: Path, world_size: int) -> None:
    """Refuse before parsing if a needed rank file is missing."""
    missing = [r for r in ranks if r not in files]
    if missing:
        name = f"model_world_size_{world_size}_rank_{missing[0]}.pt"
        raise RelexError(
            f"{directory} lacks {name} ({len(missing)} needed rank file(s) missing); copy the "
            "whole checkpoint directory"
        )


def _group_size(shard: _Shard, world_size: int, path: Path) -> int:
    """How many ranks hold one replica of the model, from a tensor's placements and mesh."""
    if shard.placements not in (("Shard(0)",), ("Replicate()", "Shard(0)")):
        raise _placement_refusal(shard, path)
    mesh = shard.mesh_shape
    if mesh is None:
        if len(shard.placements) == 1:
            return world_size  # a 1-D mesh spans every rank
        raise RelexError(
            f"{path}: cannot tell the HSDP mesh shape of tensor {_quoted(shard.name)} (a "
            f"DeviceMesh this version of relex_stream does not understand); {_MERGE_HINT}"
        )
    if len(mesh) != len(shard.placements):
        raise RelexError(
            f"{path}: tensor {_quoted(shard.name)} has {len(shard.placements)} placement(s) "
            f"but a mesh of shape {list(mesh)}; the file is corrupt; re-copy it from the training "
            "run"
        )
    if math.prod(mesh) != world_size:
        raise RelexError(
            f"{path}: tensor {_quoted(shard.name)} lives on a mesh of shape {list(mesh)} but "
            f"{FSDP_CONFIG} says world size {world_size}; fix {FSDP_CONFIG}"
        )
    return mesh[-1]


def _placement_refusal(shard: _Shard, path: Path) -> RelexError:
    """Why a tensor's placements cannot be read as dim-0 pieces, and what to do instead."""
    split = [
        p for p in shard.placements if p.startswith(("Shard(", "_Strided")) and p != "Shard(0)"
    ]
    if split:
        why = (
            f"it is split on another dim ({split[0]}: verl >= 0.6 shards each tensor on the first "
            "dim the FSDP size divides, and tensor parallelism splits others)"
        )
    elif any(p.startswith("Partial") for p in shard.placements):
        why = "each rank holds a partial sum"
    else:
        why = "it is not split on dim 0 over its mesh's last dim"
    return RelexError(
        f"{path}: tensor {_quoted(shard.name)} has placements "
        f"[{', '.join(shard.placements)}]: {why}; "
        "relex_stream reads only dim-0 FSDP shards ([Shard(0)], or [Replicate(), Shard(0)] "
        "under HSDP); convert the checkpoint to Hugging Face safetensors first "
        "(python -m verl.model_merger merge --backend fsdp)"
    )


def _expected_rows(rows: int, shards: int, index: int) -> int:
    """Rows of dim 0 that shard `index` of `shards` holds: torch's Shard(0) ceil division."""
    chunk = -(-rows // shards)
    return max(0, min(rows, (index + 1) * chunk) - index * chunk)


def _check_piece(shard: _Shard, ref: _Shard, index: int, shards: int, path: Path) -> int:
    """Check rank `index`'s piece of a tensor against rank 0's description; its numel."""
    if (shard.dtype, shard.shape, shard.placements) != (ref.dtype, ref.shape, ref.placements):
        raise RelexError(
            f"{path}: tensor {_quoted(ref.name)} is {shard.dtype} {list(shard.shape)} "
            f"[{', '.join(shard.placements)}] here but {ref.dtype} {list(ref.shape)} "
            f"[{', '.join(ref.placements)}] in rank 0; the rank files are from different saves"
        )
    if not ref.shape:
        raise RelexError(
            f"{path}: tensor {_quoted(ref.name)} is a scalar, which cannot be Shard(0)")
    rows = _expected_rows(ref.shape[0], shards, index)
    expected = (rows, *ref.shape[1:])
    if shard.local.shape != expected:
        raise RelexError(
            f"{path}: its piece of tensor {_quoted(ref.name)} has shape "
            f"{list(shard.local.shape)} where "
            f"{list(expected)} was expected (shard {index} of {shards} of a {list(ref.shape)} "
            "tensor), so the pieces do not add up to the tensor; the file is corrupt or from "
            "another save"
        )
    if not _is_contiguous(shard.local.shape, shard.local.stride):
        raise RelexError(
            f"{path}: its piece of tensor {_quoted(ref.name)} has strides "
            f"{list(shard.local.stride)}, "
            f"not contiguous; {_MERGE_HINT}"
        )
    return math.prod(expected)


def _is_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """C-contiguous as torch defines it: dims of size 1 may have any stride; empty always is."""
    if math.prod(shape) == 0:
        return True
    expected = 1
    for size, step in zip(reversed(shape), reversed(stride), strict=True):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True


def _member_starts(archive: _Archive, keys: set[str]) -> dict[str, int]:
    """Absolute data offsets of the named storage members (absent keys are left out)."""
    try:
        fd = os.open(archive.path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO is not waited on
    except OSError as exc:
        raise RelexError(f"cannot read {archive.path}: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RelexError(f"{archive.path} is not a regular file")
        return {
            key: _member_offset(fd, archive.storages[key], archive)
            for key in sorted(keys)
            if key in archive.storages
        }
    finally:
        os.close(fd)


def _piece(shard: _Shard, numel: int, archive: _Archive, starts: dict[str, int]) -> Piece:
    """Where a checked local piece's bytes lie, after checking they lie inside its member."""
    storage, path, name = shard.local.storage, archive.path, shard.name
    itemsize = DTYPES[shard.dtype][1].itemsize
    info = archive.storages.get(storage.key)
    if info is None:
        raise RelexError(
            f"{path} lacks the data of tensor {_quoted(name)} (storage {storage.key})")
    if shard.local.offset + numel > storage.numel or storage.numel * itemsize > info.file_size:
        raise RelexError(
            f"{path}: tensor {_quoted(name)} points outside its stored data (offset "
            f"{_printable(shard.local.offset)}, {numel} elements, {info.file_size} bytes "
            "stored); the file is corrupt or crafted; re-copy it from the training run"
        )
    return Piece(path, starts[storage.key] + shard.local.offset * itemsize, numel)


def _check_coordinates(
    per_rank: list[dict[str, _Shard]], archives: list[_Archive], hsdp: bool
) -> None:
    """Each file read must sit at (0, j) (HSDP) or (j,) on the mesh, j its shard index."""
    for index, (shards, archive) in enumerate(zip(per_rank, archives, strict=True)):
        expected = (0, index) if hsdp else (index,)
        for shard in shards.values():
            if shard.coordinate is not None and shard.coordinate != expected:
                raise RelexError(
                    f"{archive.path}: tensor {_quoted(shard.name)} sits at mesh coordinate "
                    f"{list(shard.coordinate)}, expected {list(expected)}; the rank files are "
                    "misnamed or from a mesh that is not row-major"
                )


def _check_names(per_rank: list[dict[str, _Shard]], archives: list[_Archive]) -> None:
    """Every rank file read must hold the same tensor names as rank 0."""
    names = set(per_rank[0])
    for shards, archive in zip(per_rank[1:], archives[1:], strict=True):
        if set(shards) != names:
            extra, lacking = sorted(set(shards) - names), sorted(names - set(shards))
            what = (f"has extra tensor {_quoted(extra[0])}" if extra
                    else f"lacks tensor {_quoted(lacking[0])}")
            raise RelexError(
                f"{archive.path} {what} compared with rank 0; the rank files are from "
                "different saves"
            )


def _assemble(per_rank: list[dict[str, _Shard]], archives: list[_Archive]) -> dict:
    """Tensor name -> TensorInfo, from the rank files of one replica, in rank order."""
    # one open per file, not one per tensor per file: thousands of ranks stay under ulimit -n
    starts = [
        _member_starts(archive, {s.local.storage.key for s in shards.values()})
        for shards, archive in zip(per_rank, archives, strict=True)
    ]
    tensors: dict[str, TensorInfo] = {}
    for name, ref in per_rank[0].items():
        pieces = []
        for index, (shards, archive) in enumerate(zip(per_rank, archives, strict=True)):
            numel = _check_piece(shards[name], ref, index, len(archives), archive.path)
            if numel:  # an empty piece (a short tensor's last ranks) holds no bytes
                pieces.append(_piece(shards[name], numel, archive, starts[index]))
        if sum(p.numel for p in pieces) != math.prod(ref.shape):
            raise RelexError(f"the pieces of tensor {_quoted(name)} do not add up to its shape")
        tensors[name] = TensorInfo(name, ref.dtype, ref.shape, tuple(pieces))
    return tensors


def open_fsdp_checkpoint(actor_dir: Path) -> FsdpCheckpoint:
    """Describe every tensor of a verl FSDP checkpoint as pieces of its rank files.

    Reads fsdp_config.json and each needed rank file's zip directory and data.pkl; no weight
    bytes. Under HSDP only the files of replica 0 are opened.
    """
    actor_dir = Path(actor_dir)
    if not actor_dir.is_dir():
        raise RelexError(f"FSDP checkpoint directory {actor_dir} does not exist")
    version, world_size = _read_fsdp_config(actor_dir)
    files = _rank_files(actor_dir, world_size)
    _require(files, range(1), actor_dir, world_size)
    first_archive, first = _read_rank(files[0])
    group = {_group_size(s, world_size, files[0]) for s in first.values()}
    if len(group) != 1:
        raise RelexError(f"{files[0]}: its tensors disagree on the mesh; {_MERGE_HINT}")
    shards = group.pop()
    _require(files, range(shards), actor_dir, world_size)
    archives, per_rank = [first_archive], [first]
    for rank in range(1, shards):
        archive, rank_shards = _read_rank(files[rank])
        archives.append(archive)
        per_rank.append(rank_shards)
    _check_names(per_rank, archives)
    _check_coordinates(per_rank, archives, hsdp=shards != world_size)
    config_dir = actor_dir / "huggingface"
    return FsdpCheckpoint(
        directory=actor_dir,
        world_size=world_size,
        fsdp_version=version,
        tensors=_assemble(per_rank, archives),
        files=tuple(a.path for a in archives),
        config_dir=config_dir if (config_dir / "config.json").is_file() else None,
    )


def find_fsdp_dir(step_dir: Path) -> Path | None:
    """step_dir/actor or step_dir itself when it holds verl model rank files, else None.

    fsdp_config.json is not required here, so that open_fsdp_checkpoint can say it is missing
    rather than the caller reporting "no model".
    """
    for candidate in (Path(step_dir) / "actor", Path(step_dir)):
        if candidate.is_dir() and any(
            RANK_FILE_RE.fullmatch(p.name) for p in candidate.glob("model_world_size_*_rank_*.pt")
        ):
            return candidate
    return None


def fsdp_fingerprint(ckpt: FsdpCheckpoint) -> dict:
    """Per rank file read: size, mtime, a hash of its data.pkl and torch.save's save id.

    data.pkl only describes the tensors, so two saves of one model have the same hash; the
    save id (a random number torch.save writes next to it) tells them apart. No weight reads.
    """
    out = {}
    for path in ckpt.files:
        archive = _open_archive(path)
        stat = path.stat()
        out[path.name] = {
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "pickle_sha256": hashlib.sha256(archive.pickle).hexdigest(),
            "serialization_id": archive.serialization_id,
        }
    return out
