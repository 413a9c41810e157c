"""Ctrl-C and SIGTERM held back while a few file operations must happen together.

Python runs a signal's handler between any two bytecodes of the main thread, so a KeyboardInterrupt
can land between a rename and the line that would undo or complete it. Inside `deferred()` a
SIGINT or SIGTERM is only noted; it is raised again, to the handler that was there before, as
the block ends.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_HELD = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: arrived.append(signum))
                for sig in _HELD}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(arrived):
            signal.raise_signal(sig)  # now to the handler that was there before
