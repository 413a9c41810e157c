"""The zarr v3 trajectory store: per tensor the base row, the K observed rows and the Gram matrix.

Rows are kept as the checkpoint's bits (bf16 as uint16), losslessly: row k is stored XOR row k−1
(row 0 XOR the base), which RL leaves mostly zero, then zstd-1 and a crc32c checksum
(bench/RESULTS.md: ~1% of the raw bytes on consecutive steps, and faster to read than a plain
zstd store). Chunks are one row by about a megabyte, so new checkpoints can be appended without
rewriting old chunks. The
store also keeps the model layout and small files (config, tokenizer), so a run can work from it
alone after the sources are gone. Every tensor carries a completion mark written after its data;
the store-wide mark is written last.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.buffer.cpu import NDBuffer

from . import row_codec
from .checkpoints import ModelLayout
from .errors import RelexError
from .kernels import GRAM_BLOCK_COLS
from .safetensors_io import DTYPES

STORE_FORMAT = "relex_stream.trajectory/2"
# --store-codec -> (row_codec transform, compressed?). xor-zstd, the default, is chosen by
# measurement (bench/RESULTS.md); the others exist to compare against and for odd data.
CODECS = {"xor-zstd": ("prev", True), "zstd": ("none", True), "none": ("none", False)}
ROW_CHUNK_BYTES = 1 << 20


def row_chunk_cols(dtype_code: str, numel: int) -> int:
    """Columns per stored chunk: ~1 MiB of one row, a multiple of the Gram block grid."""
    cols = max(GRAM_BLOCK_COLS, ROW_CHUNK_BYTES // DTYPES[dtype_code][1].itemsize)
    return max(1, min(cols, numel))


# Every chunk is written, all-zero ones too (see write_chunk), so a chunk file that is missing
# on disk means damage (zarr itself would read it as zeros); reads check for them.
_CHUNK_KEYS = {"name": "default", "separator": "/"}


def _compressors(codec: str) -> list:
    # crc32c after compression: a chunk damaged on disk fails loudly instead of decoding
    # into wrong weights.
    return [ZstdCodec(level=1), Crc32cCodec()] if CODECS[codec][1] else [Crc32cCodec()]


def compressed_fraction(base: np.ndarray, rows: np.ndarray, codec: str) -> float:
    """Stored size / raw size of a sample: base (c,) and rows (K, c) bits, as `codec` keeps them."""
    from numcodecs import Zstd

    transform, compressed = CODECS[codec]
    codes = row_codec.encode(_unsigned(rows), _unsigned(base), transform)  # (K, c)
    if not compressed:
        return 1.0
    chunk = ROW_CHUNK_BYTES // codes.itemsize
    stored = sum(
        len(Zstd(level=1).encode(np.ascontiguousarray(row[i : i + chunk])))
        for row in codes
        for i in range(0, row.shape[0], chunk)
    )
    return stored / codes.nbytes


def _transform(root: zarr.Group) -> str:
    return CODECS[root.attrs["codec"]][0]


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the store at `path` (a sibling file PATH.lock) while in use."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a+")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise RelexError(
            f"cannot write the store's lock {lock_path}: {exc.strerror}; "
            "choose a writable --cache (or --out)"
        ) from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RelexError(
                f"the store at {path} is in use by another run (pid {holder}); wait for it to "
                "finish, or give this run another --cache"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def create(
    path: Path,
    layout: ModelLayout,
    steps: list[int],
    sources: dict,
    aux_files: dict[str, bytes],
    aliases: dict[str, str],
    codec: str = "xor-zstd",
) -> zarr.Group:
    """A new, empty store for `steps`; overwrites nothing (the caller removed any old one).

    Built under a temporary name and renamed, so a store at `path` always has its metadata.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    root = zarr.open_group(str(tmp), mode="w-")
    root.attrs.update(
        {
            "format": STORE_FORMAT,
            "steps": list(steps),
            "layout": layout.to_json(),
            "aliases": aliases,
            "sources": sources,
            "tensor_ids": {name: i for i, name in enumerate(layout.tensors)},
            "codec": codec,
            "complete": False,
        }
    )
    files = root.create_group("files")
    for i, (name, content) in enumerate(aux_files.items()):
        data = np.frombuffer(content, dtype=np.uint8)
        files.create_array(
            str(i), data=data, chunks=(max(1, data.size),), attributes={"name": name}
        )
    root.create_group("base")
    root.create_group("rows")
    root.create_group("gram")
    os.rename(tmp, path)
    return zarr.open_group(str(path), mode="a")


