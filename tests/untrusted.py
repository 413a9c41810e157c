"""Helpers for the tests that treat the store as untrusted input (test_untrusted_store.py and
test_fuzz_store.py): the CLI called in-process, tree snapshots, and edits of the store's
metadata with or without a recomputed checksum."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import signal
import stat
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from relex_stream import cli
from relex_stream.store import _sha256

ROOT_META = "zarr.json"


@dataclass(frozen=True)
class Result:
    rc: int | None
    stdout: str
    stderr: str
    crashed: str | None = None  # the exception that escaped main() (a traceback in a shell)

    def __str__(self) -> str:
        return (f"rc={self.rc} crashed={self.crashed}\nstdout:\n{self.stdout[-2000:]}\n"
                f"stderr:\n{self.stderr[-2000:]}")


class Hang(Exception):
    """A command ran past its time limit (blocked on a FIFO planted in the store?)."""


def _alarm(signum, frame):  # noqa: ARG001
    raise Hang("the command ran past its time limit (blocked on a planted FIFO?)")


def call(*args: object, limit_s: int = 120) -> Result:
    """`python -m relex_stream ARGS` in this process: exit code, stdout, stderr.

    Like the subprocess: main()'s return value or SystemExit's code is the exit code, logging
    goes to the captured stderr (pytest's own handlers are set aside meanwhile), warnings are
    printed there too, and an exception that escapes main() is what a shell shows as a
    traceback. A command still running after `limit_s` seconds is interrupted (SIGALRM) and
    reported as crashed, so that a hang fails the test instead of stopping the suite.
    """
    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()
    crashed = None
    rc: int | None = None
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(limit_s)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                rc = cli.main([str(a) for a in args])
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else 1
            except BaseException as exc:  # noqa: BLE001 - reported as a crash by the caller
                crashed = f"{type(exc).__name__}: {exc}"
                import traceback

                err.write(traceback.format_exc())
        for item in caught:
            err.write(f"{item.category.__name__}: {item.message}\n")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        root.handlers[:] = saved
    return Result(rc, out.getvalue(), err.getvalue(), crashed)


MAX_ERROR_CHARS = 2000


def assert_error(result: Result, *needles: str) -> str:
    """Exit 2, no traceback, exactly one stderr line starting 'error: ' containing each needle."""
    assert result.crashed is None, f"an exception escaped:\n{result}"
    assert "Traceback" not in result.stderr, str(result)
    assert result.rc == 2, f"expected exit 2:\n{result}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one error line:\n{result}"
    # a hostile value is shown cut short, not repeated whole (a store's 5 MB codec string)
    assert len(lines[0]) < MAX_ERROR_CHARS, f"an error line of {len(lines[0])} characters"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in: {lines[0]}"
    return lines[0]


def assert_ok(result: Result) -> None:
    assert result.crashed is None and result.rc == 0, f"expected success:\n{result}"


# ----------------------------------------------------------------------------- snapshots


def _content(path: Path, size: int) -> bytes | tuple:
    """A file's bytes; for a large (sparse, forged) one its size and its two ends."""
    if size <= 64 << 20:
        return path.read_bytes()
    with open(path, "rb") as handle:
        head = handle.read(1 << 20)
        handle.seek(size - (1 << 20))
        return (size, head, handle.read())


def snapshot(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, tuple]:
    """{relative path: (kind, content, mtime_ns, inode)} of everything under root (links not
    followed); subtrees in `skip` are left out."""
    found: dict[str, tuple] = {}
    skipped = {str(p) for p in skip}

    def walk(directory: Path) -> None:
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            path = Path(entry.path)
            if str(path) in skipped:
                continue
            info = os.lstat(path)
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(info.st_mode):
                found[rel] = ("link", os.readlink(path), info.st_mtime_ns, info.st_ino)
            elif stat.S_ISDIR(info.st_mode):
                found[rel] = ("dir", None, None, info.st_ino)
                walk(path)
            elif stat.S_ISREG(info.st_mode):
                found[rel] = ("file", _content(path, info.st_size), info.st_mtime_ns,
                              info.st_ino)
            else:
                found[rel] = ("other", stat.S_IFMT(info.st_mode), info.st_mtime_ns, info.st_ino)

    if root.is_dir():
        walk(root)
    return found


def diff(before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    """What changed between two snapshots: 'created X', 'removed X', 'changed X'."""
    out = [f"created {p}" for p in sorted(set(after) - set(before))]
    out += [f"removed {p}" for p in sorted(set(before) - set(after))]
    out += [f"changed {p}" for p in sorted(set(before) & set(after)) if before[p] != after[p]]
    return out


def tree_files(directory: Path) -> dict[str, bytes]:
    """{relative path: bytes} of the regular files under a directory."""
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file() and not p.is_symlink()}


def copy_store(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, symlinks=True)
    return target


# ----------------------------------------------------------------------------- metadata edits


def read_json(path: Path) -> dict:
    return json.loads(path.read_bytes())


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, sort_keys=True, separators=(",", ":")))


def edit_manifest(store: Path, edit: Callable[[dict], object], recompute: bool = True) -> None:
    """Apply `edit` to the manifest (the root's attributes 'relex_stream'); with `recompute`,
    store its sha256 as the store computes it, so that the checksum passes."""
    meta = read_json(store / ROOT_META)
    body = meta["attributes"]["relex_stream"]
    replaced = edit(body)
    if replaced is not None:
        body = meta["attributes"]["relex_stream"] = replaced
    if recompute:
        meta["attributes"]["relex_stream_sha256"] = _sha256(body)
    write_json(store / ROOT_META, meta)


def record_paths(store: Path) -> list[Path]:
    """zarr.json of every group record of the committed generation, by group index."""
    meta = read_json(store / ROOT_META)
    gen = meta["attributes"]["relex_stream"]["current"]
    k = len(gen["steps"])
    gram = store / f"gen{gen['generation']}" / "gram"
    return sorted(gram.glob(f"g*-k{k}/{ROOT_META}"),
                  key=lambda p: int(p.parent.name[1:].split("-")[0]))


def edit_record(path: Path, edit: Callable[[dict], object], recompute: bool = True) -> None:
    """Apply `edit` to a group record's body; with `recompute`, fix its sha256."""
    meta = read_json(path)
    holder = meta["attributes"]["relex_stream_group"]
    replaced = edit(holder["record"])
    if replaced is not None:
        holder["record"] = replaced
    if recompute:
        holder["sha256"] = _sha256(holder["record"])
    write_json(path, meta)


def forge_records(store: Path) -> None:
    """After a manifest edit, make every group record of its committed generation agree with
    it (the definition digest and the sha256): a store rewritten consistently by someone who
    knows the format, which no checksum can tell from a real one."""
    body = read_json(store / ROOT_META)["attributes"]["relex_stream"]
    gen = body.get("current") if isinstance(body, dict) else None
    if not isinstance(gen, dict) or not isinstance(gen.get("steps"), list):
        return
    definition = _sha256({k: v for k, v in gen.items()
                          if k not in ("generation", "steps", "sources", "kind")})
    gram = store / f"gen{gen.get('generation')}" / "gram"
    for path in sorted(gram.glob(f"g*-k{len(gen['steps'])}/{ROOT_META}")):
        try:
            edit_record(path, lambda record: record.__setitem__("definition", definition))
        except (OSError, ValueError, KeyError, TypeError):
            continue
