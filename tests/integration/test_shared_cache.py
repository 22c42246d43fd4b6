"""The fleet's shared chunk tier on a real S3 server (SeaweedFS): nodes (mounts with
caches of their own) read from it what another node fetched from the origin; a
damaged object is never served; a tier that is down or has no credentials costs
readers nothing."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from modelfs.testing.origin import Origin
from modelfs.testing.s3 import ADMIN, READER, S3Server

from ..conftest import CHUNK, MiB, is_mounted, wait_for
from .test_control import wait_job

WEIGHTS = "model.safetensors"
_tiers = itertools.count()
TIER_BUCKET = f"tier-{os.getpid()}"


def tier_bucket(s3: S3Server) -> str:
    """BUCKET/PREFIX of a tier of the test's own: one bucket for every test (each
    bucket costs SeaweedFS volumes of its own), a prefix each."""
    if not any(b["Name"] == TIER_BUCKET for b in s3.client().list_buckets()["Buckets"]):
        s3.client().create_bucket(Bucket=TIER_BUCKET)
    return f"{TIER_BUCKET}/t{next(_tiers)}"


def shared(m: Any) -> dict[str, Any]:
    with m.client() as c:
        doc: dict[str, Any] = c.status()["shared_cache"]
    return doc


def tier_objects(s3: S3Server, where: str) -> list[str]:
    prefix = where.partition("/")[2]
    listing = s3.client().list_objects_v2(Bucket=TIER_BUCKET, Prefix=f"{prefix}/fleet/chunks/")
    return [o["Key"] for o in listing.get("Contents", [])]


def _first_node(s3: S3Server, mount_factory: Any, w: bytes) -> tuple[str, tuple[str, str], Any]:
    """A tier of the test's own (its BUCKET/PREFIX and the mount flags naming it), and a
    node that read the weights and wrote them to it."""
    bucket = tier_bucket(s3)
    tier = ("--shared-cache", f"s3://{bucket}/fleet/")
    a = mount_factory(["org/model"], *tier, cache="cache-a", env=s3.env(ADMIN))
    assert a.p(f"org/model/{WEIGHTS}").read_bytes() == w
    wait_for(lambda: shared(a)["bytes_written"] >= len(w), what="the tier written")
    return bucket, tier, a


def test_a_node_reads_from_the_tier_what_another_fetched_and_never_a_damaged_object(
        s3_server: S3Server, mount_factory: Any, origin: Origin, repo_data) -> None:
    w = repo_data["org/model@main"][WEIGHTS]
    chunks = -(-len(w) // CHUNK)
    env = s3_server.env(ADMIN)
    bucket, tier, a = _first_node(s3_server, mount_factory, w)
    assert "read from the shared cache" in a.log_text()
    assert shared(a)["misses"] == chunks and shared(a)["hits"] == 0
    assert len(tier_objects(s3_server, bucket)) == chunks

    # A second node: every chunk from the tier, none from the origin.
    origin.reset_stats()
    b = mount_factory(["org/model"], *tier, cache="cache-b", env=env)
    assert b.p(f"org/model/{WEIGHTS}").read_bytes() == w
    assert origin.data_requests(f"*{WEIGHTS}") == []
    doc = shared(b)
    assert doc["hits"] == chunks and doc["bytes_read"] == len(w) and doc["bytes_written"] == 0
    assert doc["url"] == f"s3://{bucket}/fleet/"

    # A damaged object (one byte flipped) is not served: that chunk comes from the
    # origin, and its object is written again.
    key = sorted(tier_objects(s3_server, bucket))[0]
    body = bytearray(s3_server.client().get_object(Bucket=TIER_BUCKET, Key=key)["Body"].read())
    body[0] ^= 0xFF
    s3_server.client().put_object(Bucket=TIER_BUCKET, Key=key, Body=bytes(body))
    origin.reset_stats()
    c = mount_factory(["org/model"], *tier, cache="cache-c", env=env)
    assert c.p(f"org/model/{WEIGHTS}").read_bytes() == w
    assert len(origin.data_requests(f"*{WEIGHTS}")) == 1
    assert shared(c)["damaged"] == 1 and shared(c)["hits"] == chunks - 1

    def repaired() -> bool:
        fixed = s3_server.client().get_object(Bucket=TIER_BUCKET, Key=key)["Body"].read()
        return hashlib.sha256(fixed[:-32]).digest() == fixed[-32:]
    wait_for(repaired, what="the damaged object rewritten")
    for m in (a, b, c):
        assert ADMIN[1] not in m.log_text()


def test_a_node_that_may_only_read_the_tier_reads_it_and_writes_nothing(
        s3_server: S3Server, mount_factory: Any, origin: Origin, repo_data) -> None:
    w = repo_data["org/model@main"][WEIGHTS]
    chunks = -(-len(w) // CHUNK)
    _, tier, _ = _first_node(s3_server, mount_factory, w)

    # Credentials that may read and list but not write: the store refuses the
    # lease probe at start and every write; reads go on (no back-off from them).
    origin.reset_stats()
    b = mount_factory(["org/model"], *tier, cache="cache-b", env=s3_server.env(READER))
    tokenizer = repo_data["org/model@main"]["tokenizer.json"]
    assert b.p("org/model/tokenizer.json").read_bytes() == tokenizer  # not in the tier
    assert b.p(f"org/model/{WEIGHTS}").read_bytes() == w
    assert origin.data_requests(f"*{WEIGHTS}") == []  # every chunk from the tier
    assert len(origin.data_requests("*tokenizer.json")) == 1
    doc = shared(b)
    assert doc["hits"] == chunks and doc["errors"] == 0
    assert doc["writes_refused"] >= 1 and doc["bytes_written"] == 0
    assert b.log_text().count("was refused") == 1
    assert READER[1] not in b.log_text()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_tier_that_is_down_costs_readers_nothing_and_is_logged_once(
        s3_server: S3Server, mount_factory: Any, repo_data) -> None:
    w = repo_data["org/model@main"][WEIGHTS]
    env = {**s3_server.env(ADMIN), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_closed_port()}"}
    m = mount_factory(["org/model"], "--shared-cache", "s3://nowhere/fleet/", env=env)
    t0 = time.monotonic()
    assert m.p(f"org/model/{WEIGHTS}").read_bytes() == w
    assert time.monotonic() - t0 < 10
    doc = shared(m)
    assert doc["errors"] >= 1 and doc["hits"] == 0
    assert m.log_text().count("reading from the origin for") == 1


def test_a_tier_that_never_answers_costs_readers_one_wait_and_is_logged_once(
        s3_server: S3Server, mount_factory: Any, repo_data) -> None:
    w = repo_data["org/model@main"][WEIGHTS]
    with socket.socket() as hung:  # takes connections (the kernel's backlog), never answers
        hung.bind(("127.0.0.1", 0))
        hung.listen(256)
        env = {**s3_server.env(ADMIN),
               "AWS_ENDPOINT_URL": f"http://127.0.0.1:{hung.getsockname()[1]}"}
        m = mount_factory(["org/model"], "--shared-cache", "s3://hung/fleet/", env=env)
        t0 = time.monotonic()
        assert m.p(f"org/model/{WEIGHTS}").read_bytes() == w
        took = time.monotonic() - t0
        doc = shared(m)
        assert doc["hits"] == 0 and doc["errors"] >= 3
        assert m.log_text().count("reading from the origin for") == 1
        # The reads under way failed together: one wait of the tier's 10 s bound,
        # not one per chunk (10 chunks).
        assert took < 25, took


def test_a_tier_without_credentials_is_a_warning_or_with_required_an_error(
        s3_server: S3Server, mount_factory: Any, repo_data, tmp_path: Path,
        origin: Origin) -> None:
    w = repo_data["org/model@main"][WEIGHTS]
    tier = ("--shared-cache", "s3://fleet-bucket/x/")
    m = mount_factory(["org/model"], *tier, env=s3_server.env(None))
    assert "shared cache s3://fleet-bucket/x/: no AWS credentials found" in m.log_text()
    assert "going on without it" in m.log_text()
    assert m.p(f"org/model/{WEIGHTS}").read_bytes() == w
    assert shared(m)["url"] is None

    mnt = tmp_path / "refused"
    mnt.mkdir()
    res = subprocess.run([sys.executable, "-m", "modelfs", "mount", str(mnt), "--repo",
                          "org/model", "--endpoint", origin.url, "--cache-dir",
                          str(tmp_path / "c"), *tier, "--shared-cache-required"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, **s3_server.env(None)})
    assert res.returncode == 1, res
    assert not is_mounted(mnt)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "shared cache s3://fleet-bucket/x/" in lines[0], res.stderr


def test_prefetch_writes_the_tier_and_a_fresh_node_prefetches_from_it(
        s3_server: S3Server, origin: Origin, repo_data, tmp_path: Path) -> None:
    bucket = tier_bucket(s3_server)
    env = {**os.environ, **s3_server.env(ADMIN)}

    def prefetch(cache: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "modelfs", "prefetch", "org/model",
                               "--endpoint", origin.url, "--cache-dir", str(tmp_path / cache),
                               "--chunk-size", "1MiB", "--shared-cache",
                               f"s3://{bucket}/fleet/", "--control-socket",
                               str(tmp_path / "none.sock"), "--json"],
                              capture_output=True, text=True, timeout=120, env=env)

    def job(res: subprocess.CompletedProcess[str]) -> dict:  # type: ignore[type-arg]
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout.splitlines()[-1])  # the last line: the job

    first = job(prefetch("c1"))
    total = sum(len(d) for d in repo_data["org/model@main"].values())
    sent = sum(r.bytes_sent for r in origin.data_requests() if r.status in (200, 206))
    assert sent == total
    assert (first["fetched_bytes"], first["shared_bytes"]) == (total, 0)
    origin.reset_stats()
    second = job(prefetch("c2"))
    assert origin.data_requests() == []  # every chunk from the tier
    assert (second["fetched_bytes"], second["shared_bytes"]) == (0, total)
    assert second["downloaded_bytes"] == total


@pytest.fixture
def forward_proxy(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """tinyproxy on 127.0.0.1 (Debian's), and its log."""
    if shutil.which("tinyproxy") is None:
        if os.environ.get("CI"):
            pytest.fail("no `tinyproxy` on PATH: check.sh installs it")
        pytest.skip("needs tinyproxy (apt-get install tinyproxy)")
    port, log = _closed_port(), tmp_path / "tinyproxy.log"
    conf = tmp_path / "tinyproxy.conf"
    conf.write_text(f'Port {port}\nListen 127.0.0.1\nTimeout 60\nLogFile "{log}"\n'
                    "LogLevel Info\nMaxClients 100\nAllow 127.0.0.1\n")
    proc = subprocess.Popen(["tinyproxy", "-d", "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _listening(port), what="tinyproxy listening")
        yield f"http://127.0.0.1:{port}", log
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_origin_requests_go_through_the_proxy_and_the_tier_and_api_never_do(
        s3_server: S3Server, mount_factory: Any, origin: Origin, repo_data,
        forward_proxy: tuple[str, Path]) -> None:
    w = repo_data["org/model@main"][WEIGHTS]
    proxy, log = forward_proxy
    bucket = tier_bucket(s3_server)
    s3_port = s3_server.endpoint.rsplit(":", 1)[1]
    hub_port, cdn_port = origin.url.rsplit(":", 1)[1], origin.cdn_url.rsplit(":", 1)[1]
    # The setting, and the environment's HTTP_PROXY (which the local API must ignore).
    for n, (extra, env) in enumerate(((("--proxy", proxy), {}), ((), {"HTTP_PROXY": proxy}))):
        m = mount_factory(["org/model"], "--shared-cache", f"s3://{bucket}/p{n}/", *extra,
                          cache=f"cache-{n}", env={**s3_server.env(ADMIN), **env})
        assert m.p(f"org/model/{WEIGHTS}").read_bytes() == w
        wait_for(lambda m=m: shared(m)["bytes_written"] >= len(w), what="the tier written")
        text = log.read_text()
        assert f"127.0.0.1:{hub_port}" in text and f"127.0.0.1:{cdn_port}" in text
        assert f":{s3_port}" not in text  # the tier: straight to the store
        m.close()
        log.write_text("")


FLEET_NODES = 8
# 128 MiB in CI (two cores, a time budget); TEST_FLEET_MIB=1024 runs the
# fleet tests at the size of a model shard (docs/fleet.md gives that run). Not
# MODELFS_*: the daemons these tests start refuse settings they do not know.
FLEET_MIB = int(os.environ.get("TEST_FLEET_MIB", "128"))
# Bounds grow with the size: 240 s for a job at 128 MiB on two cores.
SLOW = max(1.0, FLEET_MIB / 128)
VERIFIED = "big.safetensors: whole file cached, sha256 verified"


def _warm(s3: S3Server, mount_factory: Any, origin: Origin, bucket: str, tag: str, *,
          kill_one: bool = False) -> list[Any]:
    """FLEET_NODES daemons (mounts with caches of their own) warm org/fleet at once
    through their APIs; with `kill_one`, one is killed (-9) half-way. Returns the
    nodes that finished."""
    nodes = [mount_factory(["org/fleet"], "--shared-cache", f"s3://{bucket}/fleet/",
                           cache=f"{tag}{i}", env=s3.env(ADMIN)) for i in range(FLEET_NODES)]
    jobs = []
    for m in nodes:
        with m.client() as c:
            jobs.append(c.prefetch({"repos": [{"id": "org/fleet"}]})["id"])
    if kill_one:
        victim = nodes.pop()
        with victim.client() as c:
            wait_job(c, jobs.pop(), timeout=120 * SLOW,
                     until=lambda j: j["items"] and j["items"][0]["downloaded_bytes"]
                     >= FLEET_MIB * MiB // 4)
        victim.kill()
    for m, job in zip(nodes, jobs, strict=True):
        with m.client() as c:
            assert wait_job(c, job, timeout=240 * SLOW)["state"] == "done"
    return nodes


def _origin_bytes(origin: Origin) -> int:
    """Body bytes the origin sent (the Hub redirects the weights to its CDN)."""
    return sum(r.bytes_sent for r in origin.data_requests() if r.status in (200, 206))


def _fleet_repo(origin: Origin) -> bytes:
    rng = random.Random(8)  # in 64 MiB pieces: randbytes takes at most 2**31 bits
    data = b"".join(rng.randbytes(min(64, FLEET_MIB - i) * MiB) for i in range(0, FLEET_MIB, 64))
    origin.put_file("org/fleet", "main", "big.safetensors", data)
    return data


@pytest.mark.timeout(300 * SLOW)
def test_eight_nodes_warming_at_once_pull_the_repo_from_the_origin_about_once(
        s3_server: S3Server, mount_factory: Any, origin: Origin) -> None:
    data = _fleet_repo(origin)
    bucket = tier_bucket(s3_server)
    origin.reset_stats()
    t0 = time.monotonic()
    nodes = _warm(s3_server, mount_factory, origin, bucket, "w1-")
    print(f"\n{FLEET_NODES} nodes warmed {FLEET_MIB} MiB in {time.monotonic() - t0:.1f}s, "
          f"origin egress {_origin_bytes(origin) / len(data):.3f}x")  # pytest -s shows it
    assert len(data) <= _origin_bytes(origin) <= 1.1 * len(data)
    for m in nodes:  # each node checks its copy against the file's sha256
        wait_for(lambda m=m: VERIFIED in m.log_text(), 15 * SLOW, "the whole-file check")
    assert hashlib.sha256(nodes[0].p("org/fleet/big.safetensors").read_bytes()).digest() == \
        hashlib.sha256(data).digest()
    waits = [shared(m)["lease_waits"] for m in nodes]
    for m in nodes:
        m.close()
    # A second wave of fresh nodes pulls nothing from the origin.
    origin.reset_stats()
    again = _warm(s3_server, mount_factory, origin, bucket, "w2-")
    assert _origin_bytes(origin) == 0
    assert all(shared(m)["hits"] == FLEET_MIB for m in again)  # 1 MiB chunks
    assert sum(waits) < FLEET_NODES * FLEET_MIB  # they fetched different chunks, mostly


@pytest.mark.timeout(300 * SLOW)
def test_a_node_killed_while_warming_leaves_the_others_to_finish(
        s3_server: S3Server, mount_factory: Any, origin: Origin) -> None:
    data = _fleet_repo(origin)
    bucket = tier_bucket(s3_server)
    origin.reset_stats()
    nodes = _warm(s3_server, mount_factory, origin, bucket, "k-", kill_one=True)
    assert len(nodes) == FLEET_NODES - 1
    print(f"\none of {FLEET_NODES} nodes killed: origin egress "
          f"{_origin_bytes(origin) / len(data):.3f}x")  # pytest -s shows it
    assert len(data) <= _origin_bytes(origin) <= 1.3 * len(data)
    for m in nodes:
        wait_for(lambda m=m: VERIFIED in m.log_text(), 15 * SLOW, "the whole-file check")
