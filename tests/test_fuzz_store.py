"""Fuzz the trajectory store as hostile input: a small store is built once, and each example
changes it the way damage or an attacker might (its JSON metadata with or without a recomputed
checksum, its bytes, files and links planted in it) before running the CLI on it.

Invariants, for every example and every command (`run --cache S` from the store alone,
`report S`, `backtest S`, and a `run` that appends a checkpoint to S from the sources):

- exit 0 with outputs equal, bit for bit, to those of the untouched store; or exit 2 with
  exactly one stderr line starting with `error: `; never an exception escaping main();
- nothing outside S and the run's OUT is created, changed or removed: the sources, a sentinel
  directory that planted links point into (names, bytes, mtimes), the directory around it all;
- a refused command leaves no OUT behind.

Metadata edits come three ways: `stale` (the checksum no longer matches: damage), `forge` (the
manifest's sha256, or a record's, recomputed after the edit) and `forge-all` (the manifest
edited and every group record rewritten to agree with it, all checksums recomputed: a store
rewritten by someone who knows the format). A `forge` must still give the untouched outputs or
a refusal (records bind the manifest's meaning, the shards' raw checksums bind the bits), except
that a record's own counts (its Gram kinds and support) feed `report` and `backtest`. A
`forge-all` store cannot be told from a real one: it must only never crash or escape.

Examples: 200 by default (the file runs in about half a minute); set RELEX_FUZZ_EXAMPLES to run
more (`make fuzz`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from relex_stream import envvars
from tests.fixtures import Spec, build_trajectory
from tests.untrusted import (
    Result,
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
)

EXAMPLES = envvars.read_env_int("RELEX_FUZZ_EXAMPLES", 200, 1, 10**8)
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture],
)
STEPS = (10, 20, 30, 40)
APPENDED = 50
TARGET = "100"
LIMIT_S = 30  # a command running longer is cut short and fails the example (a hang)


# ----------------------------------------------------------------------------- the world


class World:
    """The trajectory, the untouched store, a second store (another store_id) and the
    outputs of every command on the untouched store."""

    def __init__(self, root: Path):
        self.root = root
        # steps 10..50 on disk; the store holds 10..40, so that a run can append step 50
        self.traj = build_trajectory(root / "traj", Spec(steps=(*STEPS, APPENDED),
                                                         base_shards=2))
        self.store = root / "store.zarr"
        self.other = root / "other.zarr"
        for store in (self.store, self.other):
            result = call("run", "--base", self.traj.base, "--runs", self.traj.runs,
                          "--steps", "10-40", "--cache", store, "--target", TARGET,
                          "--out", root / f"built-{store.stem}", "--device", "cpu", "--quiet")
            assert result.rc == 0, str(result)
        self.files = sorted(str(p.relative_to(self.store)) for p in self.store.rglob("*")
                            if p.is_file())
        self.dirs = ["."] + sorted(str(p.relative_to(self.store)) for p in
                                   self.store.rglob("*") if p.is_dir())
        self.records = [str(p.relative_to(self.store)) for p in record_paths(self.store)]
        work = root / "baseline"
        work.mkdir()
        self.expected = {
            name: self.outputs(command(self, work, copy_store(self.store, work / f"S-{name}")),
                               work / f"S-{name}", work / "O")
            for name, command in COMMANDS.items()
        }
        self.sources = snapshot(root / "traj")

    @staticmethod
    def outputs(result: Result, store: Path, out: Path) -> object:
        assert result.rc == 0, str(result)
        if out.exists():
            files = tree_files(out)
            shutil.rmtree(out)
            return files
        return result.stdout.replace(str(store), "STORE")


def _from_store(world: World, work: Path, store: Path) -> Result:
    return call("run", "--cache", store, "--target", TARGET, "--out", work / "O",
                "--device", "cpu", "--quiet", limit_s=LIMIT_S)


def _report(world: World, work: Path, store: Path) -> Result:
    return call("report", store, "--null-samples", "20", "--no-plots", limit_s=LIMIT_S)


def _backtest(world: World, work: Path, store: Path) -> Result:
    return call("backtest", store, "--holdout", "2", "--no-plots", limit_s=LIMIT_S)


def _append(world: World, work: Path, store: Path) -> Result:
    return call("run", "--base", world.traj.base, "--runs", world.traj.runs, "--cache", store,
                "--target", TARGET, "--out", work / "O", "--device", "cpu", "--quiet",
                limit_s=LIMIT_S)


COMMANDS = {"from-store": _from_store, "report": _report, "backtest": _backtest,
            "append": _append}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tmp_path_factory.mktemp("fuzz-store"))


# ----------------------------------------------------------------------------- mutations

HOSTILE = [
    -1, 0, 1, 7, 2**31, 2**53 + 1, 2**63, 2**64, 1.5, 1e308, -0.0, True, False, None, "", "x",
    "BF16", "F16", "F32", "I64", "exact", "randomized", "none", "xor-prev", "../../evil",
    "/tmp/abs.safetensors", "sub/x.safetensors", "../x", "..", ".", "a\nb", "\u0000",
    "x" * 300, "evil.safetensors", "model.safetensors.index.json", "zarr.json", [], {}, [[]],
    [1, 2], {"a": 1}, "relex_stream.trajectory/2",
]
NAMES = ["lock", "zarr.json", "0", "1", "4", "c", "gen1", "gen2", "gen0", "rows", "base",
         "gram", "files", "g0", "g0-k4", "g1-k4", "g0-k5", ".zarr.json.tmp-1", "x", "base.lock"]


def _paths(doc: object, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys and indices) into a JSON document."""
    found = [prefix]
    if isinstance(doc, dict):
        for key, value in doc.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            found += _paths(value, (*prefix, i))
    return found


