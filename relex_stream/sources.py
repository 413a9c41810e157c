"""Where a run's rows come from: checkpoint files or the store, behind one fill() call.

A read fills a buffer with a column range of one tensor: the base row and a list of observed
rows, each from the checkpoints on disk (safetensors or verl FSDP shards) or from the store
(rows committed earlier, or written earlier in this run). The passes, the disk estimate and the
Gram update see only `RowReader.fill`; they never ask where a row came from.

Rows read from the checkpoints that the store also holds are checked against the crc32c the
store recorded for their raw bits, per inner chunk: a checkpoint rewritten since (same size,
header and mtime included) stops the run, naming the file.
"""

from __future__ import annotations

import contextlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import shards
from .checkpoints import (
    Checkpoint,
    ModelFiles,
    ModelLayout,
    check_same_model,
    config_of,
    discover_runs,
    open_model,
    parse_ckpt_args,
    select_steps,
)
from .errors import RelexError
from .safetensors_io import FLOAT_CODES
from .store import GroupWriter, StoreReader, TrajectoryStore
from .store_layout import Generation, Group
from .tensor_files import TensorInfo, read_into, word_dtype
from .units import StepSelection

log = logging.getLogger(__name__)

TIED_HEAD = "lm_head.weight"
# A read past the page cache (direct_reads.py) waits for the device and then for the GIL; one
# thread reading the rows of a chunk in turn left the disk idle meanwhile (drift bench, cold:
# 3.3 MB reads at 0.95 GB/s against 1.6 GB/s). READ_THREADS threads keep that many reads in
# flight; rows narrower than PARALLEL_READ_BYTES are read in turn (the handoff would cost more).
READ_THREADS = 2
PARALLEL_READ_BYTES = 256 << 10
CONVERT_ELEMENTS = 1 << 20  # rows in another dtype are converted this many elements at a time
_SIGNED = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class Sources:
    """The base and the observed checkpoints of a run, opened (headers only)."""

    base: ModelFiles | None  # None: appending to a store, which holds the base
    checkpoints: list[Checkpoint]  # sorted by step
    row_dtypes: dict[str, str]  # float tensor -> the widest dtype of its checkpoints
    base_aux: dict[str, bytes] = field(default_factory=dict)  # the base's config, tokenizer

    @property
    def steps(self) -> list[int]:
        return [c.step for c in self.checkpoints]

    def checkpoint(self, step: int) -> ModelFiles:
        return next(c.model for c in self.checkpoints if c.step == step)

    def check_unchanged(self, base: bool, steps: set[int]) -> None:
        """RelexError when a file read from (the base when `base`, the checkpoints of `steps`)
        changed since it was opened. Files not read may come and go (a trainer's rotation)."""
        if base and self.base is not None:
            self.base.check_unchanged()
        for checkpoint in self.checkpoints:
            if checkpoint.step in steps:
                checkpoint.model.check_unchanged()

    def fingerprints(self, steps: list[int] | None = None) -> dict:
        wanted = self.steps if steps is None else steps
        return {
            "base": self.base.fingerprint() if self.base is not None else None,
            "steps": {str(c.step): c.model.fingerprint() for c in self.checkpoints
                      if c.step in wanted},
        }


def find_checkpoints(runs: Path | None, ckpts: list[str] | None) -> dict[int, Path]:
    if runs is not None and ckpts:
        raise RelexError("give either --runs or --ckpt, not both")
    if runs is None and not ckpts:
        raise RelexError("give the observed checkpoints with --runs RUN_DIR or --ckpt STEP=PATH")
    return discover_runs(Path(runs)) if runs is not None else parse_ckpt_args(list(ckpts or []))


def _check_base_is_not_a_checkpoint(base: Path, found: dict[int, Path]) -> None:
    """A base that is one of the observed checkpoints gives that step a zero delta and every
    prediction a wrong origin: a mistake, refused."""
    for step, path in found.items():
        with contextlib.suppress(OSError):
            if os.path.samefile(base, path):
                raise RelexError(
                    f"--base {base} is also the checkpoint of step {step}; give the model the RL "
                    "run started from (step 0)"
                )


def _weight_files(model: ModelFiles) -> frozenset[tuple[int, int]]:
    """The (device, inode) of every weight file a model reads: links and other names of one
    file give the same pairs."""
    found = set()
    for path in model.files:
        with contextlib.suppress(OSError):
            info = os.stat(path)
            found.add((info.st_dev, info.st_ino))
    return frozenset(found)


def _check_distinct_weights(base: ModelFiles | None, checkpoints: list[Checkpoint]) -> None:
    """A checkpoint whose weight files are all the base's, or another checkpoint's, under any
    name (a huggingface/ folder of the base, a link to its file, --ckpt 10=D --ckpt 20=D) gives
    a zero delta or a repeated row: refused. Sharing some files is fine (a content-addressed
    cache shares the blob of a shard that did not change)."""
    seen: dict[frozenset[tuple[int, int]], str] = {}
    if base is not None:
        seen[_weight_files(base)] = "the base (--base)"
    for checkpoint in checkpoints:
        files = _weight_files(checkpoint.model)
        if files and files in seen:
            raise RelexError(
                f"the checkpoint of step {checkpoint.step} ({checkpoint.model.directory}) reads "
                f"the same weight files as {seen[files]}; give each step its own checkpoint"
            )
        seen.setdefault(files, f"the checkpoint of step {checkpoint.step}")


