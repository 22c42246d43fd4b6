"""Real FUSE mounts of the daemon (a subprocess) against the real origin fixture."""

from __future__ import annotations

import errno
import os
import random
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from modelfs.testing.origin import Origin

from ..conftest import CHUNK, drop_page_cache, is_mounted, sha256

MAIN = "org/model@main"
WEIGHTS = "model.safetensors"

_MAPPED_READER = """
import mmap, os, random, sys, threading
path, expect, nthreads, nfaults = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
data = open(expect, "rb").read()
fd = os.open(path, os.O_RDONLY)
mm = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
bad = []
def fault(seed):
    rnd = random.Random(seed)
    for _ in range(nfaults):
        off = rnd.randrange(0, len(data) - 1)
        n = rnd.choice([1, 4096, 5000, 70000])
        if mm[off:off + n] != data[off:off + n]:
            bad.append(off)
threads = [threading.Thread(target=fault, args=(i,)) for i in range(nthreads)]
for t in threads: t.start()
for t in threads: t.join()
assert mm[-10:] == data[-10:]
print("bad", len(bad))
sys.exit(1 if bad else 0)
"""


def origin_file(tmp_path: Path, path: str, repo: str = "org/model", ref: str = "main") -> Path:
    return tmp_path / "origin" / repo / ref / path


