#!/usr/bin/env python3
"""Soak: mixed readers and prefetch jobs against an origin that fails at random.

    sudo python bench/soak.py [--minutes 20] [--fault-rate 0.2] [--readers 6]

Runs the fixture origin (modelfs.testing.origin) on 127.0.0.1 in fault-injecting
mode (`Origin.chaos`: 5xx and 429 bursts, resets at random offsets, stalls,
trickles, 200 for 206, wrong Content-Range, short and long bodies), mounts
modelfs on it, and for `--minutes` runs reader threads (random preads of
random sizes, whole-file reads, mmap slices) over three repos while prefetch
jobs start, pause, resume and cancel, the page cache is dropped (as root) and
the chunk cache is evicted now and then. Every byte read is compared with the
origin's (sha256 of the range); every read must be answered within the read
deadline plus the reader check. The daemon's RSS and open descriptors are
sampled every 10 s. Prints one table and exits 1 if a byte was wrong, a read
went past its bound, or RSS or descriptors kept growing.
Not part of CI: it runs for minutes by design.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from modelfs.control.client import ControlClient
from modelfs.testing.origin import Origin, write_safetensors

MiB = 1 << 20
READ_DEADLINE = 10.0
BOUND = READ_DEADLINE + 2.0  # the deadline, the reader check and scheduling slack
MMAP_READ = ("import mmap, sys; f = open(sys.argv[1], 'rb'); m = mmap.mmap(f.fileno(), 0, "
             "prot=mmap.PROT_READ); o, n = int(sys.argv[2]), int(sys.argv[3]); "
             "sys.stdout.buffer.write(m[o:o + n])")


def make_repos(root: Path) -> dict[str, bytes]:
    """Three repos: two shards and small files each; returns {mount path: bytes}."""
    files: dict[str, bytes] = {}
    for n, repo in enumerate(["soak/a", "soak/b", "soak/c"]):
        ref = root / repo / "main"
        ref.mkdir(parents=True)
        for shard in range(2):
            path = ref / f"model-{shard:05d}.safetensors"
            write_safetensors(path, {f"layer.{i}.w": ("F32", (512, 512 + n))
                                     for i in range(24)}, seed=n * 10 + shard)
            files[f"{repo}/{path.name}"] = path.read_bytes()
        (ref / "config.json").write_text(json.dumps({"repo": repo, "pad": "x" * 5000}))
        files[f"{repo}/config.json"] = (ref / "config.json").read_bytes()
        (ref / "tokenizer.json").write_text(json.dumps({f"t{i}": i for i in range(40000)}))
        files[f"{repo}/tokenizer.json"] = (ref / "tokenizer.json").read_bytes()
    return files


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reads = 0
        self.bytes = 0
        self.eio = 0
        self.other_errors: list[str] = []
        self.wrong: list[str] = []
        self.latencies: list[float] = []

    def add(self, latency: float, n: int = 0, *, eio: bool = False, wrong: str | None = None,
            error: str | None = None) -> None:
        with self.lock:
            self.reads += 1
            self.bytes += n
            self.eio += eio
            self.latencies.append(latency)
            if wrong:
                self.wrong.append(wrong)
            if error:
                self.other_errors.append(error)


def reader(mnt: Path, files: dict[str, bytes], stats: Stats, stop: threading.Event,
           seed: int) -> None:
    rnd = random.Random(seed)
    names = sorted(files)
    while not stop.is_set():
        name = rnd.choice(names)
        data = files[name]
        mode = rnd.choice(["pread", "pread", "pread", "whole", "mmap"])
        t0 = time.monotonic()
        try:
            with open(mnt / name, "rb", buffering=0) as f:
                if mode == "whole":
                    off, got = 0, f.read()
                elif mode == "mmap" and len(data) > 0:
                    # In a child: a page fault answered EIO is a SIGBUS, which kills the
                    # process that took it (counted as an EIO here).
                    off = rnd.randrange(len(data))
                    child = subprocess.run(
                        [sys.executable, "-c", MMAP_READ, str(mnt / name), str(off),
                         str(rnd.choice([4096, MiB]))], capture_output=True, timeout=BOUND * 3)
                    if child.returncode == -7:
                        raise OSError(5, "SIGBUS on a page fault")
                    got = child.stdout
                else:
                    off = rnd.randrange(max(len(data), 1))
                    got = os.pread(f.fileno(), rnd.choice([1, 4096, 128 << 10, MiB, 4 * MiB]),
                                   off)
            want = data[off:off + len(got)]
            bad = None if hashlib.sha256(got).digest() == hashlib.sha256(want).digest() \
                and (mode != "whole" or len(got) == len(data)) else f"{name}@{off}+{len(got)}"
            stats.add(time.monotonic() - t0, len(got), wrong=bad)
        except OSError as exc:
            stats.add(time.monotonic() - t0, eio=exc.errno == 5,
                      error=None if exc.errno == 5 else f"{name}: {exc}")


def jobs(sock: Path, stop: threading.Event, seed: int, log: list[str]) -> None:
    rnd = random.Random(seed)
    with ControlClient(sock) as c:
        while not stop.is_set():
            try:
                job = c.prefetch({"repos": [{"id": rnd.choice(["soak/a", "soak/b", "soak/c"])}]})
                for _ in range(rnd.randrange(1, 6)):
                    stop.wait(rnd.uniform(0.5, 3))
                    c.act(job["id"], rnd.choice(["pause", "resume", "resume"]))
                if rnd.random() < 0.3:
                    c.act(job["id"], "cancel")
            except Exception as exc:  # the API must keep answering: record, go on
                log.append(f"job API: {exc}")
            stop.wait(rnd.uniform(1, 5))


def sample(pid: int) -> tuple[int, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmRSS")))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--fault-rate", type=float, default=0.2)
    ap.add_argument("--readers", type=int, default=6)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="modelfs-soak-"))
    files = make_repos(work / "origin")
    mnt, cache = work / "mnt", work / "cache"
    mnt.mkdir()
    sock = work / "api.sock"
    origin = Origin(work / "origin").start()
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelfs", "mount", str(mnt), "--foreground", "--endpoint",
         origin.url, "--cache-dir", str(cache), "--control-socket", str(sock),
         "--read-deadline", str(READ_DEADLINE), "--timeout", "3", "--retry-backoff", "0.05",
         "--chunk-size", "1MiB", "--cache-size", "64MiB", "--log-file", str(work / "soak.log"),
         *[a for r in ("soak/a", "soak/b", "soak/c") for a in ("--repo", r)]])
    stats, stop, job_log = Stats(), threading.Event(), []
    samples: list[tuple[float, int, int]] = []
    threads: list[threading.Thread] = []
    try:
        deadline = time.monotonic() + 60
        while not (mnt / "soak").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the mount did not come up; see {work / 'soak.log'}")
            time.sleep(0.1)
        origin.chaos(args.fault_rate, seed=args.seed, stall=3.0)
        threads = [threading.Thread(target=reader, args=(mnt, files, stats, stop, args.seed + i),
                                    daemon=True) for i in range(args.readers)]
        threads.append(threading.Thread(target=jobs, args=(sock, stop, args.seed, job_log),
                                        daemon=True))
        for t in threads:
            t.start()
        end = time.monotonic() + args.minutes * 60
        rnd = random.Random(args.seed)
        while time.monotonic() < end and proc.poll() is None:
            # The daemon, not its supervisor (`proc`): the one that holds memory and fds.
            daemon = int((cache / "daemon" / "daemon.pid").read_text())
            samples.append((time.monotonic(), *sample(daemon)))
            print(f"{len(samples) * 10:>5}s reads {stats.reads} eio {stats.eio} wrong "
                  f"{len(stats.wrong)} rss {samples[-1][1] // 1024} MiB fds {samples[-1][2]}",
                  flush=True)
            time.sleep(10)
            if os.geteuid() == 0 and rnd.random() < 0.5:
                Path("/proc/sys/vm/drop_caches").write_text("1\n")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=BOUND + 5)
        origin.chaos(0)
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        origin.stop()
    lat = sorted(stats.latencies) or [0.0]
    half = len(samples) // 2
    rss_early = max((s[1] for s in samples[1:half + 1]), default=0)
    rss_late = max((s[1] for s in samples[half:]), default=0)
    fds_early = max((s[2] for s in samples[1:half + 1]), default=0)
    fds_late = max((s[2] for s in samples[half:]), default=0)
    slow = sum(x > BOUND for x in lat)
    rows = [
        ("duration", f"{args.minutes:g} min, fault rate {args.fault_rate:g}, "
                     f"{args.readers} readers + jobs"),
        ("reads answered", f"{stats.reads} ({stats.bytes / MiB:.0f} MiB), EIO {stats.eio}"),
        ("wrong bytes (sha256)", str(len(stats.wrong))),
        ("other errors", str(len(stats.other_errors))),
        ("read latency p50 / p99 / max", f"{statistics.median(lat):.3f} / "
                                         f"{lat[int(len(lat) * 0.99)]:.3f} / {lat[-1]:.3f} s"),
        (f"reads past {BOUND:g} s", str(slow)),
        ("daemon RSS, 1st half max / 2nd half max", f"{rss_early // 1024} / {rss_late // 1024} MiB"),
        ("daemon fds, 1st half max / 2nd half max", f"{fds_early} / {fds_late}"),
        ("daemon exit status", str(proc.returncode)),
        ("job API errors", str(len(job_log))),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"| {k:<{width}} | {v} |")
    for what in (stats.wrong[:5], stats.other_errors[:5], job_log[:5]):
        for line in what:
            print("  ", line)
    grew = rss_late > rss_early * 1.25 + 20 * 1024 or fds_late > fds_early + 8
    ok = not stats.wrong and not slow and not grew and proc.returncode == 0
    if ok:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept {work} (log: {work / 'soak.log'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
