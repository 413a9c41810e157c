"""Every input is untrusted, the store included (issue 9): one regression test per class of
broken or hostile input.

Each refusal is exactly one stderr line starting with `error: ` and exit code 2 (never a
traceback, never exit 0 with other weights), and leaves no file behind: nothing outside OUT and
the store is created, changed or removed, a refused run creates no OUT, and a run that only
reads the store does not change a byte of it. The CLI is called in-process
(tests/untrusted.py), except where a run must be caught between its passes.

a. the manifest (root zarr.json): wrong types; edits with the sha256 recomputed
b. group records: edited, forged, swapped between groups, taken from another store
c. shard bytes: flipped bits, truncations, deletions, swaps, forged indexes
d. destructive steps: --rebuild, the lock file, directories that are not stores, overlaps
e. sources changing between the passes of a run, and in place after the store was built
f. predictions that overflow the output dtype
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load

from relex_stream import shards
from relex_stream.safetensors_io import read_header
from relex_stream.store import TrajectoryStore
from tests.fixtures import EMBED, LM_HEAD, Spec, build_trajectory, qwen2_config, write_model_dir
from tests.helpers import REPO_ROOT
from tests.untrusted import (
    Result,
    assert_error,
    assert_ok,
    call,
    copy_store,
    diff,
    edit_manifest,
    edit_record,
    forge_records,
    read_json,
    record_paths,
    snapshot,
    tree_files,
    write_json,
)

STEPS = (10, 20, 30, 40)
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
# vocab 32768 × hidden 16: embed_tokens and lm_head fill exactly one 512K-element inner chunk,
# so the store keeps their rows in about 80% of the raw bytes (noise in every element) and a
# run holding the sources reads them from the checkpoints (passes.STORE_READ_CUTOFF).
VOCAB = 32768


# ----------------------------------------------------------------------------- fixtures


class Built:
    """A trajectory, its store, a second store of the same sources (another store_id), and
    the reference output of a run from the store."""

    def __init__(self, root: Path):
        self.root = root
        self.traj = build_trajectory(root / "traj", Spec(steps=STEPS, vocab=VOCAB,
                                                         base_shards=2))
        self.store = root / "store.zarr"
        assert_ok(call(*self.source_args(self.store, root / "built")))
        self.reference = tree_files(root / "built")
        self.report = self.report_of(self.store)
        # another store of a trajectory of the same shapes (other values, another store_id)
        other = build_trajectory(root / "other-traj", Spec(steps=STEPS, vocab=VOCAB,
                                                           base_shards=2, seed=1))
        self.other = root / "other.zarr"
        assert_ok(call("run", "--base", other.base, "--runs", other.runs, "--cache", self.other,
                       "--target", "100", "--out", root / "built-other", "--device", "cpu",
                       "--quiet"))

    def source_args(self, store: Path, out: Path, *extra: object) -> list[object]:
        return ["run", "--base", self.traj.base, "--runs", self.traj.runs, "--cache", store,
                "--target", "100", "--out", out, "--device", "cpu", "--quiet", *extra]

    @staticmethod
    def report_of(store: Path) -> Result:
        return call("report", store, "--no-plots")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return Built(tmp_path_factory.mktemp("untrusted"))


class Case:
    """A copy of the store in tmp_path/S, an output path tmp_path/O, and a snapshot of the
    rest of tmp_path to compare with afterwards."""

    def __init__(self, built: Built, tmp_path: Path):
        self.built, self.root = built, tmp_path
        self.store = copy_store(built.store, tmp_path / "S")
        self.out = tmp_path / "O"
        (tmp_path / "outside").mkdir()
        (tmp_path / "outside" / "precious.txt").write_bytes(b"not the tool's\n")
        self._around: dict | None = None
        self._store_before: dict | None = None

    def freeze(self) -> None:
        """Snapshot after the damage is done: from here on nothing may change."""
        self._around = snapshot(self.root, skip=(self.store, self.out))
        self._store_before = snapshot(self.store)

    def from_store(self, *extra: object) -> Result:
        return call("run", "--cache", self.store, "--target", "100", "--out", self.out,
                    "--device", "cpu", "--quiet", *extra)

    def assert_untouched(self, store_too: bool = True) -> None:
        assert diff(self._around, snapshot(self.root, skip=(self.store, self.out))) == []
        assert not self.out.exists(), f"a refused run left {self.out}"
        if store_too:
            assert diff(self._store_before, snapshot(self.store)) == [], "the store changed"


@pytest.fixture
def case(built: Built, tmp_path: Path) -> Case:
    return Case(built, tmp_path)


def refused_from_store(case: Case, *needles: str, report_may_pass: bool = False) -> str:
    """`run --cache S` and `report S` both refuse with one line, writing nothing anywhere.

    report_may_pass: the damage is in what only a run reads (rows, base): `report` may then
    also give the untouched store's report."""
    case.freeze()
    line = assert_error(case.from_store(), *needles)
    case.assert_untouched()
    report = Built.report_of(case.store)
    if not (report_may_pass and report.rc == 0 and report.stdout.replace(
            str(case.store), "S") == case.built.report.stdout.replace(str(case.built.store), "S")):
        assert_error(report)
    case.assert_untouched()
    return line


def _gen(body: dict) -> dict:
    return body["current"]


def _tensor(body: dict, name: str = Q_PROJ) -> list:
    return _gen(body)["layout"]["tensors"][name]


def _rename_shard(new: str) -> Callable[[dict], None]:
    def edit(body: dict) -> None:
        shards_ = _gen(body)["layout"]["shard_tensors"]
        old = next(iter(shards_))
        _gen(body)["layout"]["shard_tensors"] = {
            (new if k == old else k): v for k, v in shards_.items()}
    return edit


def _set(path: tuple, value: object) -> Callable[[dict], None]:
    def edit(body: dict) -> None:
        node = body
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


def _all_row_dtypes(code: str, transform: str) -> Callable[[dict], None]:
    """Every row dtype and the transform table changed consistently."""
    def edit(body: dict) -> None:
        gen = _gen(body)
        gen["row_dtypes"] = dict.fromkeys(gen["row_dtypes"], code)
        gen["transforms"] = {code: transform}
    return edit


def _pending(kind: object, generation_delta: int = 1, drop: str | None = None):
    def edit(body: dict) -> None:
        pending = copy.deepcopy(_gen(body))
        pending["generation"] += generation_delta
        if kind is not None:
            pending["kind"] = kind
        if drop:
            pending.pop(drop)
        body["pending"] = pending
    return edit


def _rename_tensor(new: str) -> Callable[[dict], None]:
    """Rename Q_PROJ everywhere in the manifest (a consistent forgery)."""
    def edit(body: dict) -> None:
        gen = _gen(body)
        layout = gen["layout"]
        layout["tensors"] = {(new if k == Q_PROJ else k): v for k, v in layout["tensors"].items()}
        layout["shard_tensors"] = {f: [new if n == Q_PROJ else n for n in names]
                                   for f, names in layout["shard_tensors"].items()}
        gen["row_dtypes"] = {(new if k == Q_PROJ else k): v for k, v in gen["row_dtypes"].items()}
    return edit


