"""The engine paths a GPU changes, on the test device (RELEX_TEST_DEVICE: cpu by default, cuda).

Every run here writes one prediction of a trajectory whose embedding and lm_head are 65536 × 16
bf16 = 1M elements, two of the store's inner chunks (512K bf16 elements) each, and is compared
with the dense float64 reference (one output ulp) and, byte for byte, with the other runs:

- chunked (--max-memory 32M: the large tensors are read in chunks, twice) and resident
  (--max-memory 4G: read once) give the same bytes;
- kept deltas (--max-memory 32M --max-gpu-memory 1G: chunked, the first pass's deltas kept for
  the second; on the CPU --max-gpu-memory stands in for the device's memory) give the same bytes;
- --svd randomized matches the reference;
- the same run twice, and a run from the finished store, give the same bytes;
- every --max-memory (and on CUDA every --max-gpu-memory) gives the same bytes;
- K > 70 with default flags: `run`, then `report` and `backtest` accept its store.

On CUDA the same tests run with --device cuda; test_cpu_and_cuda_bytes also runs the CPU and
records how many output elements differ between the devices (float64 reductions on different
hardware may round G's last bit differently): it asserts both within the reference bound and
identical bytes only within one device. test_gpu_check_dry_run (CPU only) runs
`bench/gpu_check.sh --dry-run`, every section of the GPU check on tiny sizes, so that a typo
cannot cost a lent GPU's time.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures import Spec, Trajectory, build_trajectory
from tests.helpers import REPO_ROOT, check_against_reference, run_cli, run_traj, test_device

DEVICE = test_device()
ON_CUDA = DEVICE == "cuda"
TARGET = 100
WIDE = Spec(vocab=65536)  # embed_tokens and lm_head: 65536 × 16 bf16, two inner chunks each
_READ = re.compile(r"read: .* from checkpoints \((?P<ratio>[0-9.]+)x the input's .*?\), "
                   r"(?P<store>[0-9.]+ [KMGT]?i?B) from the store")

# Flags of each run on each device. On CUDA the device budget decides chunks (it caps the host
# ring) and, by default, keeps every tensor's deltas on the GPU: 'chunked' gives it 32M, so the
# 1M-element tensors are uploaded in 512K-column chunks and nothing is kept.
RUNS: dict[str, tuple[str, ...]] = {
    "chunked": ("--max-memory", "32M", *(("--max-gpu-memory", "32M") if ON_CUDA else ())),
    "resident": ("--max-memory", "4G"),
    "kept": ("--max-memory", "32M", "--max-gpu-memory", "1G"),
    "randomized": ("--max-memory", "4G", "--svd", "randomized"),
    "chunked-64M": ("--max-memory", "64M"),
}
if ON_CUDA:  # the device budget alone: chunked on the GPU (32M), resident (64M), kept (1G)
    RUNS |= {f"gpu-{size}": ("--max-memory", "4G", "--max-gpu-memory", size)
             for size in ("32M", "64M", "1G")}


@dataclass
class Run:
    out: Path
    stdout: str
    outputs: dict[str, bytes]  # file name -> bytes of the prediction's safetensors files

    @property
    def read_ratio(self) -> float:
        """Bytes read from the checkpoints ÷ the input's bytes, from the closing summary."""
        return float(self._read().group("ratio"))

    @property
    def read_from_store(self) -> bool:
        return not self._read().group("store").startswith("0 ")

    def _read(self) -> re.Match:
        found = _READ.search(self.stdout)
        assert found, f"no read: line in the summary:\n{self.stdout}"
        return found


class Runs:
    """Each named run made once per module, into its own OUT (so each builds its own store)."""

    def __init__(self, traj: Trajectory, root: Path):
        self.traj, self.root, self._done = traj, root, {}

    def get(self, name: str, *extra: object, device: str = DEVICE) -> Run:
        key = (name, device)
        if key not in self._done:
            flags = RUNS.get(name, ())
            out = self.root / f"{name}-{device}"
            proc = _run(self.traj, out, device, *flags, *extra)
            self._done[key] = Run(out, proc.stdout, _outputs(out))
        return self._done[key]