def open_existing(path: Path, any_version: bool = False) -> zarr.Group | None:
    """The store at `path`, or None if there is none; a non-store directory is an error.

    any_version: also accept a store of an older format (only to remove it, for --rebuild).
    """
    if not path.exists():
        return None
    try:
        root = zarr.open_group(str(path), mode="a")
        found = root.attrs.get("format")
    except Exception:  # zarr raises several types for a directory that is not a group
        found = None
    if not isinstance(found, str) or not found.startswith(STORE_FORMAT.split("/")[0] + "/"):
        raise RelexError(
            f"{path} exists but is not a relex_stream store; pass another --cache or remove it"
        )
    if found != STORE_FORMAT and not any_version:
        raise RelexError(
            f"the store at {path} was written by another version of relex_stream ({found}, "
            f"this one reads {STORE_FORMAT}); rebuild it with --rebuild or use another --cache"
        )
    return root


def remove(path: Path) -> None:
    """Delete a store directory (for --rebuild)."""
    shutil.rmtree(path)


def attrs(root: zarr.Group) -> dict:
    return root.attrs.asdict()


def aux_files(root: zarr.Group) -> dict[str, bytes]:
    files = root["files"]
    return {
        files[key].attrs["name"]: files[key][:].tobytes()
        for key in sorted(files.array_keys(), key=int)
    }


def _key(root: zarr.Group, name: str) -> str:
    return str(root.attrs["tensor_ids"][name])


def is_complete(root: zarr.Group, name: str) -> bool:
    """True once the tensor's base, rows and Gram matrix are all written."""
    key = _key(root, name)
    return key in root["gram"] and bool(root["gram"][key].attrs.get("complete", False))


def prepare_tensor(
    root: zarr.Group, name: str, dtype_code: str, numel: int, float_rows: bool
) -> None:
    """(Re)create the arrays of one tensor, dropping any partial data from an interrupted run."""
    key = _key(root, name)
    bits = DTYPES[dtype_code][1]
    chunk = row_chunk_cols(dtype_code, numel)
    root["base"].create_array(
        key,
        shape=(numel,),
        chunks=(chunk,),
        dtype=bits,
        compressors=_compressors(root.attrs["codec"]),
        chunk_key_encoding=_CHUNK_KEYS,
        overwrite=True,
    )
    if float_rows:
        n_steps = len(root.attrs["steps"])
        root["rows"].create_array(
            key,
            shape=(n_steps, numel),
            chunks=(1, chunk),
            dtype=_unsigned_dtype(bits),
            compressors=_compressors(root.attrs["codec"]),
            chunk_key_encoding=_CHUNK_KEYS,
            overwrite=True,
        )


def _unsigned_dtype(bits: np.dtype) -> np.dtype:
    return np.dtype(f"u{np.dtype(bits).itemsize}")


def _unsigned(array: np.ndarray) -> np.ndarray:
    """The same memory viewed as unsigned words (bf16, fp16, fp32 bits alike)."""
    return array.view(_unsigned_dtype(array.dtype))


def write_chunk(
    root: zarr.Group, name: str, start: int, base: np.ndarray, rows: np.ndarray | None
) -> None:
    """Store base (c,) and rows (K, c) bits for columns [start, start + c)."""
    key = _key(root, name)
    stop = start + base.shape[0]
    # write_empty_chunks is a runtime setting of an opened array, not stored with it
    with zarr.config.set({"array.write_empty_chunks": True}):
        root["base"][key][start:stop] = base
        if rows is not None:
            codes = row_codec.encode(_unsigned(rows), _unsigned(base), _transform(root))  # (K, c)
            root["rows"][key][:, start:stop] = codes


@contextlib.contextmanager
def _decoding(root: zarr.Group, name: str) -> Iterator[None]:
    """Turn a chunk that fails to decode (checksum, codec, missing file) into a user error."""
    try:
        yield
    except RelexError:
        raise
    except Exception as exc:  # zarr and numcodecs raise many types for damaged chunks
        raise RelexError(
            f"the store at {_store_dir(root)} has a damaged chunk of tensor {name!r} ({exc}); "
            "rebuild it from the sources with --rebuild (or delete the store)"
        ) from None


# Codecs a store of ours uses. Anything else (numcodecs.pickle, say) in a store's metadata means
# it was not written by us; it is refused before zarr gets to decode a chunk with it.
_ALLOWED_CODECS = {"bytes", "zstd", "crc32c"}