# (edit of the manifest body, whether its sha256 is recomputed)
MANIFEST_EDITS: dict[str, tuple[Callable[[dict], object], bool]] = {
    # damage: the checksum no longer matches
    "steps-changed-checksum-stale": (_set(("current", "steps"), [10, 20, 30, 41]), False),
    "one-byte-of-layout-stale": (lambda b: _tensor(b).__setitem__(0, "F16"), False),
    # wrong JSON types (checksum recomputed, so that the parser itself must refuse them)
    "manifest-is-a-list": (lambda b: [b], True),
    "current-is-a-string": (_set(("current",), "gen1"), True),
    "steps-is-a-string": (_set(("current", "steps"), "10,20,30,40"), True),
    "steps-are-floats": (_set(("current", "steps"), [10.0, 20.0, 30.0, 40.0]), True),
    "steps-are-bools": (_set(("current", "steps"), [True, 20, 30, 40]), True),
    "layout-is-a-list": (_set(("current", "layout"), []), True),
    "tensors-is-a-list": (_set(("current", "layout", "tensors"), []), True),
    "dtype-is-a-list": (lambda b: _tensor(b).__setitem__(0, ["BF16"]), True),
    "dtype-is-a-number": (lambda b: _tensor(b).__setitem__(0, 2), True),
    "aux-is-a-dict": (_set(("current", "aux"), {}), True),
    "codec-is-a-list": (_set(("current", "codec"), ["xor-zstd"]), True),
    "sources-is-a-list": (_set(("current", "sources"), []), True),
    "store-id-is-a-number": (_set(("store_id",), 5), True),
    # steps
    "steps-unsorted": (_set(("current", "steps"), [20, 10, 30, 40]), True),
    "steps-duplicated": (_set(("current", "steps"), [10, 10, 30, 40]), True),
    "steps-negative": (_set(("current", "steps"), [-10, 20, 30, 40]), True),
    "steps-huge": (_set(("current", "steps"), [10, 20, 30, 2**60]), True),
    "steps-other": (lambda b: (_set(("current", "steps"), [10, 20, 30, 50])(b),
                               _gen(b)["sources"]["steps"].__setitem__(
                                   "50", _gen(b)["sources"]["steps"].pop("40"))), True),
    "steps-empty": (lambda b: (_set(("current", "steps"), [])(b),
                               _set(("current", "sources", "steps"), {})(b)), True),
    # layout
    "shape-negative": (lambda b: _tensor(b).__setitem__(1, [-16, 16]), True),
    "shape-huge": (lambda b: _tensor(b).__setitem__(1, [2**40, 2**40]), True),
    "shape-absurd-product": (lambda b: _tensor(b).__setitem__(1, [2**44] * 4), True),
    "shape-non-int": (lambda b: _tensor(b).__setitem__(1, [16.5, 16]), True),
    "shape-string": (lambda b: _tensor(b).__setitem__(1, ["16", 16]), True),
    "shape-other": (lambda b: _tensor(b).__setitem__(1, [8, 32]), True),
    "dtype-other": (lambda b: _tensor(b).__setitem__(0, "F32"), True),
    "dtype-unknown": (lambda b: _tensor(b).__setitem__(0, "BF17"), True),
    "shard-name-parent": (_rename_shard("../../evil.safetensors"), True),
    "shard-name-absolute": (_rename_shard("/tmp/relex-evil/x.safetensors"), True),
    "shard-name-subdir": (_rename_shard("sub/x.safetensors"), True),
    "shard-name-hidden": (_rename_shard(".x.safetensors"), True),
    "shard-name-not-safetensors": (_rename_shard("config.json"), True),
    "tensor-in-no-shard": (lambda b: _gen(b)["layout"]["shard_tensors"].__setitem__(
        next(iter(_gen(b)["layout"]["shard_tensors"])), []), True),
    "tensor-in-two-shards": (lambda b: [v.append(Q_PROJ) for v in
                                        _gen(b)["layout"]["shard_tensors"].values()], True),
    "tensor-renamed-to-a-path": (_rename_tensor("../../../evil"), True),
    # model files
    "aux-name-parent": (lambda b: _gen(b)["aux"][0].__setitem__(0, "../config.json"), True),
    "aux-name-subdir": (lambda b: _gen(b)["aux"][0].__setitem__(0, "a/config.json"), True),
    "aux-name-dotdot": (lambda b: _gen(b)["aux"][0].__setitem__(0, ".."), True),
    "aux-name-absolute": (lambda b: _gen(b)["aux"][0].__setitem__(0, "/tmp/x.json"), True),
    "aux-name-of-a-shard": (lambda b: _gen(b)["aux"][0].__setitem__(
        0, "model-00001-of-00002.safetensors"), True),
    "aux-name-of-the-index": (lambda b: _gen(b)["aux"][0].__setitem__(
        0, "model.safetensors.index.json"), True),
    "aux-twice": (lambda b: _gen(b)["aux"].append(_gen(b)["aux"][0]), True),
    "aux-size-negative": (lambda b: _gen(b)["aux"][0].__setitem__(1, -1), True),
    "aux-size-other": (lambda b: _gen(b)["aux"][0].__setitem__(1, 7), True),
    "aux-digest-other": (lambda b: _gen(b)["aux"][0].__setitem__(2, "0" * 64), True),
    # tied tensors
    "alias-to-unknown": (_set(("current", "aliases"), {LM_HEAD: "no.such.tensor"}), True),
    "alias-of-unknown": (_set(("current", "aliases"), {"no.such": EMBED}), True),
    "alias-to-a-list": (_set(("current", "aliases"), {LM_HEAD: [EMBED]}), True),
    "alias-to-itself": (_set(("current", "aliases"), {LM_HEAD: LM_HEAD}), True),
    "alias-of-another-shape": (_set(("current", "aliases"), {Q_PROJ: EMBED}), True),
    "alias-without-row-change": (_set(("current", "aliases"), {LM_HEAD: EMBED}), True),
    "alias-consistent": (lambda b: (_set(("current", "aliases"), {LM_HEAD: EMBED})(b),
                                    _gen(b)["row_dtypes"].pop(LM_HEAD)), True),
    # row dtypes and transforms
    "row-dtype-int": (_set(("current", "row_dtypes", Q_PROJ), "I64"), True),
    "row-dtype-list": (_set(("current", "row_dtypes", Q_PROJ), ["BF16"]), True),
    "row-dtype-missing": (lambda b: _gen(b)["row_dtypes"].pop(Q_PROJ), True),
    "row-dtype-extra": (_set(("current", "row_dtypes", "model.layers.0.some_buffer"), "BF16"),
                        True),
    "row-dtypes-all-f32": (_all_row_dtypes("F32", "sub-prev+zigzag+shuffle"), True),
    "row-dtypes-all-f16": (_all_row_dtypes("F16", "xor-prev"), True),
    "transform-unknown": (_set(("current", "transforms", "BF16"), "rot13"), True),
    "transform-list": (_set(("current", "transforms", "BF16"), ["xor-prev"]), True),
    "transform-none": (_set(("current", "transforms", "BF16"), "none"), True),
    "transform-shuffle": (_set(("current", "transforms", "BF16"), "sub-prev+zigzag+shuffle"),
                          True),
    "codec-unknown": (_set(("current", "codec"), "pickle"), True),
    "codec-huge": (_set(("current", "codec"), "x" * 5_000_000), True),
    "transform-huge": (_set(("current", "transforms", "BF16"), ["x" * 100_000] * 50), True),
    # generations, ids, format
    "generation-zero": (_set(("current", "generation"), 0), True),
    "generation-negative": (_set(("current", "generation"), -1), True),
    "generation-huge": (_set(("current", "generation"), 2**40), True),
    "generation-string": (_set(("current", "generation"), "1"), True),
    "generation-absent": (_set(("current", "generation"), 2), True),
    "store-id-path": (_set(("store_id",), "../" + "0" * 29), True),
    "store-id-other": (_set(("store_id",), "f" * 32), True),
    "format-future": (_set(("format",), "relex_stream.trajectory/9"), True),
    "gram-grid-other": (_set(("gram_grid",), "blocks=1"), True),
    "extra-field": (_set(("extra",), 1), True),
    "missing-field": (lambda b: b.pop("gram_grid"), True),
    "sources-unsafe-name": (lambda b: _gen(b)["sources"]["base"].__setitem__("../x", {}), True),
    "sources-missing-a-step": (lambda b: _gen(b)["sources"]["steps"].pop("20"), True),
    "no-committed-generation": (_set(("current",), None), True),
    # a pending change
    "pending-is-a-list": (_set(("pending",), [1]), True),
    "pending-without-kind": (_pending(None), True),
    "pending-kind-unknown": (_pending("delete"), True),
    "pending-kind-list": (_pending(["build"]), True),
    "pending-build-not-newer": (_pending("build", 0), True),
    "pending-append-other-generation": (_pending("append", 1), True),
    "pending-missing-field": (_pending("build", 1, drop="layout"), True),
}


