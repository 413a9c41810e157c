"""Gram blocks computed on several threads, each with its own workspace, taken back in order.

On the CPU one thread doing every block's float64 work left the second core mostly idle (the
reader and the store writer use part of it): bench/RESULTS.md. numpy's and torch's kernels
release the GIL, so a block's compare, widening and products run beside another block's.
Results come back in block order, so the Gram matrix is summed, kept deltas are listed and
outputs are written in the order one thread would have used: the same bytes.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TypeVar

from .kernels import Workspace

Result = TypeVar("Result")


class BlockPool:
    """Runs tasks `task(workspace) -> result` on one thread per workspace."""

    def __init__(self, workspaces: list[Workspace]):
        if not workspaces:
            raise ValueError("a BlockPool needs at least one workspace")
        self.workspaces = workspaces
        # one workspace: run inline (a GPU, or a budget too small for two), no thread hand-off
        self._executor = (ThreadPoolExecutor(len(workspaces), thread_name_prefix="relex-compute")
                          if len(workspaces) > 1 else None)

    def in_order(
        self, tasks: Iterable[Callable[[Workspace], Result]]
    ) -> Iterator[tuple[Result, Workspace]]:
        """(result, its workspace) per task, in the tasks' order. The workspace is the caller's
        until it asks for the next result; at most one task per workspace is in flight."""
        if self._executor is None:
            for task in tasks:
                yield task(self.workspaces[0]), self.workspaces[0]
            return
        remaining = iter(tasks)
        pending: collections.deque[tuple[Future, Workspace]] = collections.deque()
        try:
            for workspace in self.workspaces:
                task = next(remaining, None)
                if task is None:
                    break
                pending.append((self._executor.submit(task, workspace), workspace))
            while pending:
                future, workspace = pending.popleft()
                yield future.result(), workspace
                task = next(remaining, None)
                if task is not None:
                    pending.append((self._executor.submit(task, workspace), workspace))
        finally:
            # a caller that stops early (an error) must not free buffers a task still reads
            wait([future for future, _ in pending])

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
