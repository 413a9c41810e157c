"""File operations inside a directory the tool owns, never following a symbolic link.

A store may be shared on a cluster file system, so anything below its top directory is input
like any other: a link planted there must not make the tool write, truncate or delete outside it.
Every path below a root is opened component by component with O_NOFOLLOW relative to its
parent's descriptor, so a link anywhere under the root is an error, never a detour. The root
itself is the user's own path (it may be a link to another file system).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from .errors import RelexError
from .signals import deferred

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _link_error(where: str, exc: OSError) -> RelexError:
    return RelexError(
        f"{where} is a symbolic link or not a directory inside the store ({exc.strerror}); "
        "a store holds only what relex_stream wrote: remove it, or use another --cache"
    )


@contextlib.contextmanager
def opened_dir(root_fd: int, parts: tuple[str, ...], create: bool, where: str) -> Iterator[int]:
    """Descriptor of root/parts[0]/.../parts[-1], made on the way when `create`; closed after."""
    fd = os.dup(root_fd)
    try:
        for depth, part in enumerate(parts):
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise _link_error("/".join((where, *parts[: depth + 1])), exc) from None
                raise
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def open_root(path: os.PathLike | str) -> int:
    """Descriptor of the root directory itself (following a link the user gave as the path)."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def open_file(dir_fd: int, name: str, flags: int, mode: int = 0o644) -> int:
    """os.open of a regular file directly in `dir_fd`, refusing a symbolic link in its place,
    and anything else that is not a regular file (a FIFO planted there is not waited on)."""
    fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_file(dir_fd: int, name: str) -> int:
    """A new, empty file `name` in `dir_fd` for writing: whatever held the name is unlinked
    first, so that a hard link planted there never has its other copy truncated."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)
    return open_file(dir_fd, name, os.O_WRONLY | os.O_CREAT | os.O_EXCL)


def read_small(dir_fd: int, name: str, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes` in `dir_fd` (no links)."""
    fd = open_file(dir_fd, name, os.O_RDONLY)
    try:
        info = os.fstat(fd)
        if info.st_size > max_bytes:
            raise OSError(errno.EFBIG, f"larger than {max_bytes} bytes")
        return pread_exact(fd, info.st_size, 0)
    finally:
        os.close(fd)


def pread_exact(fd: int, size: int, offset: int) -> bytes:
    """Exactly `size` bytes at `offset`, or OSError when the file is shorter."""
    data = os.pread(fd, size, offset)
    while len(data) < size:
        more = os.pread(fd, size - len(data), offset + len(data))
        if not more:
            raise OSError(errno.EIO, f"file ends {size - len(data)} bytes early")
        data += more
    return data


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        done = os.write(fd, view)
        view = view[done:]


def _tmp_name(name: str) -> str:
    """The name a file is written under before it is renamed over `name`."""
    return f".{name}.tmp-{os.getpid()}"


def write_atomic(dir_fd: int, name: str, data: bytes, sync: bool = True) -> None:
    """Replace `name` in `dir_fd` with `data`: written under a temporary name (removed again if
    that fails), synced when `sync`, renamed over it, so a link planted at `name` is replaced,
    never written through."""
    tmp = _tmp_name(name)
    try:
        fd = create_file(dir_fd, tmp)
        try:
            write_all(fd, data)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    if sync:
        sync_dir(dir_fd)


