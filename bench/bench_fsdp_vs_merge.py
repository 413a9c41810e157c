"""Benchmark of issue 14: `run` over verl FSDP shards in place, against merge-then-run.

One script run does everything, on one trajectory:
  prepare   `synth` writes a fp32 trajectory T (bf16 base, fp32 checkpoints: the master weights
            verl's FSDP shards hold); W gloo ranks on CPU then save each checkpoint the way verl's
            FSDPCheckpointManager does with FSDP2: `fully_shard` on each decoder layer and the
            root (as verl's apply_fsdp2), the step's weights copied into each rank's local
            shard, `torch.save(model.state_dict())` per rank, plus fsdp_config.json and
            actor/huggingface/ (the base's config files). The rank files are torch's own DTensor
            pickles, not crafted ones. Then relex_stream's reader is checked against T on the
            first and last step (every tensor, bit for bit).
  direct    `python -m relex_stream run --base T/base --runs FSDP --target 300 --out O --rebuild`
  merge     the merger emulated, one process per checkpoint as `python -m verl.model_merger
            merge --backend fsdp` runs: torch.load of each rank file (weights_only=False, in a
            thread pool), each local piece cast to bf16, cat on dim 0, saved as one bf16
            model.safetensors next to the config files (what save_pretrained writes for a model
            of this size), then `run` over the merged directories
  fp32      `run` over T's own fp32 safetensors checkpoints: the same values as the shards, so
            the direct run's output must match it bit for bit
Each command runs under /usr/bin/time -v after os.sync() and dropping the page cache (root
only); the bytes read and written come from time -v ('File system inputs/outputs') and from
this process's /proc/self/io (which includes the children it waited for: rchar/wchar are the
bytes passed to read/write calls, page cache or not). The sync after each command (its dirty
pages reaching the disk) is timed apart. The outputs are then compared: direct against fp32
(exact), direct against merge-then-run (in bf16 ulps).

    python bench/bench_fsdp_vs_merge.py --hidden 1024 --layers 8 --vocab 12288 --steps 1-30

--relex-src DIR runs relex_stream from DIR/relex_stream (e.g. `git archive HEAD relex_stream`
unpacked there), so that edits to the working tree during the run change nothing.

Disk: T and the shards (2 x 12.1 GB at 100M parameters), plus one store (4.5 GB for the fp32
runs) and the merged copy (6.0 GB, deleted after its run) at a time: about 30 GB at the peak.
--cleanup deletes the work directory at the end; bench/out/fsdp_vs_merge.jsonl keeps the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_run import drop_caches  # noqa: E402  (bench/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT  # where the relex_stream package is taken from (--relex-src)
RANK_FILE = "model_world_size_{world}_rank_{rank}.pt"
TIME_FIELDS = {
    "Maximum resident set size (kbytes)": ("peak_rss_bytes", 1024),
    "User time (seconds)": ("user_s", 1.0),
    "System time (seconds)": ("sys_s", 1.0),
    "File system inputs": ("fs_inputs_bytes", 512),
    "File system outputs": ("fs_outputs_bytes", 512),
    "Major (requiring I/O) page faults": ("major_faults", 1),
}
IO_FIELDS = ("rchar", "wchar", "read_bytes", "write_bytes", "cancelled_write_bytes")


# ---------------------------------------------------------------------------------------------
# Helpers




def self_io() -> dict[str, int]:
    """This process's I/O counters, including every child it has waited for."""
    out = {}
    for line in Path("/proc/self/io").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key.strip()] = int(value)
    return out


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def steps_of(text: str) -> list[int]:
    first, _, last = text.partition("-")
    return list(range(int(first), int(last or first) + 1))


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


# ---------------------------------------------------------------------------------------------
# Preparation: the fp32 trajectory and its FSDP2 shards


def synth_command(args: argparse.Namespace, out: Path) -> list[str]:
    return [sys.executable, "-m", "relex_stream", "synth", "--out", str(out), "--steps",
            args.steps, "--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab",
            str(args.vocab), "--profile", "drift", "--save-dtype", "float32", "--base-dtype",
            "bfloat16"]


