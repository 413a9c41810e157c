"""Writing a model directory tensor by tensor at precomputed offsets, complete or not at all.

The safetensors header of every output shard is known from the base before any weight is
computed, so each shard is preallocated and every chunk of every tensor is written at its
offset as soon as it exists: output memory is one chunk, never one shard. Everything goes to a
temporary directory that only `finalize` turns into a loadable model. Temporary directories
carry a marker file, and only directories with that marker are ever removed as leftovers: a
directory of the user's that happens to look like one is left alone. The marker is removed
only after the rename into place, so that a run stopped at any point leaves nothing unmarked.

OUT may be shared by runs in other containers or on other hosts, where process ids say nothing:
a temporary directory's name carries a random part (two runs never share one), and its run
holds an flock on the marker while it lives. A leftover is a marked directory whose marker
nobody holds; where the file system has no locks, nothing is removed as a leftover.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checkpoints import ModelLayout, open_model
from .errors import RelexError
from .jsonfile import show
from .safefs import open_root, remove_tree, sync_dir
from .safetensors_io import DTYPES, FLOAT_CODES, INDEX_NAME, PREDICTION_KEY, PREDICTION_VALUE
from .signals import deferred

log = logging.getLogger(__name__)

_CONFIG_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}
MARKER = ".relex-stream-tmp"  # inside every temporary directory: "pid\n", flocked by its run


@dataclass(frozen=True)
class OutputSlot:
    """Where one output tensor's data lies: shard file name, absolute offset, dtype code."""

    shard: str
    offset: int
    dtype: str


def output_dtypes(layout: ModelLayout, float_dtype: str | None) -> dict[str, str]:
    """Output dtype code per tensor: the base's, or `float_dtype` for floating-point tensors."""
    return {
        name: (float_dtype if float_dtype and dtype in FLOAT_CODES else dtype)
        for name, (dtype, _) in layout.tensors.items()
    }


def new_run_id() -> str:
    """A name part no other run shares, whatever its host or PID namespace: pid-random hex."""
    return f"{os.getpid()}-{secrets.token_hex(8)}"


def tmp_dir(final_dir: Path, run_id: str) -> Path:
    return final_dir.with_name(f".{final_dir.name}.tmp-{run_id}")


def _hold_marker(directory: Path) -> int:
    """Mark `directory` as a live temporary directory of this run: the marker appears already
    locked (written under another name, then renamed), and stays locked until its descriptor
    is closed. Returns that descriptor."""
    staging = directory / f"{MARKER}.new"
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    try:
        with contextlib.suppress(OSError):  # a file system without locks: see _abandoned
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        os.rename(staging, directory / MARKER)
    except BaseException:
        os.close(fd)
        raise
    return fd


# what our temporary and parked directories are named (the pid-only names of older versions too)
_OURS_RE = re.compile(r"\.step-.+\.(?:tmp|replaced)-[0-9]+(?:-[0-9a-f]{16})?", re.ASCII)
_MARKER_RE = re.compile(rb"[0-9]{1,10}\n")  # a marker holds the pid of the run that wrote it


