"""One conformance suite over every source: the Hub (the origin fixture), plain HTTP
(the same origin's directory index), S3 (a real SeaweedFS server) and a local
directory (`file://`). Each test body runs against all four, through a real mount.

Every source shows the same content, `org/model` at main of the origin fixture,
and a second repo, `org/twin`, through which its weights are reachable too.
"""

from __future__ import annotations

import errno
import itertools
import json
import mmap
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from modelfs.testing.origin import Origin
from modelfs.testing.s3 import ADMIN, OUTSIDER, PUBLIC_BUCKET, READER, S3Server

from ..conftest import CHUNK, MiB, drop_page_cache, is_mounted, wait_for

MAIN = "org/model@main"
WEIGHTS = "model.safetensors"
SOURCES = ("hf", "http", "s3", "file")
_buckets = itertools.count()


class Backend:
    """One source's view of the origin fixture's content."""

    def __init__(self, kind: str, origin: Origin, root: Path, files: dict[str, bytes],
                 request: pytest.FixtureRequest) -> None:
        self.kind, self.origin, self.root, self.files = kind, origin, root, files
        self.env: dict[str, str] = {}
        self.args: list[str] = []
        self.s3: S3Server | None = None
        if kind == "s3":
            self.s3 = request.getfixturevalue("s3_server")
            self.bucket = f"conformance-{os.getpid()}-{next(_buckets)}"
            self.s3.upload_tree(self.bucket, "org/model/main/", files)
            self.env = self.s3.env(READER)

    def spec(self) -> str:
        """`org/model` as this source names it."""
        return {"hf": "org/model",
                "http": f"org/model={self.origin.url}/plain/org/model/main/",
                "s3": f"org/model=s3://{self.bucket if self.s3 else ''}/org/model/main/",
                "file": f"org/model=file://{self.root}/org/model/main/"}[self.kind]

    def twin(self) -> tuple[str, str]:
        """A second repo holding the same weights, and their path in it."""
        return {"hf": ("org/other", f"org/other/{WEIGHTS}"),
                "http": (f"org/twin={self.origin.url}/plain/org/model/main/{WEIGHTS}",
                         f"org/twin/{WEIGHTS}"),
                "s3": (f"org/twin=s3://{self.bucket if self.s3 else ''}/org/model/",
                       f"org/twin/main/{WEIGHTS}"),
                "file": (f"org/twin=file://{self.root}/org/model/", f"org/twin/main/{WEIGHTS}"),
                }[self.kind]

    def put(self, path: str, data: bytes) -> None:
        """Change a file of `org/model` at the origin."""
        if self.s3 is not None:
            self.s3.client().put_object(Bucket=self.bucket, Key=f"org/model/main/{path}",
                                        Body=data, ChecksumAlgorithm="SHA256")
        else:
            self.origin.put_file("org/model", "main", path, data)

    def go_down(self) -> None:
        if self.s3 is not None:
            self.s3.stop()
        elif self.kind == "file":
            os.rename(self.root / "org/model", self.root / "org/model.away")
        else:
            self.origin.go_down()

    def come_back(self) -> None:
        if self.s3 is not None:
            self.s3.start()
        elif self.kind == "file":
            os.rename(self.root / "org/model.away", self.root / "org/model")
        else:
            self.origin.come_back()

    def mount(self, mount_factory: Any, *specs: str, extra: tuple[str, ...] = ()) -> Any:
        args = [a for s in specs for a in ("--repo", s)]
        return mount_factory([], *args, *self.args, "--retries", "1", "--retry-backoff", "0.05",
                             *extra, env=self.env)


@pytest.fixture(params=SOURCES)
def backend(request: pytest.FixtureRequest, origin: Origin, repo_data: dict[str, dict[str, bytes]],
            tmp_path: Path) -> Iterator[Backend]:
    b = Backend(request.param, origin, tmp_path / "origin", repo_data[MAIN], request)
    yield b
    if b.s3 is not None and b.s3.proc is None:
        b.s3.start()  # a test that stopped the shared server leaves it running


def status(m: Any) -> dict[str, Any]:
    with m.client() as c:
        return c.status()


def fetched(m: Any) -> int:
    """Origin bytes so far, once no fetch is in flight: a read returns as its bytes
    arrive, and its fetch counts them a moment later, when the request ends."""
    last: dict[str, Any] = {}

    def settled() -> bool:
        last.update(status(m)["fetch"])
        return bool(last["in_flight"] == 0)
    wait_for(settled, what="fetches in flight to end")
    return int(last["bytes_fetched"])


