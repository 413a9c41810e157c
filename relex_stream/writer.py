"""Writing a model directory tensor by tensor at precomputed offsets, complete or not at all.

The safetensors header of every output shard is known from the base before any weight is
computed, so each shard is preallocated and every chunk of every tensor is written at its
offset as soon as it exists: output memory is one chunk, never one shard. Everything goes to a
temporary directory that only `finalize` turns into a loadable model.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checkpoints import ModelLayout
from .safetensors_io import DTYPES, INDEX_NAME

_CONFIG_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


@dataclass(frozen=True)
class OutputSlot:
    """Where one output tensor's data lies: shard file name, absolute offset, dtype code."""

    shard: str
    offset: int
    dtype: str


def output_dtypes(layout: ModelLayout, float_dtype: str | None) -> dict[str, str]:
    """Output dtype code per tensor: the base's, or `float_dtype` for floating-point tensors."""
    from .safetensors_io import FLOAT_CODES

    return {
        name: (float_dtype if float_dtype and dtype in FLOAT_CODES else dtype)
        for name, (dtype, _) in layout.tensors.items()
    }


def _header(
    names: tuple[str, ...], layout: ModelLayout, dtypes: dict[str, str]
) -> tuple[bytes, dict]:
    entries: dict = {"__metadata__": {"format": "pt"}}
    relative: dict[str, int] = {}
    cursor = 0
    for name in names:
        shape = layout.tensors[name][1]
        n_bytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtypes[name]][1].itemsize
        entries[name] = {
            "dtype": dtypes[name],
            "shape": list(shape),
            "data_offsets": [cursor, cursor + n_bytes],
        }
        relative[name] = cursor
        cursor += n_bytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
    return len(raw).to_bytes(8, "little") + raw, {"relative": relative, "data_bytes": cursor}


class ModelWriter:
    """An output model under construction in `tmp_dir`; `finalize` moves it to `final_dir`."""

    def __init__(
        self,
        tmp_dir: Path,
        final_dir: Path,
        layout: ModelLayout,
        dtypes: dict[str, str],
        create: bool = True,
    ):
        """Lay out (create=True) or attach to (create=False, other torchrun ranks) the shards."""
        self.tmp_dir, self.final_dir, self.layout, self.dtypes = tmp_dir, final_dir, layout, dtypes
        self.owner = create
        if create:
            tmp_dir.mkdir(parents=True)
        self.slots: dict[str, OutputSlot] = {}
        self._fds: dict[str, int] = {}
        self.total_bytes = 0
        for shard, names in layout.shard_tensors.items():
            header, info = _header(names, layout, dtypes)
            if create:
                fd = os.open(tmp_dir / shard, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                os.pwrite(fd, header, 0)
                os.ftruncate(fd, len(header) + info["data_bytes"])
            else:
                fd = os.open(tmp_dir / shard, os.O_RDWR)
            self._fds[shard] = fd
            self.total_bytes += info["data_bytes"]
            for name in names:
                self.slots[name] = OutputSlot(
                    shard, len(header) + info["relative"][name], dtypes[name]
                )

    def write(self, name: str, start_element: int, data: np.ndarray) -> None:
        """Write flattened elements [start_element, start_element + data.size) of a tensor."""
        slot = self.slots[name]
        view = memoryview(np.ascontiguousarray(data)).cast("B")
        offset = slot.offset + start_element * DTYPES[slot.dtype][1].itemsize
        done = 0
        while done < len(view):
            done += os.pwrite(self._fds[slot.shard], view[done:], offset + done)

    def close(self) -> None:
        """fsync and close the shard files (every rank, before the finalising barrier)."""
        for fd in self._fds.values():
            os.fsync(fd)
            os.close(fd)
        self._fds.clear()

    def finalize(self, aux_files: dict[str, bytes], overwrite: bool) -> None:
        """Write index and aux files, fsync everything, then rename into place."""
        self.close()
        if self.layout.sharded:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {
                    name: shard
                    for shard, names in self.layout.shard_tensors.items()
                    for name in names
                },
            }
            _write_synced(self.tmp_dir / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())
        for file_name, content in aux_files.items():
            if file_name == "config.json":
                content = self._config_with_dtype(content)
            _write_synced(self.tmp_dir / file_name, content)
        _fsync_dir(self.tmp_dir)
        previous = None
        if self.final_dir.exists():
            if not overwrite:
                raise FileExistsError(self.final_dir)
            previous = self.final_dir.with_name(self.final_dir.name + ".replaced-tmp")
            shutil.rmtree(previous, ignore_errors=True)
            os.rename(self.final_dir, previous)
        os.rename(self.tmp_dir, self.final_dir)
        _fsync_dir(self.final_dir.parent)
        if previous is not None:
            shutil.rmtree(previous)

    def abort(self) -> None:
        """Close files and, for the writer that laid it out, remove the temporary directory."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self.owner:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def _config_with_dtype(self, content: bytes) -> bytes:
        float_dtypes = {d for n, d in self.dtypes.items() if self.layout.tensors[n][0] != d}
        if not float_dtypes:
            return content
        config = json.loads(content)
        name = _CONFIG_DTYPE_NAMES[float_dtypes.pop()]
        keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
        for key in keys:
            config[key] = name
        return (json.dumps(config, indent=2) + "\n").encode()


def _write_synced(path: Path, content: bytes) -> None:
    with open(path, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
