#!/usr/bin/env python3
"""Loading a model through the mount against download-then-load, on one nginx origin.

    sudo python bench/loaders.py [--shard-mib 512] [--runs 3] [--write-docs]

Generates a 4-shard safetensors model (float32 tensors `model.layers.N.*`, laid
out in numeric layer order, so the name order loaders use is not the offset
order), serves it with nginx through the Hub endpoints (bench/run.py's origin),
and times, interleaved `--runs` times, with the page cache dropped before every
cold and warm case:

- `safe_open` + `get_tensor` over `sorted(keys())` of one shard: through a cold
  mount vs `aria2c -x16 -s16` download then the same load from local disk; warm
  (cache on disk) vs a local-disk load; hot (page cache, `HOT_LOADS` in a
  row) vs local hot;
- `load_file` (offset order) of one shard, cold, vs download then `load_file`;
- 4 threads loading the 4 shards concurrently, cold, vs `aria2c -j4` download of
  all 4 then the same 4-thread load.

`--profile wan` serves the same model CDN-like (bench/run.py's: a delay before
each response, a rate cap per connection) and times only the `load_file` case,
against both fast downloaders (`aria2c -x16` and `hf_transfer` as
huggingface_hub calls it), each followed by the load; the target is against the
faster of the two.

    sudo python bench/loaders.py --profile wan [--delay 0.03] [--rate 32m] --shard-mib 256
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (
    HF_TRANSFER,
    REPO,
    ModelfsMount,
    Origin,
    drop_caches,
    ensure_tools,
    machine_line,
    sh,
    write_docs_block,
)

MiB = 1 << 20
SHARDS = 4
# Hot loads take ~0.1 s, where a few ms of noise is a few %: each round times
# this many in a row (the first right after the warm or local load, as before).
HOT_LOADS = 3

LOADER = """
import sys, time
from concurrent.futures import ThreadPoolExecutor
from safetensors import safe_open
from safetensors.numpy import load_file
mode, paths = sys.argv[1], sys.argv[2:]
def by_name(p):
    with safe_open(p, framework="np") as f:
        return sum(f.get_tensor(k).nbytes for k in sorted(f.keys()))
t = time.perf_counter()
if mode == "sorted":
    n = by_name(paths[0])
elif mode == "load_file":
    n = sum(a.nbytes for a in load_file(paths[0]).values())
else:
    with ThreadPoolExecutor(4) as pool:
        n = sum(pool.map(by_name, paths))
