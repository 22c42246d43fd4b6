#!/usr/bin/env python3
"""A fleet warming one model: N nodes at once, with and without the shared tier.

    python bench/fleet.py [--size-mib 256] [--nodes 1,2,4,8] [--profile wan] [--write-docs]

One nginx origin (bench/run.py's: a Hub-style repo of two shards; `--profile wan`
makes it CDN-like, a delay before each response and a cap per connection) and one
SeaweedFS S3 server on 127.0.0.1 for the tier. For each N, interleaved, N
processes on this machine warm the repo at once, each into a cache (or directory)
of its own:

- `snapshot_download` x N (huggingface_hub, its defaults);
- `modelfs prefetch` x N without a tier;
- `modelfs prefetch --shared-cache` x N, on a fresh tier prefix;

and then a cold `cat` of one shard on a fresh mount, from the origin and from the
tier the last run filled (the last column then holds the runs).

It prints the time until the last node is done, the CPU time the whole machine
spent meanwhile (every process: the nodes, nginx, the S3 server) with how many of
its cores that kept busy, and the origin's egress (bytes nginx sent, from its
access log) against the repo's size. All N nodes share this machine's cores and
disk, so times grow with N for every case: compare the cases at one N. Cores
busy near the machine's count say the case was bound by this machine's CPU: its
CPU-seconds over the core count is the least time it could take here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from run import (
    MODELFS,
    REPO,
    ModelfsMount,
    Origin,
    drop_caches,
    ensure_tools,
    machine_line,
    timed,
    write_docs_block,
)
from run import cat as cat_file

from modelfs.testing.s3 import ADMIN, S3Server

BUCKET = "fleet-bench"


def machine_cpu() -> float:
    """CPU-seconds this machine has spent busy since boot, over all its cores and
    processes (`/proc/stat`: user, nice, system, irq and softirq time)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def run_all(cmds: list[list[str]], env: dict[str, str], log: Path) -> float:
    """Start every command at once; the seconds until the last one exits. Their
    stderr goes to `log` (warnings such as a tier backing off)."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for c in cmds]
    with open(log, "ab") as out:
        for p in procs:
            _, err = p.communicate()
            out.write(err)
            if p.returncode:
                raise RuntimeError(f"{' '.join(cmds[0][:3])} failed: {err.decode()[-500:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=256, help="size of each shard")
    ap.add_argument("--nodes", default="1,2,4,8")
    ap.add_argument("--work", default="/var/tmp/modelfs-bench-fleet")
    ap.add_argument("--profile", choices=("loopback", "wan"), default="loopback")
    ap.add_argument("--delay", type=float, default=0.03)
    ap.add_argument("--rate", default="32m")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark drops the page cache between cases")
    ensure_tools(wan=args.profile == "wan")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    origin = Origin(work)
    if args.profile == "wan":
        origin.delay, origin.rate = args.delay, args.rate
    origin.generate(args.size_mib)
    origin.write_api()
    repo_bytes = sum(p.stat().st_size for p in origin.files.values())
    origin.start()
    rows: list[str] = []
    try:
        with tempfile.TemporaryDirectory(prefix="modelfs-fleet-s3-") as s3dir, \
                S3Server(Path(s3dir)) as s3:
            s3.client().create_bucket(Bucket=BUCKET)
            # SeaweedFS makes a bucket's volumes at its first write: not in a case's time.
            s3.client().put_object(Bucket=BUCKET, Key="warm-up", Body=b"x")
            env = {**os.environ, **s3.env(ADMIN), "HF_ENDPOINT": origin.url,
                   "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                   "HF_HUB_DISABLE_XET": "1"}
            for run, n in enumerate(int(x) for x in args.nodes.split(",")):
                nodes = [work / f"node{i}" for i in range(n)]
                snap = [[sys.executable, "-c",
                         "from huggingface_hub import snapshot_download; "
                         f"snapshot_download({REPO!r}, cache_dir={str(d)!r})"] for d in nodes]

                def prefetch(d: Path, *extra: str) -> list[str]:
                    return [*MODELFS, "prefetch", REPO, "--endpoint", origin.url,
                            "--cache-dir", str(d), "--cache-size", "unlimited",
                            "--control-socket", str(d / "none.sock"), *extra]
                cases = [
                    ("snapshot_download", snap),
                    ("modelfs prefetch, no tier", [prefetch(d) for d in nodes]),
                    ("modelfs prefetch, shared tier",
                     [prefetch(d, "--shared-cache", f"s3://{BUCKET}/run{run}/") for d in nodes]),
                ]
                for name, cmds in cases:
                    for d in nodes:
                        shutil.rmtree(d, ignore_errors=True)
                        d.mkdir(parents=True)
                    drop_caches()
                    before, cpu = origin.bytes_sent(), machine_cpu()
                    seconds = run_all(cmds, env, work / "fleet.log")
                    cpu = machine_cpu() - cpu
                    time.sleep(0.5)  # the access log's last lines
                    egress = origin.bytes_sent() - before
                    rows.append(f"| {name} | {n} | {seconds:.2f} | {cpu:.1f} ({cpu / seconds:.1f}) | "
                                f"{egress / 2**30:.2f} | {egress / repo_bytes:.2f}x |")
                    print(rows[-1], flush=True)
                for d in nodes:
                    shutil.rmtree(d, ignore_errors=True)
            # A cold `cat` of one shard on a fresh node: from the origin, and from a tier
            # that holds every chunk (the last run's prefix), A B A B.
            os.environ.update(s3.env(ADMIN))
            shard = next(name for name in origin.files if name.endswith(".safetensors"))
            cat: dict[str, list[float]] = {"origin": [], "tier": []}
            for _ in range(3):
                for where, extra in (("origin", ()),
                                     ("tier", ("--shared-cache", f"s3://{BUCKET}/run{run}/"))):
                    cache = work / "cat-cache"
                    shutil.rmtree(cache, ignore_errors=True)
                    m = ModelfsMount(origin, work, cache, *extra)
                    try:
                        drop_caches()
                        cat[where].append(timed(lambda m=m: cat_file(m.file(shard))))
                    finally:
                        m.close()
            for where, times in cat.items():
                rows.append(f"| cold cat of one shard, from the {where} | 1 | "
                            f"{sorted(times)[1]:.2f} | | | {', '.join(f'{t:.2f}' for t in times)} |")
                print(rows[-1], flush=True)
    finally:
        origin.stop()
    table = "\n".join([f"| case | nodes | s to warm all | machine CPU-s (cores busy, of "
                        f"{os.cpu_count()}) | origin GiB | egress / repo |",
                        "| --- | --- | --- | --- | --- | --- |", *rows])
    print(table)
    if args.write_docs:
        head = (f"{machine_line('bench/fleet.py')}; repo of {repo_bytes / 2**20:.0f} MiB"
                + (f"; origin waiting {args.delay * 1000:.0f} ms before each response, "
                   f"`limit_rate {args.rate}`" if args.profile == "wan" else "") + ".\n")
        marker = "<!-- bench:fleet-wan -->" if args.profile == "wan" else "<!-- bench:fleet -->"
        write_docs_block(marker, f"{head}\n{table}",
                         "## A fleet warming one model (`bench/fleet.py`)\n\n"
                         if args.profile == "loopback" else "")


if __name__ == "__main__":
    main()
