"""Store compression study (issues 3 and 12): size and speed of lossless row transforms × codecs.

Generates a synthetic trajectory in memory, exactly what `relex_stream synth` writes
(relex_stream.synth.iter_tensors: 'drift' is the realistic fp32-master profile, 'planted' the old
one, 'walk' a random walk), flattens every tensor into one (K, n) array of words (uint16 for
bf16/fp16, uint32 for fp32) plus the base row in the rows' dtype, then one of three studies:

--study zarr (default; bf16 only, issue 3), for each transform × codec:
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

--study chunks (any dtype, issue 12): for each transform/codec candidate, per column block of
  one inner chunk (--chunk-bytes of one row), the row-wise transform on (K, C), then per row
  the per-chunk bytes (byte shuffle or none) and the bare codec, each chunk alone, one thread;
  decoded back into one reused (K, C) buffer and compared bit for bit. Sizes are exact; MB/s
  are raw row bytes per second of each phase (best of --repeats passes over all chunks).

--study cutoff: zstd's ratio and one-thread speed on 1 MiB chunks from incompressible
  (uniform random bytes) to compressible, against a plain copy: when to store a chunk raw.

    PYTHONPATH=. python bench/compress_study.py --params 24M --steps 1-30 --profile drift
    PYTHONPATH=. python bench/compress_study.py --study chunks --save-dtype float32 \\
        --base-dtype bfloat16 --params 8M --steps "1-10;10-100:10" --lr 2e-7,1e-6,5e-6
"""

from __future__ import annotations

import argparse
import itertools
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
from relex_stream.synth import DTYPES, iter_tensors, make_spec, qwen2_config, qwen2_shapes
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


def layers_for(params: int, hidden: int = 512, vocab: int = 8192) -> int:
    """Decoder layers of a Qwen2 layout (hidden 512, vocab 8192) of about `params` elements."""
    per_layer = sum(
        int(np.prod(s))
        for n, s in qwen2_shapes(qwen2_config(hidden, 1, vocab, False)).items()
        if n.startswith("model.layers.0.")
    )
    return max(1, round((params - 2 * vocab * hidden) / per_layer))


WORDS = {"bfloat16": np.uint16, "float16": np.uint16, "float32": np.uint32}


def bits(t: torch.Tensor) -> np.ndarray:
    """A flat tensor's bits as unsigned words (no copy)."""
    return t.contiguous().view(torch.uint8).numpy().view(WORDS[str(t.dtype).split(".")[1]])


def trajectory(
    profile: str,
    params: int,
    steps: list[int],
    seed: int,
    lr: float | None,
    save_dtype: str = "bfloat16",
    base_dtype: str | None = None,
    every_step: bool = False,
):
    """(base (n,) words, rows (K, n) words, seconds per generated checkpoint): what synth writes.

    The base comes in the rows' dtype (bf16 -> fp32 is exact): the reference of row 0.
    """
    spec = make_spec(
        steps, seed=seed, hidden=512, layers=layers_for(params), vocab=8192, profile=profile,
        lr=lr, every_step=every_step, save_dtype=save_dtype, base_dtype=base_dtype,
    )  # fmt: skip
    save = DTYPES[save_dtype][0]
    n = sum(int(np.prod(s)) for s in qwen2_shapes(spec.config).values())
    rows = np.empty((len(set(steps)), n), dtype=WORDS[save_dtype])
    base = np.empty(n, dtype=WORDS[save_dtype])
    start = time.perf_counter()
    for k, (step, tensors) in enumerate(iter_tensors(spec, steps), start=-1):
        target = base if step is None else rows[k]
        offset = 0
        for t in tensors.values():
            flat = bits(t.to(save).flatten())
            target[offset : offset + flat.size] = flat
            offset += flat.size
    per_ckpt = (time.perf_counter() - start) / (len(rows) + 1)
    return base, rows, per_ckpt


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


# --------------------------------------------------------------------------- per-chunk (issue 12)