def _run(traj: Trajectory, out: Path, device: str, *flags: object) -> subprocess.CompletedProcess:
    if device == DEVICE:
        return run_traj(traj, out, [TARGET], *flags, quiet=False)
    args = ["run", "--base", traj.base, "--runs", traj.runs, "--target", TARGET, "--out", out]
    return run_cli(*args, "--device", device, *flags)


def _outputs(out: Path) -> dict[str, bytes]:
    files = sorted((out / f"step-{TARGET}").glob("*.safetensors"))
    assert files, f"no prediction written under {out}"
    return {f.name: f.read_bytes() for f in files}


def differing_elements(a: Path, b: Path) -> dict[str, int]:
    """Per tensor, how many elements of two model dirs' safetensors differ bit for bit."""
    counts = {}
    for file in sorted(a.glob("*.safetensors")):
        left, right = load_file(str(file)), load_file(str(b / file.name))
        assert left.keys() == right.keys(), f"{file.name}: different tensors"
        for name, x in left.items():
            y = right[name]
            assert x.dtype == y.dtype and x.shape == y.shape, name
            words = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
            word = words[x.element_size()]
            counts[name] = int((x.view(word) != y.view(word)).sum())
    return counts


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.mktemp("gpu-paths")
    return Runs(build_trajectory(root / "traj", WIDE), root)


def test_chunked_and_resident_same_bytes_within_one_ulp(runs: Runs) -> None:
    chunked, resident = runs.get("chunked"), runs.get("resident")
    assert chunked.read_ratio == 2.0, "the 1M-element tensors were not read in chunks, twice"
    assert resident.read_ratio == 1.0, "a 4G budget should read every byte once"
    assert chunked.outputs == resident.outputs, "chunking changed the output bytes"
    check_against_reference(runs.traj, chunked.out, [TARGET])
    check_against_reference(runs.traj, resident.out, [TARGET])


def test_kept_deltas_same_bytes(runs: Runs) -> None:
    kept = runs.get("kept")
    assert kept.read_ratio == 1.0, "kept deltas: the second pass should read no rows again"
    assert kept.read_from_store, "kept deltas: the second pass reads the base from the store"
    assert kept.outputs == runs.get("resident").outputs, "kept deltas changed the output bytes"


def test_randomized_matches_reference(runs: Runs) -> None:
    check_against_reference(runs.traj, runs.get("randomized").out, [TARGET])


def test_same_run_twice_and_from_store_same_bytes(runs: Runs) -> None:
    first, again = runs.get("chunked"), runs.get("chunked-again", *RUNS["chunked"])
    assert again.outputs == first.outputs, "the same run twice gave different bytes"
    stored = runs.get("resident").out / "trajectory.zarr"
    from_store = runs.get("from-store", "--cache", stored, *RUNS["chunked"])
    assert from_store.outputs == first.outputs, "a run from the finished store changed the bytes"


def test_budgets_same_bytes(runs: Runs) -> None:
    names = ["chunked", "chunked-64M", "resident", "kept"]
    names += [name for name in RUNS if name.startswith("gpu-")]
    outputs = {name: runs.get(name).outputs for name in names}
    differ = [name for name in names if outputs[name] != outputs["resident"]]
    assert not differ, f"budgets {differ} gave other bytes than --max-memory 4G"
    if ON_CUDA:
        assert runs.get("gpu-32M").read_ratio == 2.0, "--max-gpu-memory 32M: not chunked"
        assert runs.get("gpu-1G").read_ratio == 1.0


