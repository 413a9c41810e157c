"""Store compression study (issue 3): size and speed of lossless row transforms × zarr codecs.

Generates a synthetic bf16 trajectory in memory (relex_stream.synth.simulate: 'drift' is the
realistic fp32-master profile, 'planted' the old one, 'walk' a random walk), flattens every
tensor into one (K, n) array of uint16 bits plus the base row, and for each transform × codec:

  * encodes column blocks with relex_stream.row_codec (timed alone: "xform enc/dec"),
  * writes them into a zarr v3 array (K, n), chunks (1, ROW_CHUNK) with the real zarr codecs
    (default zarr threading: async concurrency 10, thread pool), the way store.write_chunk does,
  * measures the bytes on disk (chunk files + metadata),
  * reads the column blocks back into one reusable buffer the way store.read_rows does
    (get_basic_selection(..., out=...); page cache warm unless --cold) and decodes them in
    place, checking that every bit comes back,
  * times the codec alone on one thread (numcodecs, blosc nthreads 1) on a sample of chunks.

MB/s are of raw bf16 row bytes (K·n·2), so all columns compare directly. The reference sizes:
raw bf16 rows (what the transforms and codecs start from) and fp16 delta files (the paper's
scripts torch.save fp16 W_t − W_0 per checkpoint: 2 bytes per element, uncompressed; their
zstd size is shown too).

    PYTHONPATH=. python bench/compress_study.py --params 24M --steps 1-30 --profile drift
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numcodecs
import numpy as np
import torch
import zarr
from bench_run import drop_caches  # bench/ is on sys.path when run as a script
from numcodecs import blosc
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
from zarr.core.buffer.cpu import NDBuffer

from relex_stream import row_codec
from relex_stream.synth import (
    _base_and_directions,
    _bf16_exact,
    qwen2_config,
    qwen2_shapes,
    simulate,
)
from relex_stream.units import parse_bytes, parse_steps

ROW_CHUNK = (1 << 20) // 2  # store.row_chunk_cols for bf16: 1 MiB of one row
BLOCK_CHUNKS = 4  # column chunks per write/read call (the engine reads ranges of several chunks)

TRANSFORMS = [("none", "xor"), ("prev", "xor"), ("base", "xor"), ("prev", "sub"), ("base", "sub")]


def codecs() -> dict[str, tuple[list, object]]:
    """label -> (zarr compressors, numcodecs equivalent for the single-thread codec timing)."""

    def blosc_pair(cname: str, clevel: int, shuffle: str) -> tuple[list, object]:
        ids = {
            "noshuffle": blosc.NOSHUFFLE,
            "shuffle": blosc.SHUFFLE,
            "bitshuffle": blosc.BITSHUFFLE,
        }
        return (
            [BloscCodec(cname=cname, clevel=clevel, shuffle=shuffle)],
            numcodecs.Blosc(cname=cname, clevel=clevel, shuffle=ids[shuffle]),
        )

    from zarr.codecs.numcodecs import Shuffle, Zstd

    return {
        "uncompressed": ([], None),
        "zstd-1": ([ZstdCodec(level=1)], numcodecs.Zstd(level=1)),
        "zstd-1+crc32c": ([ZstdCodec(level=1), Crc32cCodec()], "zstd-1+crc32c"),
        "zstd-3": ([ZstdCodec(level=3)], numcodecs.Zstd(level=3)),
        "shuffle+zstd-1": ([Shuffle(elementsize=2), Zstd(level=1)], "shuffle+zstd-1"),
        "blosc-zstd-1 noshuffle": blosc_pair("zstd", 1, "noshuffle"),
        "blosc-zstd-1 shuffle": blosc_pair("zstd", 1, "shuffle"),
        "blosc-zstd-1 bitshuffle": blosc_pair("zstd", 1, "bitshuffle"),
        "blosc-zstd-3 bitshuffle": blosc_pair("zstd", 3, "bitshuffle"),
        "blosc-lz4-5 noshuffle": blosc_pair("lz4", 5, "noshuffle"),
        "blosc-lz4-5 shuffle": blosc_pair("lz4", 5, "shuffle"),
        "blosc-lz4-5 bitshuffle": blosc_pair("lz4", 5, "bitshuffle"),
    }


def shapes_for(params: int) -> dict[str, tuple[int, ...]]:
    """A Qwen2 layout of about `params` elements (hidden 512, vocab 8192, as many layers as fit)."""
    hidden, vocab = 512, 8192
    per_layer = sum(
        int(np.prod(s))
        for n, s in qwen2_shapes(qwen2_config(hidden, 1, vocab, False)).items()
        if n.startswith("model.layers.0.")
    )
    layers = max(1, round((params - 2 * vocab * hidden) / per_layer))
    return qwen2_shapes(qwen2_config(hidden, layers, vocab, False))


def trajectory(profile: str, params: int, steps: list[int], seed: int, lr: float | None):
    """(base (n,) uint16, rows (K, n) uint16, seconds per generated checkpoint)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    shapes = shapes_for(params)
    base, directions = _base_and_directions(shapes, generator)
    base_bits = torch.cat([b.to(torch.bfloat16).flatten() for b in base.values()])
    if profile != "planted":
        base = {name: _bf16_exact(b) for name, b in base.items()}
    n = base_bits.numel()
    rows = np.empty((len(steps), n), dtype=np.uint16)
    start = time.perf_counter()
    for k, (_, tensors) in enumerate(simulate(base, directions, steps, generator, profile, lr=lr)):
        flat = torch.cat([t.flatten() for t in tensors.values()])
        rows[k] = flat.view(torch.int16).numpy().view(np.uint16)
    per_ckpt = (time.perf_counter() - start) / len(steps)
    return base_bits.view(torch.int16).numpy().view(np.uint16).copy(), rows, per_ckpt