@pytest.mark.parametrize("name", list(MANIFEST_EDITS))
def test_manifest_edit_is_refused(case: Case, name: str) -> None:
    """a. A damaged or hostile manifest: one error line, exit 2; nothing written anywhere (no
    OUT, no byte of the store, nothing around; an output shard or model file named by the
    manifest never lands outside OUT)."""
    edit, recompute = MANIFEST_EDITS[name]
    edit_manifest(case.store, edit, recompute=recompute)
    refused_from_store(case)
    assert not Path("/tmp/relex-evil").exists()


# A store rewritten consistently (the manifest edited, every group record made to agree) cannot
# be told from a real one; these edits must be refused all the same, as they are invalid in
# themselves (the one left out reshapes a tensor to another shape of as many elements).
FULLY_FORGED = [name for name, (_, recompute) in MANIFEST_EDITS.items()
                if recompute and name != "shape-other"]


@pytest.mark.parametrize("name", FULLY_FORGED)
def test_fully_forged_manifest_edit_is_refused(case: Case, name: str) -> None:
    """a. The same edits with every group record forged to agree (definition digest and
    sha256 recomputed): the manifest's own checks, and the bits' checksums, still refuse."""
    edit, _ = MANIFEST_EDITS[name]
    edit_manifest(case.store, edit)
    forge_records(case.store)
    refused_from_store(case, report_may_pass=True)  # report reads no rows and no model file
    assert not Path("/tmp/relex-evil").exists()


@pytest.mark.parametrize("damage", ["not-json", "empty", "a-list", "no-attributes",
                                    "zarr-v2", "huge"])
def test_root_metadata_that_is_not_a_manifest(case: Case, damage: str) -> None:
    """a. The root zarr.json unreadable as the store's metadata."""
    meta_path = case.store / "zarr.json"
    meta = read_json(meta_path)
    if damage == "not-json":
        meta_path.write_bytes(b'{"zarr_format": 3, "attributes": {')
    elif damage == "empty":
        meta_path.write_bytes(b"")
    elif damage == "a-list":
        write_json(meta_path, [meta])
    elif damage == "no-attributes":
        meta["attributes"] = []
        write_json(meta_path, meta)
    elif damage == "zarr-v2":
        meta["zarr_format"] = 2
        write_json(meta_path, meta)
    else:
        meta_path.write_bytes(b" " * (300 * 2**20))  # larger than any manifest
    refused_from_store(case)


def test_unforged_manifest_still_reads(case: Case) -> None:
    """The edit helpers themselves change nothing: a no-op edit reads as before."""
    edit_manifest(case.store, lambda body: None, recompute=True)
    forge_records(case.store)
    case.freeze()
    assert_ok(case.from_store())
    assert tree_files(case.out) == {k: v for k, v in case.built.reference.items()
                                    if k.startswith("step-")}


# ----------------------------------------------------------------------------- tensor names


def test_tensor_names_are_never_paths(tmp_path: Path) -> None:
    """a. Tensor names holding '/', '..' or an absolute path are names: the store keeps and
    reads them like any other, and nothing is created outside OUT and the store."""
    names = ["../../escape.weight", "a/b/c.weight", "/abs/x.weight", "..", "x/../../y"]
    gen = torch.Generator().manual_seed(0)
    base = {n: torch.randn(300, generator=gen).to(torch.bfloat16) for n in names}
    config = qwen2_config(64, torch.bfloat16, False)
    write_model_dir(tmp_path / "m" / "base", base, config)
    for step in STEPS:
        tensors = {n: (t.double() + 0.01 * step).to(torch.bfloat16) for n, t in base.items()}
        write_model_dir(tmp_path / "m" / "runs" / f"checkpoint-{step}", tensors, config,
                        aux=False)
    around = snapshot(tmp_path)
    store, out, again = tmp_path / "deep" / "S", tmp_path / "deep" / "O", tmp_path / "deep" / "P"
    assert_ok(call("run", "--base", tmp_path / "m" / "base", "--runs", tmp_path / "m" / "runs",
                   "--cache", store, "--target", "100", "--out", out, "--device", "cpu",
                   "--quiet"))
    assert_ok(call("run", "--cache", store, "--target", "100", "--out", again, "--device",
                   "cpu", "--quiet"))
    assert_ok(call("report", store, "--no-plots"))
    created = diff(around, snapshot(tmp_path, skip=(tmp_path / "deep",)))
    assert created == [], created
    assert not Path("/abs").exists()
    first = load((out / "step-100" / "model.safetensors").read_bytes())
    second = load((again / "step-100" / "model.safetensors").read_bytes())
    assert sorted(first) == sorted(names)
    assert all(torch.equal(first[n], second[n]) for n in names)


# ----------------------------------------------------------------------------- b. records


def _record_of(store: Path, tensor: str) -> Path:
    with TrajectoryStore.open(store) as opened:
        group = opened.group_of(tensor)
        gen = opened.current
    return store / f"gen{gen.generation}" / "gram" / f"g{group.index}-k{len(gen.steps)}" / (
        "zarr.json")


def _other_group_record(store: Path, tensor: str) -> Path:
    mine = _record_of(store, tensor)
    return next(p for p in record_paths(store) if p != mine)


