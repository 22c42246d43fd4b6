"""A real daemon against a hostile origin, API requests and cache directory: it
answers with one line naming the repo, keeps serving the others, and never dies."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from modelfs.cache import Index
from modelfs.testing.origin import Origin

from ..conftest import is_mounted

MAIN = "org/model@main"


def mount_cli(tmp_path: Path, origin: Origin, *args: str, timeout: float = 60,
              env_token: str | None = None) -> subprocess.CompletedProcess[str]:
    mnt = tmp_path / "m"
    mnt.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    if env_token is not None:
        env["HF_TOKEN"] = env_token
    try:
        return subprocess.run([sys.executable, "-m", "modelfs", "mount", str(mnt), "--endpoint",
                               origin.url, "--cache-dir", str(tmp_path / "c"), "--retries", "1",
                               "--retry-backoff", "0.05", *args],
                              capture_output=True, text=True, timeout=timeout, env=env)
    finally:
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
            pytest.fail("a mount that should have failed is mounted")


@pytest.mark.parametrize(("script", "body", "headers", "expect"), [
    ("revision/main", {"sha": "a" * 40 + "\n"}, {}, "origin sent no commit sha"),
    ("revision/main", "[" * 100_000, {}, "origin sent invalid JSON"),
    ("tree/*", [], {"Link": '<http://[::1/x>; rel="next"'}, "unusable Link header"),
])
def test_mount_refuses_hostile_answers_in_one_line(tmp_path: Path, origin: Origin, script: str,
                                                   body, headers, expect: str) -> None:
    origin.script(f"/api/models/org/model/{script}", body, headers=headers)
    res = mount_cli(tmp_path, origin, "--repo", "org/model")
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith("modelfs: repo org/model") and expect in lines[0]


def test_mount_with_a_listing_that_never_ends_gives_up(tmp_path: Path, origin: Origin) -> None:
    commit = origin.commit_of("org/model")
    loop = f"{origin.url}/api/models/org/model/tree/{commit}?recursive=true"
    origin.script("/api/models/org/model/tree/*", [], headers={"Link": f'<{loop}>; rel="next"'})
    t0 = time.monotonic()
    res = mount_cli(tmp_path, origin, "--repo", "org/model")
    assert res.returncode == 1 and "pages repeat or never end" in res.stderr
    assert time.monotonic() - t0 < 30


def test_a_moved_branch_with_a_hostile_listing_keeps_the_mount(mount_factory, origin: Origin,
                                                               repo_data) -> None:
    m = mount_factory(["org/model", "org/other"], "--revision-ttl", "0.3", "--retries", "0")
    before = m.p("org/model/config.json").read_bytes()
    # The branch moves to a commit whose listing holds a lone surrogate, then to one
    # whose listing is JSON nested 100,000 deep, then to a sha with a newline.
    origin.put_file("org/model", "main", "new.txt", b"new")
    origin.extra_entries["org/model"] = [
        {"type": "file", "oid": "c" * 40, "size": 3, "path": "x\udcff"}]
    time.sleep(1.5)
    assert m.p("org/model/new.txt").read_bytes() == b"new"
    assert not any("\udcff" in p.name for p in m.p("org/model").iterdir())
    origin.put_file("org/model", "main", "newer.txt", b"newer")
    origin.script("/api/models/org/model/tree/*", "[" * 100_000)
    time.sleep(1.0)
    origin.script("/api/models/org/model/revision/main", {"sha": "b" * 40 + "\n"})
    time.sleep(1.0)
    assert m.proc.poll() is None, m.log_text()[-3000:]
    assert m.p("org/model/config.json").read_bytes() == before  # still the last good tree
    assert m.p("org/other/config.json").read_bytes() == repo_data["org/other@main"]["config.json"]
    log = m.log_text()
    assert "cannot re-resolve org/model" in log and "invalid JSON" in log
    origin.clear_faults()
    time.sleep(1.0)
    assert m.p("org/model/newer.txt").read_bytes() == b"newer"  # recovers by itself


def test_poisoned_prefetch_requests_never_kill_the_daemon(mount_factory, origin: Origin) -> None:
    m = mount_factory(["org/model"])
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(m.socket))) as http:
        for body in (b'{"repos":[{"id":"org/x","revision":"\\udcff"}]}',
                     b'{"repos":[{"id":"org/\\udcff"}]}',
                     b'{"repos":[{"id":"org/x","include":["\\udcff"]}]}',
                     b'{"repos":[{"id":"org/x","revision":"' + b"r" * 300 + b'"}]}',
                     b"[" * 100_000):
            r = http.post("http://modelfs/v1/prefetch", content=body)
            assert r.status_code == 400, r.text
            assert len(r.text) < 600
        # A repo whose listing holds a hostile name: the job ends, the daemon lives.
        origin.extra_entries["org/model"] = [
            {"type": "file", "oid": "c" * 40, "size": 3, "path": "y\udcff"}]
        origin.put_file("org/model", "v7", "w.bin", b"w" * 100)
        origin.script("/api/models/org/model/revision/v8", {"sha": "d" * 40 + "\n"})
        r = http.post("http://modelfs/v1/prefetch",
                      json={"repos": [{"id": "org/model", "revision": "v7"},
                                      {"id": "org/model", "revision": "v8"}]})
        assert r.status_code == 202
        job_id = r.json()["id"]
        deadline = time.monotonic() + 30
        while (job := http.get(f"http://modelfs/v1/jobs/{job_id}").json())["finished"] is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert job["state"] == "partial"
    assert any("org/model@v8" in e and "no commit sha" in e for e in job["errors"])
    assert {i["path"] for i in job["items"] if i["state"] == "done"} >= {"w.bin"}
    assert m.proc.poll() is None


def test_daemon_starts_whatever_the_jobs_table_holds(mount_factory, tmp_path: Path) -> None:
    index = Index(tmp_path / "cache" / "index")
    index.put_job("bad-1", {"id": "bad-1", "repos": [{"id": "org/x", "revision": "\udcff"}]})
    index.put_job("bad-2", {"no": "fields"})
    index._write(lambda txn: txn.put(b"bad-3", b"{not json", db=index._jobs))
    index.close()
    m = mount_factory(["org/model"])
    assert m.p("org/model/config.json").exists()
    with m.client() as c:
        assert c.jobs() == []
    log = m.log_text()
    assert log.count("saved record is unusable") == 3
    index = Index(tmp_path / "cache" / "index")
    assert index.jobs() == []  # dropped, so the next start does not trip on them
    index.close()


def test_control_api_refuses_huge_bodies(mount_factory) -> None:
    m = mount_factory(["org/model"])
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(m.socket))) as http:
        r = http.post("http://modelfs/v1/prefetch", content=b" " * (4 << 20))
        assert r.status_code == 413
        r = http.post("http://modelfs/v1/prefetch", content=iter([b" " * (1 << 20)] * 4))
        assert r.status_code == 413
    assert m.proc.poll() is None
    with m.client() as c:
        assert c.alive()


def test_saved_jobs_can_be_listed_and_cancelled_without_a_daemon(tmp_path: Path) -> None:
    from modelfs.jobs import Job, JobSpec, RepoRequest

    cache = tmp_path / "cache"
    index = Index(cache / "index")
    job = Job("20261201-0000abcd", JobSpec((RepoRequest("org/model"),)), time.time())
    index.put_job(job.id, job.record())
    index._write(lambda txn: txn.put(b"20261201-poisoned", b"[[[", db=index._jobs))
    index.close()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "modelfs", *args, "--control-socket",
                               str(tmp_path / "none.sock")], capture_output=True, text=True,
                              timeout=60, env={"MODELFS_CACHE_DIR": str(cache), "PATH": "/usr/bin"})

    listed = cli("jobs", "--json")
    assert listed.returncode == 0, listed.stderr
    states = {j["id"]: j["state"] for j in json.loads(listed.stdout)}
    assert states == {job.id: "running", "20261201-poisoned": "unreadable"}
    assert cli("pause", job.id).returncode == 1  # only cancel works offline
    done = cli("cancel", job.id)
    assert done.returncode == 0 and done.stdout.strip() == f"{job.id} cancelled", done.stderr
    assert cli("cancel", "20261201-poisoned").stdout.strip() == "20261201-poisoned deleted"
    missing = cli("cancel", "nope")
    assert missing.returncode == 1 and "no saved job 'nope'" in missing.stderr
    index = Index(cache / "index")
    (rec,) = index.jobs()
    index.close()
    assert rec["cancelled"] is True and rec["finished"] is not None


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "modelfs", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("cut", ["8KiB", "half"])
def test_a_truncated_index_is_reported_in_one_line_and_rebuilt(
        mount_factory, origin: Origin, repo_data, tmp_path: Path, cut: str) -> None:
    m = mount_factory(["org/model"])
    weights = m.p("org/model/model.safetensors").read_bytes()
    m.close()
    data = tmp_path / "cache" / "index" / "data.mdb"
    os_size = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(8192 if cut == "8KiB" else os_size // 2)
    for args in (["cache", "verify"], ["cache", "ls"]):
        res = _cli(*args, "--cache-dir", str(tmp_path / "cache"))
        assert res.returncode == 1, res  # not 135 (SIGBUS)
        (line,) = res.stderr.strip().splitlines()
        assert "index damaged:" in line and "rebuild-index" in line
    res = mount_cli(tmp_path, origin, "--repo", "org/model", "--cache-dir",
                    str(tmp_path / "cache"))
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1
    assert "index damaged:" in res.stderr
    m2 = mount_factory(["org/model"], "--rebuild-index")
    assert m2.p("org/model/model.safetensors").read_bytes() == weights
    assert "rebuilt the cache index" in m2.log_text()
    assert list((tmp_path / "cache").glob("index.damaged-*"))


def test_rebuild_keeps_the_chunks_that_check_out(mount_factory, origin: Origin,
                                                 tmp_path: Path) -> None:
    m = mount_factory(["org/model"])
    weights = m.p("org/model/model.safetensors").read_bytes()
    m.close()
    chunks = sorted((tmp_path / "cache" / "chunks").rglob("*"))
    files = [c for c in chunks if c.is_file()]
    victim = max(files, key=lambda p: p.stat().st_size)
    victim.write_bytes(b"\0" * victim.stat().st_size)  # damaged on disk
    res = _cli("cache", "rebuild-index", "--cache-dir", str(tmp_path / "cache"))
    assert res.returncode == 0, res.stderr
    assert f"kept {len(files) - 1} chunks that check out, dropped 1" in res.stdout
    origin.reset_stats()
    m2 = mount_factory(["org/model"])
    assert m2.p("org/model/model.safetensors").read_bytes() == weights
    assert len(origin.data_requests("/cdn/*")) == 1  # only the damaged chunk is fetched again


def _wait_for(cond, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_file_whose_bytes_stay_bad_fails_until_the_origin_mends(mount_factory, origin: Origin,
                                                                  repo_data) -> None:
    w = repo_data[MAIN]["model.safetensors"]
    sha = hashlib.sha256(w).hexdigest()
    origin.corrupt_next(1000, match="model.safetensors")  # every chunk, every time
    m = mount_factory(["org/model"])
    with open(m.p("org/model/model.safetensors"), "rb") as f:
        f.read()  # served before the whole-file check can end
    _wait_for(lambda: "not served until the origin sends the right bytes" in m.log_text(),
              "the second mismatch")
    log = m.log_text()
    assert "repo org/model: model.safetensors: its bytes hash to " in log and sha in log
    for _ in range(3):  # every later read fails, from the kernel's cache too
        with open(m.p("org/model/model.safetensors"), "rb") as f, pytest.raises(OSError) as err:
            f.read()
        assert err.value.errno == 5
    origin.clear_faults()
    with open(m.p("org/model/model.safetensors"), "rb"):
        pass  # a later open checks again
    _wait_for(lambda: "the origin serves the right bytes again" in m.log_text(), "the recheck")
    assert m.p("org/model/model.safetensors").read_bytes() == w


def test_small_files_are_checked_against_their_git_blob_id(mount_factory, origin: Origin,
                                                           repo_data, tmp_path: Path) -> None:
    origin.corrupt_next(1000, match="config.json")
    m = mount_factory(["org/model"])
    with pytest.raises(OSError) as err:
        m.p("org/model/config.json").read_bytes()
    assert err.value.errno == 5  # never the wrong bytes
    assert "config.json: its bytes hash to" in m.log_text()
    assert "git blob id" in m.log_text()
    origin.clear_faults()
    assert m.p("org/model/config.json").read_bytes() == repo_data[MAIN]["config.json"]
    m.close()
    res = _cli("cache", "verify", "org/model", "--cache-dir", str(tmp_path / "cache"))
    assert "config.json: ok, git blob id verified" in res.stdout, res.stdout
    # A cache filled by a version that stored bad bytes: verify finds them.
    from modelfs.cache import CacheConfig, ChunkCache, ChunkStore

    oid = hashlib.sha1(b"blob %d\0" % len(repo_data[MAIN]["README.md"])
                       + repo_data[MAIN]["README.md"]).hexdigest()
    index = Index(tmp_path / "cache" / "index")
    cache = ChunkCache(index, ChunkStore(tmp_path / "cache"), CacheConfig())
    cache.put(oid, 1 << 20, 0, bytearray(b"# not the readme\n"[:len(repo_data[MAIN]["README.md"])]))
    index.close()
    res = _cli("cache", "verify", "org/model", "--cache-dir", str(tmp_path / "cache"))
    assert res.returncode == 1 and "README.md: GIT BLOB ID MISMATCH" in res.stdout, res.stdout


# Trust: tokens and the cache directory ----------------------------------------------


def test_a_token_with_a_trailing_cr_is_stripped_and_never_shown(mount_factory, origin: Origin,
                                                                tmp_path: Path) -> None:
    token = "hf_crlfTOKEN0123456789"
    origin.require_token["org/model"] = token
    m = mount_factory(["org/model"], env={"HF_TOKEN": token + "\r"})
    assert m.p("org/model/config.json").exists()
    m.close()
    assert token not in m.log_text() and token not in m.stderr.read_text()
    bad = mount_cli(tmp_path, origin, "--repo", "org/model",
                    env_token="hf_two words" + token)
    assert bad.returncode == 2 or bad.returncode == 1
    assert "HF_TOKEN: the token holds spaces" in bad.stderr and token not in bad.stderr


def test_the_cache_dir_is_owner_only(tmp_path: Path, origin: Origin) -> None:
    mnt = tmp_path / "bg"
    mnt.mkdir()
    cache = tmp_path / "fresh" / "cache"
    res = subprocess.run([sys.executable, "-m", "modelfs", "mount", str(mnt), "--endpoint",
                          origin.url, "--repo", "org/model", "--cache-dir", str(cache)],
                         capture_output=True, text=True, timeout=60)
    try:
        assert res.returncode == 0, res.stderr
        (mnt / "org/model/config.json").read_bytes()
    finally:
        subprocess.run([sys.executable, "-m", "modelfs", "umount", str(mnt)], timeout=60)
    assert cache.stat().st_mode & 0o777 == 0o700
    for f in [cache / "modelfs.log", cache / "index" / "data.mdb",
              *(p for p in (cache / "chunks").rglob("*") if p.is_file())]:
        assert f.stat().st_mode & 0o077 == 0, f


@pytest.mark.parametrize("plant", ["tmp-link", "chunk-dir-link", "log-link", "other-owner",
                                   "world-writable"])
def test_an_untrustworthy_cache_dir_is_refused(tmp_path: Path, origin: Origin, plant: str) -> None:
    cache = tmp_path / "c"
    (cache / "chunks").mkdir(parents=True, mode=0o700)
    (cache / "index").mkdir(mode=0o700)
    cache.chmod(0o700)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    if plant == "tmp-link":
        (cache / "tmp").symlink_to(victim)
    elif plant == "chunk-dir-link":
        (cache / "chunks" / "ab").symlink_to(victim)
    elif plant == "log-link":
        (cache / "modelfs.log").symlink_to(victim / "precious")
    elif plant == "other-owner":
        os.chown(cache, 65534, 65534)
    else:
        cache.chmod(0o777)
    for args in (["mount", str(tmp_path / "m"), "--endpoint", origin.url, "--repo", "org/model"],
                 ["cache", "ls"]):
        (tmp_path / "m").mkdir(exist_ok=True)
        res = _cli(*args, "--cache-dir", str(cache))
        assert res.returncode == 1, (plant, args, res.stderr)
        assert f"cache dir {cache}" in res.stderr
        assert not is_mounted(tmp_path / "m")
    assert (victim / "precious").read_text() == "keep me"
    assert sorted(p.name for p in victim.iterdir()) == ["precious"]


def test_huge_declared_sizes_cost_nothing_on_open_and_break_no_listing(mount_factory,
                                                                       origin: Origin) -> None:
    good = {"type": "file", "oid": "e" * 40}
    origin.extra_entries["org/model"] = [
        {**good, "path": "huge.bin", "size": 1 << 44},  # kept: within max_file_size
        {**good, "path": "beyond.bin", "size": 1 << 64},  # skipped
        {**good, "path": "way-beyond.bin", "size": 10**30},  # skipped
    ]
    m = mount_factory(["org/model"], "--prefetch-on-open=*.bin", "--retries", "0")
    names = {p.name for p in m.p("org/model").iterdir()}  # ls works for the whole directory
    assert "huge.bin" in names and not {"beyond.bin", "way-beyond.bin"} & names
    assert os.stat(m.p("org/model/huge.bin")).st_size == 1 << 44
    os.statvfs(m.path)  # df works
    with open(m.p("org/model/huge.bin"), "rb"):
        time.sleep(0.5)  # the on-open prefetch starts (and fails: the origin has no such file)
        t0 = time.monotonic()
        assert m.p("org/model/config.json").read_bytes()
        assert time.monotonic() - t0 < 1.0  # the daemon is not frozen planning 4M chunks
    status = Path(f"/proc/{m.daemon_pid()}/status").read_text()
    rss = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))
    assert rss < 400_000, f"daemon RSS {rss} kB"


def test_daemon_commands_find_the_socket_from_the_cache_dir(mount_factory, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    m = mount_factory(["org/model"], "--control-socket", str(cache / "control.sock"))
    for args in (["status", "--json"], ["jobs", "--json"]):
        res = _cli(*args, "--cache-dir", str(cache))
        assert res.returncode == 0, res.stderr
    assert json.loads(_cli("status", "--json", "--cache-dir", str(cache)).stdout)["pid"] == \
        m.daemon_pid()
