"""Per-tensor overhead of `run`: a model of N tiny bf16 tensors (4 elements each) with 4
observed steps, so the wall time is almost all fixed cost per tensor, not data.

    python bench/many_tensors.py [--tensors 4000] [--out bench/out/many]

Prints the wall time of `python -m relex_stream run` (torch's import included) and its
quotient by N.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

STEPS = (10, 20, 30, 40)


def write(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({"model_type": "bench"}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=4000)
    parser.add_argument("--out", type=Path, default=Path("bench/out/many"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    generator = torch.Generator().manual_seed(0)
    base = {f"t{i}": torch.randn(4, generator=generator).to(torch.bfloat16)
            for i in range(args.tensors)}
    write(args.out / "base", base)
    for step in STEPS:
        write(args.out / "runs" / f"checkpoint-{step}",
              {k: (v.float() + 0.01 * step).to(torch.bfloat16) for k, v in base.items()})
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "relex_stream", "run", "--base", str(args.out / "base"),
                    "--runs", str(args.out / "runs"), "--target", "100", "--out",
                    str(args.out / "pred"), "--device", "cpu", "--quiet"], check=True)
    wall = time.perf_counter() - started
    print(f"{args.tensors} tensors, K = {len(STEPS)}: run took {wall:.1f} s, "
          f"{1000 * wall / args.tensors:.1f} ms per tensor")


if __name__ == "__main__":
    main()
