#!/usr/bin/env python3
"""How fast chunk files come off this disk, by the kind of read a load does.

    sudo python bench/direct_read.py [--chunks 128] [--runs 5]

Writes `--chunks` files of 4 MiB (like a cache's chunk files) once, then, with
the page cache dropped before each case and the cases interleaved, reads them
all back: with O_DIRECT into a buffer of 4 KiB pages, with O_DIRECT into a
buffer of 2 MiB transparent huge pages (`store.direct_buffer`, what chunk loads
use), each on 1 and 4 threads, and buffered (`read` through the page cache).
Prints GB/s, medians and every run. An O_DIRECT read is split into disk
requests at the device's segment limit (`/sys/block/*/queue/max_segments`:
254 on virtio-blk), one segment per physically contiguous run of the buffer:
1024 of them for a 4 MiB buffer of 4 KiB pages, 2 for one of huge pages.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from modelfs.cache.store import direct_buffer

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import drop_caches, machine_line

CHUNK = 4 << 20


def read_direct(paths: list[Path], threads: int, huge: bool) -> float:
    bufs = [direct_buffer(CHUNK) if huge else mmap.mmap(-1, CHUNK, flags=mmap.MAP_PRIVATE)
            for _ in range(threads)]
    for b in bufs:
        b.write(b"\0" * CHUNK)  # touched once, as a reused load buffer is

    def one(i: int) -> int:
        fd = os.open(paths[i], os.O_RDONLY | os.O_DIRECT)
        try:
            return os.preadv(fd, [bufs[i % threads]], 0)
        finally:
            os.close(fd)

    drop_caches()
    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        n = sum(pool.map(one, range(len(paths))))
    return n / (time.perf_counter() - t) / 1e9


def read_buffered(paths: list[Path]) -> float:
    buf = bytearray(1 << 20)
    drop_caches()
    t = time.perf_counter()
    n = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while k := f.readinto(buf):
                n += k
    return n / (time.perf_counter() - t) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--work", default="/var/tmp/modelfs-bench-direct")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark drops the page cache between cases")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    paths = [work / f"chunk-{i:04d}" for i in range(args.chunks)]
    for p in paths:
        if not p.exists() or p.stat().st_size != CHUNK:
            p.write_bytes(os.urandom(CHUNK))
    cases = {
        "O_DIRECT, 4 KiB pages, 1 thread": lambda: read_direct(paths, 1, False),
        "O_DIRECT, 4 KiB pages, 4 threads": lambda: read_direct(paths, 4, False),
        "O_DIRECT, huge pages, 1 thread": lambda: read_direct(paths, 1, True),
        "O_DIRECT, huge pages, 4 threads": lambda: read_direct(paths, 4, True),
        "buffered read, 1 thread": lambda: read_buffered(paths),
    }
    results: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(args.runs):
        for name, fn in (cases.items() if r % 2 == 0 else reversed(cases.items())):
            results[name].append(fn())
    print(f"{machine_line('bench/direct_read.py')}; {args.chunks} files of 4 MiB, "
          f"{args.runs} runs, interleaved\n")
    print("| read | median GB/s | runs |\n|---|---:|---|")
    for name, rates in results.items():
        print(f"| {name} | {statistics.median(rates):.2f} | "
              f"{' '.join(f'{x:.2f}' for x in rates)} |")


if __name__ == "__main__":
    main()