def _get(doc: object, path: tuple) -> object:
    for key in path:
        doc = doc[key]  # type: ignore[index]
    return doc


def json_edit(data: st.DataObject, doc: dict) -> dict:
    """One hostile change somewhere in a JSON document (returns the new document)."""
    paths = _paths(doc)
    path = data.draw(st.sampled_from(paths[1:] or paths), label="path")
    parent, key = _get(doc, path[:-1]), path[-1]
    value = parent[key]
    op = data.draw(st.sampled_from(["replace", "delete", "add-key", "number", "string",
                                    "dup-item", "reverse", "swap-sibling"]), label="op")
    if op == "replace" or (op == "number" and type(value) is not int) or (
            op == "string" and not isinstance(value, str)):
        parent[key] = data.draw(st.sampled_from(HOSTILE), label="value")
    elif op == "number":
        parent[key] = data.draw(st.sampled_from([value + 1, value - 1, -value, value * 2**40,
                                                 value + 2**32, float(value)]), label="number")
    elif op == "string":
        parent[key] = data.draw(st.sampled_from([value + "/..", "../" + value, value + "x",
                                                 value[:-1], value.upper(), ""]), label="text")
    elif op == "delete":
        del parent[key]
    elif op == "add-key":
        target = value if isinstance(value, dict) else parent
        if isinstance(target, dict):
            target[data.draw(st.sampled_from(["x", "kind", "../y", "format", ""]))] = (
                data.draw(st.sampled_from(HOSTILE)))
        elif isinstance(target, list):
            target.append(data.draw(st.sampled_from(HOSTILE)))
    elif op == "dup-item" and isinstance(value, list) and value:
        value.append(value[data.draw(st.integers(0, len(value) - 1))])
    elif op == "reverse" and isinstance(value, list):
        value.reverse()
    elif op == "reverse" and isinstance(value, dict):
        parent[key] = dict(reversed(list(value.items())))
    elif op == "swap-sibling" and isinstance(parent, dict) and len(parent) > 1:
        other = data.draw(st.sampled_from([k for k in parent if k != key]))
        parent[key], parent[other] = parent[other], parent[key]
    elif op == "swap-sibling" and isinstance(parent, list) and len(parent) > 1:
        j = data.draw(st.integers(0, len(parent) - 1))
        parent[key], parent[j] = parent[j], parent[key]
    return doc


