"""The paper's RELEX scripts against `python -m relex_stream run`, end to end, on one trajectory.

The paper's scripts (github.com/weizhepei/RELEX) are never downloaded or copied here: extract a
scratch copy yourself and pass it with --scripts, e.g.

    git --git-dir=/work/.mirror/weizhepei+RELEX/repo archive HEAD | tar -x -C /tmp/relex-paper

Their imports need transformers, accelerate (device_map="cpu") and scipy; --paper-python names an
interpreter that has them (default: this one). bench/paper_compare.md shows a venv layered on
.venv that adds only accelerate and scipy.

What it does, in order:
  1. generates (or reuses) a bf16 trajectory with `python -m relex_stream synth` at steps 1..K
     (default: the 155.7M-parameter untied Qwen2, K = 30, planted profile);
  2. lays it out as the paper's scripts want it: base/ (symlinks plus a minimal local tokenizer,
     which svd_extrapolation.py saves with its output) and ckpts/global_step_N -> runs/checkpoint-N;
  3. with the page cache dropped before each (needs root; else both start warm), runs under
     /usr/bin/time -v: (a) the paper's README pipeline, precompute_deltas.py then
     svd_extrapolation.py, and (b) `python -m relex_stream run ... --rebuild` at default flags
     (plus one run per --relex-max-memory); each is followed by a timed `sync`;
  4. compares the two predicted checkpoints tensor by tensor, and a few tensors against an exact
     float64 RELEX computed here from the bf16 checkpoints;
  5. appends one JSON line per measurement to bench/out/paper_compare.jsonl, prints a table.

    python bench/paper_compare.py --scripts /tmp/relex-paper \\
        --paper-python /tmp/relex-paper-venv/bin/python
    python bench/paper_compare.py --scripts /tmp/relex-paper --hidden 256 --layers 2 \\
        --vocab 1024 --steps 5 --target 20 --clean       # a small trial

Peak RSS is /usr/bin/time's "Maximum resident set size" (file-backed pages mapped by the process
count: the paper's precompute writes its deltas through np.memmap). The anonymous part alone is
sampled every 0.1 s from /proc and reported next to it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_run import drop_caches  # noqa: E402  (bench/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30
# hidden 1024, 12 layers, vocab 20704 in synth's Qwen2 layout (intermediate 2*hidden, kv heads
# half the heads, biases on q/k/v, untied lm_head): 155,698,176 float parameters.
DEFAULT_SHAPE = {"hidden": 1024, "layers": 12, "vocab": 20704}
SCRIPT_NAMES = ("precompute_deltas.py", "svd_extrapolation.py")
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


# ---------------------------------------------------------------------------------------------
# page cache, processes, sizes




def warm_files(files: list[Path]) -> None:
    """Read every file once so that it sits in the page cache (the --cache-state warm case)."""
    buffer = bytearray(16 * 2**20)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def tree_bytes(path: Path) -> int:
    """Apparent size of every regular file under path (symlinks not followed)."""
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            p = Path(dirpath) / name
            if not p.is_symlink():
                total += p.stat().st_size
    return total


def remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


class RssSampler(threading.Thread):
    """Peak of the summed VmRSS / RssAnon / RssFile of a process's descendants, every 0.1 s."""

    FIELDS = ("VmRSS", "RssAnon", "RssFile")

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = dict.fromkeys(self.FIELDS, 0)
        self.done = threading.Event()

    def _descendants(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
        found, todo = [], [self.pid]
        while todo:
            for child in children.get(todo.pop(), []):
                found.append(child)
                todo.append(child)
        return found

    def _sample(self) -> None:
        sums = dict.fromkeys(self.FIELDS, 0)
        for pid in self._descendants():
            try:
                text = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for field in self.FIELDS:
                m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
                if m:
                    sums[field] += int(m.group(1)) * 1024
        for field in self.FIELDS:
            self.peak[field] = max(self.peak[field], sums[field])

    def run(self) -> None:
        while not self.done.wait(0.1):
            self._sample()

    def stop(self) -> dict:
        self.done.set()
        self.join()
        return {
            "peak_rss_sampled_bytes": self.peak["VmRSS"],
            "peak_rss_anon_sampled_bytes": self.peak["RssAnon"],
            "peak_rss_file_sampled_bytes": self.peak["RssFile"],
        }


TIME_FIELDS = {
    "Maximum resident set size (kbytes)": ("peak_rss_bytes", 1024),
    "User time (seconds)": ("user_s", 1.0),
    "System time (seconds)": ("sys_s", 1.0),
    "File system inputs": ("fs_read_bytes", 512),
    "File system outputs": ("fs_written_bytes", 512),
    "Major (requiring I/O) page faults": ("major_faults", 1),
    "Exit status": ("exit_status", 1),
}


def measure(cmd: list[str], log: Path, cwd: Path, env: dict) -> dict:
    """Run cmd under /usr/bin/time -v (when present) and a /proc sampler; wall, RSS, writes."""
    log.parent.mkdir(parents=True, exist_ok=True)
    time_file = log.with_suffix(".time")
    timer = ["/usr/bin/time", "-v", "-o", str(time_file)] if Path("/usr/bin/time").exists() else []
    load_before = os.getloadavg()
    with open(log, "w") as out:
        out.write("$ " + shlex.join(cmd) + "\n")
        out.flush()
        started = time.perf_counter()
        proc = subprocess.Popen(timer + cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        sampler = RssSampler(proc.pid)
        sampler.start()
        rc = proc.wait()
        wall = time.perf_counter() - started
    result = {"command": shlex.join(cmd), "log": str(log), "returncode": rc, "wall_s": wall}
    result["loadavg_1m_before_after"] = [load_before[0], os.getloadavg()[0]]
    result |= sampler.stop()
    sync_started = time.perf_counter()
    os.sync()
    result["sync_s"] = time.perf_counter() - sync_started
    if timer and time_file.exists():
        text = time_file.read_text()
        for label, (key, scale) in TIME_FIELDS.items():
            m = re.search(rf"{re.escape(label)}: ([\d.]+)", text)
            if m:
                value = float(m.group(1)) * scale
                result[key] = value if key.endswith("_s") else int(value)
    else:  # no /usr/bin/time: the sampled peak stands in
        result["peak_rss_bytes"] = result["peak_rss_sampled_bytes"]
    if "user_s" in result and "sys_s" in result:
        result["cpu_s"] = result["user_s"] + result["sys_s"]
    return result


def tail(path: str, n: int = 30) -> str:
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])


