"""GPU check: correctness against the dense reference on CUDA, Gram throughput, end to end.

Run by bench/gpu_check.sh on a lent GPU machine; everything in under 5 minutes:
  1. a small trajectory run with --device cuda, compared element-wise with the dense float64
     reference of tests/reference.py (one output ulp) and with the CPU run's bytes;
  2. Gram throughput of the engine's kernel on (K, n) bf16 rows already on the GPU, and the
     FP64 matmul rate it is bounded by;
  3. `run` end to end on a Qwen3-8B-shaped tensor set (embed_tokens 151936×4096 and one decoder
     layer's matrices) with K checkpoints, against the I/O floor of reading its files once.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relex_stream.kernels import accumulate_gram  # noqa: E402
from tests.reference import assert_matches_reference, load_model_dir, reference_from_dirs  # noqa: E402

QWEN3_8B_LAYER = {
    "model.embed_tokens.weight": (151936, 4096),
    "model.layers.0.self_attn.q_proj.weight": (4096, 4096),
    "model.layers.0.self_attn.k_proj.weight": (1024, 4096),
    "model.layers.0.self_attn.v_proj.weight": (1024, 4096),
    "model.layers.0.self_attn.o_proj.weight": (4096, 4096),
    "model.layers.0.mlp.gate_proj.weight": (12288, 4096),
    "model.layers.0.mlp.up_proj.weight": (12288, 4096),
    "model.layers.0.mlp.down_proj.weight": (4096, 12288),
    "model.layers.0.input_layernorm.weight": (4096,),
    "model.norm.weight": (4096,),
}


def run_cli(*args: object) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "relex_stream", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        sys.exit(f"run failed: {done.stderr[-2000:]}")
    return time.perf_counter() - started, done.stdout


def check_correctness(work: Path) -> dict:
    traj = work / "small"
    run_cli("synth", "--out", traj, "--steps", "3,7,20,22,50", "--tied", "--overwrite")
    steps = {s: traj / "runs" / f"checkpoint-{s}" for s in (3, 7, 20, 22, 50)}
    result = {}
    for device in ("cuda", "cpu"):
        run_cli("run", "--base", traj / "base", "--runs", traj / "runs", "--target", "120",
                "--out", work / f"small-{device}", "--device", device, "--overwrite",
                "--rebuild", "--quiet")  # fmt: skip
    ref = reference_from_dirs(traj / "base", steps, [120.0])[120.0]
    got = load_model_dir(work / "small-cuda" / "step-120")
    assert_matches_reference(got, ref, load_model_dir(traj / "base"), None)
    result["cuda_within_one_ulp_of_reference"] = True
    cuda_bytes = (work / "small-cuda" / "step-120" / "model.safetensors").read_bytes()
    cpu_bytes = (work / "small-cpu" / "step-120" / "model.safetensors").read_bytes()
    result["cuda_bytes_equal_cpu_bytes"] = cuda_bytes == cpu_bytes
    return result


def gram_throughput(n_rows: int, n_cols: int) -> dict:
    device = torch.device("cuda")
    rows = (0.02 * torch.randn(n_rows, n_cols, device=device)).to(torch.bfloat16)
    base = (0.02 * torch.randn(n_cols, device=device)).to(torch.bfloat16)
    gram = torch.zeros(n_rows, n_rows, dtype=torch.float64, device=device)
    accumulate_gram(gram, rows, base, device)
    torch.cuda.synchronize()
    started = time.perf_counter()
    repeats = 5
    for _ in range(repeats):
        accumulate_gram(gram, rows, base, device)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / repeats
    a = torch.randn(n_rows, 1 << 16, dtype=torch.float64, device=device)
    a @ a.T
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(20):
        a @ a.T
    torch.cuda.synchronize()
    fp64_rate = 20 * n_rows * n_rows * (1 << 16) / (time.perf_counter() - started)
    return {
        "K": n_rows,
        "n": n_cols,
        "gram_GMACps": n_rows * n_rows * n_cols / seconds / 1e9,
        "gram_input_GBps": n_rows * n_cols * 2 / seconds / 1e9,
        "fp64_matmul_GMACps": fp64_rate / 1e9,
    }


def write_8b_shaped(work: Path, n_steps: int) -> Path:
    from safetensors.torch import save_file

    traj = work / "qwen3-8b-shaped"
    if (traj / "runs").exists():
        return traj
    gen = torch.Generator(device="cuda").manual_seed(0)
    base = {
        n: 0.02 * torch.randn(s, device="cuda", generator=gen) for n, s in QWEN3_8B_LAYER.items()
    }
    config = {
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        "tie_word_embeddings": False,
    }
    for step in [0] + list(range(1, n_steps + 1)):
        tensors = {}
        for n, w in base.items():
            noise = 2e-4 * torch.randn(w.shape, device="cuda", generator=gen)
            tensors[n] = (w + 1e-3 * step * torch.sign(w) + noise).to(torch.bfloat16).cpu()
        directory = traj / "base" if step == 0 else traj / "runs" / f"checkpoint-{step}"
        directory.mkdir(parents=True)
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        (directory / "config.json").write_text(json.dumps(config))
    return traj


def end_to_end(work: Path, n_steps: int) -> dict:
    traj = write_8b_shaped(work, n_steps)
    files = sorted(traj.rglob("*.safetensors"))
    buffer = memoryview(bytearray(64 * 2**20))
    started = time.perf_counter()
    total = 0
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while got := f.readinto(buffer):
                total += got
    io_floor = time.perf_counter() - started
    wall, stdout = run_cli(
        "run",
        "--base",
        traj / "base",
        "--runs",
        traj / "runs",
        "--target",
        str(4 * n_steps),
        "--out",
        work / "e2e",
        "--device",
        "cuda",
        "--overwrite",
        "--rebuild",
        "--max-memory",
        "8G",
    )
    return {
        "K": n_steps,
        "input_bytes": total,
        "io_floor_s (page cache)": io_floor,
        "run_wall_s": wall,
        "ratio_run_to_io_floor": wall / io_floor,
        "summary": stdout.strip().splitlines(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/relex-gpu-check")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    report["correctness"] = check_correctness(work)
    report["gram"] = [gram_throughput(k, 1 << 26) for k in (30, 100)]
    report["end_to_end"] = end_to_end(work, args.steps)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
