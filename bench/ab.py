#!/usr/bin/env python3
"""Two source trees of modelfs against each other, on one nginx origin, in one run.

    sudo python bench/ab.py --old REV [--runs 5] [--size-mib 1024] [--write-docs]

`--old` and `--new` are git revisions of this repository (each checked out into
a temporary worktree, so the checkout may change while this runs). Every case alternates old, new, old,
new ... `--runs` times, with the page cache dropped before every cold and warm
case, and the table gives medians and the new/old ratio of each (above 1:
slower). Cases: bench/run.py's cold, warm and hot `cat` of one shard and
`modelfs prefetch` of the repo; bench/loaders.py's cold and warm `safe_open`
in name order, cold `load_file` and 4 threads loading 4 shards. Then the
daemon's peak RSS (VmHWM) streaming both shards of the peer repo cold, for the
old tree at its defaults and the new one at `--memory-limit` 128MiB, the
default and 1GiB.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loaders import SHARDS, LoaderOrigin, load
from run import (
    REPO,
    ModelfsMount,
    Origin,
    cat,
    drop_caches,
    ensure_tools,
    machine_line,
    sh,
    timed,
    write_docs_block,
)

ROOT = Path(__file__).resolve().parent.parent
LIMITS = ("128MiB", None, "1GiB")  # None: the default


class AB:
    def __init__(self, trees: dict[str, Path], runs: int) -> None:
        self.trees = trees
        self.runs = runs
        self.times: dict[str, dict[str, list[float]]] = {}

    def add(self, case: str, tree: str, seconds: float) -> None:
        self.times.setdefault(case, {}).setdefault(tree, []).append(seconds)

    def table(self) -> str:
        rows = ["| case | old median s | new median s | new / old | old runs | new runs |",
                "|---|---:|---:|---:|---|---|"]
        for case, by in self.times.items():
            old, new = statistics.median(by["old"]), statistics.median(by["new"])
            fmt = lambda ts: " ".join(f"{t:.2f}" for t in ts)  # noqa: E731
            rows.append(f"| {case} | {old:.3f} | {new:.3f} | {new / old:.2f} | "
                        f"{fmt(by['old'])} | {fmt(by['new'])} |")
        return "\n".join(rows)


def peer_cases(ab: AB, work: Path, size_mib: int) -> dict[str, float]:
    origin = Origin(work / "peer")
    origin.generate(size_mib)
    origin.write_api()
    origin.start()
    shards = [n for n in origin.files if n.endswith(".safetensors")]
    repo_bytes = sum(p.stat().st_size for p in origin.files.values())
    cache = work / "cache"
    rss: dict[str, float] = {}
    try:
        for r in range(ab.runs):
            print(f"peer round {r + 1}/{ab.runs}", flush=True)
            for name, tree in ab.trees.items():
                shutil.rmtree(cache, ignore_errors=True)
                m = ModelfsMount(origin, work, cache, tree=tree)
                try:
                    drop_caches()
                    ab.add("cold cat (one shard)", name, timed(functools.partial(cat, m.file(shards[0]))))
                finally:
                    m.close()
                m = ModelfsMount(origin, work, cache, tree=tree)
                try:
                    drop_caches()
                    ab.add("warm cat (remount, page cache dropped)", name,
                           timed(functools.partial(cat, m.file(shards[0]))))
                    ab.add("hot cat (page cache)", name, timed(functools.partial(cat, m.file(shards[0]))))
                finally:
                    m.close()
                shutil.rmtree(cache, ignore_errors=True)
                drop_caches()
                env = {**os.environ, "PYTHONPATH": str(tree)}
                ab.add(f"prefetch (repo, {repo_bytes >> 20} MiB)", name, timed(functools.partial(
                    sh, sys.executable, "-m", "modelfs", "prefetch", REPO, "--endpoint",
                    origin.url, "--cache-dir", str(cache), stderr=subprocess.DEVNULL, env=env,
                    cwd=tree)))  # from the tree: `python -m` puts the working directory first
        # Peak RSS streaming both shards cold, one daemon each.
        for name, tree in ab.trees.items():
            for limit in (LIMITS if name == "new" else (None,)):
                shutil.rmtree(cache, ignore_errors=True)
                extra = ("--memory-limit", limit) if limit else ()
                m = ModelfsMount(origin, work, cache, *extra, tree=tree)
                try:
                    drop_caches()
                    for s in shards:
                        cat(m.file(s))
                    rss[f"{name}, memory limit {limit or 'default'}"] = m.peak_rss_mib()
                finally:
                    m.close()
    finally:
        origin.stop()
    return rss


def loader_cases(ab: AB, work: Path, shard_mib: int) -> None:
    origin = LoaderOrigin(work / "loaders")
    origin.generate(shard_mib)
    origin.write_api()
    origin.start()
    shards = [n for n in origin.files if n.endswith(".safetensors")]
    cache = work / "cache"
    # (case, loader mode, shards it loads, a fresh cache first: cold, else warm)
    cases = [("loader: cold safe_open sorted", "sorted", shards[:1], True),
             ("loader: warm safe_open sorted", "sorted", shards[:1], False),
             ("loader: cold load_file", "load_file", shards[:1], True),
             (f"loader: cold {SHARDS} threads", "threads", shards, True)]
    try:
        for r in range(ab.runs):
            print(f"loader round {r + 1}/{ab.runs}", flush=True)
            for name, tree in ab.trees.items():
                for case, mode, names, fresh in cases:
                    if fresh:
                        shutil.rmtree(cache, ignore_errors=True)
                    m = ModelfsMount(origin, work, cache, tree=tree)
                    try:
                        drop_caches()
                        ab.add(case, name, load(mode, *[m.file(n) for n in names]))
                    finally:
                        m.close()
    finally:
        origin.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", required=True, help="git revision of the old tree")
    ap.add_argument("--new", default="HEAD", help="git revision of the new tree")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size-mib", type=int, default=1024, help="each of the peer repo's 2 shards")
    ap.add_argument("--shard-mib", type=int, default=256, help="each of the loader model's shards")
    ap.add_argument("--work", default="/var/tmp/modelfs-bench-ab")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark drops the page cache between cases")
    ensure_tools()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    trees, revs = {}, {}
    for name, rev in (("old", args.old), ("new", args.new)):
        trees[name] = Path(tempfile.mkdtemp(prefix=f"modelfs-{name}-"))
        sh("git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(trees[name]), rev,
           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        revs[name] = sh("git", "-C", str(ROOT), "rev-parse", "--short", rev, capture_output=True,
                        text=True).stdout.strip()
    ab = AB(trees, args.runs)
    try:
        rss = peer_cases(ab, work, args.size_mib)
        loader_cases(ab, work, args.shard_mib)
    finally:
        for tree in trees.values():
            sh("git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree), check=False)
    table = ab.table()
    rss_lines = "\n".join(f"- daemon peak RSS, both {args.size_mib} MiB shards streamed cold "
                          f"({k}): {v:.0f} MiB" for k, v in rss.items())
    print(table)
    print(rss_lines)
    if args.write_docs:
        head = (f"{machine_line('bench/ab.py')}. Old tree {revs['old']}, new tree "
                f"{revs['new']}; {args.runs} runs each, alternating.\n")
        write_docs_block("<!-- bench:ab -->", f"{head}\n{table}\n\n{rss_lines}",
                         "## Old tree against new tree (same run)\n\n")


if __name__ == "__main__":
    main()