def tensor_order(path: Path) -> list[str]:
    """Tensor names of a safetensors file in the order of their data (the model's order)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return sorted(header, key=lambda k: header[k]["data_offsets"][0])


def _module_tree(names: list[str], shapes: dict[str, tuple[int, ...]]) -> object:
    """An nn.Module (on the meta device) with one parameter per name, in this order."""
    import torch

    root = torch.nn.Module()
    with torch.device("meta"):
        for name in names:
            *path, leaf = name.split(".")
            module = root
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, torch.nn.Module())
                module = getattr(module, part)
            module.register_parameter(leaf, torch.nn.Parameter(torch.empty(shapes[name])))
    return root


def shard_worker(rank: int, world: int, traj: Path, fsdp_runs: Path, steps: list[int]) -> None:
    """One gloo rank: fully_shard a module of the model's parameters, then per step load this
    rank's rows of the fp32 checkpoint and save the state dict as verl does."""
    import torch
    from safetensors import safe_open
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    store = f"file://{fsdp_runs / '.store'}"
    torch.distributed.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
    first = traj / "runs" / f"checkpoint-{steps[0]}" / "model.safetensors"
    names = tensor_order(first)
    with safe_open(str(first), "pt") as f:
        shapes = {n: tuple(f.get_slice(n).get_shape()) for n in names}
    model = _module_tree(names, shapes)
    # verl's apply_fsdp2: each decoder layer, then the root
    for layer in model.model.layers.children():
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    params = dict(model.named_parameters())
    assert list(params) == names, "module order differs from the checkpoint's"
    for step in steps:
        src = traj / "runs" / f"checkpoint-{step}" / "model.safetensors"
        actor = fsdp_runs / f"global_step_{step}" / "actor"
        with torch.no_grad(), safe_open(str(src), "pt") as f:
            for name, param in params.items():
                local = param.to_local()
                rows = shapes[name][0]
                chunk = -(-rows // world)  # torch's Shard(0): ceil division
                start = min(rows, rank * chunk)
                local.copy_(f.get_slice(name)[start : start + local.shape[0]])
        if rank == 0:
            actor.mkdir(parents=True, exist_ok=True)
        torch.distributed.barrier()
        torch.save(model.state_dict(), actor / RANK_FILE.format(world=world, rank=rank))
        extra = {"lr_scheduler": None, "rng": {"cpu": torch.get_rng_state()}}
        torch.save(extra, actor / f"extra_state_world_size_{world}_rank_{rank}.pt")
        if rank == 0:
            hf = actor / "huggingface"
            hf.mkdir(exist_ok=True)
            for aux in ("config.json", "generation_config.json"):
                if (traj / "base" / aux).is_file():
                    shutil.copyfile(traj / "base" / aux, hf / aux)
            config = {"FSDP_version": 2, "world_size": world}
            (actor / "fsdp_config.json").write_text(json.dumps(config, indent=4))
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def write_fsdp_runs(traj: Path, fsdp_runs: Path, steps: list[int], world: int) -> float:
    """Run the W shard workers; seconds taken."""
    fsdp_runs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--shard-worker", str(rank), "--ranks", str(world),
             "--traj", str(traj), "--fsdp-runs", str(fsdp_runs), "--steps",
             f"{steps[0]}-{steps[-1]}"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(world)
    ]
    failed = []
    for rank, proc in enumerate(procs):
        out, _ = proc.communicate()
        if proc.returncode != 0:
            failed.append(f"rank {rank} exited {proc.returncode}:\n{out[-3000:]}")
    (fsdp_runs / ".store").unlink(missing_ok=True)
    if failed:
        sys.exit("shard workers failed:\n" + "\n".join(failed))
    return time.perf_counter() - started


