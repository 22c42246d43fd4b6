"""The control plane against a real daemon on a real mount and the real origin:
jobs over the API and the CLI, pause/resume/cancel, restart, SSE, status, metrics."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from modelfs.control.client import ControlClient
from modelfs.errors import ControlError
from modelfs.schema import JOB, JOB_EVENT, STATUS, check
from modelfs.testing.origin import Origin

from ..conftest import MiB, fuse_available, is_mounted, wait_for


def wait_job(client: ControlClient, job_id: str, timeout: float = 60.0,
             until: Any = lambda j: j["finished"] is not None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = client.job(job_id)
        if until(job):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['state']} after {timeout}s")
        time.sleep(0.05)


def cdn_bytes(origin: Origin, path_glob: str) -> int:
    return sum(r.bytes_sent for r in origin.data_requests(path_glob))


def test_one_call_prefetches_50_small_repos_and_2_large_files(mount_factory, origin: Origin,
                                                              repo_data) -> None:
    rng = random.Random(7)
    small = {}
    for n in range(50):
        repo = f"adapters/a{n:02d}"
        small[repo] = rng.randbytes(200_000 + n)
        origin.put_file(repo, "main", "adapter_model.safetensors", small[repo])
        origin.put_file(repo, "main", "adapter_config.json", b'{"r": %d}' % n)
    big = {p: rng.randbytes(12 * MiB + i) for i, p in enumerate(["w1.safetensors",
                                                                  "w2.safetensors"])}
    for path, data in big.items():
        origin.put_file("org/big", "main", path, data)
    m = mount_factory(["org/model"], "--parallel-files", "8")
    body = {"repos": [{"id": r} for r in small] +
                     [{"id": "org/big", "include": ["*.safetensors"]}]}
    with m.client() as c:
        job = c.prefetch(body)
        assert job["state"] in ("running", "queued")
        job = wait_job(c, job["id"], timeout=120)
        assert job["state"] == "done", job["errors"]
        assert len(job["items"]) == 102
        assert all(i["state"] == "done" and i["downloaded_bytes"] == i["bytes"]
                   for i in job["items"])
        w1 = next(i for i in job["items"] if i["path"] == "w1.safetensors")
        assert w1["checksum"] and w1["url"].endswith("/org/big/resolve/" + w1["commit"]
                                                     + "/w1.safetensors")
        assert w1["local_path"] is None  # org/big is not mounted
        # The same job again: everything is cached, so no data requests and done at once.
        origin.reset_stats()
        again = wait_job(c, c.prefetch(body)["id"], timeout=30)
        assert again["state"] == "done" and again["fetched_bytes"] == 0
        assert origin.data_requests() == []
        listed = {j["id"]: j["state"] for j in c.jobs()}
        assert listed == {job["id"]: "done", again["id"]: "done"}


def test_pause_stops_fetching_and_resume_refetches_nothing(mount_factory, origin: Origin,
                                                           repo_data) -> None:
    data = random.Random(3).randbytes(24 * MiB)
    origin.put_file("org/model", "main", "big.safetensors", data)
    m = mount_factory(["org/model"], "--per-file-connections", "4")
    events: list[dict[str, Any]] = []
    stop = threading.Event()

    def listen() -> None:  # the SSE stream, read as a client would
        transport = httpx.HTTPTransport(uds=str(m.socket))
        with httpx.Client(transport=transport, base_url="http://modelfs", timeout=None) as h, \
                h.stream("GET", "/v1/events") as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            try:
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        events.append(json.loads(line[6:]))
                    if stop.is_set():
                        return
            except httpx.RemoteProtocolError:
                assert stop.is_set()  # only the daemon going away ends the stream

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    origin.throttle = 2 * MiB  # per request: 0.5 s a chunk, 4 at a time: about 3 s in all
    with m.client() as c:
        job = c.prefetch({"repos": [{"id": "org/model", "include": ["big.safetensors"]}]})
        job = wait_job(c, job["id"], until=lambda j: j["items"])  # listed
        item = job["items"][0]
        assert item["local_path"] == str(m.p("org/model/big.safetensors"))
        wait_job(c, job["id"], until=lambda j: j["items"] and j["items"][0]["downloaded_bytes"] >= 2 * MiB)
        paused = c.act(job["id"], "pause")
        assert paused["state"] == "paused" and paused["items"][0]["state"] == "paused"
        time.sleep(1.5)  # fetches already under way finish (a chunk takes 0.5 s) ...
        sent = cdn_bytes(origin, "*")
        time.sleep(1.5)  # ... and nothing new starts
        assert cdn_bytes(origin, "*") == sent
        assert 0 < sent < len(data)
        assert c.job(job["id"])["state"] == "paused"
        c.act(job["id"], "resume")
        done = wait_job(c, job["id"])
        assert done["state"] == "done"
        # No chunk fetched twice: a pause ends a request at a chunk boundary, and only
        # what was in transit then (under a chunk per connection) left the origin twice.
        assert len(data) <= cdn_bytes(origin, "*") < len(data) + 4 * MiB
        assert done["items"][0]["fetched_bytes"] == len(data)
    origin.throttle = 0
    assert m.p("org/model/big.safetensors").read_bytes() == data
    deadline = time.monotonic() + 5
    while not any(e["job"]["state"] == "done" for e in events) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    assert [p for e in events for p in check(e, JOB_EVENT)] == []
    assert check(done, JOB) == []
    states = [e["job"]["state"] for e in events if e["job"]["id"] == job["id"]]
    assert "running" in states and "paused" in states and states[-1] == "done"
    progress = [i["downloaded_bytes"] for e in events for i in e["items"]]
    assert len(set(progress)) >= 3  # progress, not only state changes
    # Batched: never more than a few updates per second for one job.
    stamps = [e for e in events if e["job"]["id"] == job["id"]]
    assert len(stamps) <= 5 * (done["finished"] - done["created"] + 2)


def test_cancel_one_item_and_a_job(mount_factory, origin: Origin, repo_data) -> None:
    rng = random.Random(4)
    for name in ("a.safetensors", "b.safetensors"):
        origin.put_file("org/model", "main", name, rng.randbytes(16 * MiB))
    m = mount_factory(["org/model"], "--per-file-connections", "2", "--parallel-files", "1")
    origin.throttle = 2 * MiB
    with m.client() as c:
        job = c.prefetch({"repos": [{"id": "org/model", "include": ["?.safetensors"]}]})
        job = wait_job(c, job["id"], until=lambda j: j["items"])
        ids = {i["path"]: i["id"] for i in job["items"]}
        c.act(job["id"], "cancel", ids["b.safetensors"])  # still queued: never starts
        wait_job(c, job["id"], until=lambda j: j["items"][ids["a.safetensors"]]
                 ["downloaded_bytes"] > 0)
        cancelled = c.act(job["id"], "cancel")
        assert cancelled["state"] == "cancelled"
        assert {i["state"] for i in cancelled["items"]} == {"cancelled"}
        time.sleep(1.5)
        sent = cdn_bytes(origin, "*")
        time.sleep(1.0)
        assert cdn_bytes(origin, "*") == sent < 16 * MiB
        assert origin.data_requests("*b.safetensors*") == []
        with pytest.raises(ControlError, match="no job"):
            c.act("nope", "pause")
    origin.throttle = 0


def test_a_404_file_fails_alone_and_the_cli_says_which(mount_factory, origin: Origin,
                                                       repo_data) -> None:
    m = mount_factory(["org/model"])
    origin.fail_next(100, status=404, match="tokenizer.json")
    res = subprocess.run([sys.executable, "-m", "modelfs", "prefetch", "org/model",
                          "--control-socket", str(m.socket)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 1, res.stderr
    assert "failed org/model/tokenizer.json" in res.stderr
    assert "tokenizer.json" in res.stderr and "404" in res.stderr
    with m.client() as c:
        [job] = c.jobs()
    assert job["state"] == "partial"
    states = {i["path"]: i["state"] for i in job["items"]}
    assert states.pop("tokenizer.json") == "failed"
    assert set(states.values()) == {"done"}
    origin.clear_faults()
    # resume retries the failed file
    with m.client() as c:
        c.act(job["id"], "resume")
        assert wait_job(c, job["id"])["state"] == "done"


def test_a_job_survives_a_daemon_crash(mount_factory, origin: Origin, repo_data) -> None:
    data = random.Random(5).randbytes(20 * MiB)
    origin.put_file("org/model", "main", "big.safetensors", data)
    m = mount_factory(["org/model"], "--per-file-connections", "2")
    origin.throttle = 4 * MiB
    with m.client() as c:
        job = c.prefetch({"repos": [{"id": "org/model", "include": ["big.safetensors"]}]})
        wait_job(c, job["id"], until=lambda j: j["items"] and j["items"][0]["downloaded_bytes"] >= 4 * MiB)
    m.kill(clear=False)  # as after an OOM kill: the dead mount stays (ENOTCONN) ...
    assert is_mounted(m.path)
    origin.throttle = 0
    m.start()  # ... and the new daemon clears it (what Restart=on-failure relies on)
    assert "cleared the dead mount" in m.log_text()
    with m.client() as c:
        done = wait_job(c, job["id"])
    assert done["state"] == "done"
    # At most the chunks in flight at the kill (2 of 1 MiB) were fetched twice.
    assert len(data) <= cdn_bytes(origin, "*") <= len(data) + 2 * MiB
    origin.reset_stats()
    assert m.p("org/model/big.safetensors").read_bytes() == data
    assert origin.data_requests() == []


def test_status_and_metrics(mount_factory, origin: Origin, repo_data) -> None:
    m = mount_factory(["org/model", "org/model@v1"])
    want = repo_data["org/model@main"]["model.safetensors"]
    assert m.p("org/model/model.safetensors").read_bytes() == want
    with m.client() as c:
        # A chunk is served as its bytes arrive and stored after: the last ones may
        # still be on their way to disk when the read returns.
        wait_for(lambda: c.status()["cache"]["usage_bytes"] >= len(want), what="stores")
        st = c.status()
        text = c.request("GET", "/metrics")
    assert check(st, STATUS) == []
    assert st["mountpoint"] == str(m.path)
    assert {(r["id"], r["revision"], r["commit"]) for r in st["repos"]} == {
        ("org/model", "main", origin.commit_of("org/model", "main")),
        ("org/model", "v1", origin.commit_of("org/model", "v1"))}
    assert st["cache"]["usage_bytes"] >= len(want)
    assert st["fetch"]["bytes_fetched"] >= len(want)
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    value = {f.name: f.samples[0].value for f in fams.values() if f.samples}
    assert value["modelfs_fetched_bytes"] >= len(want)
    assert value["modelfs_served_bytes"] >= len(want)
    assert value["modelfs_cache_misses"] > 0
    hist = {s.labels.get("le"): s.value for s in fams["modelfs_fetch_duration_seconds"].samples
            if s.name.endswith("_bucket")}
    assert hist["+Inf"] == value["modelfs_fetches"] > 0
    assert "modelfs_errors" in fams and "modelfs_fetches_in_flight" in fams
    # Origin requests by what asked for them, and the connection window.
    requests = st["fetch"]["requests"]
    assert set(requests) == {"demand", "readahead", "prefetch"}
    assert requests["demand"] + requests["readahead"] > 0  # the read above
    by_priority = {s.labels["priority"]: s.value for s in fams["modelfs_origin_requests"].samples
                   if s.name.endswith("_total")}
    assert by_priority == {k: float(v) for k, v in requests.items()}
    assert value["modelfs_connections"] == st["fetch"]["connections"] > 0
    assert value["modelfs_max_connections"] == st["fetch"]["max_connections"]
    # The CLI shows the same.
    out = subprocess.run([sys.executable, "-m", "modelfs", "status", "--control-socket",
                          str(m.socket)], capture_output=True, text=True, check=True).stdout
    assert f"org/model@v1 -> {origin.commit_of('org/model', 'v1')[:12]}" in out
    assert f"{requests['demand']} demand, {requests['readahead']} read-ahead" in out
    # The socket is the owner's only.
    assert (os.stat(m.socket).st_mode & 0o777) == 0o600


def test_api_rejects_bad_requests_naming_the_field(mount_factory, origin: Origin,
                                                   repo_data) -> None:
    m = mount_factory(["org/model"])
    with m.client() as c:
        for body, field in [({"repos": []}, "repos"),
                            ({"repos": [{"id": "org/model", "includes": ["x"]}]}, "includes"),
                            ({"repos": [{"id": "not a repo"}]}, "repos[0]"),
                            ({"repos": ["org/model"], "pin": "yes"}, "pin"),
                            ({"repo": ["org/model"]}, "repo")]:
            with pytest.raises(ControlError, match=field.replace("[", r"\[")):
                c.prefetch(body)
        assert c.jobs() == []


def test_cli_without_a_daemon_needs_no_wait_refused(origin: Origin, tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "modelfs", "prefetch", "org/model", "--no-wait",
                          "--cache-dir", str(tmp_path / "c"), "--endpoint", origin.url],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "no daemon" in res.stderr


@pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse")
def test_systemd_notify_ready_only_once_the_mount_answers_then_stopping(
        origin: Origin, repo_data, tmp_path: Path) -> None:
    notify = tmp_path / "notify.sock"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sd:
        sd.bind(str(notify))
        sd.settimeout(30)
        proc = subprocess.Popen(
            [sys.executable, "-m", "modelfs", "mount", str(mnt), "--foreground", "--repo",
             "org/model", "--endpoint", origin.url, "--cache-dir", str(tmp_path / "cache"),
             "--control-socket", f"/tmp/mfs-notify-{os.getpid()}.sock",
             "--log-file", str(tmp_path / "log")],
            env={**os.environ, "NOTIFY_SOCKET": str(notify)})
        try:
            msg = sd.recv(4096).decode()
            assert msg.startswith("READY=1")
            assert (mnt / "org/model/config.json").read_bytes() == \
                repo_data["org/model@main"]["config.json"]  # it answered before READY
            proc.send_signal(signal.SIGTERM)
            assert sd.recv(4096).decode() == "STOPPING=1"
            assert proc.wait(timeout=30) == 0
            assert not is_mounted(mnt)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if is_mounted(mnt):
                subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