RECORD_EDITS: dict[str, tuple[Callable[[dict], object], bool]] = {
    "size-stale": (lambda r: r["rows"][0].__setitem__(0, r["rows"][0][0] + 1), False),
    "size-forged": (lambda r: r["rows"][0].__setitem__(0, r["rows"][0][0] + 1), True),
    "tail-crc-forged": (lambda r: r["rows"][1].__setitem__(1, r["rows"][1][1] ^ 1), True),
    "base-forged": (lambda r: r.__setitem__("base", r["rows"][0]), True),
    "rows-swapped-forged": (lambda r: r["rows"].reverse(), True),
    "row-missing-forged": (lambda r: r["rows"].pop(), True),
    "steps-forged": (lambda r: r.__setitem__("steps", [10, 20, 30, 41]), True),
    "group-forged": (lambda r: r.__setitem__("group", r["group"] + 1), True),
    "generation-forged": (lambda r: r.__setitem__("generation", 2), True),
    "store-id-forged": (lambda r: r.__setitem__("store_id", "f" * 32), True),
    "gram-crc-forged": (lambda r: r.__setitem__("gram_crc", r["gram_crc"] ^ 1), True),
    "gram-crc-null-forged": (lambda r: r.__setitem__("gram_crc", None), True),
    "kinds-unknown-forged": (lambda r: r["kinds"].__setitem__(Q_PROJ, "approx"), True),
    "kinds-missing-forged": (lambda r: r["kinds"].pop(Q_PROJ), True),
    "support-too-big-forged": (lambda r: r["support"].__setitem__(Q_PROJ, 10**9), True),
    "support-negative-forged": (lambda r: r["support"].__setitem__(Q_PROJ, -1), True),
    "shard-not-a-pair-forged": (lambda r: r["rows"].__setitem__(0, [1, 2, 3]), True),
    "shard-huge-forged": (lambda r: r["rows"].__setitem__(0, [2**64, 1]), True),
    "extra-field-forged": (lambda r: r.__setitem__("x", 1), True),
}


@pytest.mark.parametrize("name", list(RECORD_EDITS))
def test_group_record_edit_is_refused(case: Case, name: str) -> None:
    """b. A group record edited (with or without its sha256 recomputed): refused naming the
    group's tensors and --rebuild."""
    edit, recompute = RECORD_EDITS[name]
    edit_record(_record_of(case.store, Q_PROJ), edit, recompute=recompute)
    refused_from_store(case, Q_PROJ, "--rebuild", report_may_pass=recompute)


@pytest.mark.parametrize("how", ["swapped", "other-store", "deleted", "garbage", "no-record",
                                 "array-meta-changed"])
def test_group_record_replaced_is_refused(case: Case, how: str) -> None:
    """b. A record from another group or another store (different store_id), or none."""
    mine = _record_of(case.store, Q_PROJ)
    if how == "swapped":
        shutil.copyfile(_other_group_record(case.store, Q_PROJ), mine)
    elif how == "other-store":
        shutil.copyfile(case.built.other / mine.relative_to(case.store), mine)
    elif how == "deleted":
        mine.unlink()
    elif how == "garbage":
        mine.write_bytes(b'{"zarr_format": 3, "attr')
    elif how == "no-record":
        meta = read_json(mine)
        meta["attributes"] = {}
        write_json(mine, meta)
    else:
        meta = read_json(mine)
        meta["shape"][0] += 1
        write_json(mine, meta)
    refused_from_store(case, Q_PROJ, "--rebuild")


# ----------------------------------------------------------------------------- c. shard bytes


def _shard(store: Path, tensor: str, row: int | None):
    """(path, group, record entry, index, tensor's first inner chunk) of a row (or base) shard."""
    with TrajectoryStore.open(store) as opened:
        group = opened.group_of(tensor)
        gen = opened.current
        record = opened.record(group)
    entry = record.base if row is None else record.rows[row]
    kind = "base" if row is None else "rows"
    path = store / f"gen{gen.generation}" / kind / f"g{group.index}" / "c" / (
        "0" if row is None else f"{row}/0")
    fd = os.open(path, os.O_RDONLY)
    try:
        index = shards.read_index(fd, group.n_chunks, entry, group.chunk_cols * 8)
    finally:
        os.close(fd)
    return path, group, entry, index, group.chunk_range(tensor, 0, 1)[0]