def open_sources(
    base: Path | None,
    found: dict[int, Path],
    steps: StepSelection | None,
    window: int | None,
    also: list[int] | None = None,
    stored: ModelLayout | None = None,
    stored_aliases: dict[str, str] | None = None,
) -> Sources:
    """Open the base and the chosen checkpoints (headers only) and check they match.

    also: steps held elsewhere (the store) that take part in --steps/--window selection.
    stored, stored_aliases: the store's layout and tied tensors, which stand in for the base's
    when no base is given (appending to a store).
    """
    available = sorted(set(found) | set(also or []))
    chosen = [s for s in select_steps(available, steps, window) if s in found]
    if base is not None:
        _check_base_is_not_a_checkpoint(Path(base), found)
        base_model = open_model(Path(base))
        layout, where, config_dir = base_model.layout(), "the base", base_model.config_dir
        base_aux = base_model.aux_files()  # read once: what decides the tie is what is kept
        config = config_of(base_aux, str(base_model.config_dir))
        tied = config.get("tie_word_embeddings") is True and TIED_HEAD not in layout.tensors
    elif stored is not None:
        base_model, layout, where, config_dir = None, stored, "the store", None
        base_aux = {}
        tied = TIED_HEAD in (stored_aliases or {})
        layout = ModelLayout({n: v for n, v in stored.tensors.items()
                              if n not in (stored_aliases or {})}, {}, stored.sharded)
    else:
        raise RelexError("--runs/--ckpt need --base, the checkpoint the run started from")
    if 0 in chosen:
        raise RelexError(
            f"{found[0]} is a checkpoint of step 0, which is the base (--base, the model the run "
            "started from), not an observed step; leave it out (--steps 1-"
            f"{max(chosen)}, or move it out of --runs, or drop its --ckpt)"
        )
    checkpoints = []
    for step in chosen:
        try:
            model = open_model(found[step], config_dir)
        except RelexError:
            if step not in (also or []):
                raise
            # in the store already and only opened to compare fingerprints: a trainer's
            # retention may be removing it right now, and a removed one is fine
            log.info("step %d is in the store and its checkpoint %s does not open (being "
                     "removed?): its stored rows are used", step, found[step])
            continue
        if model.predicted:
            raise RelexError(
                f"{found[step]} was written by relex_stream (an extrapolated checkpoint), not "
                f"saved by training: it cannot be an observed step; move it out of the runs "
                f"directory, or leave it out (--steps, or drop its --ckpt)"
            )
        if tied and TIED_HEAD in model.tensors:
            model = model.without(TIED_HEAD)  # a tied copy (FSDP state dicts keep one)
        checkpoints.append(Checkpoint(step, model))
    _check_distinct_weights(base_model, checkpoints)
    row_dtypes = check_same_model(layout, where, checkpoints)
    for name, (dtype, _) in layout.tensors.items():
        if dtype in FLOAT_CODES and name not in row_dtypes:
            row_dtypes[name] = dtype  # no checkpoint chosen here (all rows in the store)
    return Sources(base_model, checkpoints, row_dtypes, base_aux)


@dataclass(frozen=True)
class RowOrigin:
    """Where a read's base and rows come from. Rows from the store come first, in row order."""

    base_from_store: bool
    store_rows: tuple[int, ...]  # store row indices
    source_steps: tuple[int, ...]  # checkpoint steps (read from the files)
    verify_rows: tuple[int | None, ...]  # per source step: the store row holding it, if any


