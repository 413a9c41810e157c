"""CPU cost of the pickle opcode pass (pickle_guard.costly_key) against the restricted
unpickle it precedes, on a torch.save pickle of N tensors (thread CPU time, best of 5).

    python bench/pickle_guard_cost.py [--tensors 3000]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from relex_stream import fsdp  # noqa: E402
from relex_stream.pickle_guard import costly_key  # noqa: E402


def best_cpu_s(work, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        work()
        best = min(best, time.thread_time() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tensors", type=int, default=3000)
    args = parser.parse_args()
    state = OrderedDict((f"model.layers.{i}.weight", torch.zeros(2, 3))
                        for i in range(args.tensors))
    buffer = io.BytesIO()
    torch.save(state, buffer)
    archive = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    data = next(archive.read(n) for n in archive.namelist() if n.endswith("data.pkl"))
    guard = best_cpu_s(lambda: costly_key(data))
    load = best_cpu_s(lambda: fsdp._Unpickler(io.BytesIO(data)).load())
    print(f"{args.tensors} tensors, data.pkl {len(data)} bytes: guard {guard * 1e3:.1f} ms, "
          f"restricted unpickle {load * 1e3:.1f} ms, ratio {guard / load:.2f}")


if __name__ == "__main__":
    main()