def test_tree_sizes_ranged_reads_and_mmap(backend: Backend, mount_factory: Any) -> None:
    m = backend.mount(mount_factory, backend.spec())
    top = m.p("org/model")
    got = {str(p.relative_to(top)): p.stat().st_size for p in top.rglob("*") if p.is_file()}
    assert got == {path: len(data) for path, data in backend.files.items()}
    assert (top / "sub" / "dir").is_dir()
    data = backend.files[WEIGHTS]
    rnd = random.Random(7)
    fd = os.open(top / WEIGHTS, os.O_RDONLY)
    try:
        for _ in range(60):
            off = rnd.randrange(0, len(data) + 100)
            size = rnd.choice([1, 4096, CHUNK + 3, 2 * CHUNK])
            assert os.pread(fd, size, off) == data[off:off + size], (off, size)
        with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as mapped:
            for _ in range(20):
                off = rnd.randrange(0, len(data) - 4096)
                assert mapped[off:off + 4096] == data[off:off + 4096]
    finally:
        os.close(fd)
    for path, blob in backend.files.items():
        assert (top / path).read_bytes() == blob, path


def test_only_touched_chunks_are_fetched(backend: Backend, mount_factory: Any) -> None:
    m = backend.mount(mount_factory, backend.spec())
    data = backend.files[WEIGHTS]
    with open(m.p(f"org/model/{WEIGHTS}"), "rb", buffering=0) as f:
        f.seek(5 * CHUNK + 1000)
        assert f.read(100) == data[5 * CHUNK + 1000:5 * CHUNK + 1100]
    assert fetched(m) == CHUNK


def test_a_file_in_two_repos_is_fetched_once(backend: Backend, mount_factory: Any) -> None:
    twin_spec, twin_path = backend.twin()
    m = backend.mount(mount_factory, backend.spec(), twin_spec)
    data = backend.files[WEIGHTS]
    assert m.p(f"org/model/{WEIGHTS}").read_bytes() == data
    assert fetched(m) == len(data)
    assert m.p(twin_path).read_bytes() == data
    assert fetched(m) == len(data)


def test_a_change_at_the_origin_is_never_mixed(backend: Backend, mount_factory: Any) -> None:
    old = backend.files[WEIGHTS]
    new = random.Random(11).randbytes(len(old))  # same size: only the version tells them apart
    m = backend.mount(mount_factory, backend.spec(), extra=("--revision-ttl", "0.3"))
    path = m.p(f"org/model/{WEIGHTS}")
    old_inode = path.stat().st_ino
    with open(path, "rb", buffering=0) as fh:
        assert fh.read(MiB) == old[:MiB]
        backend.put(WEIGHTS, new)

        def sees_new() -> bool:
            try:
                return path.read_bytes() == new
            except OSError as exc:
                if exc.errno != errno.ESTALE:
                    raise
                return False

        wait_for(sees_new, timeout=20, what="new opens to see the new version")
        assert path.stat().st_ino != old_inode
        try:
            rest: bytes | None = fh.read()
        except OSError as exc:
            rest, stale = None, exc.errno
            assert stale == errno.ESTALE
        # The old handle reads its own version to the end, or gets ESTALE: never a blend.
        assert rest is None or rest == old[MiB:]


def test_cached_files_are_served_after_a_remount_with_the_origin_gone(
        backend: Backend, mount_factory: Any) -> None:
    m = backend.mount(mount_factory, backend.spec())
    for path, blob in backend.files.items():
        assert m.p(f"org/model/{path}").read_bytes() == blob
    assert m.close() == 0
    backend.go_down()
    try:
        drop_page_cache()
        m2 = backend.mount(mount_factory, backend.spec())
        for path, blob in backend.files.items():
            assert m2.p(f"org/model/{path}").read_bytes() == blob, path
        assert fetched(m2) == 0
        assert "from the cache" in m2.log_text()
    finally:
        backend.come_back()