class RowReader:
    """Fills read buffers for one thread (the reader): from checkpoint files and the store."""

    def __init__(
        self,
        sources: Sources | None,
        store: TrajectoryStore | None,
        gen: Generation | None,
        committed_steps: tuple[int, ...],
    ):
        self._sources, self._store, self._gen = sources, store, gen
        self._committed = committed_steps
        self._store_reader: StoreReader | None = store.reader() if store is not None else None
        self._record_steps: dict[int, tuple[int, ...]] = {}
        self.bytes_from_sources = 0
        self.base_read = False  # whether the base's files were read (Sources.check_unchanged)
        self.steps_read: set[int] = set()  # checkpoints whose files were read
        self.bytes_decoded = 0  # raw bytes of the rows and bases decoded from the store
        self._io: ThreadPoolExecutor | None = None  # reads checkpoint rows side by side

    @property
    def bytes_from_store(self) -> int:
        """Stored (compressed) bytes read from the store."""
        return self._store_reader.bytes_read if self._store_reader is not None else 0

    def _steps_for(self, group: Group) -> tuple[int, ...]:
        """The steps of the record describing the group's stored pieces: all of the run's once
        the group is finished (now or by an earlier, interrupted run), else the committed ones."""
        if group.index not in self._record_steps:
            finished = self._store.has_record(group, self._gen, self._gen.steps)
            self._record_steps[group.index] = self._gen.steps if finished else self._committed
        return self._record_steps[group.index]

    def close(self) -> None:
        if self._io is not None:
            self._io.shutdown()
        if self._store_reader is not None:
            self._store_reader.close()

    def fill(
        self,
        group: Group,
        name: str,
        start: int,
        origin: RowOrigin,
        base: np.ndarray,
        rows: np.ndarray,
        live: GroupWriter | None,
    ) -> None:
        """Fill base (c,) base bits and rows (len(store_rows) + len(source_steps), c) row words."""
        width = base.shape[0]
        if origin.base_from_store:
            steps = self._steps_for(group) if live is None or not live.covers(None) else ()
            self._store_reader.read_base(self._gen, steps, group, name, start, base, live)
            self.bytes_decoded += base.nbytes
        else:
            self.base_read = True
            read_into(self._sources.base.tensors[name], start, base)
            self.bytes_from_sources += base.nbytes
            if self._store_reader is not None:
                self._verify_base(group, name, start, base, live)
        n_store = len(origin.store_rows)
        if n_store:
            self._store_reader.read_rows(self._gen, self._steps_for(group), group, name, start,
                                         list(origin.store_rows), base, rows[:n_store], live)
            self.bytes_decoded += rows[:n_store].nbytes
        self.steps_read.update(origin.source_steps)
        infos = [self._sources.checkpoint(step).tensors[name] for step in origin.source_steps]
        targets = [rows[n_store + i] for i in range(len(infos))]
        if len(infos) > 1 and width * infos[0].itemsize >= PARALLEL_READ_BYTES:
            if self._io is None:
                self._io = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="relex-read-io")
            reads = [self._io.submit(_read_converted, info, start, target, group.row_dtype)
                     for info, target in zip(infos, targets, strict=True)]
            wait(reads)  # all of them, also after a failure: none may write into a freed buffer
            for read in reads:
                read.result()
        else:
            for info, target in zip(infos, targets, strict=True):
                _read_converted(info, start, target, group.row_dtype)
        for i, (info, target) in enumerate(zip(infos, targets, strict=True)):
            self.bytes_from_sources += width * info.itemsize
            store_row = origin.verify_rows[i]
            if store_row is not None:
                self._verify(group, name, start, store_row, target, info, live)

    def _verify_base(self, group: Group, name: str, start: int, values: np.ndarray,
                     live: GroupWriter | None) -> None:
        """The base's bits, read again, must be those the store keeps (chunks the store does
        not hold yet are read for the first time: nothing to compare)."""
        steps = () if live is not None and live.covers(None) else self._steps_for(group)
        index = self._store_reader.base_index(self._gen, steps, group, name, live)
        if index is not None:
            self._compare(group, name, start, values, self._sources.base.tensors[name],
                          index.raw_crcs, index.offsets != shards.MISSING)

    def _verify(self, group: Group, name: str, start: int, row: int, values: np.ndarray,
                info: TensorInfo, live: GroupWriter | None) -> None:
        """The checkpoint's bits must be those the store recorded when it first read them."""
        expected = self._store_reader.raw_crcs(self._gen, self._steps_for(group), group, row,
                                               name, live)
        self._compare(group, name, start, values, info, expected, None)

    @staticmethod
    def _compare(group: Group, name: str, start: int, values: np.ndarray, info: TensorInfo,
                 expected: np.ndarray, held: np.ndarray | None) -> None:
        offset, _ = group.position(name)
        chunk = group.chunk_cols
        for j in group.chunk_range(name, start, start + values.shape[0]):
            if held is not None and not held[j]:
                continue
            lo = j * chunk - offset
            a, b = max(lo, start), min(lo + chunk, start + values.shape[0])
            if shards.crc32c(values[a - start : b - start]) != int(expected[j]):
                files = sorted({str(p.file) for p in info.pieces})
                raise RelexError(
                    f"{files[0]} changed after the store first read it (tensor {name!r} differs "
                    "from the store's checksum): the checkpoint was rewritten in place; rebuild "
                    "the store with --rebuild, or restore the file"
                )


def _read_converted(info: TensorInfo, start: int, out: np.ndarray, row_dtype: str | None) -> None:
    """Read elements of `info` into `out` (row dtype words), widening them if stored narrower."""
    if row_dtype is None or info.dtype == row_dtype:
        read_into(info, start, out)
        return
    from .safetensors_io import DTYPES

    source_bits = word_dtype(info.dtype)
    target_dtype = DTYPES[row_dtype][0]
    for a in range(0, out.shape[0], CONVERT_ELEMENTS):
        b = min(out.shape[0], a + CONVERT_ELEMENTS)
        scratch = np.empty(b - a, dtype=source_bits)
        read_into(info, start + a, scratch)
        widened = torch.from_numpy(scratch).view(DTYPES[info.dtype][0]).to(target_dtype)
        out[a:b] = widened.view(_SIGNED[widened.element_size()]).numpy().view(out.dtype)