# ---------------------------------------------------------------------------------------------
# trajectory and the paper's layout


def relex_env(args: argparse.Namespace, env: dict) -> tuple[dict, Path]:
    """Environment and working directory for `python -m relex_stream`: the installed engine, or
    with --relex-src the package under that directory (e.g. a `git archive` of one commit)."""
    if not args.relex_src:
        return env, ROOT
    src = Path(args.relex_src).resolve()
    path = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
    return env | {"PYTHONPATH": path}, src


def trajectory_tag(args: argparse.Namespace) -> str:
    extra = hashlib.sha1(args.synth_args.encode()).hexdigest()[:8] if args.synth_args else "std"
    return (
        f"{args.profile}-h{args.hidden}-l{args.layers}-v{args.vocab}-k{args.steps}"
        f"-seed{args.seed}-{extra}"
    )


def make_trajectory(args: argparse.Namespace, work: Path) -> tuple[Path, dict]:
    tag = trajectory_tag(args)
    path = work / f"traj-{tag}"
    marker = work / f"traj-{tag}.complete"
    record = {"trajectory": str(path), "reused": marker.exists()}
    if not marker.exists():
        remove(path)
        cmd = [
            sys.executable,
            "-m",
            "relex_stream",
            "synth",
            "--out",
            str(path),
            "--steps",
            f"1-{args.steps}",
            "--seed",
            str(args.seed),
            "--hidden",
            str(args.hidden),
            "--layers",
            str(args.layers),
            "--vocab",
            str(args.vocab),
            "--profile",
            args.profile,
        ] + shlex.split(args.synth_args)
        started = time.perf_counter()
        env, cwd = relex_env(args, os.environ | OFFLINE_ENV)
        subprocess.run(cmd, check=True, cwd=cwd, env=env, stdout=sys.stderr)
        record["synth_command"] = shlex.join(cmd)
        record["synth_s"] = time.perf_counter() - started
        marker.write_text(record["synth_command"] + "\n")
    return path, record


def model_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def tensor_index(directory: Path) -> dict[str, Path]:
    """Tensor name -> shard file, from the shards' own headers."""
    from safetensors import safe_open

    index = {}
    for path in model_files(directory):
        with safe_open(str(path), framework="pt") as f:
            index |= dict.fromkeys(f.keys(), path)
    return index