print(time.perf_counter() - t, n)
"""


def write_shard(path: Path, shard: int, size: int) -> None:
    """float32 tensors of ~8 MiB, numbered across shards, in numeric order on disk."""
    per = 8 * MiB
    count = max(1, size // per)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    for i in range(count):
        layer = shard * count + i
        header[f"model.layers.{layer}.weight"] = {
            "dtype": "F32", "shape": [per // 4], "data_offsets": [i * per, (i + 1) * per]}
    hbytes = json.dumps(header).encode()
    hbytes += b" " * (-len(hbytes) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)) + hbytes)
        for _ in range(count * per // MiB):
            f.write(os.urandom(MiB))


class LoaderOrigin(Origin):
    def generate(self, size_mib: int) -> None:  # type: ignore[override]
        root = self.work / "files" / REPO
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        for s in range(SHARDS):
            p = root / f"model-{s + 1:05d}-of-{SHARDS:05d}.safetensors"
            print(f"generating {p.name} ({size_mib} MiB)", flush=True)
            write_shard(p, s, size_mib * MiB)
        (root / "config.json").write_text(json.dumps({"architectures": ["Bench"]}))
        self.files = {p.name: p for p in sorted(root.iterdir())}


def load(mode: str, *paths: Path) -> float:
    out = sh(sys.executable, "-c", LOADER, mode, *map(str, paths), capture_output=True, text=True)
    return float(out.stdout.split()[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shard-mib", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", default="/var/tmp/modelfs-bench-loaders")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--profile", choices=("loopback", "wan"), default="loopback",
                    help="wan: a CDN-like origin, and only the load_file case")
    ap.add_argument("--delay", type=float, default=0.03, help="wan: seconds before each response")
    ap.add_argument("--rate", default="32m", help="wan: nginx limit_rate per connection")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark drops the page cache between cases")
    wan = args.profile == "wan"
    ensure_tools(wan=wan)
    work = Path(args.work + ("-wan" if wan else ""))
    work.mkdir(parents=True, exist_ok=True)
    origin = LoaderOrigin(work, delay=args.delay if wan else 0.0, rate=args.rate if wan else "")
    origin.generate(args.shard_mib)
    origin.write_api()
    origin.start()
    shards = [n for n in origin.files if n.endswith(".safetensors")]
    times: dict[str, list[float]] = {}

    def add(name: str, seconds: float) -> None:
        times.setdefault(name, []).append(seconds)

    def download(names: list[str], tool: str = "aria2c") -> tuple[Path, float]:
        dl = work / "dl"
        shutil.rmtree(dl, ignore_errors=True)
        dl.mkdir()
        drop_caches()
        t = time.perf_counter()
        if tool == "hf_transfer":  # one file, its parallel chunks; saved as f0
            sh(sys.executable, "-c", HF_TRANSFER, str(dl), origin.resolve_url(names[0]))
            (dl / "f0").rename(dl / names[0])
        elif len(names) == 1:
            sh("aria2c", "-q", "-x16", "-s16", "-k1M", "-d", str(dl), "-o", names[0],
               origin.resolve_url(names[0]))
        else:
            lst = work / "urls.txt"
            lst.write_text("".join(f"{origin.resolve_url(n)}\n  out={n}\n" for n in names))
            sh("aria2c", "-q", "-x16", "-s16", "-j4", "-k1M", "-d", str(dl), "-i", str(lst))
        return dl, time.perf_counter() - t

    def mount(fresh: bool) -> ModelfsMount:
        cache = work / "cache"
        if fresh:
            shutil.rmtree(cache, ignore_errors=True)
        return ModelfsMount(origin, work, cache)

    def load_file_round(one: str) -> None:
        for tool in ("aria2c", "hf_transfer"):
            dl, t_dl = download([one], tool)
            drop_caches()
            add(f"download ({tool}) + load_file (local)", t_dl + load("load_file", dl / one))
        m = mount(fresh=True)
        drop_caches()
        add("modelfs cold load_file", load("load_file", m.file(one)))
        m.close()

    try:
        for r in range(args.runs):
            print(f"round {r + 1}/{args.runs}", flush=True)
            one = shards[0]
            if wan:
                load_file_round(one)
                continue
            dl, t_dl = download([one])
            drop_caches()
            add("download + safe_open sorted (local)", t_dl + load("sorted", dl / one))
            drop_caches()
            add("local safe_open sorted, page cache dropped", load("sorted", dl / one))
            for _ in range(HOT_LOADS):
                add("local safe_open sorted, hot", load("sorted", dl / one))
            m = mount(fresh=True)
            drop_caches()
            add("modelfs cold safe_open sorted", load("sorted", m.file(one)))
            m.close()
            m = mount(fresh=False)
            drop_caches()
            add("modelfs warm safe_open sorted", load("sorted", m.file(one)))
            for _ in range(HOT_LOADS):
                add("modelfs hot safe_open sorted", load("sorted", m.file(one)))
            m.close()

            dl, t_dl = download([one])
            drop_caches()
            add("download + load_file (local)", t_dl + load("load_file", dl / one))
            m = mount(fresh=True)
            drop_caches()
            add("modelfs cold load_file", load("load_file", m.file(one)))
            m.close()

            dl, t_dl = download(shards)
            drop_caches()
            add("download 4 + 4 threads (local)", t_dl + load("threads", *[dl / s for s in shards]))
            m = mount(fresh=True)
            drop_caches()
            add("modelfs cold 4 threads", load("threads", *[m.file(s) for s in shards]))
            m.close()
    finally:
        origin.stop()

    def med(name: str) -> float:
        return statistics.median(times[name])

    if wan:  # against the faster download, as a speed-up: at least 1.3x
        peer = min(("download (aria2c) + load_file (local)",
                    "download (hf_transfer) + load_file (local)"), key=med)
        pairs = {"modelfs cold load_file": (peer, 1 / 1.3)}
    else:
        pairs = {
            "modelfs cold safe_open sorted": ("download + safe_open sorted (local)", 1.2),
            "modelfs warm safe_open sorted": ("local safe_open sorted, page cache dropped", 1.1),
            "modelfs hot safe_open sorted": ("local safe_open sorted, hot", 1.1),  # "≈ local"
            "modelfs cold load_file": ("download + load_file (local)", 1.2),
            "modelfs cold 4 threads": ("download 4 + 4 threads (local)", 1.2),
        }
    lines = ["| case | median s | min s | max s | vs | target |", "|---|---:|---:|---:|---|---|"]
    for name, ts in times.items():
        vs, target = "", ""
        if name in pairs:
            peer, goal = pairs[name]
            ratio = med(name) / med(peer)
            vs = f"{ratio:.2f}x {peer}"
            target = (f"≥ 1.3x faster: {1 / ratio:.2f}x, {'met' if ratio <= goal else 'missed'}"
                      if wan else f"≤ {goal}x: {'met' if ratio <= goal else 'missed'}")
        lines.append(f"| {name} | {med(name):.3f} | {min(ts):.3f} | {max(ts):.3f} | {vs} | "
                     f"{target} |")
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        head = (f"{machine_line('bench/loaders.py')}; {args.runs} runs each, "
                f"interleaved; {SHARDS} shards of {args.shard_mib} MiB (float32, layers in "
                f"numeric order on disk). Times include the loader, not the interpreter start.\n")
        if wan:
            head += (f"Origin: nginx waiting {args.delay * 1000:.0f} ms before each response, "
                     f"each connection capped by `limit_rate {args.rate}`.\n")
            write_docs_block("<!-- bench:loaders-wan -->", f"{head}\n{table}",
                             "### `load_file` on a CDN-like origin (`bench/loaders.py --profile "
                             "wan`)\n\n")
        else:
            write_docs_block("<!-- bench:loaders -->", f"{head}\n{table}",
                             "## Loaders\n\n")


if __name__ == "__main__":
    main()