def _flip(path: Path, offset: int, bit: int = 0x10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= bit
    path.write_bytes(bytes(data))


def _forge_tail(store: Path, tensor: str, row: int | None, change, hole: int = 0) -> None:
    """Rewrite a shard's checksum block and zarr index (`change(offsets, sizes, encoded, raw)`
    edits them in place) and forge the group record to match, sha256 included. `hole`: bytes
    of a sparse gap put between the chunks and the index."""
    path, group, _, index, _ = _shard(store, tensor, row)
    arrays = [index.offsets.copy(), index.sizes.copy(), index.encoded_crcs.copy(),
              index.raw_crcs.copy()]
    change(*arrays)
    tail = shards._tail(shards.ShardIndex(*arrays))
    chunks = path.read_bytes()[: -shards.tail_bytes(group.n_chunks)]
    with open(path, "wb") as handle:
        handle.write(chunks)
        handle.seek(len(chunks) + hole)
        handle.write(tail)
    entry = [len(chunks) + hole + len(tail), shards.crc32c(tail)]

    def forge(record: dict) -> None:
        if row is None:
            record["base"] = entry
        else:
            record["rows"][row] = entry

    edit_record(_record_of(store, tensor), forge)


def _swap_chunks(offsets, sizes, encoded, raw) -> None:
    """Entries of the first two inner chunks swapped, their encoded checksums too (not the raw
    ones): each chunk is read from the other's place, which every check up to the decoded
    bits accepts."""
    for array in (offsets, sizes, encoded):
        array[[0, 1]] = array[[1, 0]]


SHARD_DAMAGE = {
    # (tensor, row or None for the base, damage)
    "row-bit-in-chunk": (Q_PROJ, 0, "chunk"),
    "row-bit-in-chunk-trailer": (Q_PROJ, 2, "trailer"),
    "row-bit-in-big-tensor": (EMBED, 3, "chunk"),
    "row-bit-in-checksum-block": (Q_PROJ, 1, "sums"),
    "row-bit-in-zarr-index": (Q_PROJ, 1, "index"),
    "row-bit-in-index-crc": (Q_PROJ, 1, "last"),
    "row-truncated": (Q_PROJ, 1, "truncate"),
    "row-emptied": (Q_PROJ, 1, "empty"),
    "row-grown": (Q_PROJ, 1, "append"),
    "row-deleted": (Q_PROJ, 3, "delete"),
    "row-3-over-row-2": (Q_PROJ, 2, "copy-next"),
    "row-from-other-store": (Q_PROJ, 2, "other-store"),
    "row-replaced-by-directory": (Q_PROJ, 2, "directory"),
    "row-replaced-by-link": (Q_PROJ, 2, "link"),
    "row-replaced-by-fifo": (Q_PROJ, 2, "fifo"),
    "row-offsets-outside-forged": (Q_PROJ, 1, "forge-outside"),
    "row-offsets-wrapping-forged": (Q_PROJ, 1, "forge-wrap"),
    "row-sizes-tiny-forged": (Q_PROJ, 1, "forge-tiny"),
    "row-chunk-missing-forged": (Q_PROJ, 1, "forge-missing"),
    "row-chunks-swapped-forged": (EMBED, 1, "forge-swap"),
    "row-chunk-of-a-tib-forged": (Q_PROJ, 1, "forge-huge"),
    "base-bit-in-chunk": (Q_PROJ, None, "chunk"),
    "base-bit-in-big-tensor": (EMBED, None, "chunk"),
    "base-truncated": (Q_PROJ, None, "truncate"),
    "base-deleted": (Q_PROJ, None, "delete"),
    "base-from-other-store": (Q_PROJ, None, "other-store"),
    "base-chunks-swapped-forged": (EMBED, None, "forge-swap"),
}


@pytest.mark.parametrize("name", list(SHARD_DAMAGE))
def test_damaged_shard_is_detected_when_read(case: Case, name: str) -> None:
    """c. A damaged row or base shard: a run from the store stops naming the tensor and
    --rebuild; no output, no byte written anywhere."""
    tensor, row, damage = SHARD_DAMAGE[name]
    path, group, entry, index, j = _shard(case.store, tensor, row)
    size = path.stat().st_size
    tail = shards.tail_bytes(group.n_chunks)
    if damage == "chunk":
        _flip(path, int(index.offsets[j]) + int(index.sizes[j]) // 2)
    elif damage == "trailer":
        _flip(path, int(index.offsets[j]) + int(index.sizes[j]) - 2)
    elif damage == "sums":
        _flip(path, size - tail + 12 + 8 * j)
    elif damage == "index":
        _flip(path, size - tail + 12 + 8 * group.n_chunks + 16 * j)
    elif damage == "last":
        _flip(path, size - 1)
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[: size // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "append":
        path.write_bytes(path.read_bytes() + b"\0")
    elif damage == "delete":
        path.unlink()
    elif damage == "copy-next":
        shutil.copyfile(path.parent.parent / str(row + 1) / "0", path)
    elif damage == "other-store":
        shutil.copyfile(case.built.other / path.relative_to(case.store), path)
    elif damage == "directory":
        path.unlink()
        path.mkdir()
    elif damage == "link":
        path.unlink()
        path.symlink_to(case.root / "outside" / "precious.txt")
    elif damage == "fifo":
        path.unlink()
        os.mkfifo(path)
    elif damage == "forge-outside":
        _forge_tail(case.store, tensor, row, lambda o, s, e, r: o.__setitem__(j, size * 4))
    elif damage == "forge-wrap":
        _forge_tail(case.store, tensor, row, lambda o, s, e, r: o.__setitem__(j, 2**64 - 8))
    elif damage == "forge-tiny":
        _forge_tail(case.store, tensor, row, lambda o, s, e, r: s.__setitem__(j, 1))
    elif damage == "forge-missing":
        _forge_tail(case.store, tensor, row, lambda o, s, e, r: o.__setitem__(j, 2**64 - 1))
    elif damage == "forge-huge":  # read whole, a TiB chunk was a MemoryError traceback
        _forge_tail(case.store, tensor, row, lambda o, s, e, r: (
            o.__setitem__(j, size - tail), s.__setitem__(j, 2**40)), hole=2**40)
    elif damage == "forge-swap":
        assert group.chunk_range(tensor, 0, 1)[0] == 0 and group.n_chunks >= 2, "test bug"
        _forge_tail(case.store, tensor, row, _swap_chunks)
    case.freeze()
    assert_error(case.from_store(), tensor, "--rebuild")
    case.assert_untouched()
    assert (case.root / "outside" / "precious.txt").read_bytes() == b"not the tool's\n"


def _every_reader_refuses(case: Case) -> None:
    """report, backtest and a run from the damaged store each stop with one line naming the
    tensor and --rebuild, and change nothing."""
    case.freeze()
    for result in (call("report", case.store, "--no-plots"),
                   call("backtest", case.store, "--holdout", "2", "--no-plots"),
                   case.from_store()):
        assert_error(result, Q_PROJ, "--rebuild")
        case.assert_untouched()


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "other-store-row"])
def test_damaged_gram_is_detected_by_every_reader(case: Case, damage: str) -> None:
    """c. A damaged Gram chunk: report, backtest and a run from the store all stop naming the
    tensor and --rebuild."""
    record = _record_of(case.store, Q_PROJ)
    chunk = record.parent / "c" / "0" / "0" / "0"
    if damage == "flip":
        _flip(chunk, 17, 0x01)
    elif damage == "truncate":
        chunk.write_bytes(chunk.read_bytes()[:-9])
    elif damage == "delete":
        chunk.unlink()
    else:  # a valid chunk of another group's Gram, of another size
        other = _other_group_record(case.store, Q_PROJ).parent / "c" / "0" / "0" / "0"
        if other.exists():
            shutil.copyfile(other, chunk)
        else:
            chunk.write_bytes(b"\0" * 12)
    _every_reader_refuses(case)


GRAM_FORGERIES: dict[str, Callable[[np.ndarray], None]] = {
    "nan": lambda g: g.__setitem__((1, 2), np.nan),
    "inf-diagonal": lambda g: g.__setitem__((0, 0), np.inf),
    "near-float64-max": lambda g: g.__imul__(1.7e308 / np.abs(g).max()),
    "negated": lambda g: g.__imul__(-1.0),
    "asymmetric": lambda g: g.__setitem__((0, 3), g[0, 3] + 0.5 * abs(g[0, 3]) + 1.0),
    "larger-than-its-diagonal": lambda g: (g.__setitem__((1, 2), 3 * g[1, 1] + 3 * g[2, 2]),
                                           g.__setitem__((2, 1), 3 * g[1, 1] + 3 * g[2, 2])),
    # a diagonal past ~1.3e154 made √(G_ii G_jj) overflow to inf: every check below it passed
    "asymmetric-past-the-overflow": lambda g: (
        np.fill_diagonal(g, 1e200), g.__setitem__((0, 1), 1e249),
        g.__setitem__((1, 0), -1e249)),
    # finite, symmetric, within Cauchy-Schwarz, and still no D Dᵀ: eigenvalues below zero
    "negative-eigenvalues": lambda g: g.__setitem__(
        slice(None), np.where(np.eye(len(g), dtype=bool), g,
                              -0.99 * np.sqrt(np.outer(np.diag(g), np.diag(g))))),
}


@pytest.mark.parametrize("forgery", sorted(GRAM_FORGERIES))
def test_forged_gram_values_are_refused_by_every_reader(case: Case, forgery: str) -> None:
    """c. Gram values no matrix D Dᵀ has (not finite, too large for eigh, a negative diagonal,
    asymmetric, an entry beyond Cauchy-Schwarz), written with the chunk's crc32c, the record's
    gram_crc and its sha256 recomputed: report, backtest and a run from the store stop with
    one line naming the tensor and --rebuild (not a traceback, NaN errors or other weights)."""
    record = _record_of(case.store, Q_PROJ)
    chunk = record.parent / "c" / "0" / "0" / "0"
    with TrajectoryStore.open(case.store) as opened:
        group = opened.group_of(Q_PROJ)
    k = len(STEPS)
    stack = np.frombuffer(chunk.read_bytes()[:-4], dtype="<f8").reshape(-1, k, k).copy()
    GRAM_FORGERIES[forgery](stack[group.tensors.index(Q_PROJ)])
    data = np.ascontiguousarray(stack, dtype="<f8").tobytes()
    crc = shards.crc32c(data)
    chunk.write_bytes(data + crc.to_bytes(4, "little"))
    edit_record(record, lambda r: r.__setitem__("gram_crc", crc))
    _every_reader_refuses(case)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "swap"])
def test_damaged_model_file_in_store_is_detected(case: Case, damage: str) -> None:
    """c. A damaged config/tokenizer file kept in the store: the run from the store stops
    naming the file and --rebuild, before any output is laid out."""
    meta = read_json(case.store / "zarr.json")["attributes"]["relex_stream"]["current"]
    files = case.store / f"gen{meta['generation']}" / "files"
    name = meta["aux"][0][0]
    chunk = files / "0" / "c" / "0"
    if damage == "flip":
        _flip(chunk, 3)
    elif damage == "truncate":
        chunk.write_bytes(chunk.read_bytes()[:5])
    elif damage == "delete":
        chunk.unlink()
    else:
        shutil.copyfile(files / "1" / "c" / "0", chunk)
    case.freeze()
    assert_error(case.from_store(), name, "--rebuild")
    case.assert_untouched()