def check_reader(traj: Path, fsdp_runs: Path, steps: list[int]) -> dict:
    """relex_stream's view of the shards against T: every tensor bit for bit, at two steps."""
    import numpy as np

    sys.path.insert(0, str(SRC))
    from relex_stream.checkpoints import open_model
    from relex_stream.tensor_files import read_into

    checked = {}
    for step in (steps[0], steps[-1]):
        direct = open_model(fsdp_runs / f"global_step_{step}")
        ref = open_model(traj / "runs" / f"checkpoint-{step}")
        assert direct.fsdp is not None, "the step directory was not read as FSDP shards"
        assert list(direct.tensors) == list(ref.tensors), "tensor order differs"
        pieces = 0
        for name, info in direct.tensors.items():
            other = ref.tensors[name]
            assert (info.dtype, info.shape) == (other.dtype, other.shape), name
            a = np.empty(info.numel, np.float32)
            b = np.empty(info.numel, np.float32)
            read_into(info, 0, a)
            read_into(other, 0, b)
            assert a.view(np.uint32).tobytes() == b.view(np.uint32).tobytes(), name
            pieces += len(info.pieces)
        checked[step] = {"tensors": len(direct.tensors), "pieces": pieces,
                         "rank_files": [p.name for p in direct.fsdp.files]}
    return checked


# ---------------------------------------------------------------------------------------------
# The emulated merger (python -m verl.model_merger merge --backend fsdp)


def merge_one(actor: Path, target: Path) -> None:
    """One checkpoint, as verl's FSDPModelMerger.merge_and_save with save_pretrained."""
    import torch
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor

    world = json.loads((actor / "fsdp_config.json").read_text())["world_size"]
    paths = [actor / RANK_FILE.format(world=world, rank=r) for r in range(world)]
    with ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1)) as pool:
        states = list(pool.map(
            lambda p: torch.load(p, map_location="cpu", weights_only=False), paths))
    merged = {}
    for key in list(states[0]):
        pieces = []
        for state in states:
            tensor = state.pop(key)
            assert isinstance(tensor, DTensor) and tensor.placements[0].is_shard(0), key
            pieces.append(tensor._local_tensor.bfloat16())
        merged[key] = torch.cat(pieces, dim=0).contiguous()
    del states
    target.mkdir(parents=True, exist_ok=True)
    save_file(merged, str(target / "model.safetensors"), metadata={"format": "pt"})
    for aux in (actor / "huggingface").iterdir():
        shutil.copyfile(aux, target / aux.name)


def merge_all(fsdp_runs: Path, merged_runs: Path) -> None:
    """One merger process per checkpoint, as a user runs the verl CLI."""
    for step_dir in sorted(fsdp_runs.glob("global_step_*"), key=lambda p: int(p.name[12:])):
        cmd = [sys.executable, __file__, "--merge-one", str(step_dir / "actor"),
               str(merged_runs / step_dir.name)]
        subprocess.run(cmd, check=True, cwd=ROOT)


# ---------------------------------------------------------------------------------------------
# Measuring


