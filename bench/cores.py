#!/usr/bin/env python3
"""Cold `cat` of one shard with two cores against one, on bench/run.py's loopback origin.

    sudo python bench/cores.py [--runs 5] [--size-mib 1024] [--write-docs]

One core: the daemon (and its supervisor) and the reading `cat` all pinned to CPU 0
with `taskset`; two cores: no pinning. nginx is the network here and is never
pinned. curl to a file, pinned and not, is the reference for each. Cases
alternate within each round; the page cache is dropped before every one. Besides
times: the daemon's CPU seconds per GiB, and the share of that CPU spent in the
kernel (socket receive, chunk-file writes, FUSE replies) against user space
(Python: HTTP parsing, copies, the scheduler).
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (
    ModelfsMount,
    Origin,
    drop_caches,
    ensure_tools,
    machine_line,
    sh,
    timed,
    write_docs_block,
)

CASES = ("curl → file, 2 cores", "curl → file, 1 core",
         "modelfs cold cat, 2 cores", "modelfs cold cat, 1 core")


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--work", default="/var/tmp/modelfs-bench")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/cores.py: needs root (it drops the page cache)")
    if (os.cpu_count() or 1) < 2:
        sys.exit("bench/cores.py: needs at least two CPUs")
    ensure_tools()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    origin = Origin(work)
    origin.generate(args.size_mib)
    origin.write_api()
    origin.start()
    shard = next(n for n in origin.files if n.endswith(".safetensors"))
    size = origin.files[shard].stat().st_size
    times: dict[str, list[float]] = {c: [] for c in CASES}
    cpu: dict[str, list[tuple[float, float]]] = {"2 cores": [], "1 core": []}
    try:
        for _ in range(args.runs):
            for cores, pin in (("2 cores", []), ("1 core", ["taskset", "-c", "0"])):
                dl = work / "dl"
                shutil.rmtree(dl, ignore_errors=True)
                dl.mkdir()
                drop_caches()
                times[f"curl → file, {cores}"].append(timed(functools.partial(
                    sh, *pin, "curl", "-s", "-o", str(dl / "f"), origin.resolve_url(shard))))
                shutil.rmtree(dl, ignore_errors=True)
                cache = work / "modelfs-cache"
                shutil.rmtree(cache, ignore_errors=True)
                m = ModelfsMount(origin, work, cache, cpus="0" if pin else "")
                try:
                    drop_caches()
                    u0, s0 = cpu_times(m.pid)
                    times[f"modelfs cold cat, {cores}"].append(timed(functools.partial(
                        subprocess.run, [*pin, "cat", str(m.file(shard))],
                        stdout=subprocess.DEVNULL, check=True)))
                    u1, s1 = cpu_times(m.pid)
                    cpu[cores].append((u1 - u0, s1 - s0))
                finally:
                    m.close()
    finally:
        origin.stop()

    med = {c: statistics.median(t) for c, t in times.items()}
    rows = ["| case | median s | min s | max s | MB/s | ratio |", "|---|---:|---:|---:|---:|---|"]
    for c in CASES:
        ratio = ""
        if c == "modelfs cold cat, 2 cores":
            ratio = (f"{med['modelfs cold cat, 1 core'] / med[c]:.2f}x 1 core; "
                     f"{med['curl → file, 2 cores'] / med[c]:.2f}x curl")
        elif c == "curl → file, 2 cores":
            ratio = f"{med['curl → file, 1 core'] / med[c]:.2f}x 1 core"
        elif c == "modelfs cold cat, 1 core":
            ratio = f"{med['curl → file, 1 core'] / med[c]:.2f}x curl"
        t = times[c]
        rows.append(f"| {c} | {med[c]:.3f} | {min(t):.3f} | {max(t):.3f} | "
                    f"{size / med[c] / 1e6:.0f} | {ratio} |")
    rows.append("")
    gib = size / (1 << 30)
    for cores, samples in cpu.items():
        user = statistics.median(u for u, _ in samples) / gib
        system = statistics.median(s for _, s in samples) / gib
        rows.append(f"- daemon CPU s per GiB cold, {cores}: {user + system:.2f} "
                    f"(user {user:.2f}, system {system:.2f})")
    body = (machine_line("bench/cores.py") +
            f"; {args.runs} runs each, interleaved; a shard of {args.size_mib} MiB.\n\n" +
            "\n".join(rows))
    print(body)
    if args.write_docs:
        write_docs_block("<!-- bench:cores -->", body,
                         "## Two cores against one (`bench/cores.py`)\n\n")


if __name__ == "__main__":
    main()
