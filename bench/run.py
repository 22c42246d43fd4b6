#!/usr/bin/env python3
"""modelfs against its peers, on the same local nginx origin, in one run.

    python bench/run.py [--size-mib 1024] [--runs 3] [--write-docs]
    python bench/run.py --profile wan [--delay 0.03] [--rate 32m] --size-mib 256 ...

Installs what it needs (apt-get: nginx aria2 rclone fio curl, and for the wan
profile libnginx-mod-http-lua; pip: huggingface_hub, hf_transfer),
generates a Hub-style repo (two incompressible shards plus config and tokenizer),
serves it with nginx on 127.0.0.1 through the Hub endpoints (static JSON for
revision and tree; the resolve path with Range, ETag and X-Repo-Commit; an
autoindex for rclone's http backend), then runs every case `--runs` times,
interleaved (A B C A B C ...), and prints one table of medians and ratios.
Machines here are noisy: compare ratios within one run, not absolute numbers.

`--profile wan` makes the origin CDN-like: every response waits `--delay`
seconds before its first byte (`access_by_lua_block { ngx.sleep(...) }`) and
each connection is capped at `--rate` bytes/s (nginx's `limit_rate`). fio's
random reads are left out there (thousands of delayed requests say nothing new).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = "bench/model"
MiB = 1 << 20


def sh(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=check, **kw)


LUA_MODULE = Path("/usr/lib/nginx/modules/ngx_http_lua_module.so")

# How a timed case runs modelfs: the interpreter running the bench, as it runs
# hf_transfer and snapshot_download, not the `modelfs` on PATH. Under pyenv that
# is a bash shim that execs pyenv, about 0.05 s more from a cold page cache, which
# a venv's console script does not cost.
MODELFS = (sys.executable, "-m", "modelfs")


def ensure_tools(wan: bool = False) -> None:
    need = [t for t in ("nginx", "aria2c", "rclone", "fio", "curl", "fusermount3")
            if shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists()]
    if wan and not LUA_MODULE.exists():
        need.append("libnginx-mod-http-lua")
    if need:
        pkgs = {"aria2c": "aria2", "fusermount3": "fuse3"}
        sh("apt-get", "update", "-qq")
        sh("apt-get", "install", "-y", "-qq", *[pkgs.get(t, t) for t in need],
           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, stdout=subprocess.DEVNULL)
    for module, pkg in (("huggingface_hub", "huggingface_hub"), ("hf_transfer", "hf_transfer")):
        try:
            __import__(module)
        except ImportError:
            sh(sys.executable, "-m", "pip", "install", "-q", pkg)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# hf_transfer as huggingface_hub calls it (HF_TRANSFER_CONCURRENCY 100, 10 MiB chunks),
# file after file: argv is the directory, then the URLs.
HF_TRANSFER = """
import os, sys
from hf_transfer import download
for i, url in enumerate(sys.argv[2:]):
    download(url, os.path.join(sys.argv[1], f"f{i}"), max_files=100, chunk_size=10 << 20)
