"""Reading safetensors headers without loading tensors or running code (tensor_files.py reads
the bytes).

Every header is untrusted. `read_header` accepts exactly what the format's own parser (the
Rust `safetensors` crate's `SafeTensors::read_metadata`, which `safetensors.safe_open` runs)
accepts, minus a few things that are legal there but no real checkpoint holds:

- the header must begin with '{', as the format's specification says (the parser does not
  enforce it and skips leading whitespace);
- a key given twice (a tensor, a field, a metadata entry) is refused; the parser keeps the last;
- a tensor name must be non-empty, and a file must hold at least one tensor;
- a tensor's entry must be an object (serde would also read an array [dtype, shape, offsets]);
- a dimension may not exceed 2**62 and a tensor 2**62 bytes, even where the parser's 64-bit
  arithmetic would not overflow (zero-size tensors), so sizes fit numpy's int64;
- JSON nesting is bounded at 64 levels (serde_json's limit is 128) and integers at 20 digits.

Like the parser, it ignores unknown fields inside a tensor's entry and takes a null
`__metadata__` as no metadata. A header that is valid but uses a dtype relex_stream cannot
compute with is refused as unsupported, not as corrupt.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
from pathlib import Path

import numpy as np
import torch

from .errors import RelexError
from .jsonfile import JsonProblem, loads_strict, show

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100_000_000  # the parser's MAX_HEADER_SIZE: decimal, not 100 MiB
_MAX_HEADER_BYTES = MAX_HEADER_BYTES  # the name this module used before
MAX_TENSOR_BYTES = 2**62
MAX_DIM = 2**62
MAX_NDIM = 16  # no model has more; the store's layout keeps at most this many
_HEADER_MAX_DEPTH = 64
_USIZE_MAX = 2**64 - 1  # serde reads shapes and offsets as Rust usize (64-bit)
_TENSOR_FIELDS = ("dtype", "shape", "data_offsets")

# Every dtype the format defines, with its width in bits (the crate's Dtype::bitsize).
# tests/test_headers.py checks this list against the installed safetensors package.
FORMAT_DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}

# safetensors dtype code -> (torch dtype, numpy dtype used to hold its bits)
DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "F64": (torch.float64, np.dtype("float64")),
    "F32": (torch.float32, np.dtype("float32")),
    "F16": (torch.float16, np.dtype("float16")),
    "BF16": (torch.bfloat16, np.dtype("uint16")),
    "I64": (torch.int64, np.dtype("int64")),
    "I32": (torch.int32, np.dtype("int32")),
    "I16": (torch.int16, np.dtype("int16")),
    "I8": (torch.int8, np.dtype("int8")),
    "U8": (torch.uint8, np.dtype("uint8")),
    "BOOL": (torch.bool, np.dtype("bool")),
}
FLOAT_CODES = ("F64", "F32", "F16", "BF16")
TORCH_TO_CODE = {torch_dtype: code for code, (torch_dtype, _) in DTYPES.items()}


class HeaderProblem(ValueError):
    """Why a header was refused; read_header adds the file and what to do."""


def read_header(path: Path) -> tuple[dict, int, bytes]:
    """Parse and validate a safetensors header: (tensor entries, data offset, raw header bytes).

    Entries map each tensor name, in header order, to {"dtype": str, "shape": [int, ...],
    "data_offsets": [begin, end]} (offsets relative to the data start); `__metadata__` and
    unknown fields are left out. Any file the format's parser would refuse, and the few
    stricter cases in the module docstring, raise a RelexError naming the file.
    """
    raw, file_size = _read_raw_header(path)
    data_len = file_size - 8 - len(raw)
    try:
        entries = parse_header(raw, data_len)
    except HeaderProblem as exc:
        raise RelexError(
            f"{path} is not a valid safetensors file: {exc}; re-save or re-download it"
        ) from None
    _check_supported(path, entries)
    return entries, 8 + len(raw), raw


def _read_raw_header(path: Path) -> tuple[bytes, int]:
    """The header's bytes and the file's size, after the length prefix checks."""
    try:
        # O_NONBLOCK: a FIFO under a shard's name must not hang the run in open().
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise RelexError(
            f"cannot read {path}: {exc.strerror or exc}; check the path and permissions"
        ) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise RelexError(f"{path} is not a regular file; a safetensors file is expected")
        prefix = os.pread(fd, 8, 0)
        if len(prefix) < 8:
            raise RelexError(
                f"{path} is {info.st_size} bytes long, too short for a safetensors file; "
                "re-save or re-download it"
            )
        (header_len,) = struct.unpack("<Q", prefix)
        _check_header_len(path, header_len, info.st_size)
        raw = _pread_all(fd, header_len, 8)
    except OSError as exc:
        raise RelexError(
            f"cannot read {path}: {exc.strerror or exc}; check the file and its disk"
        ) from None
    finally:
        os.close(fd)
    if len(raw) != header_len:
        raise RelexError(f"{path} shrank while being read; wait until it is fully written")
    return raw, info.st_size


def _check_header_len(path: Path, header_len: int, file_size: int) -> None:
    """The 8-byte prefix must give a header length within the limit and within the file."""
    redo = "re-save or re-download it"
    if header_len > MAX_HEADER_BYTES:
        raise RelexError(
            f"{path} is not a valid safetensors file: its header length {header_len} exceeds "
            f"the format's limit of {MAX_HEADER_BYTES} bytes; {redo}"
        )
    if 8 + header_len > file_size:
        raise RelexError(
            f"{path} is truncated: its header claims {header_len} bytes but the file has "
            f"{file_size - 8} after the length prefix; {redo}"
        )


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    """size bytes from offset, fewer only at end of file."""
    parts, done = [], 0
    while done < size:
        chunk = os.pread(fd, min(size - done, 2**24), offset + done)
        if not chunk:
            break
        parts.append(chunk)
        done += len(chunk)
    return b"".join(parts)


# In the __metadata__ of every file relex_stream writes: a prediction must never be read back
# as an observed checkpoint (an --out inside the runs directory made step-T one).
PREDICTION_KEY = "relex_stream_prediction"
PREDICTION_VALUE = "extrapolated by relex_stream; not a checkpoint training saved"


def is_prediction(raw: bytes) -> bool:
    """Whether a valid header's __metadata__ carries PREDICTION_KEY (raw: the header bytes)."""
    if PREDICTION_KEY.encode() not in raw:  # the common case, without a second parse
        return False
    metadata = _decode_header(raw).get("__metadata__")
    return isinstance(metadata, dict) and PREDICTION_KEY in metadata


