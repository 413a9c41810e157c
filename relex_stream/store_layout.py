"""How a store arranges a model's tensors into groups, and the checked form of its manifest.

Tensors are stored in groups: a group's row k (one checkpoint) is one shard file holding every
tensor of the group, each starting on an inner-chunk boundary. Grouping keeps the file count
low on cluster file systems (about (K + 5) files per group, see README "The trajectory store")
and a group is the unit a run finishes, resumes and hands to a torchrun rank. Groups follow
from the model layout alone, so they are derived again on open, never read from the store.

Everything here is pure: the manifest is parsed from JSON and every field checked before any
of it drives a computation or names a file.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .checkpoints import (
    AUX_EXCLUDE_SUFFIXES,
    AUX_MAX_BYTES,
    JSON_AUX,
    MAX_AUX_FILES,
    ModelLayout,
    check_layout,
)
from .errors import RelexError
from .jsonfile import MAX_CONFIG_BYTES, show
from .row_codec import TRANSFORMS, default_transform
from .safetensors_io import DTYPES, FLOAT_CODES, INDEX_NAME, MAX_DIM, MAX_NDIM

STORE_FORMAT = "relex_stream.trajectory/4"
FORMAT_FAMILY = "relex_stream.trajectory/"
# Rows of one Gram panel (kernels.PANEL_ROWS): part of the format, since the panels decide the
# Gram's bits (see kernels.py).
GRAM_BLOCK_COLS = 1 << 16  # columns of one block of the fixed Gram grid (kernels.py)
PANEL_ROWS = 16
# A panel whose rows changed in at least this share of a block's columns is computed on all of
# them (no gather); also part of the format (kernels.gram_panels).
PANEL_DENSE_FRACTION = 0.5
GRAM_GRID = f"blocks={GRAM_BLOCK_COLS},panels={PANEL_ROWS},dense={PANEL_DENSE_FRACTION}"
SMALL_NUMEL = 1 << 16  # tensors below one Gram block are packed with small inner chunks
SMALL_CHUNK_COLS = 1 << 12
CHUNK_BYTES = 1 << 20  # inner chunk of a large tensor: 1 MiB of one row
GROUP_MAX_NUMEL = 1 << 27  # elements of large tensors per group (a larger tensor is alone)
PACK_MAX_NUMEL = 1 << 24
# --store-codec: (row transform applied before zstd or None, compress?)
CODECS = {"xor-zstd": True, "zstd": True, "none": False}
MAX_STEP = 2**53
MAX_STEPS = 1_000_000
MAX_ELEMENTS = 2**44
MAX_GENERATION = 10**9 - 1  # gen<G> directories: at most nine digits
_HEX64 = re.compile(r"[0-9a-f]{64}", re.ASCII)


@dataclass(frozen=True)
class Group:
    """Tensors stored together: a row of the group is one shard of `width` columns."""

    index: int
    tensors: tuple[str, ...]
    offsets: tuple[int, ...]  # first column of each tensor in the group's row
    numels: tuple[int, ...]
    base_dtype: str
    row_dtype: str | None  # None: the tensors are not floating point (kept as the base only)
    chunk_cols: int  # columns of an inner chunk

    @property
    def width(self) -> int:
        """Columns of a row, every tensor padded to a whole number of inner chunks."""
        if not self.tensors:
            return 0
        return self.offsets[-1] + _padded(self.numels[-1], self.chunk_cols)

    @property
    def n_chunks(self) -> int:
        return self.width // self.chunk_cols

    @property
    def has_rows(self) -> bool:
        return self.row_dtype is not None

    def position(self, name: str) -> tuple[int, int]:
        """(first column, elements) of tensor `name` in this group's row."""
        i = self.tensors.index(name)
        return self.offsets[i], self.numels[i]

    def chunk_range(self, name: str, start: int, stop: int) -> range:
        """Inner chunks holding elements [start, stop) of tensor `name`."""
        offset, _ = self.position(name)
        if stop <= start:
            return range(0)
        chunk = self.chunk_cols
        return range((offset + start) // chunk, (offset + stop - 1) // chunk + 1)


def _padded(numel: int, chunk: int) -> int:
    return -(-numel // chunk) * chunk


def chunk_cols_for(itemsize: int, small: bool) -> int:
    return SMALL_CHUNK_COLS if small else CHUNK_BYTES // itemsize


def transforms_for(codec: str, row_dtypes: dict[str, str]) -> dict[str, str]:
    """The row transform of each row dtype: the measured default under 'xor-zstd', none else."""
    return {
        code: default_transform(DTYPES[code][1].itemsize, code) if codec == "xor-zstd" else "none"
        for code in sorted(set(row_dtypes.values()))
    }


def plan_groups(
    layout: ModelLayout, row_dtypes: dict[str, str], aliases: dict[str, str]
) -> list[Group]:
    """The groups of a model: large tensors in runs of at most GROUP_MAX_NUMEL elements, small
    ones packed, each run of one (base dtype, row dtype); ordered by their first tensor."""
    order = [n for names in layout.shard_tensors.values() for n in names if n not in aliases]
    open_groups: dict[tuple, list[str]] = {}
    closed: list[list[str]] = []
    sizes: dict[tuple, int] = {}
    for name in order:
        dtype, shape = layout.tensors[name]
        numel = math.prod(shape)
        small = numel < SMALL_NUMEL
        key = (dtype, row_dtypes.get(name), small)
        limit = PACK_MAX_NUMEL if small else GROUP_MAX_NUMEL
        if key in open_groups and sizes[key] + numel > limit:
            closed.append(open_groups.pop(key))
        if key not in open_groups:
            open_groups[key], sizes[key] = [], 0
        open_groups[key].append(name)
        sizes[key] += numel
    closed.extend(open_groups.values())
    position = {name: i for i, name in enumerate(order)}
    closed.sort(key=lambda names: position[names[0]])
    groups = []
    for index, names in enumerate(closed):
        dtype = layout.tensors[names[0]][0]
        row_dtype = row_dtypes.get(names[0])
        numels = [math.prod(layout.tensors[n][1]) for n in names]
        small = numels[0] < SMALL_NUMEL
        itemsize = DTYPES[row_dtype or dtype][1].itemsize
        chunk = chunk_cols_for(max(itemsize, DTYPES[dtype][1].itemsize), small)
        offsets, cursor = [], 0
        for numel in numels:
            offsets.append(cursor)
            cursor += _padded(numel, chunk)
        groups.append(
            Group(index, tuple(names), tuple(offsets), tuple(numels), dtype, row_dtype, chunk)
        )
    return groups


def file_count(groups: list[Group], n_steps: int, n_aux: int) -> int:
    """Files of a committed store (README's formula): per group K row shards, a base shard, the
    zarr.json of its rows, base and Gram arrays and the Gram chunk; per aux file two; plus the
    root, the lock and five group nodes (generation, base, rows, gram, files)."""
    total = 0
    for group in groups:
        total += 2 + 1  # the base array's shard and zarr.json; the Gram array's zarr.json
        if group.has_rows:
            total += n_steps + 1 + 1  # row shards, the rows array's zarr.json, the Gram chunk
    return total + 2 * n_aux + 2 + 5


# --------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class AuxFile:
    """A small file an output model needs (config, tokenizer), kept in the store."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Generation:
    """One complete (or pending) version of a store's contents."""

    generation: int
    steps: tuple[int, ...]
    layout: ModelLayout
    row_dtypes: dict[str, str]  # per floating-point tensor (not aliases): how rows are kept
    aliases: dict[str, str]
    aux: tuple[AuxFile, ...]
    codec: str
    sources: dict  # fingerprints: {"base": {...}, "steps": {"<step>": {...}}}
    transforms: dict[str, str]  # row dtype code -> row_codec transform name its rows are kept in

    def to_json(self) -> dict:
        return {
            "generation": self.generation,
            "steps": list(self.steps),
            "layout": self.layout.to_json(),
            "row_dtypes": dict(self.row_dtypes),
            "aliases": dict(self.aliases),
            "aux": [[a.name, a.size, a.sha256] for a in self.aux],
            "codec": self.codec,
            "sources": self.sources,
            "transforms": dict(self.transforms),
        }

    def transform(self, row_dtype: str | None) -> str:
        """The row transform of rows of `row_dtype` ('none' for tensors kept as the base)."""
        return "none" if row_dtype is None else self.transforms[row_dtype]

    def groups(self) -> list[Group]:
        return plan_groups(self.layout, self.row_dtypes, self.aliases)


@dataclass(frozen=True)
class Manifest:
    """The store's root metadata: identity, the committed generation and a pending one."""

    store_id: str
    current: Generation | None
    pending: Generation | None
    pending_kind: str | None  # "build" (a new generation) or "append" (rows to the current)

    def to_json(self) -> dict:
        return {
            "format": STORE_FORMAT,
            "store_id": self.store_id,
            "gram_grid": GRAM_GRID,
            "current": None if self.current is None else self.current.to_json(),
            "pending": None
            if self.pending is None
            else {"kind": self.pending_kind, **self.pending.to_json()},
        }


def _fail(what: str) -> RelexError:
    return RelexError(f"{what}; rebuild the store with --rebuild (or use another --cache)")


def _int(value: object, what: str, low: int = 0, high: int = MAX_STEP) -> int:
    if type(value) is not int or not low <= value <= high:
        raise _fail(f"{what} is not an integer in [{low}, {high}]")
    return value


def _dict(value: object, what: str) -> dict:
    if not isinstance(value, dict):
        raise _fail(f"{what} is not a JSON object")
    return value


def _list(value: object, what: str, limit: int = MAX_STEPS) -> list:
    if not isinstance(value, list) or len(value) > limit:
        raise _fail(f"{what} is not a list (of at most {limit} items)")
    return value


def is_plain_name(name: object, max_len: int = 255) -> bool:
    """A file name with no directory part, not hidden, printable: safe to join to a directory."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= max_len
        and name not in (".", "..")
        and not name.startswith(".")
        and "/" not in name
        and "\\" not in name
        and name.isprintable()
    )


def parse_steps(value: object, what: str) -> tuple[int, ...]:
    steps = tuple(_int(s, f"{what} entry") for s in _list(value, what))
    if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        raise _fail(f"{what} are not strictly increasing")
    return steps


def _fingerprints(value: object, what: str) -> dict:
    """{file name: {key: int, str or None}} with plain names and small scalar values."""
    out = {}
    for name, fields in _dict(value, what).items():
        if not is_plain_name(name) and not _is_relative_plain(name):
            raise _fail(f"{what} names an unsafe file {show(name)}")
        fields = _dict(fields, f"{what} entry")
        if len(fields) > 8 or not all(
            isinstance(k, str) and (v is None or type(v) is int
                                    or (isinstance(v, str) and len(v) <= 128))
            for k, v in fields.items()
        ):
            raise _fail(f"{what} entry for {show(name)} is malformed")
        out[name] = dict(fields)
    return out


def _is_relative_plain(name: str) -> bool:
    """'actor/model_world_size_2_rank_0.pt': a short relative path of plain names."""
    parts = name.split("/")
    return 1 < len(parts) <= 3 and all(is_plain_name(p) for p in parts)


def parse_sources(value: object, steps: tuple[int, ...]) -> dict:
    data = _dict(value, "the store's source fingerprints")
    if set(data) != {"base", "steps"}:
        raise _fail("the store's source fingerprints are malformed")
    base = _fingerprints(data["base"], "the base's fingerprints")
    per_step = _dict(data["steps"], "the steps' fingerprints")
    if set(per_step) != {str(s) for s in steps}:
        raise _fail("the store's fingerprints do not cover its steps")
    return {
        "base": base,
        "steps": {k: _fingerprints(v, f"step {k}'s fingerprints") for k, v in per_step.items()},
    }


def parse_layout(value: object) -> ModelLayout:
    data = _dict(value, "the store's model layout")
    if set(data) != {"tensors", "shard_tensors", "sharded"} or type(data["sharded"]) is not bool:
        raise _fail("the store's model layout is malformed")
    tensors = {}
    for name, entry in _dict(data["tensors"], "the layout's tensors").items():
        entry = _list(entry, f"tensor {show(name)}", 2)
        if len(entry) != 2 or not isinstance(entry[0], str) or entry[0] not in DTYPES:
            raise _fail(f"the layout entry of tensor {show(name)} is malformed")
        shape = tuple(_int(d, f"a dimension of {show(name)}", 0, MAX_DIM) for d in
                      _list(entry[1], f"the shape of {show(name)}", MAX_NDIM))
        if math.prod(shape) > MAX_ELEMENTS:
            raise _fail(f"the shape of tensor {show(name)} in the store's layout is absurd")
        tensors[name] = (entry[0], shape)
    shard_tensors = {}
    for shard, names in _dict(data["shard_tensors"], "the layout's shards").items():
        names = _list(names, f"shard {show(shard)}")
        if not all(isinstance(n, str) for n in names):
            raise _fail(f"shard {show(shard)} of the layout is malformed")
        shard_tensors[shard] = tuple(names)
    layout = ModelLayout(tensors, shard_tensors, data["sharded"])
    try:
        check_layout(layout, "the store")
    except RelexError as exc:
        raise _fail(str(exc)) from None
    return layout


def parse_generation(value: object, codecs: dict) -> Generation:
    data = _dict(value, "a store generation")
    keys = {"generation", "steps", "layout", "row_dtypes", "aliases", "aux", "codec", "sources",
            "transforms"}
    if set(data) - {"kind"} != keys:
        raise _fail("a store generation has unexpected fields")
    steps = parse_steps(data["steps"], "the store's steps")
    layout = parse_layout(data["layout"])
    aliases = {}
    for alias, source in _dict(data["aliases"], "the store's tied tensors").items():
        if not isinstance(source, str) or alias not in layout.tensors or (
                source not in layout.tensors) or source in aliases or (
            layout.tensors[alias] != layout.tensors[source]) or alias == source:
            raise _fail(f"the store ties {show(alias)} to {show(source)}, which its layout "
                        "does not allow")
        aliases[alias] = source
    if any(source in aliases for source in aliases.values()):
        raise _fail("the store ties a tensor to a tied tensor")
    row_dtypes = _dict(data["row_dtypes"], "the store's row dtypes")
    expected = {n for n, (d, _) in layout.tensors.items() if d in FLOAT_CODES and n not in aliases}
    if set(row_dtypes) != expected or not all(
            isinstance(v, str) and v in FLOAT_CODES for v in row_dtypes.values()):
        raise _fail("the store's row dtypes do not match its layout")
    aux = []
    for item in _list(data["aux"], "the store's model files", MAX_AUX_FILES):
        if not (isinstance(item, list) and len(item) == 3 and is_plain_name(item[0])
                and isinstance(item[2], str) and _HEX64.fullmatch(item[2])):
            raise _fail("the store's list of model files is malformed")
        if item[0] == INDEX_NAME or item[0].endswith(AUX_EXCLUDE_SUFFIXES):
            # a model file of an output never takes the name of its weights or their index
            raise _fail(f"the store keeps a model file named {show(item[0])}, which no base has")
        # the limits a base's own files are read with (checkpoints.ModelFiles.aux_files): a
        # claim beyond them would be read whole before its checksum could refuse it
        limit = MAX_CONFIG_BYTES if item[0] in JSON_AUX else AUX_MAX_BYTES
        aux.append(AuxFile(item[0], _int(item[1], "a model file's size", 0, limit), item[2]))
    if len({a.name for a in aux}) != len(aux):
        raise _fail("the store names a model file twice")
    if sum(a.size for a in aux) > AUX_MAX_BYTES:
        raise _fail(f"the store's model files add up to more than {AUX_MAX_BYTES >> 20} MiB, "
                    "more than relex_stream takes from a base")
    if not isinstance(data["codec"], str) or data["codec"] not in codecs:
        raise _fail(f"the store's codec {show(data['codec'])} is not one relex_stream writes")
    transforms = _dict(data["transforms"], "the store's row transforms")
    if set(transforms) != set(row_dtypes.values()) or not all(
            isinstance(t, str) and t in TRANSFORMS for t in transforms.values()):
        raise _fail("the store names row transforms relex_stream does not know")
    return Generation(
        generation=_int(data["generation"], "the store's generation", 1, MAX_GENERATION),
        steps=steps,
        layout=layout,
        row_dtypes=dict(row_dtypes),
        aliases=aliases,
        aux=tuple(aux),
        codec=data["codec"],
        sources=parse_sources(data["sources"], steps),
        transforms=dict(transforms),
    )


def parse_manifest(data: dict) -> Manifest:
    """A Manifest from the root's attribute, every field checked; RelexError otherwise."""
    if set(data) != {"format", "store_id", "gram_grid", "current", "pending"}:
        raise _fail("the store's manifest has unexpected fields")
    if data["gram_grid"] != GRAM_GRID:
        raise _fail("the store's Gram matrices were summed on another grid")
    store_id = data["store_id"]
    if not (isinstance(store_id, str) and re.fullmatch(r"[0-9a-f]{32}", store_id, re.ASCII)):
        raise _fail("the store's id is malformed")
    current = None if data["current"] is None else parse_generation(data["current"], CODECS)
    pending, kind = None, None
    if data["pending"] is not None:
        pending = parse_generation(data["pending"], CODECS)
        kind = _dict(data["pending"], "the pending change").get("kind")
        if kind not in ("build", "append"):
            raise _fail("the store's pending change is malformed")
        if kind == "append" and (current is None or pending.generation != current.generation):
            raise _fail("the store's pending append does not follow its current generation")
        if kind == "build" and current is not None and pending.generation <= current.generation:
            raise _fail("the store's pending rebuild does not follow its current generation")
    if current is not None and len(current.steps) < 1:
        raise _fail("the store's committed generation has no steps")
    return Manifest(store_id, current, pending, kind)