def _abandoned(marker: Path) -> bool:
    """Whether no live run holds this marker (its run is gone: the directory is a leftover).
    False when that cannot be told (the file system has no locks) or it is not one of ours (not
    a plain file holding a pid line)."""
    try:
        fd = os.open(marker, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        if marker.name == MARKER and not _MARKER_RE.fullmatch(os.pread(fd, 16, 0)):
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False  # a live run, maybe in another container or on another host
    except OSError as exc:
        log.warning("cannot tell whether %s belongs to a live run (%s: the file system has no "
                    "locks); it is left alone: remove it once no run writes there",
                    marker.parent, exc.strerror or exc)
        return False
    finally:
        os.close(fd)  # releases the lock taken above


def _header(
    names: tuple[str, ...], layout: ModelLayout, dtypes: dict[str, str]
) -> tuple[bytes, dict]:
    entries: dict = {"__metadata__": {"format": "pt", PREDICTION_KEY: PREDICTION_VALUE}}
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
    """An output model under construction in a temporary directory; `finalize` renames it."""

    def __init__(self, final_dir: Path, run_id: str, layout: ModelLayout, dtypes: dict[str, str],
                 owner: bool, made: list[ModelWriter] | None = None):
        self.final_dir, self.layout, self.dtypes = final_dir, layout, dtypes
        self.run_id = run_id
        self.tmp_dir = tmp_dir(final_dir, run_id)
        self.owner = owner
        self._marker_fd: int | None = None  # its flock says the directory is in use
        self.slots: dict[str, OutputSlot] = {}
        self._fds: dict[str, int] = {}
        self.total_bytes = 0
        self._made_tmp_dir = False  # abort() removes only a directory this writer made
        if made is not None:
            # the caller aborts every writer it made, all their files closed first: with many
            # outputs open, this one alone could not even open its directory to remove it
            made.append(self)
        try:
            with self._errors():
                self._lay_out()
        except BaseException:
            if made is None:
                abort_all([self])  # never hides why the layout failed
            raise

    def _lay_out(self) -> None:
        layout, dtypes, owner = self.layout, self.dtypes, self.owner
        if owner:
            self.tmp_dir.mkdir()
            self._made_tmp_dir = True
            self._marker_fd = _hold_marker(self.tmp_dir)
        for shard, names in layout.shard_tensors.items():
            header, info = _header(names, layout, dtypes)
            path = self.tmp_dir / shard
            flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(path, flags | (os.O_CREAT | os.O_EXCL if owner else 0), 0o644)
            if owner:
                os.pwrite(fd, header, 0)
                os.ftruncate(fd, len(header) + info["data_bytes"])
            self._fds[shard] = fd
            self.total_bytes += info["data_bytes"]
            for name in names:
                self.slots[name] = OutputSlot(
                    shard, len(header) + info["relative"][name], dtypes[name]
                )

    @classmethod
    def create(cls, final_dir: Path, run_id: str, layout: ModelLayout, dtypes: dict[str, str],
               made: list[ModelWriter] | None = None) -> ModelWriter:
        """Lay out the shards (rank 0). With `made`, the writer joins that list first, and the
        caller's abort_all(made) cleans up after a failure."""
        return cls(final_dir, run_id, layout, dtypes, owner=True, made=made)

    @classmethod
    def attach(cls, final_dir: Path, run_id: str, layout: ModelLayout, dtypes: dict[str, str],
               made: list[ModelWriter] | None = None) -> ModelWriter:
        """Open the shards rank 0 laid out (other torchrun ranks)."""
        return cls(final_dir, run_id, layout, dtypes, owner=False, made=made)

    def write(self, name: str, start_element: int, data: np.ndarray) -> None:
        """Write flattened elements [start_element, start_element + data.size) of a tensor."""
        slot = self.slots[name]
        view = memoryview(np.ascontiguousarray(data)).cast("B")
        offset = slot.offset + start_element * DTYPES[slot.dtype][1].itemsize
        done = 0
        with self._errors():
            while done < len(view):
                done += os.pwrite(self._fds[slot.shard], view[done:], offset + done)

    def close(self) -> None:
        """fsync and close the shard files (every rank, before the finalising barrier)."""
        with self._errors():
            while self._fds:
                _, fd = self._fds.popitem()
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    @contextlib.contextmanager
    def _errors(self):
        """A failed write of the output (a full disk, an I/O error) is the user's to fix."""
        try:
            yield
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise RelexError(
                    f"cannot write {self.final_dir.name} in {self.final_dir.parent}: too many "
                    "open files (each output keeps its shard files open until the end); raise "
                    "the limit (ulimit -n) or ask for fewer targets, methods or windows per run"
                ) from None
            raise RelexError(
                f"cannot write {self.final_dir.name} in {self.final_dir.parent}: "
                f"{exc.strerror or exc}; free space (or choose another --out) and rerun"
            ) from None

    def finalize(self, aux_files: dict[str, bytes], overwrite: bool) -> None:
        """Write index and aux files, fsync everything, then rename into place."""
        self.prepare(aux_files)
        self.put_in_place(aux_files, overwrite)

    def prepare(self, aux_files: dict[str, bytes]) -> None:
        """Write index and aux files and fsync everything: where a full disk shows, so a run
        prepares every output before it puts any in place (none appear, or all do)."""
        with self._errors():
            self._prepare(aux_files)

    def put_in_place(self, aux_files: dict[str, bytes], overwrite: bool) -> None:
        """Rename the prepared output into place (replacing an earlier prediction with
        `overwrite`)."""
        with self._errors():
            self._put_in_place(aux_files, overwrite)

    def _prepare(self, aux_files: dict[str, bytes]) -> None:
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

    def _put_in_place(self, aux_files: dict[str, bytes], overwrite: bool) -> None:
        if os.path.lexists(self.final_dir):
            if not overwrite:
                raise RelexError(f"{self.final_dir} appeared during the run; it is left alone")
            if os.path.islink(self.final_dir) or not os.path.isdir(self.final_dir):
                raise RelexError(f"{self.final_dir} is no longer a directory of outputs; it "
                                 "is left alone")
            check_replaceable(self.final_dir, output_names(self.layout, aux_files))
            with deferred():  # a Ctrl-C between the renames must not lose the earlier output
                self._replace_earlier()
        else:
            with deferred():
                self._rename_into_place()
        _fsync_dir(self.final_dir)
        _fsync_dir(self.final_dir.parent)

    def _rename_into_place(self) -> None:
        # The marker goes only once the directory has its final name: removed before the
        # rename, a run killed in between (or refused above) left a temporary directory no
        # later run may remove. Killed between these two lines, a complete output keeps it
        # (and check_output_dir finishes it).
        os.rename(self.tmp_dir, self.final_dir)
        (self.final_dir / MARKER).unlink()
        self._release_marker()

    def _replace_earlier(self) -> None:
        """Park the earlier output in a marked directory of ours (so that a run killed between
        the renames leaves something the next run may remove), put this one in its place, and
        remove the parked one; on a failure the earlier output is put back."""
        replaced = self.final_dir.with_name(f".{self.final_dir.name}.replaced-{self.run_id}")
        replaced.mkdir()
        try:
            marker = _hold_marker(replaced)
        except BaseException:
            with contextlib.suppress(OSError):
                os.rmdir(replaced)
            raise
        parked = replaced / "previous"
        try:
            os.rename(self.final_dir, parked)
            try:
                self._rename_into_place()
            except BaseException:
                if not os.path.lexists(self.final_dir):  # a quota, an ESTALE: put it back
                    os.rename(parked, self.final_dir)
                raise
            _remove_marked(replaced)
        finally:
            os.close(marker)
            if not os.path.lexists(parked):  # never remove the earlier output while parked
                _remove_marked(replaced)

    def _release_marker(self) -> None:
        if self._marker_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._marker_fd)
            self._marker_fd = None

    def release_files(self) -> None:
        """Close the shard files without syncing them (the output is being given up), and the
        marker's lock: what is left is a leftover, for this run or the next to remove."""
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        self._release_marker()

    def abort(self) -> None:
        """Close files and, for the writer that laid it out, remove the temporary directory."""
        self.release_files()
        if self._made_tmp_dir:
            _remove_marked(self.tmp_dir)
            # made, but its marker could not be written (EMFILE, a full disk): still empty
            # (or holding the marker's staging name only)
            with contextlib.suppress(OSError):
                os.unlink(self.tmp_dir / f"{MARKER}.new")
            with contextlib.suppress(OSError):
                os.rmdir(self.tmp_dir)

    def _config_with_dtype(self, content: bytes) -> bytes:
        """config.json as it was, or with its dtype fields naming the outputs' float dtype when
        they say another (--dtype, or a base re-saved in another dtype than its config says)."""
        float_dtypes = {d for d in self.dtypes.values() if d in _CONFIG_DTYPE_NAMES}
        if len(float_dtypes) != 1:
            return content
        name = _CONFIG_DTYPE_NAMES[float_dtypes.pop()]
        config = json.loads(content)
        keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
        if all(config.get(key) == name for key in keys):
            return content
        for key in keys:
            config[key] = name
        return (json.dumps(config, indent=2) + "\n").encode()