def change_stats(base: np.ndarray, rows: np.ndarray) -> dict[str, float]:
    ever = np.zeros(rows.shape[1], dtype=bool)
    prev = base
    unchanged = []
    for row in rows:
        diff = row != prev
        unchanged.append(1.0 - diff.mean())
        ever |= row != base
        prev = row
    return {
        "never_changed": float(1.0 - ever.mean()),
        "unchanged_consecutive_mean": float(np.mean(unchanged[1:])),
        "unchanged_consecutive_min": float(np.min(unchanged[1:])),
        "unchanged_vs_base_last": float(1.0 - (rows[-1] != base).mean()),
    }


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def dir_allocated(path: Path) -> tuple[int, int]:
    """(bytes the file system allocates, number of files)."""
    files = [f for f in path.rglob("*") if f.is_file()]
    return sum(f.stat().st_blocks * 512 for f in files), len(files)


def blocks(n: int):
    width = ROW_CHUNK * BLOCK_CHUNKS
    for start in range(0, n, width):
        yield start, min(n, start + width)


def run_config(tmp: Path, base, rows, mode, op, compressors, cold: bool, reads: int) -> dict:
    k, n = rows.shape
    path = tmp / "store.zarr"
    if path.exists():
        shutil.rmtree(path)
    array = zarr.create_array(
        store=str(path),
        shape=(k, n),
        chunks=(1, ROW_CHUNK),
        dtype=np.uint16,
        compressors=compressors,
        fill_value=0,
    )
    t_xenc = t_write = 0.0
    arena = np.empty((k, ROW_CHUNK * BLOCK_CHUNKS), dtype=np.uint16)
    for start, stop in blocks(n):
        t0 = time.perf_counter()
        codes = row_codec.encode(
            rows[:, start:stop], base[start:stop], mode, op, out=arena[:, : stop - start]
        )
        t1 = time.perf_counter()
        array[:, start:stop] = codes
        t2 = time.perf_counter()
        t_xenc += t1 - t0
        t_write += t2 - t1
    size = dir_bytes(path)
    allocated, n_files = dir_allocated(path)
    best = None
    exact = True
    for attempt in range(reads):  # best of `reads`: the machine is shared and noisy
        if cold:
            drop_caches()
        array = zarr.open_array(str(path), mode="r")
        t_xdec = t_read = 0.0
        for start, stop in blocks(n):
            t0 = time.perf_counter()
            codes = arena[:, : stop - start]  # as store.read_rows: into the reader's arena
            # a slice of rows: zarr 3.1's orthogonal selection with a list of row ids is ~20x
            # slower (33 vs 650-830 MB/s here)
            array.get_basic_selection(
                (slice(0, k), slice(start, stop)), out=NDBuffer.from_numpy_array(codes)
            )
            t1 = time.perf_counter()
            back = row_codec.decode(codes, base[start:stop], mode, op, out=codes)
            t2 = time.perf_counter()
            t_read += t1 - t0
            t_xdec += t2 - t1
            if attempt == 0:
                exact &= bool(np.array_equal(back, rows[:, start:stop]))
        if best is None or t_read + t_xdec < best[0] + best[1]:
            best = (t_read, t_xdec)
    return {
        "bytes": size,
        "allocated": allocated,
        "files": n_files,
        "t_xform_enc": t_xenc,
        "t_write": t_write,
        "t_read": best[0],
        "t_xform_dec": best[1],
        "exact": exact,
    }