def test_a_damaged_chunk_is_refetched(backend: Backend, mount_factory: Any,
                                      tmp_path: Path) -> None:
    m = backend.mount(mount_factory, backend.spec())
    data = backend.files[WEIGHTS]
    assert m.p(f"org/model/{WEIGHTS}").read_bytes() == data
    assert m.close() == 0
    chunks = sorted(p for p in (tmp_path / "cache" / "chunks").rglob("*") if p.is_file())
    assert chunks
    for p in chunks:  # flip one bit in every chunk on disk
        raw = bytearray(p.read_bytes())
        raw[len(raw) // 2] ^= 0x04
        p.write_bytes(bytes(raw))
    drop_page_cache()
    m2 = backend.mount(mount_factory, backend.spec())
    assert m2.p(f"org/model/{WEIGHTS}").read_bytes() == data
    assert fetched(m2) >= len(data)
    assert "damaged or missing on disk" in m2.log_text()


def test_a_prefetch_job_reports_each_file(backend: Backend, mount_factory: Any) -> None:
    m = backend.mount(mount_factory, backend.spec())
    spec = backend.spec()
    repo, _, url = spec.partition("=")
    with m.client() as c:
        job = c.prefetch({"repos": [{"id": repo, "url": url or None}]})
        wait_for(lambda: c.job(job["id"])["finished"] is not None, timeout=60, what="the job")
        job = c.job(job["id"])
    assert job["state"] == "done", job
    items = {i["path"]: i for i in job["items"]}
    assert set(items) == set(backend.files)
    for path, blob in backend.files.items():
        assert (items[path]["downloaded_bytes"], items[path]["bytes"]) == (len(blob), len(blob))
        assert items[path]["local_path"] == str(m.p(f"org/model/{path}"))
    assert job["repos"][0]["url"] == (url or None)


def _mount_fails(tmp_path: Path, spec: str, env: dict[str, str], *extra: str) -> str:
    mnt = tmp_path / "refused"
    mnt.mkdir(exist_ok=True)
    res = subprocess.run([sys.executable, "-m", "modelfs", "mount", str(mnt), "--repo", spec,
                          "--cache-dir", str(tmp_path / "c"), "--retries", "1",
                          "--retry-backoff", "0.05", *extra],
                         capture_output=True, text=True, timeout=60, env={**os.environ, **env})
    assert res.returncode == 1, res
    assert not is_mounted(mnt)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr  # one line, no traceback
    return lines[0]


def test_missing_repos_and_bad_credentials_fail_clearly_and_mount_nothing(
        backend: Backend, tmp_path: Path) -> None:
    o = backend.origin
    if backend.kind == "hf":
        cases = [("org/missing", {}, (), "repo org/missing revision 'main': not found")]
        o.require_token["org/model"] = "hf_right"
        cases.append(("org/model", {"HF_TOKEN": "hf_wrong"}, ("--endpoint", o.url),
                      "gated or private repo org/model"))
        cases = [(s, e, x if x else ("--endpoint", o.url), w) for s, e, x, w in cases]
    elif backend.kind == "http":
        cases = [(f"org/gone={o.url}/plain/org/gone/", {}, (), "org/gone: listing of /: not found")]
    elif backend.kind == "file":
        cases = [(f"org/gone=file://{tmp_path}/nowhere/", {}, (),
                  f"org/gone: file://{tmp_path}/nowhere/: no such directory")]
    else:
        assert backend.s3 is not None
        s3 = backend.s3
        bucket = backend.bucket
        cases = [
            (f"org/m=s3://no-such-bucket-{os.getpid()}/x/", s3.env(READER), (),
             f"s3://no-such-bucket-{os.getpid()}/x/: listing: no such bucket"),
            (f"org/m=s3://{bucket}/org/model/main/", s3.env((READER[0], "wrong-secret")), (),
             f"s3://{bucket}/org/model/main/: listing: bad credentials"),
            (f"org/m=s3://{bucket}/org/model/main/", s3.env(("AKNOBODY", "whatever")), (),
             "bad credentials"),
            (f"org/m=s3://{bucket}/org/model/main/", s3.env(OUTSIDER), (), "access denied"),
            (f"org/m=s3://{bucket}/org/model/main/", s3.env(None), (),
             "no AWS credentials found"),
            (f"org/m=s3://{bucket}/org/model/main/", s3.env(None), ("--s3-anonymous",),
             "access denied"),
        ]
    for spec, env, extra, want in cases:
        line = _mount_fails(tmp_path, spec, env, *extra)
        assert want in line, (spec, line)
        assert spec.partition("=")[0] in line  # names the repo
        for secret in ("wrong-secret", READER[1], OUTSIDER[1], ADMIN[1], "hf_wrong"):
            assert secret not in line


def test_s3_anonymous_reads_a_public_bucket_and_lists_past_a_page(
        s3_server: S3Server, mount_factory: Any) -> None:
    files = {f"shard-{i:04d}.bin": bytes([i % 256]) * (1 + i % 7) for i in range(1105)}
    files["deep/a/b/config.json"] = b"{}"
    s3_server.upload_tree(PUBLIC_BUCKET, "many/", files)
    m = mount_factory([], "--repo", f"org/many=s3://{PUBLIC_BUCKET}/many/", "--s3-anonymous",
                      env=s3_server.env(None))
    names = sorted(p.name for p in m.p("org/many").iterdir())
    assert len(names) == 1106 and names[0] == "deep"  # 1,106 keys: two listing pages
    assert m.p("org/many/shard-0006.bin").read_bytes() == b"\x06" * 7
    assert m.p("org/many/deep/a/b/config.json").read_bytes() == b"{}"
    assert status(m)["repos"][0]["url"] == f"s3://{PUBLIC_BUCKET}/many/"


def test_s3_whole_file_sha256_is_checked_when_the_store_keeps_it(
        s3_server: S3Server, mount_factory: Any, repo_data: dict[str, dict[str, bytes]]) -> None:
    bucket = f"checksums-{os.getpid()}"
    s3_server.upload_tree(bucket, "m/", {WEIGHTS: repo_data[MAIN][WEIGHTS]})
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="m/plain.bin", Body=b"no checksum kept")
    m = mount_factory([], "--repo", f"org/m=s3://{bucket}/m/", env=s3_server.env(READER))
    assert m.p(f"org/m/{WEIGHTS}").read_bytes() == repo_data[MAIN][WEIGHTS]
    wait_for(lambda: "sha256 verified" in m.log_text(), what="the whole-file check")
    assert m.p("org/m/plain.bin").read_bytes() == b"no checksum kept"


