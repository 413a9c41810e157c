"""CPU seconds of each of `run`'s threads: which one a two-core run waits for.

Runs the CLI in this process with a sampler thread that reads /proc/self/task/*/stat every
50 ms (a thread's last reading counts, so a thread that ended early is still listed) and names
each thread by its Python name (compute threads summed). Linux only.

    python bench/thread_cpu.py run --base T/base --runs T/runs --target 300 --out O \\
        --overwrite --rebuild --device cpu --max-memory 2G --quiet
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relex_stream.cli import main  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
_cpu: dict[int, tuple[float, float]] = {}  # thread id -> (user s, system s), last reading
_names: dict[int, str] = {}


def _sample() -> None:
    while True:
        for thread in threading.enumerate():
            if thread.native_id:
                _names[thread.native_id] = thread.name
        for tid in os.listdir("/proc/self/task"):
            try:
                fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # the thread ended meanwhile
                continue
            _cpu[int(tid)] = (int(fields[11]) / TICK, int(fields[12]) / TICK)
        time.sleep(0.05)


def _report(wall: float) -> None:
    totals: dict[str, list[float]] = {}
    for tid, (user, system) in _cpu.items():
        name = _names.get(tid, "?")
        name = "relex-compute (all)" if name.startswith("relex-compute") else name
        total = totals.setdefault(name, [0.0, 0.0])
        total[0] += user
        total[1] += system
    print(f"wall {wall:.2f} s", file=sys.stderr)
    for name, (user, system) in sorted(totals.items(), key=lambda item: -sum(item[1])):
        print(f"  {name:22s} user {user:6.2f} s  system {system:5.2f} s", file=sys.stderr)


if __name__ == "__main__":
    threading.Thread(target=_sample, daemon=True, name="sampler").start()
    started = time.perf_counter()
    try:
        code = main(sys.argv[1:])
    finally:
        _report(time.perf_counter() - started)
    sys.exit(code)