def _array(root: zarr.Group, group: str, name: str) -> zarr.Array:
    """The array of one tensor, after checking its codecs on disk."""
    key = _key(root, name)
    meta_path = _store_dir(root) / group / key / "zarr.json"
    try:
        codecs = {c["name"] for c in json.loads(meta_path.read_text())["codecs"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RelexError(
            f"the store at {_store_dir(root)} has unreadable metadata for tensor {name!r} "
            f"({exc}); rebuild it from the sources with --rebuild"
        ) from None
    if not codecs <= _ALLOWED_CODECS:
        raise RelexError(
            f"the store at {_store_dir(root)} asks for codec(s) {sorted(codecs - _ALLOWED_CODECS)} "
            f"for tensor {name!r}, which relex_stream never writes; refusing to decode it "
            "(rebuild it from the sources with --rebuild)"
        )
    return root[group][key]


def _store_dir(root: zarr.Group) -> Path:
    return Path(str(root.store_path).removeprefix("file://"))


def _require_chunks(root: zarr.Group, group: str, name: str, rows: list[int] | None,
                    start: int, stop: int) -> None:  # fmt: skip
    """Raise if a chunk file that the read needs is missing (zarr would return zeros)."""
    key = _key(root, name)
    chunk = root[group][key].chunks[-1]
    directory = _store_dir(root) / group / key / "c"
    for j in range(start // chunk, (stop - 1) // chunk + 1):
        paths = (
            [directory / str(j)] if rows is None else [directory / str(r) / str(j) for r in rows]
        )
        for path in paths:
            if not path.is_file():
                raise FileNotFoundError(f"chunk {path} is missing")


def read_base(root: zarr.Group, name: str, start: int, out: np.ndarray) -> None:
    """Fill `out` (c,) with the base's bits for columns [start, start + c)."""
    with _decoding(root, name):
        array = _array(root, "base", name)
        _require_chunks(root, "base", name, None, start, start + out.shape[0])
        array.get_basic_selection(
            slice(start, start + out.shape[0]), out=NDBuffer.from_numpy_array(out)
        )


def read_rows(
    root: zarr.Group,
    name: str,
    row_ids: list[int],
    start: int,
    base: np.ndarray,
    out: np.ndarray,
) -> None:
    """Fill `out` (len(row_ids), c) with the bits of rows `row_ids`, columns [start, start + c).

    base: (c,) the base's bits of the same columns (row 0 is stored against it). Row k decodes
    from rows 0..k, so a prefix of rows decodes in place; other selections decode the prefix up
    to their last row in a scratch buffer. Reads are row slices: zarr's orthogonal selection
    with a list of rows is ~20x slower (bench/RESULTS.md).
    """
    with _decoding(root, name):
        needed = max(row_ids) + 1
        array = _array(root, "rows", name)
        _require_chunks(root, "rows", name, list(range(needed)), start, start + out.shape[1])
        prefix = row_ids == list(range(needed))
        scratch = out if prefix else np.empty((needed, out.shape[1]), dtype=out.dtype)
        codes = _unsigned(scratch)  # (needed, c)
        columns = slice(start, start + out.shape[1])
        array.get_basic_selection((slice(0, needed), columns), out=NDBuffer.from_numpy_array(codes))
        row_codec.decode(codes, _unsigned(base), _transform(root), out=codes)
        if not prefix:
            out[...] = scratch[row_ids]


def finish_tensor(
    root: zarr.Group, name: str, gram: torch.Tensor | None, kind: str = "exact"
) -> None:
    """Write the Gram matrix (K, K) float64 and the tensor's completion mark, in that order.

    kind "randomized" marks a low-rank approximation of G (see kernels.randomized_gram).
    """
    n_steps = len(root.attrs["steps"])
    data = (
        gram.detach().cpu().numpy().astype(np.float64)
        if gram is not None
        else np.zeros((n_steps, n_steps))
    )
    array = root["gram"].create_array(
        _key(root, name), data=data, chunks=data.shape or (1,), overwrite=True
    )
    array.attrs.update({"kind": kind, "complete": True})


def gram_kind(root: zarr.Group, name: str) -> str:
    """'exact' or 'randomized': how the stored Gram matrix was computed."""
    return root["gram"][_key(root, name)].attrs.get("kind", "exact")


def read_gram(root: zarr.Group, name: str) -> torch.Tensor:
    """The stored Gram matrix (K, K) float64 of all stored steps."""
    with _decoding(root, name):
        return torch.from_numpy(_array(root, "gram", name)[:].astype(np.float64))


def mark_complete(root: zarr.Group) -> None:
    root.attrs["complete"] = True
