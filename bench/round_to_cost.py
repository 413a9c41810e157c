"""CPU cost of rounding predictions once (kernels.round_to) against torch's cast through float32.

    python bench/round_to_cost.py [--cols 65536] [--repeats 400]

Times one Gram block's worth of float64 predictions (1, cols) cast to bf16 and fp16 both ways,
in CPU seconds of this thread (time.thread_time, less sensitive to a loaded machine than wall
time), and scales the difference to 100M output elements.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relex_stream.kernels import round_to  # noqa: E402


def per_call(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(5):
        started = time.thread_time()
        for _ in range(repeats):
            fn()
        best = min(best, (time.thread_time() - started) / repeats)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cols", type=int, default=65536)
    parser.add_argument("--repeats", type=int, default=400)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(1, args.cols, dtype=torch.float64, generator=generator)
    blocks = 100e6 / args.cols
    for dtype in (torch.bfloat16, torch.float16):
        cast = per_call(lambda d=dtype: values.to(d), args.repeats)
        once = per_call(lambda d=dtype: round_to(values, d), args.repeats)
        print(f"{dtype}: torch cast {cast * 1e6:.1f} us, round_to {once * 1e6:.1f} us per "
              f"(1, {args.cols}) block; +{(once - cast) * blocks:.2f} s of CPU per 100M elements")


if __name__ == "__main__":
    main()
