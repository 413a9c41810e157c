"""What zarr 3.1.x does with the store's sharded layout, against relex_stream's own shard writer.

Writes one row array of the store's shape (K rows of n bf16 words; one shard per row, inner
chunks of 1 MiB, zstd-1 and crc32c as the store does) in column chunks, the way a run's first
pass produces it, both with zarr (array[:, a:b] = chunk) and with relex_stream.shards, and reads
it back with zarr. Prints wall time, peak RSS growth and whether zarr reads ours bit for bit.

    python bench/zarr_shards.py --rows 30 --cols 16M --chunk 4M
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def main() -> None:
    import zarr
    from zarr.codecs import Crc32cCodec, ZstdCodec

    from relex_stream import shards
    from relex_stream.safefs import open_root

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--cols", default="16M", help="elements per row")
    parser.add_argument("--chunk", default="4M", help="columns per write (the engine's chunk)")
    parser.add_argument("--work", default="/tmp/zarr-shards")
    args = parser.parse_args()
    rows, cols, step = args.rows, _size(args.cols), _size(args.chunk)
    inner = 1 << 19  # 1 MiB of bf16
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = np.random.default_rng(0)
    data = np.zeros((rows, cols), dtype=np.uint16)  # sparse codes, as XOR-prev rows are
    for k in range(rows):
        idx = rng.choice(cols, cols // 100, replace=False)
        data[k, idx] = rng.integers(1, 1 << 16, idx.size, dtype=np.uint16)
    result = {"zarr": zarr.__version__, "rows": rows, "cols": cols, "write_cols": step}

    before = _rss()
    started = time.perf_counter()
    array = zarr.create_array(str(work / "z"), shape=(rows, cols), shards=(1, cols),
                              chunks=(1, inner), dtype="uint16", fill_value=0,
                              compressors=[ZstdCodec(level=1), Crc32cCodec()])
    for a in range(0, cols, step):
        array[:, a : a + step] = data[:, a : a + step]
    result["zarr_write_s"] = time.perf_counter() - started
    result["zarr_write_rss_growth_bytes"] = _rss() - before
    stored = sum(p.stat().st_size for p in (work / "z").rglob("*") if p.is_file())
    result["zarr_bytes"] = stored

    before = _rss()
    started = time.perf_counter()
    root = open_root(work)
    os.mkdir(work / "ours")
    writers = []
    for k in range(rows):
        os.makedirs(work / "ours" / "c" / str(k))
        fd = open_root(work / "ours" / "c" / str(k))
        writers.append(shards.ShardWriter(fd, "0", cols // inner))
        os.close(fd)
    encoder = [shards.ChunkEncoder(True, "xor-prev") for _ in range(rows)]
    for a in range(0, cols, step):
        for k in range(rows):
            for j in range(a // inner, (a + step) // inner):
                chunk = data[k, j * inner : (j + 1) * inner]
                frame, crc = encoder[k].encode(chunk)
                writers[k].write_chunk(j, frame, crc, shards.crc32c(chunk))
    for writer in writers:
        writer.finish()
    os.close(root)
    result["ours_write_s"] = time.perf_counter() - started
    result["ours_write_rss_growth_bytes"] = _rss() - before
    meta = shards.sharded_array_meta([rows, cols], 2, inner)
    (work / "ours" / "zarr.json").write_text(json.dumps(meta))
    result["ours_bytes"] = sum(p.stat().st_size for p in (work / "ours").rglob("*")
                               if p.is_file())
    started = time.perf_counter()
    back = zarr.open_array(str(work / "ours"), mode="r")[:]
    result["zarr_reads_ours_s"] = time.perf_counter() - started
    result["zarr_reads_ours_identical"] = bool(np.array_equal(back, data))
    print(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