@pytest.mark.parametrize("content", [b"[1, 2]", b'{"a": 1, "a": 2}', b"{not json", b"null"])
def test_fully_forged_model_file_is_refused(case: Case, content: bytes) -> None:
    """c. A store rewritten consistently (its config.json replaced, the manifest and every
    record updated to match, all checksums recomputed): config.json must still be a JSON
    object, as the base's is; one error line naming it, not a traceback."""
    meta = read_json(case.store / "zarr.json")["attributes"]["relex_stream"]["current"]
    j = next(i for i, item in enumerate(meta["aux"]) if item[0] == "config.json")
    chunk, _ = shards.plain_chunk(np.frombuffer(content, dtype=np.uint8))
    (case.store / f"gen{meta['generation']}" / "files" / str(j) / "c" / "0").write_bytes(chunk)
    digest = hashlib.sha256(content).hexdigest()
    edit_manifest(case.store, lambda b: _gen(b)["aux"].__setitem__(
        j, ["config.json", len(content), digest]))
    forge_records(case.store)
    case.freeze()
    assert_error(case.from_store(), "config.json", "--rebuild")
    case.assert_untouched()


@pytest.mark.parametrize("claim", ["one-of-2-GiB", "a-config-of-5-MiB", "100-MiB-in-all"])
def test_model_file_sizes_beyond_what_a_base_gives_are_refused(case: Case, claim: str) -> None:
    """c. The manifest may claim 2 GiB per model file (of 256): a 650 KB store with one sparse
    file made run, an append and watch read 2 GiB and take 4.4 GB before the checksum said
    no. Its files are held to the limits a base's are read with (4 MiB for a config, 96 MiB
    in all), so a claim beyond them is refused before anything is read."""
    sizes = {"one-of-2-GiB": [("tokenizer.model", 2**31)],
             "a-config-of-5-MiB": [("generation_config.json", 5 * 2**20)],
             "100-MiB-in-all": [("a.txt", 50 * 2**20), ("b.txt", 50 * 2**20)]}[claim]
    edit_manifest(case.store, lambda b: _gen(b)["aux"].extend(
        [name, size, "0" * 64] for name, size in sizes))
    forge_records(case.store)
    needle = "add up to" if claim == "100-MiB-in-all" else "a model file's size"
    refused_from_store(case, needle, "--rebuild")