def test_file_symlinks_are_followed_only_inside_the_tree(mount_factory, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "real").mkdir(parents=True)
    (tree / "real" / "w.bin").write_bytes(b"weights")
    (tmp_path / "secret.txt").write_text("outside")
    os.symlink("real/w.bin", tree / "inside.bin")
    os.symlink(tmp_path / "secret.txt", tree / "outside.txt")
    os.symlink("/etc", tree / "etc")
    os.symlink(".", tree / "real" / "loop")
    os.mkfifo(tree / "fifo")
    m = mount_factory([], "--repo", f"org/t=file://{tree}/")
    found = sorted(str(p.relative_to(m.p("org/t"))) for p in m.p("org/t").rglob("*"))
    assert found == ["inside.bin", "real", "real/w.bin"]
    assert m.p("org/t/inside.bin").read_bytes() == b"weights"
    log = m.log_text()
    assert "a symlink that points outside the tree" in log and "not a regular file" in log


def test_hub_datasets_mount_under_datasets(mount_factory, origin: Origin, repo_data,
                                           tmp_path: Path) -> None:
    root = tmp_path / "origin" / "datasets" / "org" / "corpus" / "main"
    root.mkdir(parents=True)
    (root / "train.jsonl").write_bytes(b'{"text": "a"}\n' * 1000)
    origin.refresh()
    m = mount_factory(["datasets/org/corpus", "org/model"])
    assert m.p("datasets/org/corpus/train.jsonl").read_bytes() == b'{"text": "a"}\n' * 1000
    commit = origin.commit_of("datasets/org/corpus")
    view = m.p(f".hf-cache/hub/datasets--org--corpus/snapshots/{commit}/train.jsonl")
    assert view.read_bytes() == b'{"text": "a"}\n' * 1000
    assert m.p(f"org/model/{WEIGHTS}").stat().st_size == len(repo_data[MAIN][WEIGHTS])


def test_s3_versioned_bucket_keeps_an_open_handle_on_its_version(
        s3_server: S3Server, mount_factory: Any) -> None:
    bucket = f"versioned-{os.getpid()}"
    client = s3_server.client()
    client.create_bucket(Bucket=bucket)
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    old = random.Random(1).randbytes(4 * MiB + 5)
    new = random.Random(2).randbytes(len(old))
    client.put_object(Bucket=bucket, Key="m/w.bin", Body=old)
    m = mount_factory([], "--repo", f"org/v=s3://{bucket}/m/", "--revision-ttl", "0.3",
                      env=s3_server.env(READER))
    path = m.p("org/v/w.bin")
    with open(path, "rb", buffering=0) as fh:
        assert fh.read(MiB) == old[:MiB]
        client.put_object(Bucket=bucket, Key="m/w.bin", Body=new)
        wait_for(lambda: path.read_bytes() == new, timeout=20, what="the new version")
        drop_page_cache()
        # Not cached, not ESTALE: the old version is read by its VersionId.
        assert fh.read() == old[MiB:]