def parse_header(raw: bytes, data_len: int) -> dict[str, dict]:
    """Validate header bytes against a data buffer of data_len bytes; entries, or HeaderProblem.

    Checks the format only: a tensor with any of the format's dtypes passes, supported by
    relex_stream or not (read_header checks that next).
    """
    header = _decode_header(raw)
    metadata = header.pop("__metadata__", None)
    _check_metadata(metadata)
    if not header:
        raise HeaderProblem("it holds no tensors")
    entries = {name: _check_entry(name, entry) for name, entry in header.items()}
    _check_offsets(entries, data_len)
    return entries


def _decode_header(raw: bytes) -> dict:
    """The header as a dict: UTF-8, starting with '{', strict JSON, an object."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderProblem(f"its header is not UTF-8 (bad byte at offset {exc.start})") from None
    if not text.startswith("{"):
        raise HeaderProblem("its header does not start with '{'")
    try:
        header = loads_strict(text, max_depth=_HEADER_MAX_DEPTH)
    except JsonProblem as exc:
        raise HeaderProblem(f"its header {exc}") from None
    if not isinstance(header, dict):
        raise HeaderProblem("its header is not a JSON object")
    return header


def _check_metadata(metadata: object) -> None:
    """__metadata__ is absent, null or an object of string -> string."""
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise HeaderProblem("its __metadata__ is not an object of strings")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise HeaderProblem(f"its __metadata__ entry {show(key)} is not a string")


def _check_entry(name: str, entry: object) -> dict:
    """One tensor's entry: dtype, shape and offsets of the right types; its size consistent."""
    if not name:
        raise HeaderProblem("it has a tensor with an empty name")
    if type(entry) is not dict:
        raise HeaderProblem(f"the entry for {show(name)} is not an object")
    try:
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    except KeyError as exc:
        raise HeaderProblem(f"the entry for {show(name)} has no {exc.args[0]!r}") from None
    if type(dtype) is not str or dtype not in FORMAT_DTYPE_BITS:
        shown = show(dtype) if isinstance(dtype, str) else "a non-string"
        raise HeaderProblem(f"tensor {show(name)} has dtype {shown}, not a safetensors dtype")
    if type(shape) is not list or not _all_usize(shape):
        raise HeaderProblem(
            f"tensor {show(name)} has shape {_brief(shape)}, not a list of non-negative integers"
        )
    if type(offsets) is not list or len(offsets) != 2 or not _all_usize(offsets):
        raise HeaderProblem(
            f"tensor {show(name)} has data_offsets {_brief(offsets)}, not [begin, end] in bytes"
        )
    nbytes = _byte_size(name, dtype, shape)
    begin, end = offsets
    if begin <= end and end - begin != nbytes:
        raise HeaderProblem(
            f"tensor {show(name)} has {end - begin} bytes of data but its dtype and shape "
            f"need {nbytes}"
        )
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def _brief(value: object, limit: int = 40) -> str:
    """A parsed JSON value, shortened for a one-line message."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _all_usize(values: list) -> bool:
    """All JSON integers that fit Rust's usize: no bools, floats or negatives (as serde reads).

    Built from C-level map/min/max because it runs for every tensor of every header.
    """
    if not set(map(type, values)) <= {int}:
        return False
    return not values or (min(values) >= 0 and max(values) <= _USIZE_MAX)


def check_tensor(name: str, dtype: str, shape: tuple[int, ...]) -> None:
    """HeaderProblem when a tensor from elsewhere (a verl rank file) could not be written into
    a safetensors header that readers take: an empty or reserved name, a size that overflows."""
    if not name or name == "__metadata__":
        raise HeaderProblem(f"it has a tensor named {show(name)}, which safetensors reserves "
                            "or refuses")
    _byte_size(name, dtype, list(shape))


def _byte_size(name: str, dtype: str, shape: list[int]) -> int:
    """numel x width in bytes, refusing what the parser's checked 64-bit arithmetic refuses.

    The parser multiplies the dimensions left to right and fails on the first overflow, so
    [2**40, 2**40, 0] is refused while [0, 2**40, 2**40] passes; this follows it exactly.
    """
    if len(shape) > MAX_NDIM:
        raise HeaderProblem(f"tensor {show(name)} has {len(shape)} dimensions (at most "
                            f"{MAX_NDIM} are read)")
    numel = 1
    for dim in shape:
        if dim > MAX_DIM:
            raise HeaderProblem(f"tensor {show(name)} has an absurd dimension {dim}")
        numel *= dim
        if numel > _USIZE_MAX:
            raise HeaderProblem(f"tensor {show(name)} has a shape whose size overflows")
    bits = numel * FORMAT_DTYPE_BITS[dtype]
    if bits > _USIZE_MAX:
        raise HeaderProblem(f"tensor {show(name)} has a shape whose size overflows")
    if bits % 8:
        raise HeaderProblem(f"tensor {show(name)} does not end on a byte boundary")
    if bits // 8 > MAX_TENSOR_BYTES:
        raise HeaderProblem(f"tensor {show(name)} claims an absurd size of {bits // 8} bytes")
    return bits // 8


def _check_offsets(entries: dict[str, dict], data_len: int) -> None:
    """Tensors, sorted by offsets, tile the data buffer from 0 to its end without gap or overlap.

    The parser's validate(): each begins where the previous ended, and the last ends at the
    end of the file. Zero-size tensors may share an offset.
    """
    position = 0
    for name, entry in sorted(entries.items(), key=lambda item: item[1]["data_offsets"]):
        begin, end = entry["data_offsets"]
        if begin != position or end < begin:
            if end < begin:
                problem = "ends before it begins"
            else:
                problem = "overlaps another" if begin < position else "leaves a gap before it"
            raise HeaderProblem(
                f"tensor {show(name)} at bytes [{begin}, {end}] {problem} (expected to begin "
                f"at {position})"
            )
        position = end
    if position > data_len:
        raise HeaderProblem(
            f"it is truncated: its tensors need {position} bytes of data but only {data_len} "
            "are present"
        )
    if position < data_len:
        raise HeaderProblem(
            f"it has {data_len - position} bytes after its last tensor's data, which the "
            "format does not allow"
        )


def _check_supported(path: Path, entries: dict[str, dict]) -> None:
    """A valid header may still use a dtype relex_stream cannot compute with."""
    for name, entry in entries.items():
        if entry["dtype"] not in DTYPES:
            raise RelexError(
                f"{path}: tensor {show(name)} has dtype {entry['dtype']}, which is not supported "
                f"(relex_stream reads {', '.join(DTYPES)}); convert the checkpoint, e.g. to BF16"
            )


def header_fingerprint(path: Path) -> dict:
    """Size, mtime and a hash of the header: enough to notice a replaced or edited file."""
    _, _, raw = read_header(path)
    try:
        stat_result = path.stat()
    except OSError as exc:
        raise RelexError(f"cannot read {path}: {exc.strerror or exc}; was it removed?") from None
    return {
        "size": stat_result.st_size,
        "mtime_ns": stat_result.st_mtime_ns,
        "header_sha256": hashlib.sha256(raw).hexdigest(),
    }
