"""Helpers to run the relex_stream CLI and inspect its output dirs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from relex_stream.envvars import relex_test_device
from tests.fixtures import AUX_FILES, EMBED, LM_HEAD, ZERO_DELTA, Trajectory
from tests.reference import (
    assert_matches_reference,
    load_model_dir,
    output_dtype,
    reference_from_dirs,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_device() -> str:
    """The device the engine tests run on: RELEX_TEST_DEVICE, 'cpu' (default) or 'cuda'."""
    return relex_test_device()


test_device.__test__ = False  # a helper, not a test (pytest collects test_* it finds imported)


def run_cli(*args: object, expect_rc: int | None = 0) -> subprocess.CompletedProcess[str]:
    """Run `python -m relex_stream ARGS`; assert the exit code unless expect_rc is None.

    The child sees no GPU unless the tests run on CUDA (RELEX_TEST_DEVICE=cuda).
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    if test_device() == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "relex_stream", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300)
    if expect_rc is not None:
        assert proc.returncode == expect_rc, (
            f"exit code {proc.returncode} (expected {expect_rc}) for {' '.join(cmd[3:])}\n"
            f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
        )
    return proc


def fmt_targets(targets: Sequence[float | str]) -> str:
    """Comma-join targets for --target."""
    return ",".join(str(t) for t in targets)


def run_traj(
    traj: Trajectory,
    out: Path,
    targets: Sequence[float | str],
    *extra: object,
    quiet: bool = True,
    expect_rc: int | None = 0,
) -> subprocess.CompletedProcess[str]:
    """Run `relex_stream run --base --runs` for a built trajectory, on the test device."""
    args: list[object] = ["run", "--base", traj.base, "--runs", traj.runs]
    args += ["--target", fmt_targets(targets), "--out", out, "--device", test_device(), *extra]
    if quiet:
        args.append("--quiet")
    return run_cli(*args, expect_rc=expect_rc)


def step_dir(out: Path, target: float) -> Path:
    """OUT/step-T with T printed as an integer when integral."""
    t = float(target)
    return out / f"step-{int(t)}" if t.is_integer() else out / f"step-{t}"


def assert_mirrors_base(out_dir: Path, base_dir: Path, dtype_flag: str | None = None) -> None:
    """Output dir has the base's shard names, weight_map, config (dtype-adjusted) and aux files."""
    assert out_dir.is_dir(), f"{out_dir} missing"
    base_files = sorted(p.name for p in base_dir.glob("*.safetensors"))
    out_files = sorted(p.name for p in out_dir.glob("*.safetensors"))
    assert out_files == base_files, f"shard files {out_files} != base {base_files}"
    base_index = base_dir / "model.safetensors.index.json"
    if base_index.exists():
        out_index = out_dir / "model.safetensors.index.json"
        assert out_index.exists(), "sharded base but no model.safetensors.index.json in output"
        want = json.loads(base_index.read_text())["weight_map"]
        got = json.loads(out_index.read_text())["weight_map"]
        assert got == want, "output weight_map differs from the base weight_map"
        from safetensors import safe_open

        for fname in out_files:
            with safe_open(str(out_dir / fname), "pt") as f:
                keys = set(f.keys())
            assert keys == {k for k, v in want.items() if v == fname}, f"{fname} holds {keys}"
    base_cfg = json.loads((base_dir / "config.json").read_text())
    out_cfg = json.loads((out_dir / "config.json").read_text())
    if dtype_flag not in (None, "auto"):
        assert out_cfg.get("torch_dtype") == dtype_flag, f"config torch_dtype {out_cfg}"
        if "dtype" in out_cfg:
            assert out_cfg["dtype"] == dtype_flag, f"config dtype {out_cfg['dtype']}"
        for key in ("torch_dtype", "dtype"):
            base_cfg.pop(key, None)
            out_cfg.pop(key, None)
    assert out_cfg == base_cfg, "config.json not copied from the base"
    for fname in AUX_FILES:
        src = base_dir / fname
        if src.exists():
            dst = out_dir / fname
            assert dst.exists(), f"{fname} not copied to the output"
            assert dst.read_bytes() == src.read_bytes(), f"{fname} differs from the base"


def check_against_reference(
    traj: Trajectory,
    out: Path,
    targets: Sequence[float],
    dtype_flag: str | None = None,
    steps: Sequence[int] | None = None,
) -> dict[float, dict[str, torch.Tensor]]:
    """Compare OUT/step-T (each target) with the reference fitted on `steps`; return outputs."""
    used = {s: p for s, p in traj.ckpt_dirs.items() if steps is None or s in steps}
    assert steps is None or sorted(used) == sorted(steps), "test bug: unknown steps"
    ref = reference_from_dirs(traj.base, used, targets)
    base = load_model_dir(traj.base)
    tied = traj.spec.tied
    outs: dict[float, dict[str, torch.Tensor]] = {}
    for tgt in targets:
        d = step_dir(out, tgt)
        assert_mirrors_base(d, traj.base, dtype_flag)
        got = load_model_dir(d)
        assert_matches_reference(
            got, ref[float(tgt)], base, dtype_flag, skip={LM_HEAD} if tied else ()
        )
        if tied and LM_HEAD in base:
            assert torch.equal(got[LM_HEAD], got[EMBED]), "tied: output lm_head != embed_tokens"
        if ZERO_DELTA in base and traj.spec.zero_delta:
            want = base[ZERO_DELTA].to(output_dtype(base[ZERO_DELTA], dtype_flag))
            assert torch.equal(got[ZERO_DELTA], want), "zero-delta tensor does not equal the base"
        outs[float(tgt)] = got
    return outs


def group_dir(store: Path, kind: str, tensor: str) -> Path:
    """STORE/gen<G>/<kind>/g<i>: the directory of the group holding `tensor` ('rows', 'base')."""
    from relex_stream.store import TrajectoryStore

    with TrajectoryStore.open(store) as opened:
        group = opened.group_of(tensor)
        generation = opened.current.generation
    return store / f"gen{generation}" / kind / f"g{group.index}"


def make_deep_dir(root: Path, depth: int) -> Path:
    """root/a/a/.../a, `depth` levels below root, made one level at a time (os.makedirs and
    Path.mkdir recurse once per level); returns the deepest folder."""
    leaf = str(root)
    os.makedirs(leaf, exist_ok=True)
    for _ in range(depth):
        leaf += "/a"
        os.mkdir(leaf)
    return Path(leaf)


def remove_deep_dir(root: Path) -> None:
    """Remove what make_deep_dir made (files in its folders too) without recursion: pytest's
    own clean-up of old temporary folders recurses, and would fail on it in a later session."""
    pending, folders = [str(root)], []
    while pending:
        folder = pending.pop()
        folders.append(folder)
        with os.scandir(folder) as found:
            for entry in found:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                else:
                    os.unlink(entry.path)
    for folder in reversed(folders):
        os.rmdir(folder)


class OsWithRename:
    """The os module, except that rename calls `rename(src, dst, real_rename)`: to fail or to
    raise a signal at one rename of a module that imports os (monkeypatch its `os`)."""

    def __init__(self, rename):
        self._rename = rename

    def __getattr__(self, attribute: str):
        return getattr(os, attribute)

    def rename(self, src, dst):
        return self._rename(src, dst, os.rename)