def mutate(data: st.DataObject, world: World, store: Path, sentinel: Path) -> str:
    """Apply one or two hostile changes to `store`; returns a description ('forge' in it when
    a metadata checksum was recomputed)."""
    done = []
    for _ in range(data.draw(st.integers(1, 2), label="changes")):
        kind = data.draw(st.sampled_from(["manifest", "record", "bytes", "plant"]), label="kind")
        if kind == "manifest":
            how = data.draw(st.sampled_from(["stale", "forge", "forge-all"]), label="forge")
            try:
                edit_manifest(store, lambda body: json_edit(data, body),
                              recompute=how != "stale")
                if how == "forge-all":
                    forge_records(store)
            except (OSError, ValueError, KeyError, TypeError):  # an earlier change broke it
                done.append("manifest (unreadable)")
                continue
            done.append(f"manifest {how}")
        elif kind == "record":
            done.append(_mutate_record(data, world, store))
        elif kind == "bytes":
            done.append(_mutate_bytes(data, world, store))
        else:
            done.append(_plant(data, world, store, sentinel))
    return "; ".join(done)


def _mutate_record(data: st.DataObject, world: World, store: Path) -> str:
    rel = data.draw(st.sampled_from(world.records), label="record")
    path = store / rel
    if not path.is_file():
        return "record (gone)"
    how = data.draw(st.sampled_from(["edit", "swap", "other-store"]), label="record-op")
    if how == "swap":
        other = data.draw(st.sampled_from(world.records), label="swap-with")
        if (store / other).is_file() and other != rel:
            shutil.copyfile(store / other, path)
        return f"record swap {rel} <- {other}"
    if how == "other-store":
        shutil.copyfile(world.other / rel, path)
        return f"record from another store {rel}"
    forge = data.draw(st.booleans(), label="forge")
    try:
        edit_record(path, lambda body: json_edit(data, body), recompute=forge)
    except (OSError, ValueError, KeyError, TypeError):  # an earlier change broke it
        return f"record {rel} (unreadable)"
    return f"record edit {rel}{' forge-record' if forge else ''}"


def _mutate_bytes(data: st.DataObject, world: World, store: Path) -> str:
    rel = data.draw(st.sampled_from(world.files), label="file")
    path = store / rel
    if not path.is_file() or path.is_symlink():
        return f"bytes {rel} (gone)"
    raw = bytearray(path.read_bytes())
    how = data.draw(st.sampled_from(["flip", "truncate", "delete", "copy", "other-store",
                                     "append", "empty"]), label="bytes-op")
    if how == "flip" and raw:
        pos = data.draw(st.integers(0, len(raw) - 1), label="offset")
        raw[pos] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        path.write_bytes(bytes(raw))
    elif how == "truncate" and raw:
        path.write_bytes(bytes(raw[: data.draw(st.integers(0, len(raw) - 1))]))
    elif how == "delete":
        path.unlink()
    elif how == "copy":
        other = store / data.draw(st.sampled_from(world.files), label="copy-from")
        if other.is_file() and other != path:
            shutil.copyfile(other, path)
    elif how == "other-store":
        shutil.copyfile(world.other / rel, path)
    elif how == "append":
        path.write_bytes(bytes(raw) + data.draw(st.binary(min_size=1, max_size=16)))
    elif how == "empty":
        path.write_bytes(b"")
    return f"bytes {how} {rel}"


