"""Deadlines on a real mount: a stuck origin gives EIO in bounded time, a reader that
goes away is answered at once, stuck requests starve nobody, and stop is bounded."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from modelfs.testing.origin import Origin

from ..conftest import MiB, drop_page_cache, is_mounted

MAIN = "org/model@main"
WEIGHTS = "model.safetensors"


def sha_of(repo_data, key: str = MAIN) -> str:
    return hashlib.sha256(repo_data[key][WEIGHTS]).hexdigest()


def test_a_trickling_origin_gives_eio_within_the_read_deadline(mount_factory, origin: Origin,
                                                               repo_data) -> None:
    m = mount_factory(["org/model"], "--read-deadline", "2", "--retries", "0")
    origin.misbehave("trickle", 1000, rate=10)
    t0 = time.monotonic()
    with open(m.p(f"org/model/{WEIGHTS}"), "rb") as f, pytest.raises(OSError) as err:
        f.read(4096)
    assert err.value.errno == 5  # EIO
    assert time.monotonic() - t0 < 6
    assert "within read_deadline (2s)" in m.log_text()
    # The reader is gone: its fetch is stopped, not left holding the origin.
    deadline = time.monotonic() + 5
    with m.client() as c:
        while c.status()["fetch"]["in_flight"]:
            assert time.monotonic() < deadline, "the abandoned fetch is still in flight"
            time.sleep(0.1)
    origin.clear_faults()
    with open(m.p(f"org/model/{WEIGHTS}"), "rb") as f:
        assert f.read(4096) == repo_data[MAIN][WEIGHTS][:4096]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL, signal.SIGTERM])
def test_a_reader_interrupted_while_the_origin_stalls_gets_its_answer_at_once(
        mount_factory, origin: Origin, sig: signal.Signals) -> None:
    m = mount_factory(["org/model"])  # the read deadline (60 s) is far away
    origin.misbehave("stall_headers", 1000, seconds=120)
    reader = subprocess.Popen([sys.executable, "-c",
                               f"open({str(m.p(f'org/model/{WEIGHTS}'))!r}, 'rb').read(4096)"],
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not origin.data_requests("/org/model/resolve/*"):  # then it waits on the CDN
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.6)  # past READER_CHECK: the read is being watched
        t0 = time.monotonic()
        reader.send_signal(sig)
        reader.wait(timeout=10)
        assert time.monotonic() - t0 < 2.0
        assert reader.returncode != 0
        assert m.proc.poll() is None
    finally:
        reader.kill()
        origin.go_down()  # end the stall, so nothing holds the mount at teardown
        origin.come_back()
        reader.wait()


def test_stuck_reads_of_one_file_do_not_starve_reads_of_another(mount_factory, origin: Origin,
                                                                repo_data) -> None:
    """16 reads of one file stall at the origin (every connection the mount has); a
    read of another file still goes through, and so does a prefetch job."""
    m = mount_factory(["org/model", "org/model@v1", "org/other"], "--read-deadline", "30")
    origin.misbehave("stall_headers", 1000, seconds=60, match=sha_of(repo_data))
    stuck = []
    path = m.p(f"org/model/{WEIGHTS}")

    def read_at(off: int) -> None:
        with open(path, "rb", buffering=0) as f, contextlib.suppress(OSError):
            os.pread(f.fileno(), 4096, off)

    for n in range(16):
        t = threading.Thread(target=read_at, args=(n % 10 * MiB + n * 8192,), daemon=True)
        t.start()
        stuck.append(t)
    deadline = time.monotonic() + 10
    while len(origin.data_requests("/org/model/resolve/*")) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(1.0)  # every connection is taken by now
    t0 = time.monotonic()
    assert m.p(f"org/model@v1/{WEIGHTS}").read_bytes() == repo_data["org/model@v1"][WEIGHTS]
    assert time.monotonic() - t0 < 12  # one stall_after (5 s) or so, not the 60 s stall
    with m.client() as c:
        job = c.prefetch({"repos": [{"id": "org/other", "include": ["config.json"]}]})
        deadline = time.monotonic() + 20
        while (j := c.job(job["id"]))["finished"] is None:
            assert time.monotonic() < deadline, "prefetch made no progress"
            time.sleep(0.1)
    assert j["state"] == "done"
    assert any(t.is_alive() for t in stuck)  # still stuck: the others did not wait for them
    origin.clear_faults()
    origin.go_down()  # ends the stalls, so the stuck reads end before teardown
    origin.come_back()
    for t in stuck:
        t.join(timeout=40)


def test_unmount_and_sigterm_with_a_stuck_request_end_the_daemon(mount_factory, origin: Origin,
                                                                 tmp_path: Path) -> None:
    for how in ("unmount", "sigterm"):
        m = mount_factory(["org/model"], cache=f"cache-{how}")
        origin.misbehave("stall_headers", 1000, seconds=120)
        reader = threading.Thread(target=_read_quietly, args=(m.p(f"org/model/{WEIGHTS}"),),
                                  daemon=True)
        reader.start()
        deadline = time.monotonic() + 10
        while not origin.data_requests("/org/model/resolve/*"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
        t0 = time.monotonic()
        if how == "unmount":
            subprocess.run(["fusermount3", "-u", "-z", str(m.path)], check=True)
        else:
            m.proc.send_signal(signal.SIGTERM)
        m.proc.wait(timeout=15)
        assert time.monotonic() - t0 < 8, how
        assert not is_mounted(m.path)
        assert not m.socket.exists()
        origin.clear_faults()
        origin.reset_stats()
        drop_page_cache()
    # A new daemon mounts on the same socket at once.
    again = mount_factory(["org/model"], cache="cache-unmount")
    assert again.p("org/model/config.json").exists()


def _read_quietly(path: Path) -> None:
    with contextlib.suppress(OSError), open(path, "rb") as f:
        f.read(4096)


def test_readers_under_random_faults_get_right_bytes_or_eio_in_bounded_time(
        mount_factory, origin: Origin, repo_data) -> None:
    """The fault-injecting origin (every kind of fault at random, 30% of data
    requests): each read answers within its deadline, and what it answers is right."""
    import random

    m = mount_factory(["org/model", "org/model@v1"], "--read-deadline", "8", "--timeout", "2",
                      "--retry-backoff", "0.05", "--prefetch-on-open=*.safetensors")
    origin.chaos(0.3, seed=7, stall=1.0)
    files = {f"org/model/{p}": d for p, d in repo_data[MAIN].items()}
    files |= {f"org/model@v1/{p}": d for p, d in repo_data["org/model@v1"].items()}
    rnd = random.Random(3)
    wrong, errors, answered, slowest = [], [], 0, 0.0
    deadline = time.monotonic() + 12
    while time.monotonic() < deadline:
        path, data = rnd.choice(sorted(files.items()))
        off = rnd.randrange(max(len(data), 1))
        n = rnd.choice([1, 4096, MiB, 3 * MiB])
        t0 = time.monotonic()
        try:
            with open(m.p(path), "rb", buffering=0) as f:
                got = os.pread(f.fileno(), n, off)
            if got != data[off:off + n]:
                wrong.append((path, off, n))
        except OSError as exc:
            errors.append(exc.errno)
        answered += 1
        slowest = max(slowest, time.monotonic() - t0)
        if rnd.random() < 0.2:
            drop_page_cache()
    assert not wrong
    assert set(errors) <= {5}  # EIO when the origin kept failing, nothing else
    assert answered > 20 and slowest < 8 + 2
    origin.chaos(0)
    assert m.proc.poll() is None