"""


# The origin ----------------------------------------------------------------------------


@dataclass
class Origin:
    work: Path
    port: int = 0
    commit: str = ""
    files: dict[str, Path] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    delay: float = 0.0  # seconds before each response (wan profile)
    rate: str = ""  # nginx limit_rate per connection, e.g. "32m" (wan profile)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def resolve_url(self, path: str) -> str:
        return f"{self.url}/{REPO}/resolve/{self.commit}/{path}"

    def generate(self, size_mib: int) -> None:
        root = self.work / "files" / REPO
        root.mkdir(parents=True, exist_ok=True)
        for i in (1, 2):
            p = root / f"model-0000{i}-of-00002.safetensors"
            if not p.exists() or p.stat().st_size != size_mib * MiB:
                print(f"generating {p} ({size_mib} MiB)", flush=True)
                with open(p, "wb") as f:
                    for _ in range(size_mib):
                        f.write(os.urandom(MiB))
        # nginx's ETag is mtime-size: two shards of one size written in one second would
        # share it, and huggingface_hub, which keeps blobs by ETag, would fetch one of them.
        for i in (1, 2):
            os.utime(root / f"model-0000{i}-of-00002.safetensors", (1_700_000_000 + i,) * 2)
        (root / "config.json").write_text(json.dumps({"architectures": ["Bench"], "hidden": 4096}))
        (root / "tokenizer.json").write_text(json.dumps({"vocab": {f"t{i}": i for i in range(30000)}}))
        self.files = {p.name: p for p in sorted(root.iterdir())}

    def write_api(self) -> None:
        entries = []
        for name, p in self.files.items():
            data_hash = hashlib.sha256()
            blob = hashlib.sha1(f"blob {p.stat().st_size}\0".encode())
            with open(p, "rb") as f:
                while block := f.read(8 * MiB):
                    data_hash.update(block)
                    blob.update(block)
            e = {"type": "file", "path": name, "size": p.stat().st_size, "oid": blob.hexdigest()}
            if name.endswith(".safetensors"):
                e["lfs"] = {"oid": data_hash.hexdigest(), "size": p.stat().st_size, "pointerSize": 134}
            entries.append(e)
        self.commit = hashlib.sha1(json.dumps(entries).encode()).hexdigest()
        api = self.work / "www" / "api" / "models" / REPO
        for rev in ("main", self.commit):
            (api / "revision").mkdir(parents=True, exist_ok=True)
            (api / "tree").mkdir(parents=True, exist_ok=True)
            (api / "revision" / rev).write_text(json.dumps(
                {"id": REPO, "sha": self.commit, "siblings": [{"rfilename": n} for n in self.files]}))
            (api / "tree" / rev).write_text(json.dumps(entries))

    def start(self) -> None:
        self.port = free_port()
        conf = self.work / "nginx.conf"
        # Debian's lua module needs its NDK module loaded first.
        modules = (f"load_module {LUA_MODULE.parent}/ndk_http_module.so;\n"
                   f"load_module {LUA_MODULE};" if self.delay else "")
        wan = (f"access_by_lua_block {{ ngx.sleep({self.delay}) }}" if self.delay else "") + \
              (f" limit_rate {self.rate};" if self.rate else "")
        conf.write_text(f"""
{modules}
worker_processes 2;
pid {self.work}/nginx.pid;
error_log {self.work}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
    types {{ application/json json; }}
    default_type application/octet-stream;
    log_format bytes '$bytes_sent $request';
    access_log {self.work}/access.log bytes;
    sendfile on; tcp_nopush on; keepalive_requests 100000;
    client_body_temp_path {self.work}/tmp; proxy_temp_path {self.work}/tmp;
    fastcgi_temp_path {self.work}/tmp; uwsgi_temp_path {self.work}/tmp; scgi_temp_path {self.work}/tmp;
    server {{
        listen 127.0.0.1:{self.port};
        {wan}
        location /api/ {{ root {self.work}/www; default_type application/json; }}
        location ~ ^/{REPO}/resolve/[^/]+/(.+)$ {{
            alias {self.work}/files/{REPO}/$1;
            add_header X-Repo-Commit {self.commit};
        }}
        location /plain/ {{ alias {self.work}/files/{REPO}/; autoindex on; }}
    }}
}}
""")
        (self.work / "tmp").mkdir(exist_ok=True)
        self.proc = subprocess.Popen(["nginx", "-c", str(conf), "-g", "daemon off;"])
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nginx did not start")

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def bytes_sent(self) -> int:
        """Bytes nginx has sent so far (from its access log)."""
        log = self.work / "access.log"
        if not log.exists():
            return 0
        return sum(int(line.split(" ", 1)[0]) for line in log.read_text().splitlines() if line)


# Mounts -------------------------------------------------------------------------------------


def is_mounted(path: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


class ModelfsMount:
    """A daemon mounting the bench repo; `tree`: run the package from that source
    tree (`python -m modelfs` with it first on the path) instead of the installed one."""

    def __init__(self, origin: Origin, work: Path, cache: Path, *extra: str,
                 tree: Path | None = None, cpus: str = "") -> None:
        self.path = work / "mnt-modelfs"
        self.path.mkdir(parents=True, exist_ok=True)
        self.cmd = ["modelfs"] if tree is None else [sys.executable, "-m", "modelfs"]
        if cpus:  # the daemon (and its supervisor) confined to these CPUs
            self.cmd = ["taskset", "-c", cpus, *self.cmd]
        self.env = os.environ if tree is None else {**os.environ, "PYTHONPATH": str(tree)}
        # `python -m` puts the working directory before PYTHONPATH, and the daemon's
        # processes inherit it: run from the tree, or a checkout's root wins.
        self.cwd = None if tree is None else str(tree)
        out = sh(*self.cmd, "mount", str(self.path), "--endpoint", origin.url, "--repo", REPO,
                 "--cache-dir", str(cache), *extra, capture_output=True, text=True, env=self.env,
                 cwd=self.cwd)
        assert "mounted (pid " in out.stdout, out.stdout
        # The daemon serving the mount (the printed pid is its supervisor's): what
        # CPU and memory are measured of.
        self.pid = int((cache / "daemon" / "daemon.pid").read_text())

    def file(self, name: str) -> Path:
        return self.path / REPO / name

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mib(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def close(self) -> None:
        sh(*self.cmd, "umount", str(self.path), check=False, env=self.env, cwd=self.cwd)


class RcloneMount:
    def __init__(self, origin: Origin, work: Path, *, keep_cache: bool = False) -> None:
        self.path = work / "mnt-rclone"
        self.path.mkdir(parents=True, exist_ok=True)
        cache = work / "rclone-cache"
        if not keep_cache:
            shutil.rmtree(cache, ignore_errors=True)
        self.proc = subprocess.Popen(
            ["rclone", "mount", ":http:", str(self.path), "--http-url", f"{origin.url}/plain/",
             "--vfs-cache-mode", "full", "--cache-dir", str(cache), "--read-only",
             "--config", "/dev/null"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            if is_mounted(self.path):
                return
            time.sleep(0.05)
        raise RuntimeError("rclone mount did not appear")

    def file(self, name: str) -> Path:
        return self.path / name

    def close(self) -> None:
        sh("fusermount3", "-u", str(self.path), check=False)
        self.proc.wait(timeout=30)


# Cases -----------------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def cat(path: Path) -> None:
    sh("cat", str(path), stdout=subprocess.DEVNULL)


def read_first_mib(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        f.read(MiB)


def fio_randread(path: Path) -> float:
    """fio random 1 MiB reads over the first 256 MiB; returns seconds."""
    out = sh("fio", "--name=rr", f"--filename={path}", "--rw=randread", "--bs=1M", "--size=256M",
             "--readonly", "--ioengine=psync", "--output-format=json", capture_output=True, text=True)
    job = json.loads(out.stdout)["jobs"][0]["read"]
    return job["runtime"] / 1000 if job["runtime"] else float("nan")


@dataclass
class Result:
    name: str
    nbytes: int
    times: list[float] = field(default_factory=list)
    note: str = ""

    def med(self) -> float:
        return statistics.median(self.times)

    def mbps(self) -> float:
        return self.nbytes / self.med() / 1e6


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.origin = Origin(self.work)
        if args.profile == "wan":
            self.origin.delay, self.origin.rate = args.delay, args.rate
        self.results: dict[str, Result] = {}
        self.extra: dict[str, str] = {}

    def add(self, name: str, nbytes: int, seconds: float, note: str = "") -> None:
        r = self.results.setdefault(name, Result(name, nbytes))
        r.times.append(seconds)
        if note:
            r.note = note

    @property
    def shard(self) -> str:
        return next(n for n in self.origin.files if n.endswith(".safetensors"))

    def fresh_cache(self) -> Path:
        cache = self.work / "modelfs-cache"
        shutil.rmtree(cache, ignore_errors=True)
        return cache

    def round(self) -> None:
        o, work, shard = self.origin, self.work, self.shard
        size = o.files[shard].stat().st_size
        dl = work / "dl"

        # curl to a file
        shutil.rmtree(dl, ignore_errors=True)
        dl.mkdir()
        drop_caches()
        self.add("curl → file", size, timed(lambda: sh("curl", "-s", "-o", str(dl / "f"),
                                                       o.resolve_url(shard))))
        # aria2c -x16 -s16 to a file
        shutil.rmtree(dl, ignore_errors=True)
        dl.mkdir()
        drop_caches()
        self.add("aria2c -x16 → file", size, timed(lambda: sh(
            "aria2c", "-q", "-x16", "-s16", "-k1M", "--file-allocation=none", "-d", str(dl),
            "-o", "f", o.resolve_url(shard))))
        # hf_transfer to a file, as huggingface_hub calls it (100 files, 10 MiB chunks)
        shutil.rmtree(dl, ignore_errors=True)
        dl.mkdir()
        drop_caches()
        self.add("hf_transfer → file", size, timed(lambda: sh(
            sys.executable, "-c", HF_TRANSFER, str(dl), o.resolve_url(shard))))
        shutil.rmtree(dl, ignore_errors=True)
        # one curl range request of the first MiB
        drop_caches()
        self.add("curl range 1 MiB", MiB, timed(lambda: sh(
            "curl", "-s", "-o", "/dev/null", "-r", f"0-{MiB - 1}", o.resolve_url(shard))))

        # rclone mount, cold cat and fio
        rc = RcloneMount(o, work)
        try:
            drop_caches()
            self.add("rclone mount cold cat", size, timed(lambda: cat(rc.file(shard))))
        finally:
            rc.close()
        rc = RcloneMount(o, work, keep_cache=True)
        try:
            drop_caches()
            self.add("rclone mount warm cat (remount, its cache)", size,
                     timed(lambda: cat(rc.file(shard))))
        finally:
            rc.close()
        if self.args.profile == "loopback":
            rc = RcloneMount(o, work)
            try:
                drop_caches()
                self.add("rclone mount fio randread", 256 * MiB, fio_randread(rc.file(shard)))
            finally:
                rc.close()

        # modelfs: cold cat, then warm (remount, page cache dropped), then hot
        m = ModelfsMount(o, work, self.fresh_cache())
        try:
            drop_caches()
            cpu0 = m.cpu_seconds()
            self.add("modelfs cold cat", size, timed(lambda: cat(m.file(shard))))
            self.extra["daemon CPU s per GiB cold"] = f"{(m.cpu_seconds() - cpu0) * (1 << 30) / size:.2f}"
            other = [n for n in o.files if n.endswith(".safetensors") and n != shard]
            for n in other:
                cat(m.file(n))
            self.extra["daemon peak RSS MiB (both shards streamed)"] = f"{m.peak_rss_mib():.0f}"
        finally:
            m.close()
        m = ModelfsMount(o, work, work / "modelfs-cache")
        try:
            drop_caches()
            self.add("modelfs warm cat (remount, page cache dropped)", size,
                     timed(lambda: cat(m.file(shard))))
            self.add("modelfs hot cat (page cache)", size, timed(lambda: cat(m.file(shard))))
        finally:
            m.close()
        # modelfs first MiB, uncached
        m = ModelfsMount(o, work, self.fresh_cache())
        try:
            drop_caches()
            self.add("modelfs first MiB (uncached)", MiB, timed(lambda: read_first_mib(m.file(shard))))
        finally:
            m.close()
        # modelfs fio randread cold, with origin bytes: with the default on-open prefetch
        # of weight files, and without it (only what the reads touch)
        for label, extra in (("", ()), (" (no prefetch-on-open)", ("--prefetch-on-open=",))) \
                if self.args.profile == "loopback" else ():
            m = ModelfsMount(o, work, self.fresh_cache(), *extra)
            try:
                drop_caches()
                before = o.bytes_sent()
                self.add(f"modelfs fio randread{label}", 256 * MiB, fio_randread(m.file(shard)))
                time.sleep(1)  # let in-flight fetches land in the count
                fetched = o.bytes_sent() - before
                self.extra[f"modelfs fio{label}: origin bytes / bytes read"] = (
                    f"{fetched / (256 * MiB):.2f}")
            finally:
                m.close()

        # whole repo: snapshot_download, aria2c (all files), modelfs prefetch
        repo_bytes = sum(p.stat().st_size for p in o.files.values())
        hf_cache = work / "hf-cache"
        shutil.rmtree(hf_cache, ignore_errors=True)
        drop_caches()
        code = ("from huggingface_hub import snapshot_download; "
                f"snapshot_download({REPO!r}, cache_dir={str(hf_cache)!r})")
        env = {**os.environ, "HF_ENDPOINT": o.url, "HF_HUB_DISABLE_TELEMETRY": "1",
               "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_XET": "1"}
        self.add("snapshot_download (repo)", repo_bytes,
                 timed(lambda: sh(sys.executable, "-c", code, env=env)))
        shutil.rmtree(hf_cache, ignore_errors=True)
        shutil.rmtree(dl, ignore_errors=True)
        dl.mkdir()
        urls = work / "aria2-input.txt"
        urls.write_text("".join(f"{o.resolve_url(n)}\n  out={n}\n" for n in o.files))
        drop_caches()
        self.add("aria2c -x16 -j4 (repo)", repo_bytes, timed(lambda: sh(
            "aria2c", "-q", "-x16", "-s16", "-j4", "-k1M", "--file-allocation=none", "-d", str(dl),
            "-i", str(urls))))
        shutil.rmtree(dl, ignore_errors=True)
        dl.mkdir()
        drop_caches()
        self.add("hf_transfer file by file (repo)", repo_bytes, timed(lambda: sh(
            sys.executable, "-c", HF_TRANSFER, str(dl), *[o.resolve_url(n) for n in o.files])))
        shutil.rmtree(dl, ignore_errors=True)
        cache = self.fresh_cache()
        drop_caches()
        self.add("modelfs prefetch (repo)", repo_bytes, timed(lambda: sh(
            *MODELFS, "prefetch", REPO, "--endpoint", o.url, "--cache-dir", str(cache),
            stderr=subprocess.DEVNULL)))
        # One request per chunk, as before runs of chunks were asked for at once.
        cache = self.fresh_cache()
        drop_caches()
        self.add("modelfs prefetch (repo, --request-size 4MiB)", repo_bytes, timed(lambda: sh(
            *MODELFS, "prefetch", REPO, "--endpoint", o.url, "--cache-dir", str(cache),
            "--request-size", "4MiB", stderr=subprocess.DEVNULL)))

        # local disk references
        drop_caches()
        self.add("local disk cold (dd)", size, timed(lambda: sh(
            "dd", f"if={o.files[shard]}", "of=/dev/null", "bs=1M", "status=none")))
        cat(o.files[shard])
        self.add("local page cache (cat)", size, timed(lambda: cat(o.files[shard])))

    def table(self) -> str:
        rows = ["| case | median s | min s | max s | MB/s | ratio |", "|---|---:|---:|---:|---:|---|"]
        ref = {
            "modelfs cold cat": ("curl → file", "aria2c -x16 → file", "hf_transfer → file",
                                 "rclone mount cold cat"),
            "modelfs fio randread": ("rclone mount fio randread",),
            "modelfs fio randread (no prefetch-on-open)": ("rclone mount fio randread",),
            "modelfs first MiB (uncached)": ("curl range 1 MiB",),
            "modelfs warm cat (remount, page cache dropped)": (
                "local disk cold (dd)", "rclone mount warm cat (remount, its cache)"),
            "modelfs hot cat (page cache)": ("local page cache (cat)",),
            "modelfs prefetch (repo)": ("snapshot_download (repo)", "aria2c -x16 -j4 (repo)",
                                        "hf_transfer file by file (repo)",
                                        "modelfs prefetch (repo, --request-size 4MiB)"),
        }
        for r in self.results.values():
            ratios = []
            for other in ref.get(r.name, ()):
                if other in self.results:
                    ratios.append(f"{self.results[other].med() / r.med():.2f}x {other}")
            rows.append(f"| {r.name} | {r.med():.3f} | {min(r.times):.3f} | {max(r.times):.3f} | "
                        f"{r.mbps():.0f} | {'; '.join(ratios)} |")
        rows.append("")
        rows += [f"- {k}: {v}" for k, v in self.extra.items()]
        return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024, help="size of each shard")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", default="/var/tmp/modelfs-bench")
    ap.add_argument("--write-docs", action="store_true", help="write docs/benchmarks.md")
    ap.add_argument("--profile", choices=("loopback", "wan"), default="loopback",
                    help="wan: a CDN-like origin (a delay before each response, a rate cap "
                         "per connection)")
    ap.add_argument("--delay", type=float, default=0.03, help="wan: seconds before each response")
    ap.add_argument("--rate", default="32m", help="wan: nginx limit_rate per connection")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark drops the page cache between cases")
    ensure_tools(wan=args.profile == "wan")
    b = Bench(args)
    b.origin.generate(args.size_mib)
    b.origin.write_api()
    b.origin.start()
    try:
        for i in range(args.runs):
            print(f"round {i + 1}/{args.runs}", flush=True)
            b.round()
    finally:
        b.origin.stop()
    table = b.table()
    print(table)
    if args.write_docs:
        head = (f"{machine_line('bench/run.py')}; {args.runs} runs each, interleaved; "
                f"shards of {args.size_mib} MiB.\n")
        if args.profile == "wan":
            head += (f"Origin: nginx waiting {args.delay * 1000:.0f} ms before each response, "
                     f"each connection capped by `limit_rate {args.rate}`.\n")
            write_docs_block("<!-- bench:wan -->", f"{head}\n{table}",
                             "## A CDN-like origin (`bench/run.py --profile wan`)\n\n")
        else:
            write_docs_block("<!-- bench:table -->", f"{head}\n{table}")


def machine_line(script: str) -> str:
    """What a docs table was measured on, and the command that reruns it."""
    cmd = " ".join(["python", script, *sys.argv[1:]])
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    return (f"Machine: {platform.node()}, {os.cpu_count()} cores, {mem:.0f} GiB, "
            f"Linux {platform.release()}, Python {platform.python_version()}; "
            f"{time.strftime('%Y-%m-%d')}. Command: `{cmd}`")


def write_docs_block(marker: str, body: str, new_section: str = "") -> None:
    """Replace the block between two `marker` lines in docs/benchmarks.md (or append
    it under `new_section`): the prose around the tables stays as written."""
    out = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
    text = out.read_text() if out.exists() else "# Benchmarks\n"
    block = f"{marker}\n{body}\n{marker}"
    if marker in text:
        pre, _, rest = text.partition(marker)
        _, _, post = rest.partition(marker)
        text = pre + block + post
    else:
        text += f"\n{new_section}{block}\n"
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
