"""Restarts that keep the mount: a reader streaming a file through the mount while the
daemon is restarted (`modelfs restart`) or killed (under the supervisor) sees every byte
right and no error, only pauses; a stop with readers stuck on a stalled origin ends
within its bound and leaves no reader waiting in the kernel."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelfs.daemon.supervisor import STOP_WAIT
from modelfs.testing.origin import Origin

from ..conftest import MiB, Mount, fuse_available, is_mounted, wait_for

BIG = 1 << 30  # the 1 GiB stream
RESTARTS = 5
# The reader reads at about this rate, so that the restarts fall inside its stream.
READ_RATE = 48 * MiB

READER = r"""
import hashlib, json, sys, time
path, rate = sys.argv[1], float(sys.argv[2])
h = hashlib.sha256(); longest = 0.0; n = 0; t0 = time.monotonic()
with open(path, "rb", buffering=0) as f:
    while True:
        t = time.monotonic()
        block = f.read(1 << 20)
        longest = max(longest, time.monotonic() - t)
        if not block:
            break
        h.update(block); n += len(block)
        ahead = t0 + n / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
print(json.dumps({"sha256": h.hexdigest(), "bytes": n, "longest_pause": longest}))
"""


def _resend_supported() -> bool:
    """Linux 6.9 and later resend requests on FUSE_NOTIFY_RESEND (FUSE_HAS_RESEND)."""
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    return (major, minor) >= (6, 9)


@pytest.fixture(scope="module")
def big_origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Origin, str]]:
    root = tmp_path_factory.mktemp("big-origin")
    path = root / "org" / "big" / "main" / "weights.bin"
    path.parent.mkdir(parents=True)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(BIG // (64 * MiB)):
            block = os.urandom(64 * MiB)
            h.update(block)
            f.write(block)
    (path.parent / "config.json").write_text('{"big": true}')
    with Origin(root) as o:
        yield o, h.hexdigest()


@pytest.fixture
def big_mount(big_origin: tuple[Origin, str], tmp_path: Path) -> Iterator[Mount]:
    if not fuse_available():
        pytest.skip("needs /dev/fuse and fusermount3")
    origin, _ = big_origin
    m = Mount(tmp_path / "mnt", tmp_path / "cache", origin, ["org/big"], ["--chunk-size", "4MiB"])
    try:
        yield m
    finally:
        if m.proc.poll() is None:
            m.close()
        assert not is_mounted(m.path)


def _stream(m: Mount) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", READER, str(m.p("org/big/weights.bin")),
                             str(READ_RATE)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(reader: subprocess.Popen[str], digest: str, what: str) -> float:
    out, err = reader.communicate(timeout=300)
    assert reader.returncode == 0, f"the reader failed during {what}: {err.strip()}"
    result = json.loads(out)
    assert result["bytes"] == BIG
    assert result["sha256"] == digest
    print(f"\n{what}: longest pause of the reader {result['longest_pause']:.2f}s")
    return float(result["longest_pause"])


def test_a_stream_survives_five_restarts(big_mount: Mount, big_origin: tuple[Origin, str]) -> None:
    m, (_, digest) = big_mount, big_origin
    reader = _stream(m)
    pids = {m.daemon_pid()}
    time.sleep(1.5)
    for _ in range(RESTARTS):
        res = subprocess.run([sys.executable, "-m", "modelfs", "restart", str(m.path),
                              "--cache-dir", str(m.cache_dir)], capture_output=True, text=True,
                             timeout=150)
        assert res.returncode == 0, res.stderr
        assert reader.poll() is None, "the stream ended before the restarts did"
        pids.add(m.daemon_pid())
        time.sleep(1.0)
    assert len(pids) == RESTARTS + 1  # each restart ran a new daemon process
    pause = _finish(reader, digest, f"{RESTARTS} restarts")
    assert pause < 30
    assert m.proc.poll() is None  # the supervisor, and the mount, stayed


@pytest.mark.skipif(not _resend_supported(), reason="needs FUSE_NOTIFY_RESEND (Linux 6.9+)")
def test_a_stream_survives_five_kills_of_the_daemon(big_mount: Mount,
                                                    big_origin: tuple[Origin, str]) -> None:
    m, (_, digest) = big_mount, big_origin
    reader = _stream(m)
    time.sleep(1.5)
    for _ in range(RESTARTS):
        pid = m.daemon_pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: m.daemon_pid() not in (None, pid), 60, "a successor daemon")  # noqa: B023
        assert reader.poll() is None, "the stream ended before the kills did"
        time.sleep(1.0)
    pause = _finish(reader, digest, f"{RESTARTS} kill -9s")
    assert pause < 30
    assert "killed by SIGKILL; starting a successor" in m.log_text()


def test_a_stream_survives_a_new_supervisor_taking_the_mount_over(
        big_mount: Mount, big_origin: tuple[Origin, str]) -> None:
    """`modelfs mount --take-over` (a new pod of an upgraded DaemonSet) takes the mount
    from the running supervisor, which then stops without unmounting."""
    m, (_, digest) = big_mount, big_origin
    reader = _stream(m)
    time.sleep(1.5)
    old = m.proc
    with open(m.stderr, "ab") as err:
        m.proc = subprocess.Popen([*m.cmd, "--take-over"], stdin=subprocess.DEVNULL, stdout=err,
                                  stderr=err, env=m.env)
    wait_for(lambda: "took " + str(m.path) + " over" in m.log_text(), 60, "the take-over")
    wait_for(lambda: "took over org/big" in m.log_text().rsplit("took " + str(m.path), 1)[1],
             60, "the new supervisor's daemon")
    old.send_signal(signal.SIGTERM)
    assert old.wait(timeout=10) == 0
    assert is_mounted(m.path) and m.proc.poll() is None  # the new one serves on
    _finish(reader, digest, "a take-over by a new supervisor")
    assert "stays mounted, served by the new supervisor" in m.log_text()


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def test_sigterm_with_readers_stuck_on_a_stalled_origin(mount_factory, origin: Origin) -> None:
    m = mount_factory(["org/model"], "--chunk-size", "256KiB")
    origin.misbehave("stall_headers", 1000, seconds=120)
    code = ("import sys\nf = open(sys.argv[1], 'rb', buffering=0)\nf.seek(int(sys.argv[2]))\n"
            "try:\n    f.read(4096)\nexcept OSError as e:\n    print(e.errno)\n")
    readers = [subprocess.Popen([sys.executable, "-c", code, str(m.p("org/model/model.safetensors")),
                                 str(i * 512 * 1024)], stdout=subprocess.PIPE, text=True)
               for i in range(16)]
    wait_for(lambda: origin.data_requests(), 20, "reads stuck on the origin")
    time.sleep(1.0)
    assert all(r.poll() is None for r in readers)  # all waiting on the mount
    daemon = m.daemon_pid()
    t0 = time.monotonic()
    m.proc.send_signal(signal.SIGTERM)
    m.proc.wait(timeout=STOP_WAIT + 10)
    took = time.monotonic() - t0
    assert took <= STOP_WAIT, f"the stop took {took:.1f}s"
    assert not is_mounted(m.path)
    for r in readers:
        out, _ = r.communicate(timeout=5)  # none is left waiting in the kernel (D state)
        assert r.returncode == 0
        out = out.strip()
        assert out in {"5", "103", "107"}, f"reader ended with {out!r}"  # EIO, ECONNABORTED, ENOTCONN
    assert daemon is not None and _state(daemon) is None  # the daemon is gone too
    print(f"\nSIGTERM with 16 stuck readers: stopped in {took:.1f}s")


def test_a_successor_that_cannot_restore_the_mount_never_serves_it(mount_factory) -> None:
    """A damaged mount state: successors refuse to serve (they would number inodes
    differently from the kernel's), back off, and the mount is given up, never wrong."""
    m = mount_factory(["org/model"])
    assert m.p("org/model/config.json").read_bytes()
    (m.cache_dir / "daemon" / "mount-state.json").write_text('{"version": 1, "nodes": [')
    pid = m.daemon_pid()
    assert pid is not None
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    assert m.proc.wait(timeout=90) == 1
    took = time.monotonic() - t0
    assert not is_mounted(m.path)
    log = m.log_text()
    assert "cannot take over the mount" in log and "giving up the mount" in log
    assert "starting a successor on the same mount in" in log  # it backed off
    print(f"\na damaged mount state: the mount given up after {took:.1f}s")
