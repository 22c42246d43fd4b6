#!/usr/bin/env python3
"""The floor of a FUSE load on this machine: a minimal pyfuse3 file system that
serves one file from memory, against the same load from local disk.

    sudo python bench/fuse_floor.py [--shard-mib 512] [--runs 5]

`floor.py ram` keeps the whole file in anonymous memory, so its reads cost only
FUSE (a request, a copy into the reply, the kernel's copy into the mount's
pages) with the mount tuned as modelfs tunes its own (`daemon.tune_kernel`).
A warm modelfs load cannot beat it; a local-disk load is the target it is
measured against. Same name-order `safe_open` loader as `bench/loaders.py`,
page cache dropped before every load, cases interleaved.
"""

from __future__ import annotations

import argparse
import errno
import mmap
import os
import stat
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

NAME = b"model.safetensors"


def serve(src: str, mnt: str) -> None:
    """The file system: one regular file, its bytes in memory."""
    import pyfuse3
    import trio

    from modelfs.daemon.kernel import tune_kernel

    size = os.path.getsize(src)
    data = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
    with open(src, "rb") as f:
        f.readinto(data)
    view = memoryview(data)

    class Ops(pyfuse3.Operations):
        def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
            a = pyfuse3.EntryAttributes()
            a.st_ino = ino
            a.st_mode = (stat.S_IFDIR | 0o555) if ino == pyfuse3.ROOT_INODE else \
                (stat.S_IFREG | 0o444)
            a.st_size = 0 if ino == pyfuse3.ROOT_INODE else size
            a.attr_timeout = a.entry_timeout = 3600
            return a

        async def getattr(self, ino, ctx=None):
            return self._attr(ino)

        async def lookup(self, parent, name, ctx=None):
            if name != NAME:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attr(2)

        async def open(self, ino, flags, ctx):
            return pyfuse3.FileInfo(fh=ino, keep_cache=True)

        async def read(self, fh, off, n):
            return view[off:off + n]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            await trio.to_thread.run_sync(tune_kernel, Path(mnt))
            print("ready", flush=True)

    pyfuse3.init(Ops(), mnt, set(pyfuse3.default_options) | {"fsname=floor", "ro"})
    try:
        trio.run(main)
    finally:
        pyfuse3.close(unmount=False)


def main() -> None:
    from loaders import load, write_shard
    from run import drop_caches, machine_line

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shard-mib", type=int, default=512)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--work", default="/var/tmp/modelfs-bench-floor")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark drops the page cache between cases")
    work = Path(args.work)
    mnt = work / "mnt"
    mnt.mkdir(parents=True, exist_ok=True)
    src = work / "model.safetensors"
    if not src.exists() or src.stat().st_size < args.shard_mib << 20:
        write_shard(src, 0, args.shard_mib << 20)

    def floor() -> float:
        proc = subprocess.Popen([sys.executable, __file__, "--serve", str(src), str(mnt)],
                                stdout=subprocess.PIPE, text=True)
        try:
            if proc.stdout is None or proc.stdout.readline().strip() != "ready":
                raise RuntimeError("the floor file system did not come up")
            drop_caches()
            return load("sorted", mnt / NAME.decode())
        finally:
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
            proc.wait()

    def local() -> float:
        drop_caches()
        return load("sorted", src)

    times: dict[str, list[float]] = {"local disk": [], "FUSE from memory": []}
    for r in range(args.runs):
        pairs = [("local disk", local), ("FUSE from memory", floor)]
        for name, fn in pairs if r % 2 == 0 else pairs[::-1]:
            times[name].append(fn())
    base = statistics.median(times["local disk"])
    print(f"{machine_line('bench/fuse_floor.py')}; {args.shard_mib} MiB shard, name order, "
          f"{args.runs} runs, interleaved\n")
    print("| load | median s | vs local disk | runs |\n|---|---:|---:|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.3f} | {med / base:.2f}x | {' '.join(f'{t:.3f}' for t in ts)} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(sys.argv[2], sys.argv[3])
    else:
        main()
