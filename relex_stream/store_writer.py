"""Store writes on a background thread, so compressing rows overlaps the Gram computation."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from .errors import RelexError


class StoreWriter:
    """Runs submitted store writes in order on one thread; errors surface on the next call.

    Each write may carry a `done` callback (releasing the buffer it reads); it runs even when
    a write fails, so the reader never waits for a buffer that will not come back.
    """

    def __init__(self, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="relex-store-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            write, done = item
            try:
                if self._error is None:
                    write()
            except OSError as exc:
                self._error = RelexError(
                    f"cannot write the trajectory store: {exc.strerror or exc}; free space (or "
                    "fix the file system) and rerun: finished tensors are kept"
                )
            except BaseException as exc:  # re-raised in the submitting thread
                self._error = exc
            finally:
                if done is not None:
                    done()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, write: Callable[[], None], done: Callable[[], None] | None = None) -> None:
        """Queue `write` (blocks while `depth` writes are pending)."""
        self._raise()
        self._queue.put((write, done))

    def close(self, raise_errors: bool = True) -> None:
        """Wait for every queued write; raise the first error, if any (and asked to)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if raise_errors:
            self._raise()


def release_after(count: int, release: Callable[[], None]) -> Callable[[], None]:
    """A callback that calls `release` on its `count`-th call (from any thread)."""
    lock = threading.Lock()
    left = [count]

    def one() -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            release()

    return one