def sync_dir(dir_fd: int) -> None:
    """fsync a directory, where the file system can: some (CIFS, 9p, FUSE mounts) answer EINVAL
    or ENOTSUP for a directory, and the entries are then as durable as it makes them."""
    try:
        os.fsync(dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise


# The trees relex_stream makes are a few levels deep; anything deeper was put there by someone
# else (a store is shared), and is left rather than walked (one fd and one frame per level).
MAX_REMOVE_DEPTH = 32


def remove_tree(dir_fd: int, name: str, owned: Callable[[str], bool] | None = None,
                depth: int = 0) -> int:
    """Delete `name` in `dir_fd` and everything below it; links are removed, never followed.

    owned: when given, only entries whose names it accepts are removed (with what lies below
    them); others are left, and so are the directories holding them. Directories more than
    MAX_REMOVE_DEPTH levels down are left too. Returns how many entries were left.
    """
    if (owned is not None and not owned(name)) or depth > MAX_REMOVE_DEPTH:
        return 1
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return 0
    if not stat.S_ISDIR(info.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return 0
    child = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    left = 0
    try:
        with os.scandir(child) as found:
            for entry in found:
                left += remove_tree(child, entry.name, owned, depth + 1)
    finally:
        os.close(child)
    if left == 0:
        os.rmdir(name, dir_fd=dir_fd)
    return left


def entries(dir_fd: int) -> list[str]:
    """Names in a directory (sorted)."""
    return sorted(entry.name for entry in os.scandir(dir_fd))


def paths_overlap(a: os.PathLike | str, b: os.PathLike | str) -> bool:
    """Whether one of two paths (links resolved) lies inside the other, or they are the same."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a.is_relative_to(b) or b.is_relative_to(a)


def replace_file(path: os.PathLike | str, data: bytes | str) -> Path:
    """`data` as the file `path` (write_atomic, unsynced: reports, plots, the progress board):
    a link (symbolic or hard) planted at `path` is replaced, never written through.
    RelexError when the directory cannot be written."""
    path = Path(path)
    # a path of undecodable bytes reaches text as surrogate escapes: they go back as its bytes
    raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            write_atomic(dir_fd, path.name, raw, sync=False)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise RelexError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def replace_files(directory: os.PathLike | str, files: dict[str, bytes | str],
                  stale: Sequence[str] = ()) -> list[Path]:
    """`files` (name -> data) in `directory` as one set: every file is written under a
    temporary name first, then all are renamed into place and the `stale` names (files of an
    earlier set this one lacks) removed. A failure before the renames (a full disk, a directory
    under one of the names) removes the temporaries and leaves the earlier set as it was.
    RelexError names the file that could not be written."""
    directory = Path(directory)
    written: list[str] = []  # temporary names made so far
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise RelexError(f"cannot write {directory}: {exc.strerror or exc}") from None
    try:
        name = ""
        try:
            for name, data in files.items():
                _refuse_directory(dir_fd, name)
                tmp = _tmp_name(name)
                fd = create_file(dir_fd, tmp)
                written.append(tmp)
                try:
                    write_all(fd, data.encode("utf-8", "surrogateescape")
                              if isinstance(data, str) else data)
                finally:
                    os.close(fd)
            for name in stale:
                _refuse_directory(dir_fd, name)
        except BaseException as exc:  # Ctrl-C too: no temporary is left behind
            for tmp in written:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dir_fd)
            if isinstance(exc, OSError):
                raise RelexError(f"cannot write {directory / name}: {exc.strerror or exc}; "
                                 "the files there are left as they were") from None
            raise
        # past this point only a failing file system can stop a rename (a signal waits for
        # the renames to end): the set is then mixed, and the error says from which file
        with deferred():
            _rename_all(dir_fd, directory, list(files))
        for name in stale:
            try:
                os.unlink(name, dir_fd=dir_fd)  # a link is removed, never followed
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise RelexError(f"cannot remove the old {directory / name}: "
                                 f"{exc.strerror or exc}") from None
    finally:
        os.close(dir_fd)
    return [directory / name for name in files]


def _rename_all(dir_fd: int, directory: Path, names: list[str]) -> None:
    """Rename each name's temporary into place; on a failure the temporaries not yet renamed
    are removed and RelexError says which files are new."""
    for i, name in enumerate(names):
        try:
            os.replace(_tmp_name(name), name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError as exc:
            for rest in names[i:]:
                with contextlib.suppress(OSError):
                    os.unlink(_tmp_name(rest), dir_fd=dir_fd)
            done = f"{', '.join(names[:i])} are new, the others as they were" if i else \
                "the files there are left as they were"
            raise RelexError(f"cannot write {directory / name}: {exc.strerror or exc}; "
                             f"{done}: rerun with --overwrite once it can be written") from None


def _refuse_directory(dir_fd: int, name: str) -> None:
    """OSError (EISDIR) when `name` in `dir_fd` is a directory: no file may replace it."""
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode):
        raise OSError(errno.EISDIR, "Is a directory (move it away or give another --out)")


def read_small_at(path: os.PathLike | str, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes` at `path` (its own name not a link;
    never waited on): for small files a run reads back from directories others can write."""
    path = Path(path)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return read_small(fd, path.name, max_bytes)
    finally:
        os.close(fd)
