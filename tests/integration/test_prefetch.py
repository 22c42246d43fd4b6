"""`modelfs prefetch` and background prefetch on open, against the real origin."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from modelfs.testing.origin import Origin

from ..conftest import CHUNK, MiB, sha256

WEIGHTS = "model.safetensors"


def prefetch(origin: Origin, cache: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modelfs", "prefetch", *args, "--endpoint",
                           origin.url, "--cache-dir", str(cache), "--chunk-size", "1MiB",
                           "--retry-backoff", "0.05"], capture_output=True, text=True, timeout=120)


def chunks_fetched(origin: Origin) -> list[int]:
    """The chunks the CDN's ranged answers covered, once per request that covered them."""
    spans = [[int(x) for x in r.range.removeprefix("bytes=").split("-")]
             for r in origin.data_requests("/cdn/*")]
    return [c for a, b in spans for c in range(a // CHUNK, b // CHUNK + 1)]


def test_prefetch_fills_the_cache_and_reruns_fetch_nothing(origin: Origin, repo_data,
                                                           tmp_path: Path, mount_factory) -> None:
    cache = tmp_path / "cache"
    res = prefetch(origin, cache, "org/model", "org/model@v1")
    assert res.returncode == 0, res.stderr
    main_bytes = sum(len(d) for d in repo_data["org/model@main"].values())
    v1_bytes = sum(len(d) for d in repo_data["org/model@v1"].values())
    assert f"done org/model/{WEIGHTS} ({len(repo_data['org/model@main'][WEIGHTS])} bytes)" in res.stderr
    # Every byte fetched once (the weights in 1 MiB ranges, split across connections).
    sent = sum(r.bytes_sent for r in origin.data_requests() if r.status in (200, 206))
    assert sent == main_bytes + v1_bytes

    origin.reset_stats()
    res = prefetch(origin, cache, "org/model", "org/model@v1")
    assert res.returncode == 0
    assert "fetched 0 bytes" in res.stderr
    assert origin.data_requests() == []

    # A mount over the warmed cache reads everything without a data request.
    m = mount_factory(["org/model"])
    for path, data in repo_data["org/model@main"].items():
        assert sha256(m.p(f"org/model/{path}").read_bytes()) == sha256(data)
    assert origin.data_requests() == []


def test_prefetch_include_exclude(origin: Origin, repo_data, tmp_path: Path) -> None:
    res = prefetch(origin, tmp_path / "c", "org/model", "--include", "*.json", "--exclude",
                   "tokenizer*")
    assert res.returncode == 0, res.stderr
    fetched = {r.path.rsplit("/", 1)[-1] for r in origin.data_requests()}
    assert fetched == {"config.json"}


def test_prefetch_one_failing_file_does_not_fail_the_others(origin: Origin, repo_data,
                                                            tmp_path: Path) -> None:
    origin.fail_next(1000, 503, match="tokenizer.json")
    res = prefetch(origin, tmp_path / "c", "org/model", "--retries", "1")
    assert res.returncode == 1
    assert "failed org/model/tokenizer.json" in res.stderr
    assert f"done org/model/{WEIGHTS}" in res.stderr
    res = prefetch(origin, tmp_path / "c", "org/nope")
    assert res.returncode == 1
    assert "repo org/nope revision 'main': not found" in res.stderr


def test_prefetch_usage_errors_exit_2(origin: Origin, tmp_path: Path) -> None:
    assert prefetch(origin, tmp_path / "c").returncode == 2
    res = prefetch(origin, tmp_path / "c", "not-a-repo")
    assert res.returncode == 2
    assert "expected ORG/NAME" in res.stderr


def test_open_prefetches_the_whole_file_in_the_background(mount_factory, origin: Origin,
                                                          repo_data) -> None:
    m = mount_factory(["org/model"], "--prefetch-on-open=*.safetensors")
    data = repo_data["org/model@main"][WEIGHTS]
    with open(m.p(f"org/model/{WEIGHTS}"), "rb", buffering=0) as f:
        assert f.read(10) == data[:10]
        deadline = time.monotonic() + 30
        want = list(range(-(-len(data) // CHUNK)))
        while len(chunks_fetched(origin)) < len(want) and time.monotonic() < deadline:
            time.sleep(0.05)
    # Every chunk once (consecutive missing chunks in one request).
    assert sorted(chunks_fetched(origin)) == want
    origin.reset_stats()
    fd = os.open(m.p(f"org/model/{WEIGHTS}"), os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # drop the kernel's copy of this file
    os.close(fd)
    assert m.p(f"org/model/{WEIGHTS}").read_bytes() == data
    assert origin.data_requests() == []
    # The prefetched chunks were held in memory for the file's reader: none had to
    # be loaded back from its chunk file (written past the page cache).
    with m.client() as c:
        assert c.status()["reads"]["chunk_loads"] == 0
    # Only matching files are prefetched on open.
    assert m.p("org/model/tokenizer.json").read_bytes()[:1] == b"{"
    assert [r.path for r in origin.data_requests()] == ["/org/model/resolve/" +
                                                        origin.commit_of("org/model") +
                                                        "/tokenizer.json"]


def test_opening_a_cached_file_loads_its_chunks_ahead_of_the_reader(
        mount_factory, origin: Origin, repo_data, tmp_path: Path) -> None:
    """After a restart nothing is in memory, and every chunk is loaded from disk and
    checked before it is served. On open of a weight file cached whole, chunks are
    loaded ahead of the reader (in the loader's order), so its reads rarely wait
    for the disk; each chunk is loaded once."""
    data = repo_data["org/model@main"][WEIGHTS]
    assert prefetch(origin, tmp_path / "cache", "org/model").returncode == 0
    origin.reset_stats()
    m = mount_factory(["org/model"], "--prefetch-on-open=*.safetensors")
    chunks = -(-len(data) // CHUNK)
    with open(m.p(f"org/model/{WEIGHTS}"), "rb", buffering=0) as f:
        assert f.read(10) == data[:10]  # the first chunk: loaded on the read's own time
        assert f.read() == data[10:]
    with m.client() as c:
        reads = c.status()["reads"]
    assert reads["chunk_loads"] + reads["chunk_loads_ahead"] == chunks, reads
    assert reads["chunk_loads_ahead"] >= chunks // 2, reads
    assert origin.data_requests() == []


def test_the_next_shard_is_prefetched_while_one_is_read_in_order(mount_factory,
                                                                  origin: Origin) -> None:
    """Loaders read a checkpoint's shards in turn: while one is read in order, the
    next one (only) is fetched whole. A random reader of a shard, or a quick probe,
    starts none."""
    repos = {repo: {f"model-{i:05d}-of-00003.safetensors": os.urandom(20 * MiB + 100 * i)
                    for i in (1, 2, 3)} for repo in ("org/loaded", "org/random")}
    for repo, shards in repos.items():
        for name, data in shards.items():
            origin.put_file(repo, "main", name, data)
    names = list(repos["org/loaded"])
    m = mount_factory(list(repos), "--prefetch-on-open=*.safetensors")

    def fetched(repo: str, name: str) -> set[int]:
        spans = [[int(x) for x in r.range.removeprefix("bytes=").split("-")]
                 for r in origin.data_requests(f"/cdn/{sha256(repos[repo][name])}")]
        return {c for a, b in spans for c in range(a // CHUNK, b // CHUNK + 1)}

    first = repos["org/random"][names[0]]
    with open(m.p(f"org/random/{names[0]}"), "rb", buffering=0) as f:
        for c in (5, 0, 17, 2, 16, 1, 9, 4):  # a random reader
            f.seek(c * CHUNK + 10)
            assert f.read(4096) == first[c * CHUNK + 10:c * CHUNK + 4106]
        time.sleep(1.0)
    assert fetched("org/random", names[1]) == set()

    with open(m.p(f"org/loaded/{names[2]}"), "rb") as f:  # a probe of the last shard
        f.read(8)
    with open(m.p(f"org/loaded/{names[0]}"), "rb", buffering=0) as f:
        assert b"".join(iter(lambda: f.read(MiB), b"")) == repos["org/loaded"][names[0]]
        deadline = time.monotonic() + 30
        want = set(range(-(-len(repos["org/loaded"][names[1]]) // CHUNK)))
        while fetched("org/loaded", names[1]) != want and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fetched("org/loaded", names[1]) == want
    time.sleep(0.5)
    # What the probe read, and nothing ahead of the next shard.
    assert fetched("org/loaded", names[2]) <= {0, 1}
    origin.reset_stats()
    second = repos["org/loaded"][names[1]]
    assert m.p(f"org/loaded/{names[1]}").read_bytes() == second
    assert fetched("org/loaded", names[1]) == set()  # all of it from the cache


def test_sequential_read_is_fetched_ahead_in_parallel(mount_factory, origin: Origin,
                                                      repo_data) -> None:
    m = mount_factory(["org/model"])
    data = repo_data["org/model@main"][WEIGHTS]
    origin.delay = 0.05
    with open(m.p(f"org/model/{WEIGHTS}"), "rb", buffering=0) as f:
        got = b"".join(iter(lambda: f.read(MiB), b""))
    assert got == data
    ranges = [r.range for r in origin.data_requests("/cdn/*")]
    assert len(ranges) == len(set(ranges)) == -(-len(data) // CHUNK)


def test_a_quick_probe_of_a_weight_file_fetches_only_what_it_read(mount_factory, origin: Origin,
                                                                  repo_data) -> None:
    m = mount_factory(["org/model"], "--prefetch-on-open=*.safetensors")
    with open(m.p(f"org/model/{WEIGHTS}"), "rb") as f:  # like `safe_open` reading the header
        assert f.read(8) == repo_data["org/model@main"][WEIGHTS][:8]
    time.sleep(1.0)  # well past the on-open prefetch's start delay
    # The chunk it read, and at most the one the kernel's own 1 MiB read-ahead reaches.
    starts = sorted(int(r.range.removeprefix("bytes=").split("-")[0])
                    for r in origin.data_requests("/cdn/*"))
    assert starts[0] == 0
    assert starts[-1] <= CHUNK
    assert len(starts) == len(set(starts))


def test_an_unusable_cache_dir_is_a_clear_error(origin: Origin, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    res = prefetch(origin, not_a_dir, "org/model")
    assert res.returncode == 1
    assert f"cache dir {not_a_dir}: not a directory" in res.stderr
    assert "Traceback" not in res.stderr
    mnt = tmp_path / "m"
    mnt.mkdir()
    res = subprocess.run([sys.executable, "-m", "modelfs", "mount", str(mnt), "--endpoint",
                          origin.url, "--repo", "org/model", "--cache-dir", str(not_a_dir)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert str(not_a_dir) in res.stderr
    assert "Traceback" not in res.stderr


def test_prefetch_force_refetches_and_pin_pins(origin: Origin, repo_data, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert prefetch(origin, cache, "org/model@v1").returncode == 0
    origin.reset_stats()
    res = prefetch(origin, cache, "org/model@v1", "--force", "--pin")
    assert res.returncode == 0, res.stderr
    v1_bytes = sum(len(d) for d in repo_data["org/model@v1"].values())
    assert sum(r.bytes_sent for r in origin.data_requests() if r.status in (200, 206)) == v1_bytes
    ls = subprocess.run([sys.executable, "-m", "modelfs", "cache", "ls", "--cache-dir", str(cache)],
                        capture_output=True, text=True, check=True).stdout
    assert "org/model@v1 -> " in ls and "pinned" in ls