# Row transforms for the per-chunk study: (row-wise mode, op, byte shuffle per chunk). The names
# the store can record are row_codec.TRANSFORMS; the rest exist here only, to compare against.
CHUNK_TRANSFORMS = {
    "none": ("none", "xor", False),
    "xor-prev": ("prev", "xor", False),
    "xor-prev+shuffle": ("prev", "xor", True),
    "sub-prev+zigzag": ("prev", "sub", False),
    "sub-prev+zigzag+shuffle": ("prev", "sub", True),
    "xor-base+shuffle": ("base", "xor", True),
    "sub-base+zigzag+shuffle": ("base", "sub", True),
}
CANDIDATES = (
    "none/zstd-1,xor-prev/zstd-1,xor-prev/zstd-3,xor-prev+shuffle/zstd-1,xor-prev+shuffle/zstd-3,"
    "sub-prev+zigzag/zstd-1,sub-prev+zigzag+shuffle/zstd-1,sub-prev+zigzag+shuffle/zstd-3,"
    "xor-prev/blosc-zstd-1 bitshuffle,sub-prev+zigzag/blosc-zstd-1 bitshuffle,"
    "sub-prev+zigzag/blosc-zstd-1 shuffle,sub-prev+zigzag/blosc-lz4-5 bitshuffle,"
    "xor-base+shuffle/zstd-1,sub-base+zigzag+shuffle/zstd-1"
)


def chunk_codec(label: str):
    """A bare numcodecs codec, one thread (blosc: set_nthreads(1) by the caller)."""
    if label.startswith("zstd-"):
        return numcodecs.Zstd(level=int(label.split("-", 1)[1]))
    name, shuffle = label.removeprefix("blosc-").split(" ")
    cname, level = name.split("-")
    ids = {"noshuffle": blosc.NOSHUFFLE, "shuffle": blosc.SHUFFLE, "bitshuffle": blosc.BITSHUFFLE}
    return numcodecs.Blosc(cname=cname, clevel=int(level), shuffle=ids[shuffle])