def describe_model(base: Path) -> dict:
    """Float parameters, bytes and tensor count of a safetensors model, from its headers."""
    import struct

    n_float = n_bytes = n_tensors = 0
    sizes = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8}
    for path in model_files(base):
        with open(path, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            n_tensors += 1
            if info["dtype"] in sizes:
                n_float += math.prod(info["shape"])
            n_bytes += info["data_offsets"][1] - info["data_offsets"][0]
    config = json.loads((base / "config.json").read_text())
    return {
        "float_parameters": n_float,
        "checkpoint_bytes": n_bytes,
        "tensors": n_tensors,
        "tied": bool(config.get("tie_word_embeddings", False)),
        "config": {
            k: config.get(k)
            for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
        },
    }


TOKENIZER_SCRIPT = """
import sys
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
tok = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1}, unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(
    sys.argv[1]
)
"""


def paper_layout(trajectory: Path, layout: Path, python: str, env: dict) -> dict[int, Path]:
    """layout/base: the base's files as symlinks plus a local tokenizer (svd_extrapolation.py
    saves AutoTokenizer.from_pretrained(base) with its output; synth writes none);
    layout/ckpts/global_step_N -> runs/checkpoint-N (the only names precompute_deltas.py finds)."""
    remove(layout)
    (layout / "base").mkdir(parents=True)
    (layout / "ckpts").mkdir()
    for item in (trajectory / "base").iterdir():
        (layout / "base" / item.name).symlink_to(item.resolve())
    if not any((trajectory / "base").glob("tokenizer*")):
        subprocess.run([python, "-c", TOKENIZER_SCRIPT, str(layout / "base")], check=True, env=env)
    steps = {}
    for item in (trajectory / "runs").iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", item.name)
        if m:
            steps[int(m.group(1))] = item
            (layout / "ckpts" / f"global_step_{m.group(1)}").symlink_to(item.resolve())
    return dict(sorted(steps.items()))


# ---------------------------------------------------------------------------------------------
# comparing predictions


def bf16_ulp(x):
    """Spacing of bf16 numbers at |x| (8 significant bits); the smallest normal's at 0."""
    import torch

    _, exponent = torch.frexp(x.abs().clamp_min(2.0**-126))
    return torch.ldexp(torch.ones_like(x), exponent - 8)


def exact_relex(names, base_idx, ckpt_idx, steps, target, chunk=1 << 20) -> dict:
    """float64 RELEX rank-1 prediction of each named tensor, from the bf16 checkpoints."""
    import torch
    from safetensors import safe_open

    t = torch.tensor(steps, dtype=torch.float64)
    centred = t - t.mean()
    h = 1.0 / len(steps) + (target - t.mean()) * centred / (centred * centred).sum()
    handles: dict[Path, object] = {}

    def opened(path):
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt")
        return handles[path]

    def rows(name, a, b):
        w0 = opened(base_idx[name]).get_slice(name)[a:b].to(torch.float64)
        deltas = torch.stack(
            [opened(ckpt_idx[s][name]).get_slice(name)[a:b].to(torch.float64) - w0 for s in steps]
        )
        return w0, deltas.reshape(len(steps), -1)

    out = {}
    for name in names:
        shape = opened(base_idx[name]).get_slice(name).get_shape()
        per_row = math.prod(shape[1:]) if len(shape) > 1 else 1
        step_rows = max(1, chunk // per_row)
        spans = [(a, min(a + step_rows, shape[0])) for a in range(0, shape[0], step_rows)]
        gram = torch.zeros(len(steps), len(steps), dtype=torch.float64)
        for a, b in spans:
            _, d = rows(name, a, b)
            gram += d @ d.T
        _, vectors = torch.linalg.eigh(gram)
        u = vectors[:, -1]
        w = (h @ u) * u
        pieces = []
        for a, b in spans:
            w0, d = rows(name, a, b)
            pieces.append(w0.reshape(-1) + w @ d)
        out[name] = torch.cat(pieces).reshape(shape)
    return out


def compare_predictions(
    paper_dir: Path,
    relex_dir: Path,
    trajectory: Path,
    steps: list[int],
    target: int,
    n_reference: int,
) -> dict:
    """Tensor-by-tensor differences of the two bf16 predictions, and of each against an exact
    float64 RELEX on a few tensors. Relative figures are over the predicted change ‖Ŵ − W_0‖."""
    import torch
    from safetensors import safe_open

    paper_idx, relex_idx = tensor_index(paper_dir), tensor_index(relex_dir)
    base_idx = tensor_index(trajectory / "base")
    missing = sorted(set(relex_idx) ^ set(paper_idx))
    per_tensor = []
    sq_diff = sq_delta = 0.0
    n_elements = n_equal = n_within_1ulp = 0
    for name in sorted(set(relex_idx) & set(paper_idx)):
        with safe_open(str(paper_idx[name]), framework="pt") as f:
            a = f.get_tensor(name)
        with safe_open(str(relex_idx[name]), framework="pt") as f:
            b = f.get_tensor(name)
        with safe_open(str(base_idx[name]), framework="pt") as f:
            w0 = f.get_tensor(name).to(torch.float64)
        if not a.is_floating_point():
            continue
        dtypes = (str(a.dtype), str(b.dtype))
        a64, b64 = a.to(torch.float64), b.to(torch.float64)
        diff = (a64 - b64).abs()
        ulps = diff / bf16_ulp(torch.maximum(a64.abs(), b64.abs()))
        delta = float(((b64 - w0) ** 2).sum())
        sq_diff += float((diff**2).sum())
        sq_delta += delta
        n_elements += a.numel()
        n_equal += int((a64 == b64).sum())
        n_within_1ulp += int((ulps <= 1).sum())
        per_tensor.append(
            {
                "name": name,
                "dtypes": dtypes,
                "numel": a.numel(),
                "max_abs_diff": float(diff.max()),
                "max_ulps": float(ulps.max()),
                "frac_equal": float((a64 == b64).double().mean()),
                "frac_within_1ulp": float((ulps <= 1).double().mean()),
                "rel_fro_diff": float(diff.norm()) / math.sqrt(delta) if delta else None,
            }
        )
    per_tensor.sort(key=lambda r: -(r["rel_fro_diff"] or 0.0))
    result = {
        "tensors_compared": len(per_tensor),
        "tensors_missing_in_one": missing,
        "elements": n_elements,
        "frac_equal": n_equal / n_elements if n_elements else None,
        "frac_within_1ulp": n_within_1ulp / n_elements if n_elements else None,
        "max_ulps": max((r["max_ulps"] for r in per_tensor), default=None),
        "max_abs_diff": max((r["max_abs_diff"] for r in per_tensor), default=None),
        "rel_fro_diff_all": math.sqrt(sq_diff / sq_delta) if sq_delta else None,
        "worst_tensors": per_tensor[:5],
    }
    if n_reference:
        names = [r["name"] for r in per_tensor]
        picks = [n for n in names if n.endswith(("q_proj.weight", "down_proj.weight"))][:2]
        picks += [n for n in names if n.endswith(("k_proj.bias", "norm.weight"))][:2]
        picks += [n for n in ("lm_head.weight", "model.embed_tokens.weight") if n in names][:1]
        picks = picks[:n_reference]
        ckpt_idx = {s: tensor_index(trajectory / "runs" / f"checkpoint-{s}") for s in steps}
        exact = exact_relex(picks, base_idx, ckpt_idx, steps, target)
        ref_rows = []
        for name in picks:
            ref = exact[name]
            with safe_open(str(base_idx[name]), framework="pt") as f:
                w0 = f.get_tensor(name).to(torch.float64)
            change = float((ref - w0).norm())
            ref_bf16 = ref.to(torch.bfloat16).to(torch.float64)
            row = {"name": name, "numel": ref.numel()}
            for label, idx in (("paper", paper_idx), ("relex_stream", relex_idx)):
                with safe_open(str(idx[name]), framework="pt") as f:
                    got = f.get_tensor(name).to(torch.float64)
                err = (got - ref).abs()
                ulps = err / bf16_ulp(ref)
                row[label] = {
                    "rel_fro_err": float(err.norm()) / change if change else None,
                    "max_abs_err": float(err.max()),
                    "max_ulps_vs_exact": float(ulps.max()),
                    "frac_beyond_1ulp": float((ulps > 1).double().mean()),
                    "frac_equal_to_rounded_exact": float((got == ref_bf16).double().mean()),
                }
            ref_rows.append(row)
        result["vs_exact_float64"] = ref_rows
    return result


# ---------------------------------------------------------------------------------------------
# the two pipelines


def set_cache_state(state: str, files: list[Path]) -> str:
    if state == "cold":
        return "cold" if drop_caches() else "not-dropped (not root)"
    warm_files(files)
    return "warm"


def run_paper(
    args, layout: Path, work: Path, steps: list[int], env: dict, inputs, rep: int = 0
) -> dict:
    scripts = Path(args.scripts).resolve() / "scripts"
    deltas, cache, out = work / "paper-deltas", work / "paper-svd-cache", work / "paper-relex"
    for p in (deltas, cache, out):
        remove(p)
    py = args.paper_python
    precompute = [
        py,
        str(scripts / "precompute_deltas.py"),
        "--base_model",
        str(layout / "base"),
        "--checkpoint_dir",
        str(layout / "ckpts"),
        "--output_dir",
        str(deltas),
        "--max_checkpoints",
        str(len(steps)),
        "--num_workers",
        str(args.paper_workers),
    ]
    extrapolate = [
        py,
        str(scripts / "svd_extrapolation.py"),
        "--base_model",
        str(layout / "base"),
        "--delta_dir",
        str(deltas),
        "--history_steps",
        str(max(steps)),
        "--rank",
        "1",
        "--fit_method",
        "linear",
        "--mode",
        "extrapolate",
        "--target_steps",
        str(args.target),
        "--output_dir",
        str(out),
        "--svd_cache_dir",
        str(cache),
    ]
    state = set_cache_state(args.cache_state, inputs)
    stages = {}
    for label, cmd in (("precompute_deltas", precompute), ("svd_extrapolation", extrapolate)):
        r = measure(cmd, work / "logs" / f"paper-{label}-{rep}.log", work, env)
        stages[label] = r
        if r["returncode"] != 0:
            r["error_tail"] = tail(r["log"])
            print(f"paper {label} failed (exit {r['returncode']}):\n{r['error_tail']}")
            break
    sizes = {
        "deltas": tree_bytes(deltas),
        "svd_cache": tree_bytes(cache),
        "output": tree_bytes(out),
    }
    ok = all(r["returncode"] == 0 for r in stages.values()) and len(stages) == 2
    total = {
        "ok": ok,
        "cache_state": state,
        "wall_s": sum(r["wall_s"] for r in stages.values()),
        "wall_with_sync_s": sum(r["wall_s"] + r["sync_s"] for r in stages.values()),
        "cpu_s": sum(r.get("cpu_s", 0.0) for r in stages.values()),
        "peak_rss_bytes": max(r.get("peak_rss_bytes", 0) for r in stages.values()),
        "peak_rss_anon_sampled_bytes": max(
            r["peak_rss_anon_sampled_bytes"] for r in stages.values()
        ),
        "fs_written_bytes": sum(r.get("fs_written_bytes", 0) for r in stages.values()),
        "bytes_on_disk": sizes,
        "output_dir": str(out / f"step{args.target}"),
    }
    if not args.keep:  # the 9 GB of fp16 deltas and the cache are not needed for the comparison
        remove(deltas)
        remove(cache)
    return {"stages": stages, "total": total}


def run_relex(
    args, trajectory: Path, work: Path, max_memory: str | None, env, inputs, rep: int = 0
) -> dict:
    label = "default" if max_memory is None else f"max-memory-{max_memory}"
    out = work / f"relex-{label}"
    remove(out)
    cmd = (
        [
            sys.executable,
            "-m",
            "relex_stream",
            "run",
            "--base",
            str(trajectory / "base"),
            "--runs",
            str(trajectory / "runs"),
            "--target",
            str(args.target),
            "--out",
            str(out),
            "--rebuild",
        ]
        + (["--max-memory", max_memory] if max_memory else [])
        + shlex.split(args.relex_args)
    )
    state = set_cache_state(args.cache_state, inputs)
    env, cwd = relex_env(args, env)
    r = measure(cmd, work / "logs" / f"relex-{label}-{rep}.log", cwd, env)
    r |= {"ok": r["returncode"] == 0, "cache_state": state, "max_memory": max_memory or "default"}
    r["wall_with_sync_s"] = r["wall_s"] + r["sync_s"]
    r["bytes_on_disk"] = {
        "out_total": tree_bytes(out),
        "output": tree_bytes(out / f"step-{args.target}"),
    }
    r["output_dir"] = str(out / f"step-{args.target}")
    summary = re.search(r"read: .*", Path(r["log"]).read_text(errors="replace"))
    r["summary_line"] = summary.group(0) if summary else None
    if not r["ok"]:
        r["error_tail"] = tail(r["log"])
        print(f"relex_stream run failed (exit {r['returncode']}):\n{r['error_tail']}")
    return r


# ---------------------------------------------------------------------------------------------


def check_paper_env(args, env: dict) -> None:
    scripts = Path(args.scripts) / "scripts"
    missing = [n for n in SCRIPT_NAMES if not (scripts / n).is_file()]
    if missing:
        sys.exit(f"error: {scripts} lacks {', '.join(missing)} (extract the paper's repo there)")
    probe = "import transformers, accelerate, scipy, tqdm, safetensors, tokenizers, numpy"
    done = subprocess.run([args.paper_python, "-c", probe], capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(
            f"error: {args.paper_python} cannot run the paper's scripts:\n{done.stderr[-800:]}\n"
            "Give --paper-python an interpreter with transformers, accelerate and scipy "
            "(bench/paper_compare.md: a venv layered on .venv)."
        )


def check_disk(work: Path, model: dict | None, args) -> dict:
    """Free space against what the run will write (a rough upper bound)."""
    n = (
        model["float_parameters"]
        if model
        else (args.layers * (9 * args.hidden**2 + 4 * args.hidden) + 2 * args.vocab * args.hidden)
    )
    k = args.steps
    need = {
        "trajectory": 0 if model else (k + 1) * 2 * n,
        "paper_deltas": k * 2 * n,
        "paper_svd_cache": 4 * n,
        "outputs": 2 * 2 * n * (1 + len(args.relex_max_memory)),
        "relex_store": k * 2 * n,  # 'none' codec bound; xor-zstd writes less
    }
    free = shutil.disk_usage(work).free
    info = {"free_bytes": free, "needed_bytes_bound": sum(need.values()), "needed": need}
    if free < sum(need.values()) and not args.no_disk_check:
        sys.exit(
            f"error: {free / GIB:.1f} GiB free under {work}, need up to "
            f"{sum(need.values()) / GIB:.1f} GiB ({need}); --no-disk-check to try anyway"
        )
    return info


def fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / GIB:.2f}G"


def ratio(a, b) -> float | None:
    return a / b if a and b else None


def disk_total(r: dict) -> int | None:
    disk = r.get("bytes_on_disk")
    if not disk:
        return None
    return disk["out_total"] if "out_total" in disk else sum(disk.values())


def print_table(rows: list[tuple[str, dict]], ratios: dict) -> None:
    print()
    print(
        f"{'pipeline':<40}{'wall':>9}{'+sync':>9}{'CPU':>9}{'peak RSS':>11}{'anon RSS':>11}"
        f"{'FS writes':>11}{'on disk':>11}"
    )
    for label, r in rows:
        with_sync = r.get("wall_with_sync_s", r["wall_s"] + r.get("sync_s", 0.0))
        print(
            f"{label:<40}{r['wall_s']:>8.1f}s{with_sync:>8.1f}s{r.get('cpu_s', 0.0):>8.1f}s"
            f"{fmt_bytes(r.get('peak_rss_bytes')):>11}"
            f"{fmt_bytes(r.get('peak_rss_anon_sampled_bytes')):>11}"
            f"{fmt_bytes(r.get('fs_written_bytes')):>11}{fmt_bytes(disk_total(r)):>11}"
        )
    print()
    for key, value in ratios.items():
        print(f"  {key:<46} {value:.2f}x" if value else f"  {key:<46} -")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scripts", required=True, help="scratch copy of weizhepei/RELEX")
    parser.add_argument(
        "--paper-python",
        default=sys.executable,
        help="interpreter for the paper's scripts (transformers, accelerate, scipy)",
    )
    parser.add_argument("--hidden", type=int, default=DEFAULT_SHAPE["hidden"])
    parser.add_argument("--layers", type=int, default=DEFAULT_SHAPE["layers"])
    parser.add_argument("--vocab", type=int, default=DEFAULT_SHAPE["vocab"])
    parser.add_argument("--steps", type=int, default=30, help="K: checkpoints at steps 1..K")
    parser.add_argument(
        "--profile", default="planted", help="synth profile (planted: noise everywhere)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--synth-args", default="", help="more synth flags, passed through (e.g. '--shard-size 2G')"
    )
    parser.add_argument("--target", type=int, default=200, help="target step (both pipelines)")
    parser.add_argument(
        "--paper-workers",
        type=int,
        default=8,
        help="precompute_deltas.py --num_workers (its README: 8)",
    )
    parser.add_argument(
        "--relex-max-memory",
        action="append",
        default=[],
        help="an extra relex_stream run with this --max-memory (repeatable)",
    )
    parser.add_argument("--relex-args", default="", help="more flags for every relex_stream run")
    parser.add_argument(
        "--relex-src",
        help="run `python -m relex_stream` from the package in this directory (PYTHONPATH), e.g. "
        "a `git archive HEAD` snapshot; default: the installed engine",
    )
    parser.add_argument(
        "--cache-state",
        choices=["cold", "warm"],
        default="cold",
        help="page cache before each pipeline: dropped (root) or inputs read in",
    )
    parser.add_argument("--order", choices=["paper-first", "relex-first"], default="paper-first")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run both N times, alternating the order; ratios use each side's fastest run",
    )
    parser.add_argument("--skip-paper", action="store_true")
    parser.add_argument("--skip-relex", action="store_true")
    parser.add_argument(
        "--reference-tensors",
        type=int,
        default=5,
        help="tensors checked against an exact float64 RELEX (0: none)",
    )
    parser.add_argument("--work", default=str(ROOT / "bench" / "out" / "paper_compare"))
    parser.add_argument("--jsonl", default=str(ROOT / "bench" / "out" / "paper_compare.jsonl"))
    parser.add_argument("--keep", action="store_true", help="keep deltas, stores and outputs")
    parser.add_argument(
        "--clean", action="store_true", help="also delete the trajectory and layout at the end"
    )
    parser.add_argument("--no-disk-check", action="store_true")
    args = parser.parse_args()

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = os.environ | OFFLINE_ENV
    if not args.skip_paper:
        check_paper_env(args, env)
    tag = trajectory_tag(args)
    existing = (work / f"traj-{tag}.complete").exists()
    disk = check_disk(
        work, describe_model(work / f"traj-{tag}" / "base") if existing else None, args
    )
    trajectory, traj_record = make_trajectory(args, work)
    model = describe_model(trajectory / "base")
    inputs = model_files(trajectory / "base") + sorted((trajectory / "runs").rglob("*.safetensors"))
    layout = work / "paper-layout"
    steps_map = paper_layout(trajectory, layout, args.paper_python, env)
    steps = list(steps_map)
    spacing = {b - a for a, b in zip(steps, steps[1:], strict=False)}
    common = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "host": {
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "mem_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        },
        "relex_src": str(Path(args.relex_src).resolve()) if args.relex_src else None,
        "relex_stream_head": subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "paper_scripts_sha256": {
            n: hashlib.sha256((Path(args.scripts) / "scripts" / n).read_bytes()).hexdigest()[:16]
            for n in SCRIPT_NAMES
            if (Path(args.scripts) / "scripts" / n).exists()
        },
        "trajectory": traj_record
        | model
        | {
            "K": len(steps),
            "steps": f"{steps[0]}..{steps[-1]}",
            "profile": args.profile,
            "input_bytes": sum(p.stat().st_size for p in inputs),
        },
        "target": args.target,
        # the paper regresses on the list index and puts the target at index
        # (K - 1) + (target - last step): the same line as regression on the step only when
        # the steps are 1 apart
        "index_regression_matches_step": spacing == {1},
    }
    if spacing != {1}:
        print(
            f"warning: steps {steps[:4]}... are not 1 apart: the paper's index regression "
            "extrapolates to a different point than relex_stream's step regression"
        )
    records: list[dict] = []

    def emit(kind: str, payload: dict) -> None:
        record = {"measurement": kind} | common | payload
        records.append(record)
        with open(args.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")

    emit("setup", {"disk": disk})
    print(
        f"trajectory {trajectory}: {model['float_parameters'] / 1e6:.1f}M float parameters, "
        f"K = {len(steps)}, {common['trajectory']['input_bytes'] / GIB:.2f} GiB of input"
    )

    papers: list[dict] = []
    relex_runs: list[dict] = []

    def do_paper(rep: int) -> None:
        paper = run_paper(args, layout, work, steps, env, inputs, rep)
        papers.append(paper)
        for label, r in paper["stages"].items():
            emit(f"paper.{label}", r | {"repeat": rep})
        emit("paper.total", paper["total"] | {"repeat": rep})

    def do_relex(rep: int) -> None:
        for mm in [None, *args.relex_max_memory]:
            r = run_relex(args, trajectory, work, mm, env, inputs, rep)
            relex_runs.append(r | {"repeat": rep})
            emit("relex.run", relex_runs[-1])

    for rep in range(args.repeat):
        order = [do_paper, do_relex] if args.order == "paper-first" else [do_relex, do_paper]
        if rep % 2:  # alternate, so neither side always runs after the other
            order.reverse()
        for run_one in order:
            if run_one is do_paper and args.skip_paper or run_one is do_relex and args.skip_relex:
                continue
            run_one(rep)

    rows: list[tuple[str, dict]] = []
    ratios: dict = {}
    tag_rep = (lambda rep: f" #{rep}") if args.repeat > 1 else (lambda rep: "")
    for rep, paper in enumerate(papers):
        for label, r in paper["stages"].items():
            rows.append((f"paper {label}{tag_rep(rep)}", r))
        rows.append((f"paper total{tag_rep(rep)}", paper["total"]))
    for r in relex_runs:
        rows.append((f"relex_stream run ({r['max_memory']}){tag_rep(r['repeat'])}", r))
    good_papers = [p["total"] for p in papers if p["total"]["ok"]]
    defaults = [r for r in relex_runs if r["max_memory"] == "default" and r["ok"]]
    if good_papers and defaults:
        # fastest run of each side: the least disturbed by other load on a shared machine
        t = min(good_papers, key=lambda r: r["wall_s"])
        default = min(defaults, key=lambda r: r["wall_s"])
        ratios = {
            "wall: paper / relex_stream": ratio(t["wall_s"], default["wall_s"]),
            "wall incl. sync: paper / relex_stream": ratio(
                t["wall_with_sync_s"], default["wall_with_sync_s"]
            ),
            "CPU time (user+sys): paper / relex_stream": ratio(
                t.get("cpu_s"), default.get("cpu_s")
            ),
            "peak RSS (time -v): paper / relex_stream": ratio(
                t["peak_rss_bytes"], default.get("peak_rss_bytes")
            ),
            "peak anon RSS (sampled): paper / relex_stream": ratio(
                t["peak_rss_anon_sampled_bytes"], default["peak_rss_anon_sampled_bytes"]
            ),
            "FS writes: paper / relex_stream": ratio(
                t["fs_written_bytes"], default.get("fs_written_bytes")
            ),
        }
        emit(
            "summary",
            {
                "ratios": ratios,
                "fastest_paper_wall_s": t["wall_s"],
                "fastest_relex_wall_s": default["wall_s"],
                "goal_5x_wall": (ratios["wall: paper / relex_stream"] or 0) >= 5,
                "goal_5x_rss": (ratios["peak RSS (time -v): paper / relex_stream"] or 0) >= 5,
            },
        )
    # the outputs on disk are the last run's of each side
    paper_out = Path(papers[-1]["total"]["output_dir"]) if papers else None
    last_default = [r for r in relex_runs if r["max_memory"] == "default"][-1:]
    relex_out = Path(last_default[0]["output_dir"]) if last_default else None
    if paper_out and relex_out and paper_out.is_dir() and relex_out.is_dir():
        print("comparing the two predictions ...", file=sys.stderr)
        agreement = compare_predictions(
            paper_out, relex_out, trajectory, steps, args.target, args.reference_tensors
        )
        emit("agreement", agreement)
        print(
            f"agreement over {agreement['tensors_compared']} tensors: "
            f"{agreement['frac_equal']:.4%} of elements equal, "
            f"{agreement['frac_within_1ulp']:.4%} within 1 bf16 ulp "
            f"(max {agreement['max_ulps']:.0f}, max |diff| {agreement['max_abs_diff']:.2e}), "
            f"‖paper − relex_stream‖/‖Ŵ − W_0‖ = "
            f"{agreement['rel_fro_diff_all']:.2e}"
        )
        for row in agreement.get("vs_exact_float64", []):
            a, b = row["paper"], row["relex_stream"]
            print(
                f"  vs exact float64, {row['name']}: correctly rounded: paper "
                f"{a['frac_equal_to_rounded_exact']:.4%}, relex_stream "
                f"{b['frac_equal_to_rounded_exact']:.4%}; > 1 ulp off: paper "
                f"{a['frac_beyond_1ulp']:.2e}, relex_stream {b['frac_beyond_1ulp']:.2e}; "
                f"max |err|: paper {a['max_abs_err']:.1e}, relex_stream {b['max_abs_err']:.1e}"
            )
    print_table(rows, ratios)
    print(f"\n{len(records)} records appended to {args.jsonl}; logs in {work / 'logs'}")

    if not args.keep:
        if papers:
            remove(work / "paper-relex")
        for r in relex_runs:
            remove(Path(r["output_dir"]).parent)
    if args.clean:
        remove(layout)
        remove(trajectory)
        remove(work / f"traj-{tag}.complete")


if __name__ == "__main__":
    main()
