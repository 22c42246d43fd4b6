"""Cache lifecycle through real mounts: freshness, integrity, space, crash safety,
start-up and offline serving."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modelfs.cache import Index
from modelfs.testing.origin import Origin

from ..conftest import MiB, drop_page_cache, is_mounted, sha256, wait_for


def modelfs(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "modelfs", *args], capture_output=True, text=True,
                         timeout=120)
    if check and res.returncode != 0:
        raise AssertionError(f"modelfs {' '.join(args)} exited {res.returncode}: {res.stderr}")
    return res


def cache_ls(cache_dir: Path) -> dict:  # type: ignore[type-arg]
    return json.loads(modelfs("cache", "ls", "--json", "--cache-dir", str(cache_dir)).stdout)


def file_cached(ls: dict, repo: str, rev: str, path: str) -> tuple[int, int]:  # type: ignore[type-arg]
    for r in ls["revisions"]:
        if r["repo_id"] == repo and r["revision"] == rev:
            f = next(f for f in r["files"] if f["path"] == path)
            return f["cached"], f["size"]
    raise AssertionError(f"{repo}@{rev} not in cache ls")


# Freshness ------------------------------------------------------------------------------


def test_branch_move_new_opens_see_new_tree_open_handles_keep_theirs(
        mount_factory, origin: Origin, repo_data, tmp_path: Path) -> None:
    sha_v1 = origin.commit_of("org/model", "v1")
    m = mount_factory(["org/model", f"org/model@{sha_v1}"], "--revision-ttl", "0.3")
    old = repo_data["org/model@main"]["model.safetensors"]
    new = random.Random(9).randbytes(5 * MiB + 3)
    with open(m.p("org/model/model.safetensors"), "rb") as fh:
        head = fh.read(MiB)
        origin.put_file("org/model", "main", "model.safetensors", new)
        origin.put_file("org/model", "main", "added.txt", b"added on main\n")
        wait_for(lambda: m.p("org/model/added.txt").exists(), what="the moved branch")
        assert m.p("org/model/model.safetensors").read_bytes() == new
        assert m.p("org/model/model.safetensors").stat().st_size == len(new)
        drop_page_cache()
        rest = fh.read()
    assert head + rest == old  # the handle opened before the move: old content, never a mix
    assert m.p(f"org/model@{sha_v1}/model.safetensors").read_bytes() == \
        repo_data["org/model@v1"]["model.safetensors"]
    resolves = [r.path for r in origin.records if "/revision/" in r.path]
    assert resolves and not [p for p in resolves if sha_v1 in p]  # a commit is never re-resolved
    assert "moved" in m.log_text()


def test_files_unchanged_by_a_branch_move_keep_their_inode_and_page_cache(
        mount_factory, origin: Origin, repo_data) -> None:
    m = mount_factory(["org/model"], "--revision-ttl", "0.3")
    weights = repo_data["org/model@main"]["model.safetensors"]
    path = m.p("org/model/model.safetensors")
    assert path.read_bytes() == weights  # now in the kernel's page cache
    ino = path.stat().st_ino
    readme_ino = m.p("org/model/README.md").stat().st_ino
    origin.put_file("org/model", "main", "README.md", b"# model, edited\n")
    wait_for(lambda: m.p("org/model/README.md").read_bytes() == b"# model, edited\n",
             what="the moved branch")
    assert m.p("org/model/README.md").stat().st_ino != readme_ino  # changed: a new inode
    assert path.stat().st_ino == ino  # unchanged: the same inode
    with m.client() as c:
        served = c.status()["reads"]["bytes_served"]
        assert path.read_bytes() == weights
        # Answered from the kernel's pages of the kept inode. (Without the merge the
        # daemon serves the whole file again; the kernel may drop a few pages anyway.)
        assert c.status()["reads"]["bytes_served"] - served < len(weights) // 4
    hf = m.p(".hf-cache/hub/models--org--model/snapshots")
    assert len(list(hf.iterdir())) == 1  # the HF view moved too


def test_force_refetches_listing_and_content(mount_factory, origin: Origin, repo_data) -> None:
    w = repo_data["org/model@main"]["model.safetensors"]
    m = mount_factory(["org/model"])
    assert sha256(m.p("org/model/model.safetensors").read_bytes()) == sha256(w)
    m.close()
    origin.reset_stats()
    m = mount_factory(["org/model"])
    drop_page_cache()
    assert m.p("org/model/model.safetensors").read_bytes() == w
    assert origin.data_requests() == []  # cached: no data requests
    m.close()
    m = mount_factory(["org/model"], "--force")
    assert m.p("org/model/model.safetensors").read_bytes() == w
    assert sum(r.bytes_sent for r in origin.data_requests()) >= len(w)
    assert any("/tree/" in r.path for r in origin.records)


# Integrity ------------------------------------------------------------------------------


def test_damaged_chunks_are_detected_reported_and_refetched(mount_factory, origin: Origin,
                                                            repo_data, tmp_path: Path) -> None:
    w = repo_data["org/model@main"]["model.safetensors"]
    m = mount_factory(["org/model"])
    assert m.p("org/model/model.safetensors").read_bytes() == w
    m.p("org/model/config.json").read_bytes()
    m.close()
    cache = tmp_path / "cache"
    ix = Index(cache / "index")
    content_id = hashlib.sha256(w).hexdigest()
    chunks = ix.file_chunks(content_id, MiB)
    ix.close()
    assert len(chunks) == 11
    paths = [cache / "chunks" / chunks[i][:2] / chunks[i] for i in (2, 5, 9)]
    raw = bytearray(paths[0].read_bytes())
    raw[12345] ^= 0x10
    paths[0].write_bytes(bytes(raw))  # a flipped bit
    paths[1].write_bytes(paths[1].read_bytes()[:4096])  # truncated
    paths[2].unlink()  # deleted

    res = modelfs("cache", "verify", "org/model", "--cache-dir", str(cache), check=False)
    assert res.returncode == 1
    assert "model.safetensors: DAMAGED: 3 of 11 chunks dropped" in res.stdout
    assert "config.json: ok" in res.stdout
    res = modelfs("cache", "verify", "--cache-dir", str(cache))
    assert "model.safetensors: ok, partial (8 chunks)" in res.stdout

    # Damage done while no daemon was running, not caught by verify: found on first use.
    ix = Index(cache / "index")
    d = ix.get_chunk(content_id, MiB, 0)
    ix.close()
    assert d is not None
    p0 = cache / "chunks" / d[:2] / d
    raw = bytearray(p0.read_bytes())
    raw[0] ^= 1
    p0.write_bytes(bytes(raw))
    origin.reset_stats()
    m = mount_factory(["org/model"])
    drop_page_cache()
    assert m.p("org/model/model.safetensors").read_bytes() == w
    fetched = sorted(r.range for r in origin.data_requests() if r.status == 206)
    assert len(fetched) == 4, fetched  # chunk 0 (damaged on disk) and the three verify dropped
    assert "damaged or missing on disk" in m.log_text()


def test_whole_file_sha256_mismatch_is_dropped_and_refetched(mount_factory, origin: Origin,
                                                             repo_data, tmp_path: Path) -> None:
    w = repo_data["org/model@main"]["model.safetensors"]
    origin.corrupt_next(1, match="model.safetensors")  # one chunk arrives with a flipped byte
    m = mount_factory(["org/model"])
    m.p("org/model/model.safetensors").read_bytes()
    wait_for(lambda: "INTEGRITY" in m.log_text(), what="the whole-file check to fail")
    wait_for(lambda: "sha256 verified" in m.log_text(), what="the refetched file to verify")
    assert m.p("org/model/model.safetensors").read_bytes() == w  # kernel cache dropped too
    m.close()
    res = modelfs("cache", "verify", "org/model", "--cache-dir", str(tmp_path / "cache"))
    assert "model.safetensors: ok, sha256 verified" in res.stdout


# Compression --------------------------------------------------------------------------


def test_compressible_files_are_stored_compressed_and_read_back(mount_factory, origin: Origin,
                                                                repo_data, tmp_path: Path) -> None:
    tok = repo_data["org/model@main"]["tokenizer.json"]
    w = repo_data["org/model@main"]["model.safetensors"]
    m = mount_factory(["org/model"])
    assert m.p("org/model/tokenizer.json").read_bytes() == tok
    assert m.p("org/model/model.safetensors").read_bytes() == w
    m.close()
    ix = Index(tmp_path / "cache" / "index")
    tok_blob = ix.blob(ix.get_chunk(hashlib.sha1(b"blob %d\0" % len(tok) + tok).hexdigest(), MiB, 0)
                       or "")
    w_blob = ix.blob(ix.get_chunk(hashlib.sha256(w).hexdigest(), MiB, 0) or "")
    ix.close()
    raw_disk = -(-len(tok) // 4096) * 4096
    assert tok_blob is not None and tok_blob.codec == 1 and tok_blob.disk_bytes < raw_disk
    assert w_blob is not None and not w_blob.compressed  # random weights: stored raw
    assert w_blob.positional  # an LFS file: chunks named by position, checked whole
    origin.reset_stats()
    m = mount_factory(["org/model"])
    drop_page_cache()
    assert m.p("org/model/tokenizer.json").read_bytes() == tok  # decompressed from the cache
    assert origin.data_requests() == []


# Space ----------------------------------------------------------------------------------


def test_size_limit_evicts_lru_and_keeps_pins(mount_factory, origin: Origin, repo_data,
                                              tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    sha_v1 = origin.commit_of("org/model", "v1")
    m = mount_factory(["org/model@v1"])  # the index learns v1's listing
    m.close()
    modelfs("cache", "pin", "org/model@v1", "--cache-dir", str(cache), "--endpoint", origin.url)
    m = mount_factory(["org/model", "org/model@v1"], "--cache-size", "6MiB")
    v1 = repo_data["org/model@v1"]["model.safetensors"]
    w = repo_data["org/model@main"]["model.safetensors"]
    assert m.p("org/model@v1/model.safetensors").read_bytes() == v1
    assert m.p("org/model/model.safetensors").read_bytes() == w
    m.close()
    ls = cache_ls(cache)
    assert ls["usage"] <= 6 * MiB
    assert file_cached(ls, "org/model", "v1", "model.safetensors") == (len(v1), len(v1))
    cached, size = file_cached(ls, "org/model", "main", "model.safetensors")
    assert 0 < cached < size
    pinned = [r for r in ls["revisions"] if r["pinned"]]
    assert [(r["repo_id"], r["revision"], r["commit"]) for r in pinned] == \
        [("org/model", "v1", sha_v1)]
    # Read again through a fresh mount: what was evicted is fetched again, all right.
    m = mount_factory(["org/model"], "--cache-size", "6MiB")
    drop_page_cache()
    assert m.p("org/model/model.safetensors").read_bytes() == w


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_disk_full_evicts_or_serves_uncached(mount_factory, origin: Origin, repo_data,
                                             tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(small)], check=True)
    try:
        m = mount_factory(["org/model"], "--cache-size", "unlimited", cache="small/cache")
        w = repo_data["org/model@main"]["model.safetensors"]
        assert m.p("org/model/model.safetensors").read_bytes() == w
        drop_page_cache()
        assert m.p("org/model/model.safetensors").read_bytes() == w
        assert m.proc.poll() is None  # still serving
        log = m.log_text()
        assert "cache file system full" in log or "serving it uncached" in log
        m.close()
    finally:
        subprocess.run(["umount", str(small)], check=False)


# Crash safety and start-up ------------------------------------------------------------


def test_kill_9_during_prefetch_leaves_nothing_damaged(mount_factory, origin: Origin,
                                                       repo_data, tmp_path: Path) -> None:
    w = repo_data["org/model@main"]["model.safetensors"]
    origin.throttle = 2 * MiB  # per connection: a 10 MiB prefetch takes about a second
    rnd = random.Random(4)
    completed = 0
    for i in range(20):
        m = mount_factory(["org/model"], "--prefetch-on-open=*.safetensors",
                          *(["--force"] if i % 2 else []))
        with contextlib.suppress(OSError), open(m.p("org/model/model.safetensors"), "rb") as fh:
            fh.read(4096)
            time.sleep(rnd.uniform(0.25, 0.9))
            m.proc.kill()
            m.proc.wait()
        subprocess.run(["fusermount3", "-u", str(m.path)], check=False)
        assert not is_mounted(m.path)
        completed += "prefetched org/model/model.safetensors" in m.log_text()
    assert completed < 10  # most kills landed mid-prefetch
    origin.throttle = 0
    cache = tmp_path / "cache"
    res = modelfs("cache", "verify", "--cache-dir", str(cache))
    assert "nothing damaged" in res.stdout, res.stdout
    modelfs("cache", "gc", "--cache-dir", str(cache))
    m = mount_factory(["org/model"])
    for path, data in repo_data["org/model@main"].items():
        assert m.p(f"org/model/{path}").read_bytes() == data, path
    assert m.p("org/model/model.safetensors").read_bytes() == w


def test_start_up_does_not_scan_the_chunks(mount_factory, origin: Origin, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    n = 100_000
    ix = Index(cache / "index")
    records = []
    for i in range(n):
        digest = hashlib.sha256(i.to_bytes(8, "big")).hexdigest()
        d = cache / "chunks" / digest[:2]
        if not d.exists():
            d.mkdir(parents=True)
        (d / digest).write_bytes(b"x")
        records.append((f"bulk{i // 1000}", MiB, i % 1000, digest, 4096, 1, 0, 0))
    ix.put_chunks(records)
    assert ix.statistics().blobs == n
    ix.close()
    t0 = time.monotonic()
    m = mount_factory(["org/model"])
    ready = time.monotonic() - t0
    print(f"mount over {n} cached chunks ready in {ready:.2f}s")
    assert ready < 5.0, ready  # about a second; generous for a noisy VM
    assert m.p("org/model/config.json").exists()


# Offline ------------------------------------------------------------------------------


def test_offline_serves_cache_fails_fast_and_recovers(mount_factory, origin: Origin,
                                                      repo_data) -> None:
    files = repo_data["org/model@main"]
    flags = ("--retries", "1", "--retry-backoff", "0.05", "--timeout", "2", "--revision-ttl", "0.3")
    m = mount_factory(["org/model"], *flags)
    assert m.p("org/model/config.json").read_bytes() == files["config.json"]
    origin.go_down()
    try:
        drop_page_cache()
        assert m.p("org/model/config.json").read_bytes() == files["config.json"]
        t0 = time.monotonic()
        with pytest.raises(OSError) as exc:
            m.p("org/model/model.safetensors").read_bytes()
        assert exc.value.errno == errno.EIO
        assert time.monotonic() - t0 < 15
        assert "model.safetensors" in m.log_text()
        m.close()
        # Remount with the origin still down: the listing comes from the index.
        m = mount_factory(["org/model"], *flags)
        assert sorted(os.listdir(m.p("org/model"))) == sorted(
            {p.split("/")[0] for p in files})
        assert m.p("org/model/config.json").read_bytes() == files["config.json"]
        assert "from the cache" in m.log_text()
    finally:
        origin.come_back()
    # Back by itself: uncached reads work again, and the branch is followed again.
    assert m.p("org/model/model.safetensors").read_bytes() == files["model.safetensors"]
    origin.put_file("org/model", "main", "config.json", b'{"moved": true}')
    wait_for(lambda: m.p("org/model/config.json").read_bytes() == b'{"moved": true}',
             what="the branch to be followed again")


# Cache commands -----------------------------------------------------------------------


def test_cache_commands(mount_factory, origin: Origin, repo_data, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    m = mount_factory(["org/model", "org/other"])
    for rel in ("org/model/config.json", "org/model/model.safetensors", "org/other/config.json"):
        m.p(rel).read_bytes()
    m.close()
    text = modelfs("cache", "ls", "--cache-dir", str(cache)).stdout
    assert "org/model@main" in text and "model.safetensors" in text
    w = repo_data["org/model@main"]["model.safetensors"]
    ls = cache_ls(cache)
    assert file_cached(ls, "org/other", "main", "model.safetensors") == (len(w), len(w))  # shared
    modelfs("cache", "pin", "org/other", "--cache-dir", str(cache), "--endpoint", origin.url)
    out = modelfs("cache", "evict", "org/model", "--cache-dir", str(cache)).stdout
    assert "evicted 1 files" in out  # config.json; the weights are shared with pinned org/other
    ls = cache_ls(cache)
    assert file_cached(ls, "org/model", "main", "config.json")[0] == 0
    assert file_cached(ls, "org/model", "main", "model.safetensors")[0] == len(w)
    modelfs("cache", "unpin", "org/other", "--cache-dir", str(cache), "--endpoint", origin.url)
    stray = cache / "chunks" / "ff" / ("ff" * 32)
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(b"left by a crash")
    os.utime(stray, (time.time() - 3600,) * 2)
    out = modelfs("cache", "gc", "--cache-dir", str(cache)).stdout
    assert "removed 1 unindexed chunk files" in out and not stray.exists()
    out = modelfs("cache", "clear", "--yes", "--cache-dir", str(cache)).stdout
    assert cache_ls(cache)["usage"] == 0
    assert not any((cache / "chunks").rglob("*.*")) and not [
        p for p in (cache / "chunks").rglob("*") if p.is_file()]
    bad = modelfs("cache", "evict", "not-a-repo", "--cache-dir", str(cache), check=False)
    assert bad.returncode == 2 and "ORG/NAME" in bad.stderr