def abort_all(writers: Iterable[ModelWriter]) -> None:
    """Abort every writer, never raising: all their files are closed first (with a thousand
    outputs open, removing one directory failed with EMFILE and left the others), and one
    that cannot be removed is logged, not allowed to stop the rest or hide the run's error."""
    writers = list(writers)
    for writer in writers:
        writer.release_files()
    for writer in writers:
        try:
            writer.abort()
        except OSError as exc:
            log.warning("could not remove the temporary output %s (%s); remove it by hand",
                        writer.tmp_dir, exc.strerror or exc)


def output_names(layout: ModelLayout, aux_names: Iterable[str]) -> frozenset[str]:
    """The file names an output of this layout holds: shards, the index, the model files."""
    names = set(layout.shard_tensors) | set(aux_names)
    if layout.sharded:
        names.add(INDEX_NAME)
    return frozenset(names)


def check_replaceable(directory: Path, own_names: Collection[str]) -> None:
    """Refuse to replace an existing output that holds anything an output of ours would not
    (a file of another name, a directory, a link), or whose weights relex_stream did not write
    (a training checkpoint has the same file names): --overwrite replaces outputs, never a
    user's files that happen to sit at OUT/step-T."""
    try:
        with os.scandir(directory) as listing:
            entries = list(listing)
        foreign = sorted(entry.name for entry in entries
                         if entry.name not in own_names
                         or not entry.is_file(follow_symlinks=False))
    except OSError as exc:
        raise RelexError(f"cannot read {directory}: {exc.strerror or exc}; remove it or "
                         "choose another --out") from None
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise RelexError(
            f"{directory} holds {show(foreign[0])}{more}, which no output of relex_stream "
            "holds; --overwrite replaces only outputs: move those files away or choose "
            "another --out"
        )
    if entries and not is_prediction_dir(directory):
        raise RelexError(
            f"{directory} holds a model relex_stream did not write (a checkpoint saved by "
            "training, say); --overwrite replaces only predictions: move it away or choose "
            "another --out"
        )