class Clock:
    """Seconds per named phase, summed over calls."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}

    def lap(self, phase: str, since: float) -> float:
        now = time.perf_counter()
        self.t[phase] = self.t.get(phase, 0.0) + now - since
        return now


def chunk_pass(base, rows, transform, codec, chunk: int, clock: Clock) -> tuple[int, bool]:
    """Encode every (row, inner chunk) as the store would, decode it back: (bytes, exact).

    Per column block of `chunk` words: the row-wise transform on (K, chunk), then per row
    chunk_to_bytes and the codec; decoding reverses it into one reused (K, chunk) buffer.
    """
    mode, op, shuffle = CHUNK_TRANSFORMS[transform]
    k = rows.shape[0]
    codes = np.empty((k, chunk), dtype=rows.dtype)
    planes = np.empty(chunk * rows.itemsize, dtype=np.uint8)
    size, exact = 0, True
    for start in range(0, rows.shape[1], chunk):
        stop = min(rows.shape[1], start + chunk)
        block, work = rows[:, start:stop], codes[:, : stop - start]
        t = time.perf_counter()
        row_codec.encode(block, base[start:stop], mode, op, out=work)
        t = clock.lap("enc rows", t)
        buffers = []
        for row in work:
            buffers.append(row_codec.shuffle_bytes(row) if shuffle else row)  # blosc: words
        t = clock.lap("enc bytes", t)
        payloads = [codec.encode(b) for b in buffers]
        t = clock.lap("enc codec", t)
        size += sum(len(p) for p in payloads)
        for row, payload in zip(work, payloads, strict=True):
            target = planes[: row.nbytes] if shuffle else row
            t = time.perf_counter()
            codec.decode(payload, out=target)
            t = clock.lap("dec codec", t)
            if shuffle:
                row_codec.unshuffle_bytes(target, row)
            t = clock.lap("dec bytes", t)
        row_codec.decode(work, base[start:stop], mode, op, out=work)
        clock.lap("dec rows", t)
        exact &= bool(np.array_equal(work, block))
    return size, exact


def order0_entropy(words: np.ndarray, sample: int = 1 << 23) -> float:
    """Shannon entropy (bits per word) of the word values, on up to `sample` words."""
    flat = words.reshape(-1)[:sample]
    _, counts = np.unique(flat, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


EXPONENT = {"float32": (23, 0xFF), "bfloat16": (7, 0xFF), "float16": (10, 0x1F)}  # shift, mask


def conditional_entropy(codes: np.ndarray, previous: np.ndarray, dtype: str) -> float:
    """Entropy (bits per word) of the codes given the exponent of the previous row's word.

    What a coder that knows each weight's binade could reach (sampled like order0_entropy).
    """
    shift, mask = EXPONENT[dtype]
    flat, context = codes.reshape(-1)[: 1 << 23], previous.reshape(-1)[: 1 << 23]
    exponent = (context >> shift) & mask
    total = 0.0
    for value in np.unique(exponent):
        picked = flat[exponent == value]
        total += picked.size * order0_entropy(picked)
    return total / flat.size


def chunk_study(args, steps_list: list[str], lrs: list[float | None]) -> list[dict]:
    """Per-chunk grid: every candidate on every (steps, lr) trajectory; prints the tables."""
    blosc.set_nthreads(1)
    candidates = [c.split("/") for c in (args.candidates or CANDIDATES).split(",")]
    results = []
    for steps_text, lr in itertools.product(steps_list, lrs):
        base, rows, per_ckpt = trajectory(
            args.profile, parse_bytes(args.params), parse_steps(steps_text), args.seed, lr,
            args.save_dtype, args.base_dtype, args.every_step,
        )  # fmt: skip
        width = 8 * rows.itemsize
        chunk = parse_bytes(args.chunk_bytes) // rows.itemsize
        sub = row_codec.encode(rows, base, "prev", "sub")
        previous = np.concatenate([base[None], rows[:-1]])
        entropy = order0_entropy(sub) / width
        given_exponent = conditional_entropy(sub, previous, args.save_dtype) / width
        changed = float(np.mean(rows != previous))
        del sub, previous
        label = f"steps {steps_text}, lr {lr if lr is not None else 'default'}"
        print(
            f"\n# {args.profile} {args.save_dtype} rows (base {args.base_dtype or args.save_dtype})"
            f", {label}: K={rows.shape[0]}, n={rows.shape[1]:,}, raw {rows.nbytes / 2**20:.0f} MiB"
            f", {per_ckpt:.2f} s/checkpoint to generate; changed vs previous row {changed:.4f}; "
            f"order-0 entropy of sub-prev codes {entropy:.4f} of raw, given the previous "
            f"word's exponent {given_exponent:.4f}"
        )
        print(
            "| transform | codec | size / raw | enc MB/s | dec MB/s | rows enc | bytes enc |"
            " codec enc | codec dec | bytes dec | rows dec | exact |"
        )
        print("|---" * 12 + "|")
        for row in chunk_candidates(base, rows, candidates, chunk, args.repeats):
            row |= {"trajectory": label, "entropy0": entropy, "changed": changed}
            row["entropy_given_exponent"] = given_exponent
            results.append(row)
            print(format_chunk_row(row), flush=True)
    return results


def chunk_candidates(base, rows, candidates: list, chunk: int, repeats: int) -> list[dict]:
    """Size (exact) and best-of-`repeats` one-thread MB/s per phase of every candidate.

    The passes go round-robin over the candidates, so a burst of load on this shared machine
    slows one pass of each rather than every pass of one.
    """
    best: list[dict[str, float]] = [{} for _ in candidates]
    sizes, exact = [0] * len(candidates), [True] * len(candidates)
    for _ in range(repeats):
        for i, (transform, codec_label) in enumerate(candidates):
            clock = Clock()
            sizes[i], ok = chunk_pass(base, rows, transform, chunk_codec(codec_label), chunk, clock)
            exact[i] &= ok
            best[i] = {p: min(best[i].get(p, float("inf")), t) for p, t in clock.t.items()}
    mb = rows.nbytes / 1e6
    out = []
    for (transform, codec), times, size, ok in zip(candidates, best, sizes, exact, strict=True):
        out.append({
            "transform": transform, "codec": codec, "ratio": size / rows.nbytes,
            "enc_MBps": mb / sum(t for p, t in times.items() if p.startswith("enc")),
            "dec_MBps": mb / sum(t for p, t in times.items() if p.startswith("dec")),
            "phases_MBps": {p: mb / t if t else float("inf") for p, t in times.items()},
            "exact": ok,
        })  # fmt: skip
    return out


def format_chunk_row(row: dict) -> str:
    """One markdown row; '-' for a phase that does nothing (no shuffle, or transform 'none')."""
    phases = row["phases_MBps"]
    mode, _, shuffle = CHUNK_TRANSFORMS[row["transform"]]
    idle = {"bytes": not shuffle, "rows": mode == "none", "codec": False}
    order = ["enc rows", "enc bytes", "enc codec", "dec codec", "dec bytes", "dec rows"]
    shown = ["-" if idle[p.split()[1]] else f"{phases[p]:.0f}" for p in order]
    return (
        f"| {row['transform']} | {row['codec']} | {row['ratio']:.4f} | {row['enc_MBps']:.0f} | "
        f"{row['dec_MBps']:.0f} | " + " | ".join(shown) + f" | {'yes' if row['exact'] else 'NO'} |"
    )


def summary_table(results: list[dict]) -> None:
    """size / raw of every candidate (rows) on every trajectory (columns)."""
    trajectories = list(dict.fromkeys(r["trajectory"] for r in results))
    print("\n| transform | codec | " + " | ".join(trajectories) + " |")
    print("|---|---|" + "---:|" * len(trajectories))
    by_key: dict[tuple, dict] = {}
    for r in results:
        by_key.setdefault((r["transform"], r["codec"]), {})[r["trajectory"]] = r["ratio"]
    for (transform, codec), ratios in by_key.items():
        cells = [f"{ratios[t]:.4f}" if t in ratios else "" for t in trajectories]
        print(f"| {transform} | {codec} | " + " | ".join(cells) + " |")
    first = {r["trajectory"]: r for r in results}
    print("| order-0 entropy of sub-prev codes | (bound for word-wise coders) | " + " | ".join(
        f"{first[t]['entropy0']:.4f}" for t in trajectories) + " |")  # fmt: skip


# --------------------------------------------------------------------------- cut-off (issue 12)


def cutoff_chunks(args) -> dict[str, list[np.ndarray]]:
    """1 MiB chunks from incompressible to compressible: label -> chunks (uint8)."""
    size, count = parse_bytes(args.chunk_bytes), 16
    rng = np.random.default_rng(args.seed)
    chunks = {}
    for kept in (8, 7, 6, 4, 2):  # bytes with `kept` random low bits, the rest zero
        label = "uniform random bytes" if kept == 8 else f"random bytes, {kept} of 8 bits"
        chunks[label] = [
            (rng.integers(0, 256, size, dtype=np.uint8) & ((1 << kept) - 1)).astype(np.uint8)
            for _ in range(count)
        ]
    params = parse_bytes(args.params)
    base, rows, _ = trajectory("planted", params, parse_steps("10-100:10"), args.seed, None)
    codes = row_codec.encode(rows, base, "prev", "xor")
    chunks["planted bf16, xor-prev"] = _row_chunks(codes, size, count)
    for lr, steps in ((2e-7, "1-10"), (5e-6, "10-100:10")):
        base, rows, _ = trajectory(
            "drift", params, parse_steps(steps), args.seed, lr, "float32", "bfloat16"
        )
        codes = row_codec.encode(rows, base, "prev", "sub")
        shuffled = [
            row_codec.shuffle_bytes(c.view(np.uint32)) for c in _row_chunks(codes, size, count)
        ]
        chunks[f"fp32 drift lr {lr:g} steps {steps}, sub-prev+zigzag+shuffle"] = shuffled
        low = np.concatenate([s[: size // 4] for s in shuffled])  # the low-byte planes only
        chunks[f"fp32 drift lr {lr:g} steps {steps}, low-byte planes only"] = [
            low[i : i + size] for i in range(0, low.size - size + 1, size)
        ]
    return chunks


def _row_chunks(codes: np.ndarray, size: int, count: int) -> list[np.ndarray]:
    flat = codes.reshape(-1).view(np.uint8)
    return [flat[i * size : (i + 1) * size].copy() for i in range(min(count, flat.size // size))]


def cutoff_study(args) -> list[dict]:
    """zstd on chunks of every compressibility: ratio and one-thread MB/s, against a memcpy."""
    blosc.set_nthreads(1)
    results = []
    print("| chunks | codec | compressed / raw | enc MB/s | dec MB/s | memcpy MB/s |")
    print("|---|---|---:|---:|---:|---:|")
    for label, chunks in cutoff_chunks(args).items():
        for codec_label in args.cutoff_codecs.split(","):
            row = {"chunks": label, "codec": codec_label}
            row |= cutoff_row(chunks, chunk_codec(codec_label), args.repeats)
            results.append(row)
            print(
                f"| {label} | {codec_label} | {row['ratio']:.4f} | {row['enc_MBps']:.0f} | "
                f"{row['dec_MBps']:.0f} | {row['memcpy_MBps']:.0f} |",
                flush=True,
            )
    return results


def cutoff_row(chunks: list[np.ndarray], codec, repeats: int) -> dict:
    """Compressed / raw and best-of-`repeats` MB/s: encode, decode (into a buffer), memcpy."""
    mb = sum(c.nbytes for c in chunks) / 1e6
    outs = [np.empty_like(c) for c in chunks]
    times: dict[str, list[float]] = {"enc": [], "dec": [], "copy": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        payloads = [codec.encode(c) for c in chunks]
        t1 = time.perf_counter()
        for payload, out in zip(payloads, outs, strict=True):
            codec.decode(payload, out=out)
        t2 = time.perf_counter()
        for chunk, out in zip(chunks, outs, strict=True):
            np.copyto(out, chunk)
        t3 = time.perf_counter()
        for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            times[key].append(value)
    payloads = [codec.encode(c) for c in chunks]
    for payload, out, chunk in zip(payloads, outs, chunks, strict=True):
        out[:] = 0
        codec.decode(payload, out=out)
        assert np.array_equal(out, chunk)
    return {
        "ratio": sum(len(p) for p in payloads) / (mb * 1e6),
        "enc_MBps": mb / min(times["enc"]),
        "dec_MBps": mb / min(times["dec"]),
        "memcpy_MBps": mb / min(times["copy"]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--study",
        default="zarr",
        choices=["zarr", "chunks", "cutoff"],
        help="zarr: bf16 transforms x zarr codecs through a zarr store (issue 3); chunks: per "
        "inner chunk, any dtype, one thread (issue 12); cutoff: zstd on incompressible chunks",
    )
    p.add_argument("--profile", default="drift", choices=["planted", "drift", "walk"])
    p.add_argument("--params", default="24M", help="about this many elements (default 24M)")
    p.add_argument(
        "--steps", default="1-30", help="saved steps (default 1-30); chunks: several, ';'-separated"
    )
    p.add_argument(
        "--lr", default=None, help="synth lr (default: the profile's); chunks: a comma list"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-dtype", default="bfloat16", choices=list(WORDS))
    p.add_argument("--base-dtype", default=None, choices=list(WORDS))
    p.add_argument("--every-step", action="store_true", help="synth every_step (trainer-exact)")
    p.add_argument("--codecs", default=None, help="zarr: comma list of codec labels (default all)")
    p.add_argument("--transforms", default=None, help="zarr: comma list like none-xor,prev-xor")
    p.add_argument("--candidates", default=None, help="chunks: transform/codec,...")
    p.add_argument("--repeats", type=int, default=2, help="chunks, cutoff: timing passes; best")
    p.add_argument("--cutoff-codecs", default="zstd-1,zstd-3,zstd--1", help="cutoff: codecs")
    p.add_argument("--cold", action="store_true", help="drop the page cache before each read")
    p.add_argument("--reads", type=int, default=2, help="read passes per config; best counts")
    p.add_argument("--sample-chunks", type=int, default=96, help="chunks for the 1-thread timing")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--tmp", default=None, help="directory for the temporary stores")
    p.add_argument("--chunk-bytes", default="1M", help="raw bytes of one row chunk (default 1M)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    if args.study == "chunks":
        lrs = [float(x) for x in args.lr.split(",")] if args.lr else [None]
        results = chunk_study(args, args.steps.split(";"), lrs)
        summary_table(results)
    elif args.study == "cutoff":
        results = cutoff_study(args)
    else:
        return zarr_study(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if all(r.get("exact", True) for r in results) else 1


def zarr_study(args: argparse.Namespace) -> int:
    """The issue-3 grid: bf16 row transforms x zarr codecs through a real zarr store."""
    if args.save_dtype != "bfloat16":
        raise SystemExit("--study zarr measures bf16 rows; use --study chunks for other dtypes")
    global ROW_CHUNK
    ROW_CHUNK = parse_bytes(args.chunk_bytes) // 2

    warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3")
    steps = parse_steps(args.steps)
    params = parse_bytes(args.params)
    all_codecs = codecs()
    chosen = args.codecs.split(",") if args.codecs else list(all_codecs)
    transforms = (
        [tuple(t.split("-")) for t in args.transforms.split(",")] if args.transforms else TRANSFORMS
    )

    lr = float(args.lr) if args.lr else None
    base, rows, per_ckpt = trajectory(
        args.profile, params, steps, args.seed, lr, every_step=args.every_step
    )
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