def test_gram_matrices_larger_than_memory_are_refused_before_the_read(
        case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    """c. A forged step count asks T·K²·8 bytes of the Gram file (a sparse file makes it on
    a few KB of disk): 2.3 GB for report, backtest and run, then a MemoryError traceback
    under a memory limit. A claim the machine cannot hold is refused before the read, and an
    allocation that fails anyway is one line."""
    from relex_stream import store as store_module

    class Little:
        available = 1000

    monkeypatch.setattr(store_module.psutil, "virtual_memory", lambda: Little)
    case.freeze()
    for result in (call("report", case.store, "--no-plots"),
                   call("backtest", case.store, "--holdout", "2", "--no-plots"),
                   case.from_store()):
        assert_error(result, "memory available", "--rebuild")
    monkeypatch.undo()

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(store_module.TrajectoryStore, "grams", no_memory)
    assert_error(call("report", case.store, "--no-plots"), "out of memory")
    case.assert_untouched()


# ----------------------------------------------------------------------------- d. destructive


def test_rebuild_refuses_existing_output_before_touching_the_store(case: Case) -> None:
    """d. `run --rebuild` without --overwrite while OUT/step-T exists: refused before a byte
    of the store changes (mtimes included)."""
    (case.out / "step-100").mkdir(parents=True)
    (case.out / "step-100" / "keep.txt").write_bytes(b"mine")
    before_out = snapshot(case.out)
    case.freeze()
    result = call(*case.built.source_args(case.store, case.out, "--rebuild"))
    assert_error(result, "already exists")
    assert diff(case._store_before, snapshot(case.store)) == []
    assert diff(before_out, snapshot(case.out)) == []


def test_rebuild_keeps_the_old_store_readable_until_it_commits(case: Case, tmp_path: Path):
    """d. A rebuild that fails half way (a checkpoint with NaN in a late tensor) leaves the
    old store readable, giving the same bytes as before."""
    traj = tmp_path / "traj"
    shutil.copytree(case.built.traj.root, traj)
    path = traj / "runs" / "checkpoint-30" / "model.safetensors"
    entries, start, _ = read_header(path)
    a, b = entries["model.norm.weight"]["data_offsets"]  # in the last group
    with open(path, "r+b") as handle:
        handle.seek(start + a)
        handle.write(b"\xc0\x7f" * ((b - a) // 2))
    result = call("run", "--base", traj / "base", "--runs", traj / "runs", "--cache",
                  case.store, "--target", "100", "--out", tmp_path / "O2", "--device", "cpu",
                  "--quiet", "--rebuild")
    assert_error(result, "model.norm.weight")
    case.freeze()
    assert_ok(case.from_store())
    assert tree_files(case.out) == {k: v for k, v in case.built.reference.items()
                                    if k.startswith("step-")}


def test_rebuild_removes_only_what_relex_stream_wrote(case: Case) -> None:
    """d. Files someone else put in the store (in the generation a rebuild supersedes, in a
    directory named like the store's own, at the root) survive the rebuild's clean-up, with
    the directories holding them; the store's own files there are removed, and the rebuilt
    store gives the reference output, now and on the next run."""
    planted = ["notes.txt", "gen1/notes.txt", "gen1/gram/notes.txt", "gen1/rows/g0/c/notes.txt",
               "gen7/notes.txt", "files/notes.txt", "gen1/base/g0/c/.hidden"]
    for name in planted:
        (case.store / name).parent.mkdir(parents=True, exist_ok=True)
        (case.store / name).write_bytes(b"not the tool's\n")
    own = sorted(p.relative_to(case.store).as_posix() for p in (case.store / "gen1").rglob("*")
                 if p.is_file() and p.name != "notes.txt" and p.name != ".hidden")
    assert own, "the store's first generation holds its files"
    assert_ok(call(*case.built.source_args(case.store, case.out, "--rebuild", "--overwrite")))
    for name in planted:
        assert (case.store / name).read_bytes() == b"not the tool's\n", name
    assert [name for name in own if (case.store / name).exists()] == []
    assert tree_files(case.out) == case.built.reference
    again = case.root / "again"
    assert_ok(call("run", "--cache", case.store, "--target", "100", "--out", again,
                   "--device", "cpu", "--quiet"))
    assert tree_files(again) == {k: v for k, v in case.built.reference.items()
                                 if k.startswith("step-")}


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo", "directory"])
def test_lock_file_is_never_written_through(case: Case, kind: str) -> None:
    """d. S/lock a link to a file outside (or a FIFO, or a directory): a run that must lock the
    store for writing (here --rebuild) refuses with one line, and the file outside keeps its
    bytes; a run that only reads the store leaves it alone too."""
    target = case.root / "outside" / "precious.txt"
    lock = case.store / "lock"
    lock.unlink(missing_ok=True)
    if kind == "symlink":
        lock.symlink_to(target)
    elif kind == "hardlink":
        os.link(target, lock)
    elif kind == "fifo":
        os.mkfifo(lock)
    else:
        lock.mkdir()
    case.freeze()
    assert_error(call(*case.built.source_args(case.store, case.out, "--rebuild")), "lock")
    case.assert_untouched()
    result = case.from_store()
    assert result.rc in (0, 2) and result.crashed is None, str(result)
    if result.rc == 2:
        assert_error(result, "lock")
    assert target.read_bytes() == b"not the tool's\n"
    assert diff(case._store_before, snapshot(case.store)) == []


def test_cache_at_a_directory_that_is_not_a_store(built: Built, tmp_path: Path) -> None:
    """d. --cache at a directory holding other files: refused, not a byte written into it;
    `report` on a plain directory, an empty one or a missing path: the same."""
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_bytes(b"my notes")
    empty = tmp_path / "empty"
    empty.mkdir()
    before = snapshot(tmp_path)
    assert_error(call(*built.source_args(plain, tmp_path / "O")), "not a relex_stream store")
    assert_error(call(*built.source_args(plain, tmp_path / "O", "--rebuild")))
    assert_error(call("run", "--cache", plain, "--target", "100", "--out", tmp_path / "O"))
    for path in (plain, empty, tmp_path / "missing"):
        assert_error(call("report", path, "--no-plots"))
        assert_error(call("backtest", path, "--holdout", "2", "--no-plots"))
    assert diff(before, snapshot(tmp_path)) == []


def test_cache_dot_is_refused(built: Built, tmp_path: Path, monkeypatch) -> None:
    """d. `--cache .` from a directory that holds other files: refused, nothing written."""
    here = tmp_path / "here"
    here.mkdir()
    (here / "notes.txt").write_bytes(b"my notes")
    monkeypatch.chdir(here)
    before = snapshot(tmp_path)
    assert_error(call(*built.source_args(Path("."), tmp_path / "O")))
    assert_error(call(*built.source_args(Path("."), Path("O"))))
    assert_error(call("run", "--cache", ".", "--target", "100", "--out", "O"))
    assert diff(before, snapshot(tmp_path)) == []


def test_store_and_output_may_not_overlap(case: Case) -> None:
    """d. --cache inside an output directory, or the output inside the store: refused."""
    case.freeze()
    inside_out = case.out / "step-100" / "store.zarr"
    assert_error(call(*case.built.source_args(inside_out, case.out)), "overlap")
    assert_error(call("run", "--cache", case.store, "--target", "100", "--out",
                      case.store / "outputs"), "overlap")
    assert_error(call("run", "--cache", case.store, "--target", "100", "--out",
                      case.store), "overlap")
    case.assert_untouched()


def test_refused_runs_leave_no_new_files(built: Built, tmp_path: Path) -> None:
    """d. Runs refused before or during their work, with a new --cache and a new --out, leave
    no file behind: not an empty store, not an empty OUT."""
    traj = tmp_path / "traj"
    shutil.copytree(built.traj.root, traj)
    path = traj / "runs" / "checkpoint-20" / "model.safetensors"
    entries, start, _ = read_header(path)
    a, b = entries[EMBED]["data_offsets"]  # the first group read: refused before any finishes
    nan_copy = tmp_path / "nan-runs"
    shutil.copytree(traj / "runs", nan_copy)
    with open(nan_copy / "checkpoint-20" / "model.safetensors", "r+b") as handle:
        handle.seek(start + a)
        handle.write(b"\xc0\x7f" * ((b - a) // 2))
    before = snapshot(tmp_path)
    new = tmp_path / "new" / "deeper"

    def run(*extra: object, runs: Path = traj / "runs") -> Result:
        return call("run", "--base", traj / "base", "--runs", runs, "--target", "100",
                    "--out", new / "O", "--device", "cpu", "--quiet", *extra)

    assert_error(run("--steps", "10,99"))
    assert_error(run("--window", "0"))
    assert_error(run("--max-memory", "1K"))
    assert_error(run("--cache", new / "S", "--dtype", "float8"))
    assert_error(run(runs=nan_copy), EMBED)  # refused in the Gram pass
    assert_error(run("--cache", new / "S", runs=nan_copy), EMBED)
    assert_error(call("run", "--cache", new / "S", "--target", "100", "--out", new / "O"))
    assert diff(before, snapshot(tmp_path)) == []


@pytest.mark.parametrize("damage", ["model-file", "record", "gram"])
def test_refused_append_leaves_the_store_unchanged(built: Built, tmp_path: Path,
                                                   damage: str) -> None:
    """d. An append (a checkpoint after the store's last step) to a store with a damaged
    model file, record or Gram matrix is refused before a byte of the store changes."""
    store = tmp_path / "S"
    assert_ok(call(*built.source_args(store, tmp_path / "first", "--steps", "10-30")))
    meta = read_json(store / "zarr.json")["attributes"]["relex_stream"]["current"]
    gen = store / f"gen{meta['generation']}"
    if damage == "model-file":
        _flip(gen / "files" / "0" / "c" / "0", 2)
    elif damage == "record":
        _flip(record_paths(store)[-1], 40)
    else:
        _flip(_record_of(store, Q_PROJ).parent / "c" / "0" / "0" / "0", 9)
    before = snapshot(tmp_path)
    assert_error(call(*built.source_args(store, tmp_path / "O")), "--rebuild")
    assert diff(before, snapshot(tmp_path)) == []


def test_a_directory_where_the_store_writes_a_file_is_one_error(built: Built,
                                                                tmp_path: Path) -> None:
    """d. (found by make fuzz) A directory planted where an append rewrites a metadata file (a
    group's rows array) is one error line naming the store, not an IsADirectoryError."""
    store = tmp_path / "S"
    assert_ok(call(*built.source_args(store, tmp_path / "first", "--steps", "10-30")))
    meta = read_json(store / "zarr.json")["attributes"]["relex_stream"]["current"]
    target = store / f"gen{meta['generation']}" / "rows" / "g0" / "zarr.json"
    target.unlink()
    target.mkdir()
    (target / "x").write_text("in the way")
    assert_error(call(*built.source_args(store, tmp_path / "O")), str(store))
    assert (target / "x").read_text() == "in the way"


def test_from_store_run_with_damaged_rows_leaves_no_output_dir(case: Case) -> None:
    """d. A run refused while reading (a damaged chunk) removes the OUT it made."""
    path, _, _, index, j = _shard(case.store, EMBED, 1)
    _flip(path, int(index.offsets[j]) + 40)
    case.out = case.root / "new" / "O"
    case.freeze()
    assert_error(case.from_store(), EMBED)
    case.assert_untouched()
    assert not (case.root / "new").exists()


# ----------------------------------------------------------------------------- e. sources


def _rewrite_in_place(path: Path, tensor: str, elements: slice | None = None) -> None:
    """Write other values (NaN) into `tensor`'s bytes of a safetensors file in place; its size,
    header and mtime stay as they were."""
    entries, start, _ = read_header(path)
    a, b = entries[tensor]["data_offsets"]
    if elements is not None:
        a, b = a + 2 * elements.start, a + 2 * elements.stop
    info = os.stat(path)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\xc0\x7f" * ((b - a) // 2), start + a)
    finally:
        os.close(fd)
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (info.st_size, info.st_mtime_ns)


@pytest.mark.parametrize("which", ["checkpoint", "base"])
def test_checkpoint_rewritten_in_place_after_the_store_was_built(built: Built, tmp_path: Path,
                                                                 which: str) -> None:
    """e(ii). A checkpoint (or the base) rewritten in place after the store was built, keeping
    size, header and mtime, so that its fingerprint still matches: a run that reads its rows
    from the checkpoints again stops naming the file."""
    traj = tmp_path / "traj"
    shutil.copytree(built.traj.root, traj)  # copy2: mtimes kept, the fingerprints match
    store = copy_store(built.store, tmp_path / "S")
    args = ["run", "--base", traj / "base", "--runs", traj / "runs", "--cache", store,
            "--target", "100", "--device", "cpu"]
    result = call(*args, "--out", tmp_path / "before")
    assert_ok(result)
    assert "from checkpoints (0.00x" not in result.stdout, "test bug: nothing read from sources"
    path = traj / ("base/model-00001-of-00002.safetensors" if which == "base" else
                   "runs/checkpoint-20/model.safetensors")
    _rewrite_in_place(path, EMBED)
    store_before = snapshot(store)
    line = assert_error(call(*args, "--out", tmp_path / "O", "--quiet"), str(path),
                        "--rebuild")
    assert "changed" in line
    assert not (tmp_path / "O").exists()
    assert diff(store_before, snapshot(store)) == []


BIG_VOCAB = 200_000  # embed_tokens and lm_head: 3.2M elements, 7 inner chunks each
BIG_STEPS = (10, 20, 30, 40, 50, 60)


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory):
    """A trajectory whose two large tensors are read in chunks under --max-memory 32M (two
    passes, the second from the checkpoints), and where in its store row 2 of the group holding
    lm_head ends lm_head's first inner chunk."""
    root = tmp_path_factory.mktemp("between")
    traj = build_trajectory(root / "traj", Spec(vocab=BIG_VOCAB, steps=BIG_STEPS,
                                                base_shards=2))
    store = root / "reference.zarr"
    result = call("run", "--base", traj.base, "--runs", traj.runs, "--cache", store,
                  "--target", "100", "--out", root / "ref", "--device", "cpu",
                  "--max-memory", "32M")
    assert_ok(result)
    assert "(2.00x the input" in result.stdout, f"test bug: not read twice:\n{result.stdout}"
    path, group, _, index, j = _shard(store, LM_HEAD, 2)
    end_of_first_chunk = int(index.offsets[j] + index.sizes[j])
    return traj, group.index, end_of_first_chunk


def test_checkpoint_rewritten_between_the_passes(big, tmp_path: Path) -> None:
    """e(i). A checkpoint rewritten (NaN into lm_head, size, header and mtime kept) after the
    run's first pass read it and before its second pass reads it again: the run stops naming
    the file, and writes no output.

    The run is a subprocess; the store's shards are deterministic, so the reference store says
    at which size row 2's shard holds lm_head's first inner chunk: once the live shard is that
    large, the first pass has read that chunk of checkpoint-30 and the second has not started
    (it waits for the whole tensor). The run is paused (SIGSTOP) while the file is rewritten.
    """
    source, group_index, first_chunk_end = big
    traj = tmp_path / "traj"
    shutil.copytree(source.root, traj)
    out = tmp_path / "out"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT),
                                                      os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.Popen(
        [sys.executable, "-m", "relex_stream", "run", "--base", str(traj / "base"), "--runs",
         str(traj / "runs"), "--target", "100", "--out", str(out), "--device", "cpu",
         "--max-memory", "32M", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT)
    shard = out / "trajectory.zarr" / "gen1" / "rows" / f"g{group_index}" / "c" / "2" / "0"
    victim = traj / "runs" / "checkpoint-30" / "model.safetensors"
    caught = False
    deadline = time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                size = shard.stat().st_size
            except OSError:
                size = 0
            if size >= first_chunk_end:
                proc.send_signal(signal.SIGSTOP)
                try:
                    _rewrite_in_place(victim, LM_HEAD, slice(0, 1 << 19))
                finally:
                    proc.send_signal(signal.SIGCONT)
                caught = True
                break
            time.sleep(0.0005)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert caught, f"the run ended (rc={proc.returncode}) before its first pass was seen"
    result = Result(proc.returncode, stdout, stderr)
    line = assert_error(result, str(victim), LM_HEAD)
    assert "changed" in line
    assert not (out / "step-100").exists()


# ----------------------------------------------------------------------------- f. overflow


@pytest.fixture(scope="module")
def steep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """q_proj moves by 1e30 per step: its line passes bf16's largest value (3.4e38) near step
    3.4e8."""

    def edit(step: int, tensors: dict[str, torch.Tensor]) -> None:
        tensors[Q_PROJ] = (tensors[Q_PROJ].double() + 1e30 * step).to(torch.bfloat16)

    root = tmp_path_factory.mktemp("steep")
    traj = build_trajectory(root / "traj", Spec(steps=STEPS, edit=edit))
    return traj


@pytest.mark.parametrize("target", ["1e12", "4000000000"])
def test_prediction_overflowing_bf16_is_refused(steep, tmp_path: Path, target: str) -> None:
    """f. A far target whose prediction overflows bf16: one line naming tensor and target,
    exit 2, no output; --allow-nonfinite writes it (exit 0)."""
    args = ["run", "--base", steep.base, "--runs", steep.runs, "--target", target, "--device",
            "cpu", "--quiet"]
    line = assert_error(call(*args, "--out", tmp_path / "O"), Q_PROJ)
    label = f"step-{int(float(target))}"
    assert label in line and "--allow-nonfinite" in line, line
    assert not list((tmp_path / "O").glob("step-*"))
    assert_ok(call(*args, "--out", tmp_path / "P", "--allow-nonfinite"))
    written = load((tmp_path / "P" / label / "model.safetensors").read_bytes())
    assert not bool(torch.isfinite(written[Q_PROJ].float()).all())
    assert bool(torch.isfinite(written[EMBED].float()).all())


def test_target_beyond_the_step_range_is_one_line(steep, tmp_path: Path) -> None:
    """f. --target 1e30 is refused with one line (targets are steps, at most 2**53)."""
    args = ["run", "--base", steep.base, "--runs", steep.runs, "--target", "1e30", "--device",
            "cpu", "--quiet", "--out", tmp_path / "O"]
    assert_error(call(*args), "--target")
    assert_error(call(*args, "--allow-nonfinite"), "--target")
    assert not (tmp_path / "O").exists()


def test_harness_matches_a_subprocess(case: Case) -> None:
    """The in-process call behaves as `python -m relex_stream`: same exit code and error line
    for a refusal, and a usage mistake exits 2 through argparse."""
    edit_record(_record_of(case.store, Q_PROJ), lambda r: r.__setitem__("group", 99))
    inprocess = case.from_store()
    proc = subprocess.run(
        [sys.executable, "-m", "relex_stream", "run", "--cache", str(case.store), "--target",
         "100", "--out", str(case.out), "--device", "cpu", "--quiet"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO_ROOT)))
    assert (inprocess.rc, inprocess.stderr) == (proc.returncode, proc.stderr)
    assert_error(call("run", "--cache", case.store), "--target")