def codec_single_thread(codec, chunks: list[np.ndarray], repeats: int = 3) -> tuple[float, float]:
    """Best-of-`repeats` seconds to encode and decode `chunks` with the bare codec, one thread."""
    times = [_codec_once(codec, chunks) for _ in range(repeats)]
    return min(t[0] for t in times), min(t[1] for t in times)


def _codec_once(codec, chunks: list[np.ndarray]) -> tuple[float, float]:
    if codec is None:
        t0 = time.perf_counter()
        encoded = [c.tobytes() for c in chunks]
        t1 = time.perf_counter()
        for e in encoded:
            np.frombuffer(e, dtype=np.uint16).copy()
        return t1 - t0, time.perf_counter() - t1
    if codec == "zstd-1+crc32c":
        zstd, crc = numcodecs.Zstd(level=1), numcodecs.CRC32C()
        t0 = time.perf_counter()
        encoded = [crc.encode(zstd.encode(c)) for c in chunks]
        t1 = time.perf_counter()
        for e in encoded:
            zstd.decode(crc.decode(e))
        return t1 - t0, time.perf_counter() - t1
    if codec == "shuffle+zstd-1":
        shuffle, zstd = numcodecs.Shuffle(elementsize=2), numcodecs.Zstd(level=1)
        t0 = time.perf_counter()
        encoded = [zstd.encode(shuffle.encode(c)) for c in chunks]
        t1 = time.perf_counter()
        for e in encoded:
            shuffle.decode(zstd.decode(e))
        return t1 - t0, time.perf_counter() - t1
    t0 = time.perf_counter()
    encoded = [codec.encode(c) for c in chunks]
    t1 = time.perf_counter()
    for e in encoded:
        codec.decode(e)
    return t1 - t0, time.perf_counter() - t1


