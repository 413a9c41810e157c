"""The trajectory store: a zarr v3 hierarchy holding, per group of tensors, the base row, every
observed row (losslessly, in its own dtype) and the Gram matrices, plus the model's small files.

    S/zarr.json                  root group; its attributes hold the manifest (and its sha256)
    S/lock                       flock target of the run that writes the store
    S/gen<G>/base/g<i>           the base's bits of group i: one shard
    S/gen<G>/rows/g<i>           observed rows of group i: (K, width), one shard per row
    S/gen<G>/gram/g<i>-k<K>      Gram matrices (T, K, K) float64 of group i's T float tensors;
                                 its zarr.json attributes are the group record (sizes and
                                 checksums of every shard): the group's completion mark
    S/gen<G>/files/<j>           config, tokenizer and other files an output needs

Rows are stored as codes (row k against row k − 1, row 0 against the base; row_codec.py), so an
appended checkpoint creates new files and rewrites none. A store is input like any other: the
manifest is checked field by field on open, every name is built from integers or checked to
be a plain file name, every byte read is checked against a checksum its parent holds (and the
bits decoded from a chunk against the crc32c of the bits that were stored), every group record
names the store, generation, group, steps and meaning (definition_sha256) it was written for,
and a missing or damaged piece is an error naming the tensor and the remedy, never zeros.
Files are never opened through a link, nor waited on (a FIFO), and written ones are created
anew (a hard link planted in the store is replaced, not written through).

Changes are transactions: the manifest records a pending generation (a build or an append),
groups are written and marked complete one by one (a killed run resumes at the next group),
and one atomic rename of the root's zarr.json commits; only then are superseded files removed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import stat
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import psutil
import torch

from . import shards
from .checkpoints import JSON_AUX
from .errors import NotAStore, RelexError, StoreBusy
from .jsonfile import JsonProblem, loads_strict, show
from .kernels import PSD_TOLERANCE
from .row_codec import (
    bytes_to_chunk,
    chunk_to_bytes,
    decode_rows,
    default_transform,
    encode_rows,
    transform_spec,
)
from .safefs import (
    entries,
    open_file,
    open_root,
    opened_dir,
    read_small,
    remove_tree,
    write_atomic,
)
from .safetensors_io import DTYPES
from .store_layout import (
    FORMAT_FAMILY,
    STORE_FORMAT,
    Generation,
    Group,
    Manifest,
    parse_manifest,
)
from .units import format_bytes

log = logging.getLogger(__name__)

ROOT_META = "zarr.json"
LOCK_NAME = "lock"
MAX_ROOT_BYTES = 256 * 2**20
MAX_META_BYTES = 64 * 2**20
_V2_DIRS = ("base", "rows", "gram", "files")
# No Gram entry of real checkpoints comes near: deltas of float32 values are below 7e38, so
# squares summed over 1e15 elements stay below 1e93 (and fp64 rows that large overflow the
# model anyway). eigh fails to converge on entries near float64's limit.
MAX_GRAM_VALUE = 1e250
# Every name relex_stream writes below a store's root (directories and files, temporary ones of
# write_atomic included): what it removes, when it removes, is only ever these.
_STORE_NAME = re.compile(
    r"zarr\.json|\d+|gen\d+|base|rows|gram|files|c|g\d+|g\d+-k\d+|\.(zarr\.json|\d+)\.tmp-\d+",
    re.ASCII)


def _write_error(path: Path, where: str, exc: OSError) -> RelexError:
    return RelexError(
        f"cannot write the store at {path} ({where}: {exc.strerror or exc}); free space or fix "
        "the file system, or rebuild it with --rebuild if something not written by relex_stream "
        "is in the way (or use another --cache)"
    )


def _store_error(path: Path, what: str) -> RelexError:
    return RelexError(
        f"the store at {path} {what}; rebuild it from the sources with --rebuild "
        "(or use another --cache)"
    )


def _tensors_of(group: Group, limit: int = 24) -> str:
    """'tensors 'a', 'b' and 3 more': the tensors a damaged piece of a group belongs to."""
    names = ", ".join(repr(n) for n in group.tensors[:limit])
    more = len(group.tensors) - limit
    return f"tensor {names}" if len(group.tensors) == 1 else (
        f"tensors {names}" + (f" and {more} more" if more > 0 else ""))


def _canonical(data: object) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _sha256(data: object) -> str:
    return hashlib.sha256(_canonical(data)).hexdigest()


def definition_sha256(gen: Generation) -> str:
    """What a generation's pieces mean (layout, row dtypes, tied tensors, transforms, codec,
    model files), not which steps it holds or where they came from: every group record keeps
    it, so a manifest that tells a reader to read the pieces as another model is refused."""
    data = gen.to_json()
    return _sha256({k: v for k, v in data.items() if k not in ("generation", "steps", "sources")})


def _strict_json(raw: bytes, where: str) -> dict:
    """Parse JSON strictly (jsonfile.loads_strict); a dict at the top."""
    try:
        data = loads_strict(raw.decode("utf-8"))
    except (UnicodeDecodeError, JsonProblem):
        raise RelexError(f"{where} is not valid JSON") from None
    if not isinstance(data, dict):
        raise RelexError(f"{where} is not a JSON object")
    return data


def _zarr_json(raw: bytes, where: str) -> dict:
    data = _strict_json(raw, where)
    if data.get("zarr_format") != 3 or not isinstance(data.get("attributes"), dict):
        raise RelexError(f"{where} is not zarr v3 metadata")
    return data


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class GroupRecord:
    """A finished group at a given number of rows: sizes and checksums of all its pieces."""

    group: int
    steps: tuple[int, ...]
    base: shards.ShardRecord
    rows: tuple[shards.ShardRecord, ...]
    gram_crc: int | None
    kinds: dict[str, str]  # float tensor -> "exact" or "randomized"
    support: dict[str, int]  # float tensor -> columns where some stored row differs from the base
    definition: str  # definition_sha256 of the generation the pieces were written for

    def to_json(self, store_id: str, generation: int) -> dict:
        return {
            "store_id": store_id,
            "generation": generation,
            "definition": self.definition,
            "group": self.group,
            "steps": list(self.steps),
            "base": self.base.to_json(),
            "rows": [r.to_json() for r in self.rows],
            "gram_crc": self.gram_crc,
            "kinds": self.kinds,
            "support": self.support,
        }


def _parse_record(
    data: object, store_id: str, gen: Generation, group: Group, steps: tuple[int, ...]
) -> GroupRecord:
    """Check a group record against what the manifest says it must be."""
    if not isinstance(data, dict) or set(data) != {"record", "sha256"}:
        raise ValueError("malformed record")
    body = data["record"]
    if _sha256(body) != data["sha256"]:
        raise ValueError("its record does not match its checksum")
    expected_keys = {"store_id", "generation", "definition", "group", "steps", "base", "rows",
                     "gram_crc", "kinds", "support"}
    if not isinstance(body, dict) or set(body) != expected_keys:
        raise ValueError("malformed record")
    if (body["store_id"], body["generation"], body["group"], body["steps"]) != (
        store_id, gen.generation, group.index, list(steps)):
        raise ValueError("its record belongs to another store, generation, group or step list")
    if body["definition"] != definition_sha256(gen):
        # the manifest says to read the pieces as another model (shapes, dtypes, transforms,
        # file names) than the one they were written for
        raise ValueError("its record was written for another model layout than the manifest's")

    def shard(item: object) -> shards.ShardRecord:
        if not (isinstance(item, list) and len(item) == 2 and all(type(x) is int and
                0 <= x < 2**63 for x in item)):
            raise ValueError("malformed shard record")
        return shards.ShardRecord(item[0], item[1])

    rows = body["rows"]
    n_rows = len(steps) if group.has_rows else 0
    if not isinstance(rows, list) or len(rows) != n_rows:
        raise ValueError("its record lists the wrong number of rows")
    float_names = set(group.tensors) if group.has_rows else set()
    kinds, support = body["kinds"], body["support"]
    if not (isinstance(kinds, dict) and set(kinds) == float_names
            and all(v in ("exact", "randomized") for v in kinds.values())):
        raise ValueError("malformed kinds")
    numel = dict(zip(group.tensors, group.numels, strict=True))
    if not (isinstance(support, dict) and set(support) == float_names and all(
            type(v) is int and 0 <= v <= numel[k] for k, v in support.items())):
        raise ValueError("malformed support counts")
    gram_crc = body["gram_crc"]
    if (gram_crc is None) == bool(float_names) or (gram_crc is not None and type(gram_crc) is not
                                                    int):
        raise ValueError("malformed Gram checksum")
    return GroupRecord(group.index, steps, shard(body["base"]), tuple(shard(r) for r in rows),
                       gram_crc, dict(kinds), dict(support), body["definition"])


# --------------------------------------------------------------------------- the store


class TrajectoryStore:
    """An opened store: its checked manifest, and reads and writes of its groups."""

    def __init__(self, path: Path, root_fd: int, manifest: Manifest, lock_fd: int | None):
        self.path = path
        self._root_fd = root_fd
        self.manifest = manifest
        self._lock_fd = lock_fd
        self._records: dict[tuple[int, int, int], GroupRecord] = {}
        self._grams: dict[tuple[int, int, int], np.ndarray] = {}
        self.created = False  # this process made the store (create() wrote its first manifest)
        self.finished_groups = 0  # groups this process marked complete

    # ------------------------------------------------------------------ open, create, close

    @staticmethod
    def probe(path: Path) -> str:
        """'absent', 'empty' (a directory a new store may be made in) or 'store' (has metadata).

        A directory with other content is refused without a byte written into it.
        """
        try:
            info = os.stat(path)
        except FileNotFoundError:
            return "absent"
        except OSError as exc:
            raise RelexError(f"cannot look at {path}: {exc.strerror}") from None
        if not stat.S_ISDIR(info.st_mode):
            raise NotAStore(f"{path} exists and is not a directory", "pass another --cache")
        try:
            names = os.listdir(path)
        except OSError as exc:
            raise NotAStore(f"cannot read {path}: {exc.strerror}", "pass another --cache") from None
        if ROOT_META in names:
            return "store"
        # an empty directory, or one another run is creating a store in (its lock, and the
        # temporary file of its first manifest)
        if all(n == LOCK_NAME or n.startswith(f".{ROOT_META}.tmp-") for n in names):
            return "empty"
        raise NotAStore(
            f"{path} exists but is not a relex_stream store (no {ROOT_META})",
            "relex_stream will not write into it: pass another --cache, or remove it",
        )

    @classmethod
    def open(cls, path: Path, lock: str = "none") -> TrajectoryStore:
        """Open and check an existing store; lock 'none', 'shared' or 'exclusive'."""
        try:
            root_fd = open_root(path)
        except OSError as exc:
            raise RelexError(f"cannot open the store at {path}: {exc.strerror}") from None
        lock_fd = None
        try:
            if lock != "none":
                lock_fd = _lock(path, root_fd, exclusive=lock == "exclusive")
            manifest = _read_manifest(path, root_fd)
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            os.close(root_fd)
            raise
        return cls(path, root_fd, manifest, lock_fd)

    @classmethod
    def create(cls, path: Path, replace: bool = False) -> TrajectoryStore:
        """Make a new, empty store at `path` (absent or an empty directory) and lock it.

        replace: over a store that cannot be opened (is_replaceable); its files stay until the
        first commit removes what the new manifest does not name (--rebuild).
        """
        made_dir = False
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.mkdir(path, 0o755)
                made_dir = True
            root_fd = open_root(path)
        except OSError as exc:
            raise RelexError(
                f"cannot create the store at {path}: {exc.strerror}; choose a writable --cache"
            ) from None
        try:
            made_lock = LOCK_NAME not in entries(root_fd)
            lock_fd = _lock(path, root_fd, exclusive=True)
        except BaseException as exc:
            # a file system without locks: leave nothing (but a lock another run holds stays)
            if made_lock and not isinstance(exc, StoreBusy):
                with contextlib.suppress(OSError):
                    os.unlink(LOCK_NAME, dir_fd=root_fd)
            os.close(root_fd)
            if made_dir:
                with contextlib.suppress(OSError):
                    os.rmdir(path)
            raise
        if ROOT_META in entries(root_fd) and not replace:  # another run made it meanwhile
            os.close(lock_fd)
            os.close(root_fd)
            return cls.open(path, lock="exclusive")
        manifest = Manifest(uuid.uuid4().hex, None, None, None)
        store = cls(path, root_fd, manifest, lock_fd)
        store.created = True
        try:
            store._write_manifest(manifest)
        except BaseException:
            if made_lock:  # a full disk: nothing of the store is left (its folder is emptied)
                with contextlib.suppress(OSError):
                    os.unlink(LOCK_NAME, dir_fd=root_fd)
            store.close()
            raise
        return store

    def close(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    def __enter__(self) -> TrajectoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the committed view

    @property
    def current(self) -> Generation:
        if self.manifest.current is None:
            raise RelexError(
                f"the store at {self.path} holds no finished run yet (an interrupted first "
                "run?); rerun with --base and --runs to build it"
            )
        return self.manifest.current

    @property
    def steps(self) -> list[int]:
        return list(self.current.steps)

    def groups(self, gen: Generation | None = None) -> list[Group]:
        return (gen or self.current).groups()

    def group_of(self, name: str, gen: Generation | None = None) -> Group:
        for group in self.groups(gen):
            if name in group.tensors:
                return group
        raise KeyError(name)

    def aux_files(self, gen: Generation | None = None) -> dict[str, bytes]:
        """The model's small files (config, tokenizer), each checked against its sha256."""
        gen = gen or self.current
        files = {}
        for j, aux in enumerate(gen.aux):
            where = f"gen{gen.generation}/files/{j}"
            try:
                with opened_dir(self._root_fd, (f"gen{gen.generation}", "files", str(j), "c"),
                                False, str(self.path)) as fd:
                    raw = read_small(fd, "0", aux.size + 4)
                data = shards.read_plain_chunk(raw, None, np.uint8, aux.size)
            except (OSError, ValueError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise _store_error(self.path, f"has a damaged or missing copy of the model file "
                                              f"{aux.name!r} ({where}: {reason})") from None
            if hashlib.sha256(data.tobytes()).hexdigest() != aux.sha256:
                raise _store_error(self.path, f"has a damaged copy of the model file "
                                              f"{aux.name!r} ({where})")
            if aux.name in JSON_AUX:  # read as the base's are (checkpoints.aux_files)
                try:
                    _strict_json(data.tobytes(), aux.name)
                except RelexError:
                    raise _store_error(self.path, f"has a copy of the model file {aux.name!r} "
                                                  "that is not a JSON object") from None
            files[aux.name] = data.tobytes()
        return files

    def record(self, group: Group, gen: Generation | None = None,
               steps: tuple[int, ...] | None = None) -> GroupRecord:
        """The record of a finished group (committed steps unless `steps` says otherwise)."""
        gen = gen or self.current
        steps = gen.steps if steps is None else steps
        key = (gen.generation, group.index, len(steps))
        if key not in self._records:
            record = self._load_record(gen, group, steps)
            if record is None:
                raise _store_error(self.path, f"misses the record of {_tensors_of(group)}")
            self._records[key] = record
        return self._records[key]

    def has_record(self, group: Group, gen: Generation, steps: tuple[int, ...]) -> bool:
        """True when the group is finished for `steps` (a resumed run skips it)."""
        try:
            return self._load_record(gen, group, steps) is not None
        except RelexError:
            return False

    def _load_record(self, gen: Generation, group: Group,
                     steps: tuple[int, ...]) -> GroupRecord | None:
        name = f"g{group.index}-k{len(steps)}"
        try:
            with opened_dir(self._root_fd, (f"gen{gen.generation}", "gram", name), False,
                            str(self.path)) as fd:
                raw = read_small(fd, ROOT_META, MAX_META_BYTES)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _store_error(self.path, f"has unreadable metadata of {_tensors_of(group)} "
                                          f"({exc.strerror})") from None
        try:
            meta = _zarr_json(raw, f"gen{gen.generation}/gram/{name}/zarr.json")
        except RelexError as exc:
            raise _store_error(self.path, f"has damaged metadata of {_tensors_of(group)} "
                                          f"({exc})") from None
        expected = shards.plain_array_meta(
            [len(group.tensors) if group.has_rows else 0, len(steps), len(steps)], "float64"
        )
        if {k: v for k, v in meta.items() if k != "attributes"} != {
                k: v for k, v in expected.items() if k != "attributes"}:
            raise _store_error(self.path, f"has changed metadata of {_tensors_of(group)}")
        try:
            return _parse_record(meta["attributes"].get("relex_stream_group"),
                                 self.manifest.store_id, gen, group, steps)
        except ValueError as exc:
            raise _store_error(self.path, f"has a damaged record of {_tensors_of(group)} "
                                          f"({exc})") from None

    def grams(self, group: Group, gen: Generation | None = None,
              steps: tuple[int, ...] | None = None) -> np.ndarray:
        """(T, K, K) float64 Gram matrices of the group's float tensors."""
        gen = gen or self.current
        steps = gen.steps if steps is None else steps
        key = (gen.generation, group.index, len(steps))
        if key in self._grams:
            return self._grams[key]
        record = self.record(group, gen, steps)
        k, t = len(steps), len(group.tensors)
        _check_fits_memory(self.path, t * k * k * 8 * 2, f"the Gram matrices of "
                           f"{_tensors_of(group)} ({t} of {k} × {k} steps)")
        name = f"g{group.index}-k{k}"
        try:
            with opened_dir(self._root_fd, (f"gen{gen.generation}", "gram", name, "c", "0", "0"),
                            False, str(self.path)) as fd:
                raw = read_small(fd, "0", t * k * k * 8 + 4)
            data = shards.read_plain_chunk(raw, record.gram_crc, np.dtype("<f8"), t * k * k)
        except (OSError, ValueError) as exc:
            raise _store_error(self.path, f"has a damaged or missing Gram matrix of "
                                          f"{_tensors_of(group)} ({exc})") from None
        stack = data.reshape(t, k, k)
        for name, gram in zip(group.tensors, stack, strict=True):
            problem = gram_problem(gram)
            if problem is not None:
                raise _store_error(self.path, f"has a damaged Gram matrix of tensor "
                                              f"{show(name)} ({problem})")
        self._grams[key] = stack
        return self._grams[key]

    def gram(self, name: str) -> torch.Tensor:
        """The Gram matrix (K, K) float64 of one float tensor, over all committed steps."""
        group = self.group_of(name)
        return torch.from_numpy(self.grams(group)[group.tensors.index(name)].copy())

    # ------------------------------------------------------------------ reading rows

    def reader(self) -> StoreReader:
        """A reader of base and row bits (one per thread)."""
        return StoreReader(self)

    @contextlib.contextmanager
    def _dir(self, parts: tuple[str, ...], create: bool = False):
        """A directory of the store, made when `create` (for writing: a write that fails in it,
        say over a directory planted where a file goes, is one error naming the store)."""
        try:
            with opened_dir(self._root_fd, parts, create, str(self.path)) as fd:
                yield fd
        except OSError as exc:
            if not create:
                raise  # readers name the piece they were reading
            raise _write_error(self.path, "/".join(parts), exc) from None

    # ------------------------------------------------------------------ transactions

    def begin(self, kind: str, pending: Generation) -> None:
        """Record a pending build (new generation) or append; discard a different pending one."""
        self._require_lock()
        old = self.manifest.pending
        if old is not None and old != pending:
            self._discard_pending(old, self.manifest.pending_kind)
        if old == pending:
            return
        manifest = replace(self.manifest, pending=pending, pending_kind=kind)
        if kind == "build":
            self._make_generation(pending)
        else:
            for group in pending.groups():
                self._write_rows_meta(pending, group, len(pending.steps))
        self._write_manifest(manifest)

    def _make_generation(self, gen: Generation) -> None:
        parts = (f"gen{gen.generation}",)
        with self._dir(parts, create=True) as fd:
            write_atomic(fd, ROOT_META, _canonical(shards.group_meta()))
        for sub in ("base", "rows", "gram", "files"):
            with self._dir((*parts, sub), create=True) as fd:
                write_atomic(fd, ROOT_META, _canonical(shards.group_meta()))
        for group in gen.groups():
            base_meta = shards.sharded_array_meta(
                [1, group.width], DTYPES[group.base_dtype][1].itemsize, group.chunk_cols
            )
            with self._dir((*parts, "base", f"g{group.index}"), create=True) as fd:
                write_atomic(fd, ROOT_META, _canonical(base_meta))
            self._write_rows_meta(gen, group, len(gen.steps))

    def write_aux(self, gen: Generation, files: dict[str, bytes]) -> None:
        """Keep the model's small files in the pending generation (in manifest order)."""
        for j, aux in enumerate(gen.aux):
            content = np.frombuffer(files[aux.name], dtype=np.uint8)
            parts = (f"gen{gen.generation}", "files", str(j))
            with self._dir((*parts, "c"), create=True) as fd:
                chunk, _ = shards.plain_chunk(content)
                write_atomic(fd, "0", chunk)
            with self._dir(parts) as fd:
                write_atomic(fd, ROOT_META,
                             _canonical(shards.plain_array_meta([aux.size], "uint8")))

    def _write_rows_meta(self, gen: Generation, group: Group, n_rows: int) -> None:
        if not group.has_rows:
            return
        meta = shards.sharded_array_meta(
            [n_rows, group.width], DTYPES[group.row_dtype][1].itemsize, group.chunk_cols
        )
        with self._dir((f"gen{gen.generation}", "rows", f"g{group.index}"), create=True) as fd:
            write_atomic(fd, ROOT_META, _canonical(meta))

    def group_writer(self, pending: Generation, group: Group, first_row: int,
                     write_base: bool) -> GroupWriter:
        """A writer of the group's new rows first_row.. (and its base) in the pending change."""
        return GroupWriter(self, pending, group, first_row, write_base)

    def commit(self) -> None:
        """Make the pending change the current one, then remove what it superseded."""
        self._require_lock()
        manifest = self.manifest
        if manifest.pending is None:
            return
        old = manifest.current
        new = Manifest(manifest.store_id, manifest.pending, None, None)
        self._write_manifest(new)
        self._records.clear()
        self._grams.clear()
        try:
            self._collect_garbage(old)
        except OSError as exc:  # committed: what is left over costs disk, not correctness
            log.warning("the store at %s is committed, but removing what the change replaced "
                        "failed (%s); it reads correctly, and the next change removes them",
                        self.path, exc.strerror or exc)

    def abandon(self) -> None:
        """Drop the pending change: the committed generation stays current (or none, for a
        first build), and what the change wrote is removed."""
        self._require_lock()
        manifest = self.manifest
        if manifest.pending is None:
            return
        self._write_manifest(replace(manifest, pending=None, pending_kind=None))
        self._records.clear()
        self._grams.clear()
        self._discard_pending(manifest.pending, manifest.pending_kind)
        current = manifest.current
        if manifest.pending_kind == "build" or current is None:
            return
        k, left = len(current.steps), 0  # an append: its rows go, the arrays' shapes are K again
        for group in current.groups():
            if not group.has_rows:
                continue
            self._write_rows_meta(current, group, k)
            with contextlib.suppress(FileNotFoundError), self._dir(
                    (f"gen{current.generation}", "rows", f"g{group.index}", "c")) as fd:
                for name in entries(fd):
                    if name.isdigit() and int(name) >= k:
                        left += self._remove(fd, name)
        self._report_left(left)

    def _collect_garbage(self, old: Generation | None) -> None:
        """Remove files no committed state refers to: old generations, Gram versions, rows."""
        gen = self.current
        keep = f"gen{gen.generation}"
        left = 0
        for name in entries(self._root_fd):
            if (name.startswith("gen") and name[3:].isdigit() and name != keep) or (
                    name in _V2_DIRS):
                left += self._remove(self._root_fd, name)
        k = len(gen.steps)
        with self._dir((keep, "gram")) as fd:
            wanted = {f"g{g.index}-k{k}" for g in gen.groups()}
            for name in entries(fd):
                if name != ROOT_META and name not in wanted:
                    left += self._remove(fd, name)
        for group in gen.groups():
            if not group.has_rows:
                continue
            with contextlib.suppress(FileNotFoundError), self._dir(
                    (keep, "rows", f"g{group.index}", "c")) as fd:
                for name in entries(fd):
                    if not (name.isdigit() and int(name) < k):
                        left += self._remove(fd, name)
        self._report_left(left)

    def _discard_pending(self, pending: Generation, kind: str | None) -> None:
        """Remove what an interrupted change to other steps wrote (relex_stream's own files)."""
        if kind == "build":
            self._report_left(self._remove(self._root_fd, f"gen{pending.generation}"))
            return
        current = self.current
        k = len(current.steps)
        left = 0
        with self._dir((f"gen{current.generation}", "gram")) as fd:
            for name in entries(fd):
                if name != ROOT_META and not name.endswith(f"-k{k}"):
                    left += self._remove(fd, name)
        self._report_left(left)

    @staticmethod
    def _remove(dir_fd: int, name: str) -> int:
        """remove_tree of the store's own names only: files someone else put in the store
        (and the directories holding them) stay. Returns how many entries stayed."""
        return remove_tree(dir_fd, name, owned=_STORE_NAME.fullmatch)

    def _report_left(self, left: int) -> None:
        if left:
            log.warning("left %d file(s) in %s that relex_stream did not write (and the "
                        "directories holding them); remove them by hand if they are not needed",
                        left, self.path)

    def _write_manifest(self, manifest: Manifest) -> None:
        body = manifest.to_json()
        attributes = {"relex_stream": body, "relex_stream_sha256": _sha256(body)}
        try:
            write_atomic(self._root_fd, ROOT_META, _canonical(shards.group_meta(attributes)))
        except OSError as exc:
            raise _write_error(self.path, ROOT_META, exc) from None
        self.manifest = manifest

    def _require_lock(self) -> None:
        if self._lock_fd is None:
            raise AssertionError("store changes need the exclusive lock")

    @property
    def locked(self) -> bool:
        return self._lock_fd is not None


# --------------------------------------------------------------------------- locking


def _lock(path: Path, root_fd: int, exclusive: bool) -> int | None:
    """flock the store's lock file (never through a link); None for a shared lock without one."""
    flags = os.O_RDWR | os.O_CREAT if exclusive else os.O_RDONLY
    try:
        fd = open_file(root_fd, LOCK_NAME, flags)
    except FileNotFoundError:
        return None  # nobody ever wrote this store from here: nothing to wait for
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RelexError(
                f"the store's lock {path / LOCK_NAME} is a symbolic link; relex_stream will not "
                "write through it: remove it (or use another --cache)"
            ) from None
        if not exclusive:
            return None  # a store we cannot write is read without a lock
        raise RelexError(
            f"cannot write the store's lock {path / LOCK_NAME}: {exc.strerror}; choose a "
            "writable --cache (or --out)"
        ) from None
    if exclusive and os.fstat(fd).st_nlink != 1:  # its pid is written: never into another file
        os.close(fd)
        raise RelexError(
            f"the store's lock {path / LOCK_NAME} is a hard link to another file; relex_stream "
            "will not write through it: remove it (or use another --cache)"
        )
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        # the file holds the last writer's pid: a reader holding the lock writes none
        raise StoreBusy(
            f"the store at {path} is in use by another process (its last writer was pid "
            f"{holder}); wait for it to finish, or give this run another --cache"
        ) from None
    except OSError as exc:  # ENOLCK, ENOSYS, EOPNOTSUPP: a file system without locks
        os.close(fd)
        if not exclusive:
            log.debug("the store at %s is read without a lock (%s)", path, exc.strerror)
            return None  # what a reader reads is checked (checksums, the manifest) anyway
        raise RelexError(
            f"the file system of the store at {path} has no locks ({exc.strerror or exc}), "
            "which writing a shared store needs: put --cache on one that has them (NFS v4 or "
            "NFS with lockd, Lustre mounted with -o flock, a local disk)"
        ) from None
    if exclusive:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _read_manifest(path: Path, root_fd: int) -> Manifest:
    try:
        raw = read_small(root_fd, ROOT_META, MAX_ROOT_BYTES)
    except FileNotFoundError:
        raise NotAStore(f"{path} exists but is not a relex_stream store (no {ROOT_META})") \
            from None
    except OSError as exc:
        raise _store_error(path, f"has unreadable metadata ({exc.strerror})") from None
    try:
        meta = _zarr_json(raw, f"{path}/{ROOT_META}")
    except RelexError as exc:
        raise NotAStore(f"{path} exists but is not a relex_stream store ({exc})") from None
    attributes = meta["attributes"]
    found = attributes.get("format")
    if isinstance(found, str) and found.startswith(FORMAT_FAMILY):
        raise RelexError(
            f"the store at {path} was written by an older relex_stream ({found}; this one reads "
            f"{STORE_FORMAT}); rebuild it with --rebuild (or use another --cache)"
        )
    body = attributes.get("relex_stream")
    if not isinstance(body, dict):
        raise NotAStore(f"{path} exists but is not a relex_stream store")
    if body.get("format") != STORE_FORMAT:
        raise RelexError(
            f"the store at {path} was written by another version of relex_stream "
            f"({str(body.get('format'))[:60]!r}; this one reads {STORE_FORMAT}); rebuild it with "
            "--rebuild (or use another --cache)"
        )
    if _sha256(body) != attributes.get("relex_stream_sha256"):
        raise _store_error(path, "has metadata that does not match its checksum")
    return parse_manifest(body)


def stored_row_fraction(path: Path, gen: Generation, k: int, last_rows: int = 3) -> float | None:
    """Bytes on disk ÷ raw bytes of the last `last_rows` of the first k rows of `gen` (all
    groups): what an append's rows will likely take, or None when there are none to measure
    (sizes only, no link followed; a store that lies here only makes the disk check looser)."""
    rows = range(max(1, k - last_rows), k)  # row 0 is against the base: not typical
    stored = raw = 0
    try:
        root = open_root(path)
    except OSError:
        return None
    try:
        for group in gen.groups():
            if not group.has_rows:
                continue
            row_bytes = sum(group.numels) * DTYPES[group.row_dtype][1].itemsize
            for row in rows:
                try:
                    with opened_dir(root, (f"gen{gen.generation}", "rows", f"g{group.index}",
                                           "c", str(row)), False, str(path)) as fd:
                        stored += os.stat("0", dir_fd=fd, follow_symlinks=False).st_size
                except (OSError, RelexError):
                    return None
                raw += row_bytes
    finally:
        os.close(root)
    return stored / raw if raw else None


def _check_fits_memory(path: Path, nbytes: int, what: str) -> None:
    """RelexError before a read the store's metadata sizes that this machine could not hold
    (a forged step count asks T·K²·8 bytes of a file a sparse one can fake)."""
    available = psutil.virtual_memory().available
    if nbytes > available:
        raise _store_error(path, f"claims {what}, which take {format_bytes(nbytes)} to read, "
                                 f"more than the {format_bytes(available)} of memory available")


def gram_problem(gram: np.ndarray) -> str | None:
    """Why a stored (K, K) float64 matrix cannot be a Gram matrix D Dᵀ, or None.

    Every Gram matrix is finite and symmetric, with a non-negative diagonal and
    |G_ij| <= sqrt(G_ii G_jj) (Cauchy-Schwarz); the checks allow rounding-sized slack (a
    randomized one is Q S Qᵀ, symmetric only to rounding). The checksums catch damage; these
    catch a matrix forged with its checksums recomputed, before eigh meets it.
    """
    if not np.isfinite(gram).all():
        return "values that are not finite"
    if gram.size and float(np.abs(gram).max()) > MAX_GRAM_VALUE:
        return "values larger than any checkpoint can give"
    diagonal = np.diagonal(gram)  # (K,)
    # rounding-sized, relative to the largest entry (a PSD matrix's is on its diagonal)
    tolerance = 1e-9 * max(float(diagonal.max(initial=0.0)), 0.0) + 1e-300
    if (diagonal < -tolerance).any():
        return "a negative diagonal"
    root = np.sqrt(np.clip(diagonal, 0.0, None))  # (K,)
    bound = root[:, None] * root[None, :]  # (K, K); the product of the roots cannot overflow
    slack = 1e-6 * bound + tolerance
    if (np.abs(gram - gram.T) > slack).any():
        return "it is not symmetric"
    if (np.abs(gram) > bound + slack).any():
        return "entries larger than its diagonal allows"
    # positive semi-definite up to rounding: G + τ·max(diag)·I must factor (a Cholesky costs a
    # third of an eigh); it fails iff an eigenvalue lies below -τ·max(diag), and rounding
    # leaves ones of ~K·ε·λ_max, far above that (λ_max <= K·max(diag)).
    shift = PSD_TOLERANCE * float(diagonal.max(initial=0.0)) + 1e-300
    try:
        np.linalg.cholesky((gram + gram.T) / 2 + shift * np.eye(gram.shape[0]))
    except np.linalg.LinAlgError:
        return "a negative eigenvalue, which no deltas give"
    return None


def is_replaceable(path: Path) -> bool:
    """True for a store --rebuild may replace though it cannot be opened: its root says it is
    relex_stream's (an earlier format, or this one damaged)."""
    try:
        raw = read_small_path(path / ROOT_META, MAX_ROOT_BYTES)
        attributes = _zarr_json(raw, str(path))["attributes"]
    except (OSError, RelexError):
        return False
    old = attributes.get("format")
    body = attributes.get("relex_stream")
    return (isinstance(old, str) and old.startswith(FORMAT_FAMILY)) or (
        isinstance(body, dict) and str(body.get("format", "")).startswith(FORMAT_FAMILY))


def read_small_path(path: Path, max_bytes: int) -> bytes:
    fd = open_root(path.parent)
    try:
        return read_small(fd, path.name, max_bytes)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- row transforms


def encode_codes(row: np.ndarray, previous: np.ndarray, transform: str,
                 reuse: bool = False) -> np.ndarray:
    """(C·itemsize,) uint8 for the compressor: one row's chunk coded against the previous row
    (or the base), then byte-shuffled when the transform says so. With `reuse`, in this
    thread's scratch (valid until its next encode)."""
    codes_out = shuffled = None
    if reuse:
        codes_out = shards.scratch("codes", row.nbytes).view(row.dtype)[None, :]
        if transform_spec(transform).shuffle:
            shuffled = shards.scratch("shuffled", row.nbytes)
    codes = encode_rows(row[None, :], previous, transform, out=codes_out)[0]
    return chunk_to_bytes(np.ascontiguousarray(codes), transform, shuffled)


def _raw_payload(data: np.ndarray, reference: np.ndarray | None,
                 transform: str) -> Callable[[int, int, np.ndarray], None]:
    """fill_payload (shards.fill_raw_frame) of one chunk's codes: data and reference (C,)
    words; bytes [lo, hi) of the codes go into `into` (uint8, hi − lo bytes in any shape)."""
    if reference is None or transform_spec(transform).mode == "none":
        source = data.view(np.uint8)
        return lambda lo, hi, into: np.copyto(into, source[lo:hi].reshape(into.shape))
    if transform == "xor-prev":  # XOR works byte by byte: any byte range is its own codes
        words, against = data.view(np.uint8), reference.view(np.uint8)
        return lambda lo, hi, into: np.bitwise_xor(words[lo:hi].reshape(into.shape),
                                                   against[lo:hi].reshape(into.shape), out=into)
    codes = encode_codes(data, reference, transform, reuse=True)
    return lambda lo, hi, into: np.copyto(into, codes[lo:hi].reshape(into.shape))


def decode_chunk_codes(payload: memoryview, crc: int, transform: str, codes: np.ndarray,
                       scratch: np.ndarray) -> None:
    """Decode one stored chunk into `codes` (C,) words (scratch: C·itemsize bytes)."""
    if transform_spec(transform).shuffle:
        shards.decode_chunk(payload, crc, scratch)
        bytes_to_chunk(scratch, transform, codes)
    else:
        shards.decode_chunk(payload, crc, codes)


def apply_codes(current: np.ndarray, codes: np.ndarray, transform: str) -> None:
    """current ← the row whose codes are `codes` against `current` (the previous row)."""
    decode_rows(codes[None, :], current, transform, out=codes[None, :])
    current[...] = codes


def apply_codes_in_place(codes: np.ndarray, previous: np.ndarray, transform: str) -> None:
    """codes ← the row they code against `previous` (XOR-prev needs one pass)."""
    if transform == "xor-prev":
        np.bitwise_xor(codes, previous, out=codes)
    else:
        decode_rows(codes[None, :], previous, transform, out=codes[None, :])


def compressed_sample_fraction(base: np.ndarray, rows: np.ndarray, group: Group,
                               codec: str) -> float:
    """Stored size ÷ raw size of a sample: base (c,) and rows (K, c) bits as the store keeps
    them (c at most one inner chunk)."""
    transform = default_transform(rows.itemsize, group.row_dtype) if codec == "xor-zstd" else (
        "none")
    raw = stored = 0
    previous = _reference_row(base, group, rows.dtype)
    for row in rows:
        frame, _, _ = shards.encode_chunk(encode_codes(row, previous, transform), codec != "none",
                                          shards.KEEP_ZSTD_BELOW[transform])
        stored += len(frame) + 4
        raw += row.nbytes
        previous = row
    return stored / raw if raw else 1.0


# --------------------------------------------------------------------------- reading rows


class StoreReader:
    """Reads base and row bits of committed (or live, being written) groups; one per thread.

    Keeps the shards of one group open at a time; every chunk is checked against the shard's
    tail, and the tail against the group record, before its bits are used.
    """

    def __init__(self, store: TrajectoryStore):
        self._store = store
        self._open: dict[tuple, tuple[int, shards.ShardIndex]] = {}
        self._group_key: tuple | None = None
        self.bytes_read = 0  # stored (compressed) bytes read from disk

    def _payload(self, fd: int, index: shards.ShardIndex, j: int) -> memoryview:
        self.bytes_read += int(index.sizes[j])
        return memoryview(shards.read_chunk_payload(fd, index, j))

    def close(self) -> None:
        for fd, _ in self._open.values():
            os.close(fd)
        self._open.clear()

    def _shard(self, gen: Generation, group: Group, row: int | None,
               record: shards.ShardRecord | None, live: GroupWriter | None, name: str):
        """(fd, index) of the base shard (row None) or a row shard; `name`: the tensor read."""
        key = (gen.generation, group.index, row)
        if (gen.generation, group.index) != self._group_key:
            self.close()
            self._group_key = (gen.generation, group.index)
        if key in self._open:
            return self._open[key]
        gen_dir, group_dir = f"gen{gen.generation}", f"g{group.index}"
        parts = (gen_dir, "base", group_dir, "c") if row is None else (
            gen_dir, "rows", group_dir, "c", str(row))
        try:
            with self._store._dir(parts) as fd_dir:
                fd = open_file(fd_dir, "0", os.O_RDONLY)
            try:
                if live is not None and live.covers(row):
                    index = live.index(row)
                else:
                    words = group.base_dtype if row is None else group.row_dtype
                    index = shards.read_index(fd, group.n_chunks, record, group.chunk_cols
                                              * DTYPES[words][1].itemsize)
            except BaseException:
                os.close(fd)
                raise
        except (OSError, ValueError) as exc:
            what = "base" if row is None else f"row {row}"
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise _store_error(
                self._store.path, f"has a damaged or missing shard ({what}) of "
                f"{_tensors_of(group)} ({reason})") from None
        self._open[key] = (fd, index)
        return fd, index

    def raw_crcs(self, gen: Generation, steps: tuple[int, ...], group: Group, row: int,
                 name: str, live: GroupWriter | None = None) -> np.ndarray:
        """(n_chunks,) crc32c of the raw bits of every inner chunk of a stored row."""
        record = None if live is not None and live.covers(row) else self._store.record(
            group, gen, steps).rows[row]
        _, index = self._shard(gen, group, row, record, live, name)
        return index.raw_crcs

    def base_index(self, gen: Generation, steps: tuple[int, ...], group: Group, name: str,
                   live: GroupWriter | None = None) -> shards.ShardIndex | None:
        """The index (raw-bits crc32c included) of the group's base shard, or None when the
        store holds no base of the group yet; with a live writer, chunks it has not written
        yet are MISSING in it."""
        if live is not None and live.covers(None):
            return live.index(None)
        if not steps or not self._store.has_record(group, gen, steps):
            return None
        record = self._store.record(group, gen, steps).base
        return self._shard(gen, group, None, record, None, name)[1]

    def _spans(self, group: Group, name: str, start: int, stop: int):
        """(inner chunk j, slice of the output, slice of the chunk) covering [start, stop)."""
        offset, _ = group.position(name)
        chunk = group.chunk_cols
        for j in group.chunk_range(name, start, stop):
            lo = j * chunk - offset
            a, b = max(lo, start), min(lo + chunk, stop)
            yield j, slice(a - start, b - start), slice(a - lo, b - lo)

    def read_base(self, gen: Generation, steps: tuple[int, ...], group: Group, name: str,
                  start: int, out: np.ndarray, live: GroupWriter | None = None) -> None:
        """Fill `out` (c,) with the base's bits of `name`, elements [start, start + c).

        steps: the steps whose group record describes what `live` does not write."""
        record = None if live is not None and live.covers(None) else self._store.record(
            group, gen, steps).base
        fd, index = self._shard(gen, group, None, record, live, name)
        scratch = np.empty(group.chunk_cols, dtype=out.dtype)
        with self._guard(name):
            for j, span, inner in self._spans(group, name, start, start + out.shape[0]):
                payload = self._payload(fd, index, j)
                shards.decode_chunk(payload, int(index.encoded_crcs[j]), scratch)
                _check_raw(group, name, j, scratch[inner], index)
                out[span] = scratch[inner]

    def read_rows(self, gen: Generation, steps: tuple[int, ...], group: Group, name: str,
                  start: int, row_ids: list[int], base: np.ndarray, out: np.ndarray,
                  live: GroupWriter | None = None) -> None:
        """Fill `out` (len(row_ids), c) with rows `row_ids` of `name`, elements [start, start+c).

        base: (c,) the base's bits of the same elements (row 0 is coded against it). Row k
        decodes from rows 0..k, so every row up to the last one asked for is decoded, one inner
        chunk at a time (memory: two chunks). steps: the committed steps whose record describes
        the rows that `live` (a group being written) does not.
        """
        transform = gen.transform(group.row_dtype)
        words = out.dtype
        needed = max(row_ids) + 1
        handles = []
        for k in range(needed):
            live_row = live is not None and live.covers(k)
            record = None if live_row else self._store.record(group, gen, steps).rows[k]
            handles.append(self._shard(gen, group, k, record, live, name))
        position = {row: i for i, row in enumerate(row_ids)}
        codes = np.empty(group.chunk_cols, dtype=words)
        current = np.empty(group.chunk_cols, dtype=words)
        scratch = np.empty(group.chunk_cols * codes.itemsize, dtype=np.uint8)
        in_place = row_ids == list(range(needed)) and not transform_spec(transform).shuffle
        with self._guard(name):
            for j, span, inner in self._spans(group, name, start, start + out.shape[1]):
                reference = _reference_row(base[span], group, words)
                if in_place and inner.stop - inner.start == group.chunk_cols:
                    # every row asked for, whole chunks: decode straight into the output and
                    # undo the transform there (row k against the row above it)
                    for k, (fd, index) in enumerate(handles):
                        target = out[k, span]
                        shards.decode_chunk(self._payload(fd, index, j),
                                            int(index.encoded_crcs[j]), target)
                        apply_codes_in_place(target, reference if k == 0 else out[k - 1, span],
                                             transform)
                        _check_raw(group, name, j, target, index)
                    continue
                current[inner] = reference
                for k, (fd, index) in enumerate(handles):
                    payload = self._payload(fd, index, j)
                    decode_chunk_codes(payload, int(index.encoded_crcs[j]), transform, codes,
                                       scratch)
                    apply_codes(current[inner], codes[inner], transform)
                    _check_raw(group, name, j, current[inner], index)
                    if k in position:
                        out[position[k], span] = current[inner]

    @contextlib.contextmanager
    def _guard(self, name: str):
        try:
            yield
        except (OSError, ValueError, RuntimeError) as exc:
            raise _store_error(
                self._store.path, f"has a damaged chunk of tensor {show(name)} ({exc})") from None


def _check_raw(group: Group, name: str, j: int, bits: np.ndarray,
               index: shards.ShardIndex) -> None:
    """Decoded bits of inner chunk j against the crc32c of the bits that were stored (taken
    before any transform): a store whose metadata decodes its rows another way, or a chunk
    taken from elsewhere, fails here. `bits`: the chunk's elements of tensor `name`, all of
    them (reads start on inner chunks; a partial one is not checked here)."""
    offset, numel = group.position(name)
    if bits.shape[0] == min(group.chunk_cols, numel - (j * group.chunk_cols - offset)) and (
            shards.crc32c(bits) != int(index.raw_crcs[j])):
        raise ValueError("its decoded bits do not match the checksum taken when they were stored")


def _reference_row(base: np.ndarray, group: Group, words: np.dtype) -> np.ndarray:
    """The base's bits widened to the rows' dtype (what row 0 is coded against)."""
    if group.base_dtype == group.row_dtype:
        return base.view(words)
    base_t = torch.from_numpy(base.view(DTYPES[group.base_dtype][1]))
    if group.base_dtype == "BF16":
        base_t = base_t.view(torch.bfloat16)
    widened = base_t.to(DTYPES[group.row_dtype][0])
    return widened.view(_torch_words(words)).numpy().view(words)


def _torch_words(words: np.dtype) -> torch.dtype:
    return {2: torch.int16, 4: torch.int32, 8: torch.int64}[np.dtype(words).itemsize]


# --------------------------------------------------------------------------- writing groups


class GroupWriter:
    """The new rows (and, for a new generation, the base) of one group, written shard by shard.

    Used by one thread (the store writer). finish() writes the Gram array and the group record,
    which marks the group complete.
    """

    def __init__(self, store: TrajectoryStore, pending: Generation, group: Group,
                 first_row: int, write_base: bool):
        self._store, self.gen, self.group = store, pending, group
        self.first_row = first_row
        self._shards: dict[int | None, shards.ShardWriter] = {}
        self._transform = pending.transform(group.row_dtype)
        self._compress = pending.codec != "none"
        self._encoders: dict[int | None, shards.ChunkEncoder] = {}
        gen_dir = f"gen{pending.generation}"
        try:
            if write_base:
                with store._dir((gen_dir, "base", f"g{group.index}", "c"), create=True) as fd:
                    self._shards[None] = shards.ShardWriter(fd, "0", group.n_chunks)
            if group.has_rows:
                for k in range(first_row, len(pending.steps)):
                    with store._dir((gen_dir, "rows", f"g{group.index}", "c", str(k)),
                                    create=True) as fd:
                        self._shards[k] = shards.ShardWriter(fd, "0", group.n_chunks)
        except BaseException:
            self.abort()
            raise
        self._indexes = {row: shard.index for row, shard in self._shards.items()}

    def flush(self) -> None:
        """Make every chunk written so far readable (the second pass may read it back)."""
        for shard in self._shards.values():
            shard.flush()

    def covers(self, row: int | None) -> bool:
        """True when this writer writes (or wrote) the base (None) or row `row`."""
        return row in self._indexes

    def index(self, row: int | None) -> shards.ShardIndex:
        """The shard's index, also after finish(): reads of this run keep using it."""
        return self._indexes[row]

    def stored_fraction(self, name: str) -> float:
        """Bytes the new rows of `name` take in the store ÷ their raw bytes (1.0 if none)."""
        chunks = list(self.group.chunk_range(name, 0, self.group.position(name)[1]))
        new_rows = [k for k in self._indexes if k is not None]
        if not chunks or not new_rows:
            return 1.0
        stored = sum(int(self._indexes[k].sizes[chunks].sum()) for k in new_rows)
        itemsize = DTYPES[self.group.row_dtype][1].itemsize
        return stored / (len(new_rows) * self.group.position(name)[1] * itemsize)

    def write(self, name: str, start: int, base: np.ndarray, rows: np.ndarray | None) -> int:
        """Store elements [start, start + c) of `name`: base (c,) bits and rows (K, c) bits of
        every row up to the last new one (the row before the first new row is the reference).

        Returns the bytes written.
        """
        written = 0
        if None in self._shards:
            written += self._write_shard(None, name, start, base, None)
        if rows is None or not self.group.has_rows:
            return written
        for k in range(self.first_row, rows.shape[0]):
            previous = None if k == 0 else rows[k - 1]
            written += self._write_shard(k, name, start, rows[k], previous, base)
        return written

    def _write_shard(self, row: int | None, name: str, start: int, raw: np.ndarray,
                     previous: np.ndarray | None, base: np.ndarray | None = None) -> int:
        """Encode and append the inner chunks of `raw` (c,) to one shard; codes are taken
        against `previous` (or, for row 0, the base widened to the rows' dtype)."""
        group, shard = self.group, self._shards[row]
        offset, numel = group.position(name)
        chunk = group.chunk_cols
        stop = start + raw.shape[0]
        transform = "none" if row is None else self._transform
        encoder = self._encoders.setdefault(
            row, shards.ChunkEncoder(self._compress, transform, reuse=True))
        written = 0
        for j in group.chunk_range(name, start, stop):
            lo = j * chunk - offset
            a, b = max(lo, start), min(lo + chunk, stop, numel)
            data = raw[a - start : b - start]
            raw_crc = shards.crc32c(data)
            reference = None
            if row is not None:
                reference = (
                    previous[a - start : b - start] if previous is not None
                    else _reference_row(base[a - start : b - start], group, raw.dtype)
                )
            if b - a == chunk and not encoder.tries_zstd():
                # kept as raw blocks: the codes are computed where the file's bytes are staged
                encoder.skip()
                shard.write_raw_chunk(j, data.nbytes, _raw_payload(data, reference, transform),
                                      raw_crc)
                written += shards.raw_frame_bytes(data.nbytes) + 4
                continue
            if b - a < chunk:  # the tensor's last chunk: zarr pads with the fill value
                data = np.concatenate([data, np.zeros(chunk - (b - a), dtype=data.dtype)])
                if reference is not None:
                    reference = np.concatenate(
                        [reference, np.zeros(chunk - (b - a), dtype=reference.dtype)])
            payload = data if row is None else encode_codes(data, reference, transform,
                                                             reuse=True)
            frame, crc = encoder.encode(payload)
            shard.write_chunk(j, frame, crc, raw_crc)
            written += len(frame) + 4
        return written

    def finish(self, grams: dict[str, np.ndarray], kinds: dict[str, str],
               support: dict[str, int], old: GroupRecord | None) -> None:
        """Close the shards, write the Gram array and the record (the completion mark)."""
        group, gen = self.group, self.gen
        base = self._shards.pop(None).finish() if None in self._shards else old.base
        new_rows = [self._shards.pop(k).finish() for k in sorted(k for k in self._shards)]
        rows = (old.rows[: self.first_row] if old is not None else ()) + tuple(new_rows)
        k = len(gen.steps)
        name = f"g{group.index}-k{k}"
        gram_crc = None
        floats = list(group.tensors) if group.has_rows else []
        parts = (f"gen{gen.generation}", "gram", name)
        if floats:
            stack = np.stack([np.asarray(grams[t], dtype="<f8") for t in floats])  # (T, K, K)
            chunk, gram_crc = shards.plain_chunk(stack)
            with self._store._dir((*parts, "c", "0", "0"), create=True) as fd:
                write_atomic(fd, "0", chunk)
        record = GroupRecord(group.index, gen.steps, base, rows, gram_crc,
                             {t: kinds[t] for t in floats}, {t: support[t] for t in floats},
                             definition_sha256(gen))
        body = record.to_json(self._store.manifest.store_id, gen.generation)
        meta = shards.plain_array_meta([len(floats), k, k], "float64")
        meta["attributes"] = {"relex_stream_group": {"record": body, "sha256": _sha256(body)}}
        with self._store._dir(parts, create=True) as fd:
            write_atomic(fd, ROOT_META, _canonical(meta))
        self._store.finished_groups += 1

    def abort(self) -> None:
        for shard in self._shards.values():
            shard.abort()
        self._shards.clear()