def _plant(data: st.DataObject, world: World, store: Path, sentinel: Path) -> str:
    directory = store / data.draw(st.sampled_from(world.dirs), label="dir")
    name = data.draw(st.sampled_from(NAMES) | st.text("abcgk0123-.", min_size=1, max_size=6),
                     label="name")
    if name in (".", ".."):
        return "plant (no name)"
    what = data.draw(st.sampled_from(["file", "dir", "link-dir", "link-file", "hardlink",
                                      "fifo", "dangling"]), label="plant")
    if not directory.is_dir() or directory.is_symlink():
        return "plant (no dir)"
    target = directory / name
    if target.is_symlink() or target.is_file() or (target.exists() and not target.is_dir()):
        target.unlink()
    elif target.is_dir():
        shutil.rmtree(target)
    if what == "file":
        target.write_bytes(b"planted")
    elif what == "dir":
        target.mkdir()
        (target / "zarr.json").write_bytes(b"{}")
    elif what == "link-dir":
        target.symlink_to(sentinel)
    elif what == "link-file":
        target.symlink_to(sentinel / "precious.txt")
    elif what == "hardlink":
        os.link(sentinel / "hard.txt", target)
    elif what == "fifo":
        os.mkfifo(target)
    else:
        target.symlink_to(sentinel / "no-such-file")
    return f"plant {what} {target.relative_to(store)}"


# ----------------------------------------------------------------------------- the property


def _sentinel(directory: Path) -> Path:
    directory.mkdir()
    (directory / "precious.txt").write_bytes(b"do not touch\n")
    (directory / "hard.txt").write_bytes(b"linked from the store\n")
    (directory / "sub").mkdir()
    (directory / "sub" / "zarr.json").write_bytes(b'{"zarr_format": 3}')
    return directory


def check_command(world: World, name: str, work: Path, store: Path, what: str) -> None:
    out = work / "O"
    result = COMMANDS[name](world, work, store)  # a hang is cut short by call()
    context = f"{name} after [{what}]:\n{result}"
    event(f"{name}: exit {result.rc}")
    assert result.crashed is None and "Traceback" not in result.stderr, context
    assert result.rc in (0, 2), context
    if result.rc == 2:
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), context
        assert not out.exists(), f"a refused command left {out}: {context}"
        return
    got = World.outputs(result, store, out)
    if "forge-all" in what or ("forge-record" in what and name in ("report", "backtest")):
        # a store rewritten consistently, or a record's own counts (Gram kinds, support) with
        # its checksum recomputed, are indistinguishable from real ones: exit 0 is fine
        return
    if got != world.expected[name]:
        changed = sorted(k for k in set(got) | set(world.expected[name])
                         if got.get(k) != world.expected[name].get(k)) if isinstance(
                             got, dict) else got
        pytest.fail(f"exit 0 with other outputs ({changed}): {context}")


@FUZZ
@given(data=st.data())
def test_fuzz_hostile_store(world: World, data: st.DataObject) -> None:
    work = Path(tempfile.mkdtemp(dir=world.root, prefix="ex-"))
    try:
        sentinel = _sentinel(work / "sentinel")
        store = copy_store(world.store, work / "S")
        what = mutate(data, world, store, sentinel)
        around = snapshot(world.root, skip=(store,  work / "O"))
        for name in COMMANDS:
            check_command(world, name, work, store, what)
            if (work / "O").exists():
                shutil.rmtree(work / "O")
            changes = diff(around, snapshot(world.root, skip=(store, work / "O")))
            assert changes == [], f"{name} after [{what}] changed files outside S and O: {changes}"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_baseline_is_meaningful(world: World) -> None:
    """The untouched store gives every command's output (a check of the harness itself)."""
    assert isinstance(world.expected["from-store"], dict) and world.expected["from-store"]
    assert "step-100/config.json" in world.expected["from-store"]
    assert world.expected["report"] and world.expected["backtest"]
    assert set(world.expected["append"]) == set(world.expected["from-store"])
    assert world.expected["append"] != world.expected["from-store"]  # five steps, not four
    meta = read_json(world.store / "zarr.json")
    assert meta["attributes"]["relex_stream"]["current"]["steps"] == list(STEPS)
    assert json.dumps(meta)  # plain JSON