def is_prediction_dir(directory: Path) -> bool:
    """Whether `directory` holds a model whose weights carry relex_stream's prediction mark."""
    try:
        return open_model(directory).predicted
    except RelexError:
        return False


def check_output_dir(directory: Path, overwrite: bool,
                     own_names: Collection[str] | None = None) -> None:
    """Refuse an existing output without --overwrite (or, with it, one holding files of
    another kind: check_replaceable), a link in its place, an unwritable OUT."""
    if directory.is_symlink():
        raise RelexError(
            f"{directory} is a symbolic link; relex_stream will not replace it: remove it or "
            "choose another --out"
        )
    if directory.is_dir():
        _finish_killed_output(directory)
    if directory.exists():
        if not overwrite:
            raise RelexError(f"{directory} already exists; pass --overwrite to replace it")
        if not directory.is_dir():
            raise RelexError(f"{directory} exists and is not a directory; remove it first")
        if own_names is not None:
            check_replaceable(directory, own_names)
    probe = directory.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise RelexError(f"cannot write to {probe}: choose a writable --out")


def _finish_killed_output(directory: Path) -> None:
    """A run killed between renaming an output into place and removing its marker left a
    complete output holding the marker: remove it, as that run would have."""
    if _abandoned(directory / MARKER):
        with contextlib.suppress(OSError):
            os.unlink(directory / MARKER)
            log.info("%s was put in place by a run that was stopped before it removed its "
                     "marker; the marker is removed", directory)


def remove_leftovers(directory: Path) -> None:
    """Make OUT, and remove what killed runs of ours left in it (marked temporary directories
    of processes that are gone)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RelexError(
            f"cannot create {directory}: {exc.strerror}; choose another --out"
        ) from None
    for entry in directory.iterdir():
        if not _OURS_RE.fullmatch(entry.name) or entry.is_symlink() or not entry.is_dir():
            continue
        if _abandoned(entry / MARKER):  # not ours (no marker), or a live run's: left alone
            _remove_marked(entry)
        elif _abandoned(entry / f"{MARKER}.new"):  # killed while writing its marker
            _remove_unfinished(entry)
        elif _empty_for_a_while(entry):  # killed between making it and its marker
            with contextlib.suppress(OSError):
                os.rmdir(entry)


# A run makes its temporary directory, then its marker, within microseconds: an empty one
# older than this is a killed run's, never a live run's about to mark it.
EMPTY_LEFTOVER_AGE_S = 60.0


def _empty_for_a_while(directory: Path) -> bool:
    try:
        with os.scandir(directory) as listing:
            if any(listing):
                return False
        return time.time() - os.lstat(directory).st_mtime > EMPTY_LEFTOVER_AGE_S
    except OSError:
        return False


def _remove_unfinished(directory: Path) -> None:
    """A temporary directory whose run died while writing its marker: the staging name is
    the only thing in it (the shards come after the marker)."""
    with contextlib.suppress(OSError):
        with os.scandir(directory) as listing:
            names = [entry.name for entry in listing]
        if names == [f"{MARKER}.new"]:
            os.unlink(directory / f"{MARKER}.new")
            os.rmdir(directory)


def _remove_marked(directory: Path) -> None:
    """Remove a temporary directory of ours (it must carry the marker), links never followed."""
    try:
        info = os.lstat(directory)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(info.st_mode) or not (directory / MARKER).is_file():
        return
    parent_fd = open_root(directory.parent)
    try:
        remove_tree(parent_fd, directory.name)
    finally:
        os.close(parent_fd)


def _write_synced(path: Path, content: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        sync_dir(fd)
    finally:
        os.close(fd)
