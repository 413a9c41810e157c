"""Chunks kept as raw blocks are built where the store file's bytes are staged: same bytes.

The store writer computes an incompressible chunk's codes straight into the staging buffer of
its shard file (shards.ShardWriter.write_raw_chunk). Here the same runs are made with every
chunk sent through the general path instead (zstd tried, then a raw frame of the codes built
apart and copied), and every shard file must come out byte for byte the same.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from relex_stream import shards
from relex_stream.cli import main as cli_main

from .fixtures import Spec, build_trajectory
from .helpers import check_against_reference

TARGET = 80


def _shard_bytes(store: Path) -> dict[str, bytes]:
    files = [p for pattern in ("gen*/rows/**/*", "gen*/base/**/*") for p in store.glob(pattern)]
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(files) if p.is_file()}


def _run(traj, out: Path, *flags: str) -> dict[str, bytes]:
    args = ["run", "--base", traj.base, "--runs", traj.runs, "--target", TARGET, "--out", out,
            "--device", "cpu", "--quiet", *flags]
    assert cli_main([str(a) for a in args]) == 0
    return _shard_bytes(out / "trajectory.zarr")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16],
                         ids=["bf16", "fp32", "fp16"])
@pytest.mark.parametrize("codec", ["xor-zstd", "zstd", "none"])
def test_raw_chunks_built_in_place_are_the_general_path_bytes(tmp_path, monkeypatch, dtype,
                                                              codec):
    # 65536 x 16 embedding and lm_head: two 1 MiB chunks per row in bf16 (large enough to go
    # direct), and small tensors packed in 4096-column chunks (through the page cache)
    traj = build_trajectory(tmp_path / "traj", Spec(vocab=1 << 16, dtype=dtype,
                                                    steps=(10, 20, 30)))
    flags = ("--store-codec", codec) if codec != "xor-zstd" else ()
    built_in_place = []
    real = shards.ShardWriter.write_raw_chunk

    def counting(self, *args):
        built_in_place.append(args[1])
        return real(self, *args)

    monkeypatch.setattr(shards.ShardWriter, "write_raw_chunk", counting)
    in_place = _run(traj, tmp_path / "in-place", *flags)
    check_against_reference(traj, tmp_path / "in-place", [TARGET])
    assert max(built_in_place) >= 1 << 20, "no full-size chunk took the in-place path"

    monkeypatch.setattr(shards.ChunkEncoder, "tries_zstd", lambda self: True)
    general = _run(traj, tmp_path / "general", *flags)
    assert in_place.keys() == general.keys() and in_place
    changed = [name for name in in_place if in_place[name] != general[name]]
    assert not changed, f"shard files differ between the two paths: {changed[:5]}"

    rerun = tmp_path / "from-store"
    args = ["run", "--cache", tmp_path / "in-place" / "trajectory.zarr", "--target", TARGET,
            "--out", rerun, "--device", "cpu", "--quiet"]
    assert cli_main([str(a) for a in args]) == 0
    check_against_reference(traj, rerun, [TARGET])