def measure(name: str, cmd: list[str], work: Path, cold: bool) -> dict:
    """cmd under /usr/bin/time -v, after dropping the page cache; wall, RSS, bytes, summary."""
    dropped = drop_caches() if cold else False
    time_file = work / f"{name}.time"
    log = work / f"{name}.log"
    before, load = self_io(), os.getloadavg()[0]
    started = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(["/usr/bin/time", "-v", "-o", str(time_file), *cmd], cwd=SRC,
                              env=dict(os.environ, PYTHONPATH=str(SRC)), stdout=out,
                              stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    after = self_io()
    sync_started = time.perf_counter()
    os.sync()
    result = {
        "name": name,
        "command": shlex.join(cmd),
        "returncode": done.returncode,
        "cache_dropped": dropped,
        "wall_s": wall,
        "sync_after_s": time.perf_counter() - sync_started,
        "loadavg_1m_before_after": [load, os.getloadavg()[0]],
        **{f"proc_{k}": after[k] - before[k] for k in IO_FIELDS},
    }
    text = time_file.read_text()
    for label, (key, scale) in TIME_FIELDS.items():
        m = re.search(rf"{re.escape(label)}: ([\d.]+)", text)
        if m:
            value = float(m.group(1)) * scale
            result[key] = value if key.endswith("_s") else int(value)
    lines = log.read_text(errors="replace").splitlines()
    summary = [ln for ln in lines if ln.startswith(("read:", "support:", "wall time:", "tensors:"))]
    result["summary"] = summary
    for ln in summary:
        m = re.match(r"read: (.+?) from checkpoints", ln)
        if m:
            result["summary_read"] = m.group(1)
    if done.returncode != 0:
        sys.exit(f"{name} failed ({done.returncode}); see {log}:\n" + "\n".join(lines[-30:]))
    return result


def run_command(base: Path, runs: Path, out: Path, target: str) -> list[str]:
    return [sys.executable, "-m", "relex_stream", "run", "--base", str(base), "--runs",
            str(runs), "--target", target, "--out", str(out), "--rebuild"]


def output_file(out: Path, target: str) -> Path:
    return out / f"step-{target}" / "model.safetensors"


def compare(a: Path, b: Path) -> dict:
    """Identical bytes? Else the differences of bf16 outputs in ulps (median, 99th percentile,
    max) and the largest |a - b| over each tensor's largest |a|."""
    import torch
    from safetensors import safe_open

    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.view(torch.int16).to(torch.int32) & 0xFFFF
        magnitude = bits & 0x7FFF
        return torch.where(bits >= 0x8000, -magnitude, magnitude)

    identical, total, dtypes, rel = True, 0, set(), 0.0
    counts = torch.zeros(1 << 16, dtype=torch.int64)  # elements per ulp difference (capped)
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        assert sorted(fa.keys()) == sorted(fb.keys())
        for key in fa.keys():
            x, y = fa.get_tensor(key), fb.get_tensor(key)
            dtypes.add(str(x.dtype))
            total += x.numel()
            same = x.dtype == y.dtype and torch.equal(x.view(torch.uint8), y.view(torch.uint8))
            identical &= same
            if x.dtype == torch.bfloat16 == y.dtype:
                diff = (ordered(x) - ordered(y)).abs().clamp(max=(1 << 16) - 1)
                counts += torch.bincount(diff.flatten(), minlength=1 << 16)
                scale = float(x.float().abs().max()) or 1.0
                rel = max(rel, float((x.float() - y.float()).abs().max()) / scale)
    cumulative = counts.cumsum(0)

    def percentile(q: float) -> int:
        return int(torch.searchsorted(cumulative, torch.tensor(q * int(cumulative[-1]))))

    nonzero = counts.nonzero()
    return {"identical": identical, "elements": total, "dtypes": sorted(dtypes),
            "elements_differing": int(cumulative[-1] - counts[0]),
            "ulps_median": percentile(0.5), "ulps_p99": percentile(0.99),
            "ulps_max": int(nonzero.max()) if len(nonzero) else 0,
            "max_abs_diff_over_tensor_max_abs": rel}


def startup_seconds() -> float:
    """Wall time of a merger process that only imports what it needs (its fixed cost)."""
    cmd = [sys.executable, "-c",
           "import torch, safetensors.torch, torch.distributed.tensor  # noqa"]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - started


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=12288)
    ap.add_argument("--steps", default="1-30", help="FIRST-LAST")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--target", default="300")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "fsdp_vs_merge")
    ap.add_argument("--relex-src", type=Path, help="directory holding the relex_stream to run")
    ap.add_argument("--cleanup", action="store_true", help="delete the work directory at the end")
    ap.add_argument("--shard-worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--traj", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--fsdp-runs", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--merge-one", nargs=2, type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--merge-all", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    steps = steps_of(args.steps)
    if args.shard_worker is not None:
        return shard_worker(args.shard_worker, args.ranks, args.traj, args.fsdp_runs, steps)
    if args.merge_one:
        return merge_one(*args.merge_one)
    if args.merge_all:
        return merge_all(*args.merge_all)

    global SRC
    SRC = (args.relex_src or ROOT).resolve()
    work = args.work.resolve()
    traj, fsdp_runs, merged_runs = work / "traj", work / "fsdp", work / "merged"
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"args": {k: str(v) for k, v in vars(args).items() if v is not None}}
    if not (traj / "synth.json").is_file():
        cmd = synth_command(args, traj)
        started = time.perf_counter()
        subprocess.run([*cmd, "--overwrite"], check=True, cwd=SRC, stderr=subprocess.DEVNULL)
        result["synth"] = {"command": shlex.join(cmd), "s": time.perf_counter() - started}
    if not (fsdp_runs / f"global_step_{steps[-1]}" / "actor" / "fsdp_config.json").is_file():
        shutil.rmtree(fsdp_runs, ignore_errors=True)
        result["shard_s"] = write_fsdp_runs(traj, fsdp_runs, steps, args.ranks)
    result["reader_check"] = check_reader(traj, fsdp_runs, steps)
    sizes = {
        "base": tree_bytes(traj / "base"),
        "fp32_checkpoints": tree_bytes(traj / "runs"),
        "fsdp_model_rank_files": sum(p.stat().st_size for p in fsdp_runs.rglob("model_*.pt")),
        "fsdp_all": tree_bytes(fsdp_runs),
    }
    result["sizes"] = sizes
    print(json.dumps(result, indent=2), file=sys.stderr)

    measures = {}
    out_direct, out_merged, out_fp32 = work / "out-direct", work / "out-merged", work / "out-fp32"
    for out in (out_direct, out_merged, out_fp32, merged_runs):
        shutil.rmtree(out, ignore_errors=True)

    def run_and_shrink(name: str, runs: Path, out: Path) -> None:
        measures[name] = measure(name, run_command(traj / "base", runs, out, args.target), work,
                                 cold=True)
        store = out / "trajectory.zarr"
        measures[name]["store_bytes"] = tree_bytes(store)
        measures[name]["output_bytes"] = tree_bytes(out / f"step-{args.target}")
        shutil.rmtree(store)  # one store on disk at a time

    run_and_shrink("direct", fsdp_runs, out_direct)
    merge_cmd = [sys.executable, __file__, "--merge-all", str(fsdp_runs), str(merged_runs)]
    measures["merge"] = measure("merge", merge_cmd, work, cold=True)
    sizes["merged"] = tree_bytes(merged_runs)
    run_and_shrink("merged_run", merged_runs, out_merged)
    shutil.rmtree(merged_runs)
    run_and_shrink("fp32_safetensors", traj / "runs", out_fp32)
    result["measures"] = measures
    result["merger_startup_s"] = startup_seconds()
    result["direct_vs_fp32"] = compare(output_file(out_direct, args.target),
                                       output_file(out_fp32, args.target))
    result["direct_vs_merged"] = compare(output_file(out_direct, args.target),
                                         output_file(out_merged, args.target))
    m = measures
    two = ("merge", "merged_run")
    result["merge_then_run"] = {
        k: sum(m[n][k] for n in two)
        for k in ("wall_s", "sync_after_s", "fs_inputs_bytes", "fs_outputs_bytes",
                  *(f"proc_{f}" for f in IO_FIELDS))
    }
    result["merge_then_run"]["peak_rss_bytes"] = max(m[n]["peak_rss_bytes"] for n in two)
    both = result["merge_then_run"]
    result["ratios_merge_then_run_over_direct"] = {
        k: both[k] / m["direct"][k] if m["direct"][k] else None
        for k in ("wall_s", "fs_inputs_bytes", "fs_outputs_bytes", "proc_rchar", "proc_wchar",
                  "peak_rss_bytes")
    }
    print(json.dumps(result, indent=2))
    with open(work.parent / "fsdp_vs_merge.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    for name, r in measures.items():
        print(f"{name:>16}: wall {r['wall_s']:.1f} s (+{r['sync_after_s']:.1f} s sync), "
              f"disk read {gib(r['fs_inputs_bytes'])}, rchar {gib(r['proc_rchar'])}, "
              f"disk written {gib(r['fs_outputs_bytes'])}, peak RSS {gib(r['peak_rss_bytes'])}",
              file=sys.stderr)
    if args.cleanup:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