def test_s3_credentials_from_a_profile_are_refreshed_and_never_logged(
        s3_server: S3Server, mount_factory: Any, tmp_path: Path,
        repo_data: dict[str, dict[str, bytes]]) -> None:
    """AWS_PROFILE and the shared config file, with a `credential_process` whose
    credentials expire within botocore's refresh window: every use refreshes them."""
    bucket = f"profile-{os.getpid()}"
    s3_server.upload_tree(bucket, "m/", {WEIGHTS: repo_data[MAIN][WEIGHTS]})
    calls = tmp_path / "calls"
    helper = tmp_path / "creds.py"
    helper.write_text(
        "import datetime, json, sys\n"
        f"open({str(calls)!r}, 'a').write('x')\n"
        "exp = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=5)\n"
        f"print(json.dumps({{'Version': 1, 'AccessKeyId': {READER[0]!r}, "
        f"'SecretAccessKey': {READER[1]!r}, 'Expiration': exp.strftime('%Y-%m-%dT%H:%M:%SZ')}}))\n")
    config = tmp_path / "aws-config"
    config.write_text(f"[profile models]\ncredential_process = {sys.executable} {helper}\n"
                      "region = us-east-1\n")
    env = s3_server.env(None) | {"AWS_PROFILE": "models", "AWS_CONFIG_FILE": str(config)}
    m = mount_factory([], "--repo", f"org/m=s3://{bucket}/m/", env=env)
    assert m.p(f"org/m/{WEIGHTS}").read_bytes() == repo_data[MAIN][WEIGHTS]
    assert len(calls.read_text()) >= 2  # found once, then refreshed before use
    assert READER[1] not in m.log_text()
    with m.client() as c:
        assert READER[1] not in str(c.status())


def test_prefetch_without_a_daemon_warms_the_cache(backend: Backend, tmp_path: Path,
                                                   mount_factory: Any) -> None:
    cache = tmp_path / "cache"
    extra = ["--endpoint", backend.origin.url] if backend.kind == "hf" else []
    res = subprocess.run([sys.executable, "-m", "modelfs", "prefetch", backend.spec(), "--json",
                          "--cache-dir", str(cache), "--chunk-size", "1MiB",
                          "--control-socket", str(tmp_path / "no-daemon.sock"), *extra],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, **backend.env})
    assert res.returncode == 0, res.stderr
    job = json.loads(res.stdout.splitlines()[-1])
    assert (job["type"], job["state"], job["files_done"]) == ("job", "done", len(backend.files))
    # The mount finds every byte in the cache: nothing is fetched again.
    m = backend.mount(mount_factory, backend.spec())
    for path, blob in backend.files.items():
        assert m.p(f"org/model/{path}").read_bytes() == blob
    assert fetched(m) == 0


def test_a_hung_share_costs_a_read_eio_not_the_mount(mount_factory, origin: Origin, repo_data,
                                                     tmp_path: Path) -> None:
    """The "share" is a modelfs mount whose origin stalls: a read through the file://
    mount above it fails within its bound, the mount answers meanwhile, and once the
    share answers again the file reads right."""
    share = mount_factory(["org/model"])
    nfs = mount_factory([], "--repo", f"org/nfs=file://{share.path}/org/model/",
                        "--timeout", "1", "--min-rate", "1GiB/s")
    data = repo_data[MAIN][WEIGHTS]
    origin.misbehave("stall_headers", 1, match=WEIGHTS, seconds=6)
    start = time.monotonic()
    fd = os.open(nfs.p(f"org/nfs/{WEIGHTS}"), os.O_RDONLY)
    try:
        with pytest.raises(OSError) as exc:
            os.pread(fd, 4096, 0)
    finally:
        os.close(fd)
    assert exc.value.errno == errno.EIO
    assert time.monotonic() - start < 5
    assert sorted(os.listdir(nfs.p("org/nfs")))  # the mount still answers
    assert "hung share" in nfs.log_text()
    wait_for(lambda: time.monotonic() - start > 7, timeout=10, what="the stall to end")
    assert nfs.p(f"org/nfs/{WEIGHTS}").read_bytes() == data


def test_the_api_reads_a_file_url_only_when_it_is_mounted(mount_factory, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "w.bin").write_bytes(b"mounted")
    m = mount_factory([], "--repo", f"org/t=file://{tree}/")
    with m.client() as c:
        ok = c.prefetch({"repos": [f"org/t=file://{tree}/"]})
        bad = c.prefetch({"repos": [{"id": "org/etc", "url": "file:///etc/"}]})
        wait_for(lambda: all(c.job(j["id"])["finished"] for j in (ok, bad)), what="the jobs")
        ok, bad = c.job(ok["id"]), c.job(bad["id"])
    assert ok["state"] == "done"
    assert bad["state"] == "failed" and bad["items"] == []
    assert "prefetched through the daemon only when it is mounted" in bad["errors"][0]