def fp16_delta_reference(tmp: Path, base: np.ndarray, rows: np.ndarray) -> dict[str, int]:
    """Bytes of fp16 W_t − W_0 per checkpoint: raw (torch.save) and through zarr zstd-3."""
    k, n = rows.shape
    base_f = torch.from_numpy(base.view(np.int16)).view(torch.bfloat16).float()
    out = {"fp16_raw": 2 * k * n}
    for label, compressors in [
        ("fp16_zstd3", [ZstdCodec(level=3)]),
        ("fp16_blosc_zstd1_bitshuffle", [BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle")]),
    ]:
        path = tmp / "fp16.zarr"
        if path.exists():
            shutil.rmtree(path)
        array = zarr.create_array(
            store=str(path),
            shape=(k, n),
            chunks=(1, ROW_CHUNK),
            dtype=np.float16,
            compressors=compressors,
            fill_value=0,
        )
        for start, stop in blocks(n):
            w = torch.from_numpy(rows[:, start:stop].view(np.int16)).view(torch.bfloat16).float()
            array[:, start:stop] = (w - base_f[start:stop]).half().numpy()
        out[label] = dir_bytes(path)
    shutil.rmtree(tmp / "fp16.zarr")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="drift", choices=["planted", "drift", "walk"])
    p.add_argument("--params", default="24M", help="about this many elements (default 24M)")
    p.add_argument("--steps", default="1-30", help="saved steps (default 1-30: consecutive)")
    p.add_argument("--lr", type=float, default=None, help="synth lr (default: the profile's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--codecs", default=None, help="comma list of codec labels (default all)")
    p.add_argument("--transforms", default=None, help="comma list like none-xor,prev-xor")
    p.add_argument("--cold", action="store_true", help="drop the page cache before each read")
    p.add_argument("--reads", type=int, default=2, help="read passes per config; best counts")
    p.add_argument("--sample-chunks", type=int, default=96, help="chunks for the 1-thread timing")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--tmp", default=None, help="directory for the temporary stores")
    p.add_argument("--chunk-bytes", default="1M", help="raw bytes of one row chunk (default 1M)")
    args = p.parse_args(argv)
    global ROW_CHUNK
    ROW_CHUNK = parse_bytes(args.chunk_bytes) // 2

    torch.set_num_threads(2)
    warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3")
    steps = parse_steps(args.steps)
    params = parse_bytes(args.params)
    all_codecs = codecs()
    chosen = args.codecs.split(",") if args.codecs else list(all_codecs)
    transforms = (
        [tuple(t.split("-")) for t in args.transforms.split(",")] if args.transforms else TRANSFORMS
    )

    base, rows, per_ckpt = trajectory(args.profile, params, steps, args.seed, args.lr)
    k, n = rows.shape
    raw = rows.nbytes
    stats = change_stats(base, rows)
    print(
        f"# chunks (1, {ROW_CHUNK}): {2 * ROW_CHUNK / 2**20:g} MiB of one row; "
        f"column blocks of {BLOCK_CHUNKS} chunks per zarr call"
    )
    print(
        f"# profile {args.profile}, steps {args.steps} (K={k}), n={n:,} elements, "
        f"raw rows {raw / 2**20:.0f} MiB, generated in {per_ckpt:.2f} s/checkpoint"
    )
    print("# change stats: " + json.dumps({key: round(v, 5) for key, v in stats.items()}))

    tmp = Path(tempfile.mkdtemp(prefix="compress_study_", dir=args.tmp))
    results = {
        "profile": args.profile,
        "steps": args.steps,
        "K": k,
        "n": n,
        "raw_bytes": raw,
        "chunk_cols": ROW_CHUNK,
        "stats": stats,
        "gen_s_per_ckpt": per_ckpt,
        "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__,
        "rows": [],
    }
    try:
        ref = fp16_delta_reference(tmp, base, rows)
        results["fp16"] = ref
        print(
            f"# fp16 delta files: raw {ref['fp16_raw'] / raw:.3f} of bf16 rows; zstd-3 "
            f"{ref['fp16_zstd3'] / raw:.4f}; blosc-zstd-1 bitshuffle "
            f"{ref['fp16_blosc_zstd1_bitshuffle'] / raw:.4f}"
        )
        rng = np.random.default_rng(0)
        n_chunks = -(-n // ROW_CHUNK)
        picks = [
            (int(rng.integers(k)), int(rng.integers(n_chunks - 1)))
            for _ in range(args.sample_chunks)
        ]
        mb = raw / 1e6
        header = (
            "| transform | codec | size / bf16 rows | size / fp16 deltas |"
            " size / fp16 zstd-3 | allocated / bf16 rows | xform enc+dec s |"
            " write MB/s | read MB/s | 1-thread codec enc MB/s | 1-thread codec dec MB/s |"
            " exact |"
        )
        print(header)
        print("|---" * 12 + "|")
        for mode, op in transforms:
            tname = "none" if mode == "none" else f"{op}-{mode}"
            sample = []
            for row, chunk in picks:
                start = chunk * ROW_CHUNK
                ref_row = (base if row == 0 else rows[row - 1]) if mode == "prev" else base
                sample.append(
                    row_codec.encode(
                        rows[row : row + 1, start : start + ROW_CHUNK],
                        ref_row[start : start + ROW_CHUNK],
                        mode,
                        op,
                    )[0]
                )
            sample_mb = sum(c.nbytes for c in sample) / 1e6
            for label in chosen:
                compressors, bare = all_codecs[label]
                r = run_config(tmp, base, rows, mode, op, compressors, args.cold, args.reads)
                blosc.set_nthreads(1)
                enc1, dec1 = codec_single_thread(bare, sample)
                blosc.set_nthreads(os.cpu_count() or 1)
                row = {
                    "transform": tname,
                    "codec": label,
                    **r,
                    "frac_rows": r["bytes"] / raw,
                    "frac_fp16": r["bytes"] / ref["fp16_raw"],
                    "frac_fp16_zstd3": r["bytes"] / ref["fp16_zstd3"],
                    "write_MBps": mb / (r["t_write"] + r["t_xform_enc"]),
                    "read_MBps": mb / (r["t_read"] + r["t_xform_dec"]),
                    "xform_enc_MBps": mb / r["t_xform_enc"] if r["t_xform_enc"] else None,
                    "xform_dec_MBps": mb / r["t_xform_dec"] if r["t_xform_dec"] else None,
                    "codec1_enc_MBps": sample_mb / enc1,
                    "codec1_dec_MBps": sample_mb / dec1,
                }
                results["rows"].append(row)
                print(
                    f"| {tname} | {label} | {row['frac_rows']:.4f} | {row['frac_fp16']:.4f} | "
                    f"{row['frac_fp16_zstd3']:.3f} | {r['allocated'] / raw:.4f} | "
                    f"{r['t_xform_enc']:.2f}+{r['t_xform_dec']:.2f} | {row['write_MBps']:.0f} | "
                    f"{row['read_MBps']:.0f} | {row['codec1_enc_MBps']:.0f} | "
                    f"{row['codec1_dec_MBps']:.0f} | {'yes' if r['exact'] else 'NO'} |",
                    flush=True,
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if all(r["exact"] for r in results["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