def run_mapped(path: Path, expect: Path, *, threads: int, faults: int) -> None:
    """Fault random pages of `path` from `threads` threads of a child process; every
    byte must equal `expect`'s, and it must finish (no deadlock) within the timeout."""
    res = subprocess.run([sys.executable, "-c", _MAPPED_READER, str(path), str(expect),
                          str(threads), str(faults)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_tree_sizes_and_modes(mount_factory, repo_data) -> None:
    m = mount_factory(["org/model", "org/model@v1", "org/other"])
    for key, top in [("org/model@main", "org/model"), ("org/model@v1", "org/model@v1"),
                     ("org/other@main", "org/other")]:
        root = m.p(top)
        seen = {p.relative_to(root).as_posix(): p.stat().st_size
                for p in root.rglob("*") if p.is_file()}
        assert seen == {path: len(data) for path, data in repo_data[key].items()}
    st_file = m.p("org/model/config.json").stat()
    st_dir = m.p("org/model/sub").stat()
    assert stat.S_IMODE(st_file.st_mode) == 0o444 and stat.S_ISREG(st_file.st_mode)
    assert stat.S_IMODE(st_dir.st_mode) == 0o555 and stat.S_ISDIR(st_dir.st_mode)
    assert st_file.st_uid == os.getuid()
    assert sorted(os.listdir(m.path)) == [".hf-cache", "org"]
    assert sorted(os.listdir(m.p("org"))) == ["model", "model@v1", "other"]
    assert os.statvfs(m.path).f_namemax == 255


def test_allow_other_is_passed_to_the_kernel(mount_factory) -> None:
    m = mount_factory(["org/model"], "--allow-other")
    with open("/proc/self/mounts") as f:
        opts = next(line.split()[3] for line in f if line.split()[1] == str(m.path))
    assert "allow_other" in opts.split(",")
    assert "ro" in opts.split(",")


def test_listing_needs_no_data_requests(mount_factory, origin: Origin) -> None:
    m = mount_factory(["org/model"])
    list(m.p("org/model").rglob("*"))
    assert origin.data_requests() == []


def test_every_file_hashes_like_the_origin(mount_factory, repo_data) -> None:
    m = mount_factory(["org/model", "org/model@v1"])
    for key, top in [("org/model@main", "org/model"), ("org/model@v1", "org/model@v1")]:
        for path, data in repo_data[key].items():
            assert sha256(m.p(f"{top}/{path}").read_bytes()) == sha256(data), path


def test_random_preads_and_mmap_match(mount_factory, repo_data, tmp_path: Path) -> None:
    m = mount_factory(["org/model"])
    data = repo_data[MAIN][WEIGHTS]
    rnd = random.Random(42)
    fd = os.open(m.p(f"org/model/{WEIGHTS}"), os.O_RDONLY)
    try:
        for _ in range(200):
            off = rnd.randrange(0, len(data) + 100)
            size = rnd.choice([1, 7, 4096, 65536, CHUNK + 3, 3 * CHUNK])
            assert os.pread(fd, size, off) == data[off:off + size], (off, size)
    finally:
        os.close(fd)
    # Mapped reads run in a child process: a page fault blocks its thread while it
    # holds the GIL, and this process also runs the origin the daemon fetches from.
    run_mapped(m.p(f"org/model/{WEIGHTS}"), origin_file(tmp_path, WEIGHTS), threads=1, faults=50)


def test_only_touched_chunks_are_fetched(mount_factory, origin: Origin, repo_data) -> None:
    m = mount_factory(["org/model"])
    with open(m.p(f"org/model/{WEIGHTS}"), "rb", buffering=0) as f:
        f.seek(5 * CHUNK + 1000)
        assert f.read(100) == repo_data[MAIN][WEIGHTS][5 * CHUNK + 1000:5 * CHUNK + 1100]
    cdn = [r for r in origin.data_requests() if r.server == "cdn"]
    assert [r.range for r in cdn] == [f"bytes={5 * CHUNK}-{6 * CHUNK - 1}"]
    assert sum(r.bytes_sent for r in cdn) == CHUNK


def test_remount_rereads_without_data_requests(mount_factory, origin: Origin, repo_data) -> None:
    m = mount_factory(["org/model"])
    before = {p: m.p(f"org/model/{p}").read_bytes() for p in repo_data[MAIN]}
    assert m.close() == 0
    origin.reset_stats()
    drop_page_cache()
    m2 = mount_factory(["org/model"])
    for path, data in repo_data[MAIN].items():
        assert m2.p(f"org/model/{path}").read_bytes() == data == before[path]
    assert origin.data_requests() == []


def test_file_shared_by_two_repos_is_stored_once(mount_factory, origin: Origin, repo_data,
                                                 tmp_path: Path) -> None:
    m = mount_factory(["org/model", "org/other"])
    data = repo_data[MAIN][WEIGHTS]
    assert m.p(f"org/model/{WEIGHTS}").read_bytes() == data
    fetched = sum(r.bytes_sent for r in origin.data_requests() if r.server == "cdn")
    assert fetched == len(data)
    origin.reset_stats()
    assert m.p(f"org/other/{WEIGHTS}").read_bytes() == data
    assert origin.data_requests() == []
    want = -(-len(data) // CHUNK)

    def chunk_files() -> int:
        return sum(1 for p in (tmp_path / "cache" / "chunks").rglob("*") if p.is_file())

    deadline = time.monotonic() + 10  # chunks are stored after they are served
    while chunk_files() < want and time.monotonic() < deadline:
        time.sleep(0.05)
    assert chunk_files() == want


def test_pinned_and_main_show_their_own_content(mount_factory, origin: Origin, repo_data) -> None:
    m = mount_factory(["org/model", "org/model@v1", f"org/model@{origin.commit_of('org/model', 'v1')}"])
    assert m.p("org/model/config.json").read_bytes() == repo_data[MAIN]["config.json"]
    assert m.p("org/model@v1/config.json").read_bytes() == repo_data["org/model@v1"]["config.json"]
    sha_dir = f"org/model@{origin.commit_of('org/model', 'v1')}"
    assert m.p(f"{sha_dir}/{WEIGHTS}").read_bytes() == repo_data["org/model@v1"][WEIGHTS]
    assert m.p(f"org/model/{WEIGHTS}").read_bytes() == repo_data[MAIN][WEIGHTS]
    assert not m.p("org/model@v1/sub").exists()


def test_writes_get_erofs(mount_factory) -> None:
    m = mount_factory(["org/model"])
    f = m.p("org/model/config.json")
    attempts = [
        lambda: open(f, "r+b"),
        lambda: open(m.p("org/model/new.txt"), "wb"),
        lambda: os.mkdir(m.p("org/model/newdir")),
        lambda: os.unlink(f),
        lambda: os.rename(f, m.p("org/model/x.json")),
        lambda: os.chmod(f, 0o644),
        lambda: os.utime(f),
        lambda: os.truncate(f, 0),
        lambda: os.symlink("config.json", m.p("org/model/link")),
        lambda: os.rmdir(m.p("org/model/sub")),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as exc:
            attempt()
        assert exc.value.errno == errno.EROFS
    assert f.read_bytes().startswith(b"{")


def test_connection_reset_mid_body_is_resumed(mount_factory, origin: Origin, repo_data) -> None:
    m = mount_factory(["org/model"])
    origin.reset_next(1, after_bytes=300_000, match=WEIGHTS)
    with open(m.p(f"org/model/{WEIGHTS}"), "rb", buffering=0) as f:
        f.seek(2 * CHUNK)  # read the whole chunk: it needs the bytes after the reset
        assert f.read(CHUNK) == repo_data[MAIN][WEIGHTS][2 * CHUNK:3 * CHUNK]
    ranges = [r.range for r in origin.data_requests() if r.server == "cdn"]
    # The body broke after at most 300,000 bytes (a reset may discard some that were
    # in flight); the retry asks only for the rest.
    assert len(ranges) == 2
    assert ranges[0] == f"bytes={2 * CHUNK}-{3 * CHUNK - 1}"
    resumed_at, end = (int(x) for x in ranges[1].removeprefix("bytes=").split("-"))
    assert 2 * CHUNK < resumed_at <= 2 * CHUNK + 300_000
    assert end == 3 * CHUNK - 1


def test_concurrent_readers_of_one_chunk_share_one_fetch(mount_factory, origin: Origin,
                                                        repo_data) -> None:
    m = mount_factory(["org/model"])
    data = repo_data[MAIN][WEIGHTS]
    origin.delay = 0.3  # keep the fetch in flight while all readers arrive
    path = m.p(f"org/model/{WEIGHTS}")
    base = 7 * CHUNK
    results: dict[int, bytes] = {}
    barrier = threading.Barrier(8)

    def reader(i: int) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no kernel read-ahead merging
            barrier.wait()
            results[i] = os.pread(fd, 4096, base + i * 65536)
        finally:
            os.close(fd)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for i in range(8):
        assert results[i] == data[base + i * 65536:base + i * 65536 + 4096]
    ranges = [r.range for r in origin.data_requests() if r.server == "cdn"]
    # One request for the chunk all eight read (read-ahead may add later chunks).
    assert ranges.count(f"bytes={base}-{base + CHUNK - 1}") == 1
    assert all(int(r.removeprefix("bytes=").split("-")[0]) >= base for r in ranges)


def test_5xx_is_retried_with_backoff(mount_factory, origin: Origin, repo_data) -> None:
    m = mount_factory(["org/model"], "--retry-backoff", "0.05")
    origin.fail_next(3, 503, match=WEIGHTS)
    origin.fail_next(1, 429, match=WEIGHTS, retry_after="0")
    with open(m.p(f"org/model/{WEIGHTS}"), "rb") as f:
        assert f.read(1000) == repo_data[MAIN][WEIGHTS][:1000]
    statuses = [r.status for r in origin.data_requests()]
    # Every injected failure was seen and retried (read-ahead may interleave other fetches).
    assert statuses.count(503) == 3
    assert statuses.count(429) == 1


def test_persistent_failure_is_eio_and_logged_then_recovers(mount_factory, origin: Origin,
                                                             repo_data) -> None:
    m = mount_factory(["org/model"], "--retries", "2", "--retry-backoff", "0.05")
    origin.fail_next(100, 503, match=WEIGHTS)
    fd = os.open(m.p(f"org/model/{WEIGHTS}"), os.O_RDONLY)
    try:
        with pytest.raises(OSError) as exc:
            os.pread(fd, 100, 3 * CHUNK + 5)
        assert exc.value.errno == errno.EIO
        # The kernel asks for whole pages: the log names the page-aligned offset.
        assert f"read of org/model/{WEIGHTS} at offset {3 * CHUNK} " in m.log_text()
        origin.clear_faults()
        assert os.pread(fd, 100, 3 * CHUNK + 5) == repo_data[MAIN][WEIGHTS][3 * CHUNK + 5:3 * CHUNK + 105]
    finally:
        os.close(fd)


def test_unsafe_listing_entries_are_skipped(mount_factory, origin: Origin) -> None:
    oid = "a" * 40
    origin.extra_entries["org/model"] = [
        {"type": "file", "path": p, "size": 3, "oid": oid}
        for p in ["../escape", "/etc/passwd", "a/./b", "a//b", "", "x\0y", "config.json",
                  "README.md/inner"]
    ]
    m = mount_factory(["org/model"])
    names = {p.relative_to(m.p("org/model")).as_posix() for p in m.p("org/model").rglob("*")}
    assert names == {"config.json", "tokenizer.json", "model.safetensors", "sub", "sub/dir",
                     "sub/dir/notes.txt", "README.md", "empty.txt"}
    assert not (m.path.parent / "escape").exists()
    log = m.log_text()
    assert "skipping listing entry '../escape'" in log
    assert "collides with another entry" in log


def test_mount_cli_background_and_umount(tmp_path: Path, origin: Origin, repo_data) -> None:
    mnt = tmp_path / "bg"
    mnt.mkdir()
    cache = tmp_path / "bgcache"
    res = subprocess.run([sys.executable, "-m", "modelfs", "mount", str(mnt), "--endpoint",
                          origin.url, "--repo", "org/model", "--cache-dir", str(cache)],
                         capture_output=True, text=True, timeout=60)
    try:
        assert res.returncode == 0, res.stderr
        assert is_mounted(mnt)
        assert (mnt / "org/model/config.json").read_bytes() == repo_data[MAIN]["config.json"]
    finally:
        out = subprocess.run([sys.executable, "-m", "modelfs", "umount", str(mnt)],
                             capture_output=True, text=True, timeout=60)
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
    assert out.returncode == 0, out.stderr
    assert not is_mounted(mnt)
    assert "mounted org/model" in (cache / "modelfs.log").read_text()


@pytest.mark.parametrize(("repo", "expect"), [
    ("org/nope", "repo org/nope revision 'main': not found (HTTP 404 RepoNotFound)"),
    ("org/model@nope", "repo org/model revision 'nope': not found (HTTP 404 RevisionNotFound)"),
])
def test_unknown_repo_or_revision_fails_and_mounts_nothing(tmp_path: Path, origin: Origin,
                                                           repo: str, expect: str) -> None:
    mnt = tmp_path / "m"
    mnt.mkdir()
    res = subprocess.run([sys.executable, "-m", "modelfs", "mount", str(mnt), "--endpoint",
                          origin.url, "--repo", repo, "--cache-dir", str(tmp_path / "c")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert res.stderr.strip() == f"modelfs: {expect}"
    assert not is_mounted(mnt)


def test_unreachable_origin_fails_with_reason(tmp_path: Path) -> None:
    mnt = tmp_path / "m"
    mnt.mkdir()
    res = subprocess.run([sys.executable, "-m", "modelfs", "mount", str(mnt), "--endpoint",
                          "http://127.0.0.1:9", "--repo", "org/model", "--retries", "1",
                          "--retry-backoff", "0.05", "--cache-dir", str(tmp_path / "c")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert "repo org/model revision 'main': ConnectError" in res.stderr
    assert not is_mounted(mnt)


def test_gated_repo_needs_token_which_never_leaks(tmp_path: Path, mount_factory, origin: Origin,
                                                  repo_data) -> None:
    token = "hf_secretTOKEN123"
    origin.require_token["org/model"] = token
    mnt = tmp_path / "g"
    mnt.mkdir()
    res = subprocess.run([sys.executable, "-m", "modelfs", "mount", str(mnt), "--endpoint",
                          origin.url, "--repo", "org/model", "--cache-dir", str(tmp_path / "c")],
                         capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in os.environ.items() if k != "HF_TOKEN"})
    assert res.returncode == 1
    assert res.stderr.strip() == "modelfs: gated or private repo org/model: set HF_TOKEN or --token-file"
    assert not is_mounted(mnt)

    tf = tmp_path / "token"
    tf.write_text(token + "\n")
    m = mount_factory(["org/model"], "--token-file", str(tf))
    assert m.p(f"org/model/{WEIGHTS}").read_bytes()[:4096] == repo_data[MAIN][WEIGHTS][:4096]
    assert m.p("org/model/config.json").read_bytes() == repo_data[MAIN]["config.json"]
    hub = [r for r in origin.records if r.server == "hub" and r.status < 400]
    cdn = [r for r in origin.records if r.server == "cdn"]
    assert hub and all(r.authorized for r in hub)
    assert cdn and not any(r.authorized for r in cdn)  # dropped on the cross-host redirect
    m.close()
    assert token not in m.log_text()


def test_mount_over_a_mount_or_a_missing_dir_fails_cleanly(mount_factory, tmp_path: Path,
                                                          origin: Origin) -> None:
    m = mount_factory(["org/model"])
    for target, reason in [(m.path, "something is already mounted there"),
                           (tmp_path / "missing", "not an existing directory")]:
        res = subprocess.run([sys.executable, "-m", "modelfs", "mount", str(target), "--endpoint",
                              origin.url, "--repo", "org/model", "--cache-dir", str(tmp_path / "c")],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 1
        assert reason in res.stderr
    assert m.p("org/model/config.json").exists()  # the first mount still serves


def test_parallel_page_faults_on_an_uncached_mapping(mount_factory, tmp_path: Path) -> None:
    m = mount_factory(["org/model"])
    run_mapped(m.p(f"org/model/{WEIGHTS}"), origin_file(tmp_path, WEIGHTS), threads=16, faults=50)