@pytest.mark.skipif(not ON_CUDA, reason="compares CPU and CUDA bytes: RELEX_TEST_DEVICE=cuda")
def test_cpu_and_cuda_bytes(runs: Runs, record_property) -> None:
    """Both devices within one ulp of the reference; how many elements differ is recorded
    (float64 sums in another order may round G's last bit, and rarely an output's)."""
    report = {}
    for name in ("resident", "chunked", "kept"):
        on_cuda, on_cpu = runs.get(name), runs.get(name, device="cpu")
        check_against_reference(runs.traj, on_cpu.out, [TARGET])
        check_against_reference(runs.traj, on_cuda.out, [TARGET])
        counts = differing_elements(on_cpu.out / f"step-{TARGET}", on_cuda.out / f"step-{TARGET}")
        report[name] = {"same_bytes": on_cpu.outputs == on_cuda.outputs,
                        "differing_elements": sum(counts.values()),
                        "by_tensor": {k: v for k, v in counts.items() if v}}
    record_property("cpu_vs_cuda", json.dumps(report, sort_keys=True))
    print("cpu_vs_cuda", json.dumps(report, sort_keys=True))


def test_many_checkpoints_default_flags(tmp_path: Path) -> None:
    """K = 72 > 70 with default flags: `report` and `backtest` must accept the store `run`
    built (--svd auto keeps the exact Gram matrix, which they need)."""
    traj = build_trajectory(tmp_path / "traj", Spec(steps=tuple(range(1, 73)), vocab=64))
    out = tmp_path / "out"
    run_traj(traj, out, [150])
    store = out / "trajectory.zarr"
    assert run_cli("report", store, "--no-plots", "--null-samples", "0").stdout.strip()
    assert run_cli("backtest", store, "--holdout", "3", "--no-plots").stdout.strip()


@pytest.mark.skipif(ON_CUDA, reason="the CPU's guard for the real check, which is running now")
@pytest.mark.skipif(os.environ.get("RELEX_GPU_CHECK_CHILD") == "1", reason="inside the check")
def test_gpu_check_dry_run(tmp_path: Path) -> None:
    """Every section of bench/gpu_check.sh runs on the CPU, tiny, and reports ok."""
    env = dict(os.environ, OUT=str(tmp_path), CUDA_VISIBLE_DEVICES="",
               PYTHON=sys.executable)
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=400)
    tail = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, tail
    lines = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    sections = {line["section"]: line for line in lines if "status" in line}
    expected = {"env", "kernels", "cpu_vs_cuda", "pytest", "end_to_end", "memory"}
    assert expected <= set(sections), (sorted(sections), tail)
    bad = {name: s for name, s in sections.items() if s["status"] != "ok"}
    assert not bad, (bad, tail)


def test_a_short_gpu_budget_names_max_gpu_memory() -> None:
    """When the device's budget, not --max-memory, cannot hold one chunk, the error names
    --max-gpu-memory and how much it needs (the CPU has no device budget: planned directly)."""
    from types import SimpleNamespace

    from relex_stream.errors import RelexError
    from relex_stream.memory import Budget
    from relex_stream.plan import chunking
    from relex_stream.store_layout import Group

    n = 1 << 20  # one tensor of 1M bf16 elements, K = 30
    group = Group(0, ("w",), (0,), (n,), "BF16", "BF16", 1 << 19)
    gen = SimpleNamespace(steps=tuple(range(1, 31)), groups=lambda: [group])
    inputs = SimpleNamespace(target=gen, observed=list(range(1, 31)))
    budget = Budget.split(4 << 30, 30, 1, 1 << 16, 1 << 20)
    assert chunking(inputs, budget, None)["w"].gram_cols == n  # the host budget holds it whole
    assert chunking(inputs, budget, 32 << 20)["w"].gram_cols < n  # the GPU budget chunks it
    with pytest.raises(RelexError, match=r"--max-gpu-memory is too small .* give at least"):
        chunking(inputs, budget, 1 << 20)
    small = Budget.split(8 << 20, 30, 1, 1 << 16, 1 << 20)  # the host budget is short too
    with pytest.raises(RelexError, match=r"--max-memory"):
        chunking(inputs, small, None)
