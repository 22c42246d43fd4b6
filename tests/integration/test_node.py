"""The DaemonSet on a node, without a cluster: its container's command, arguments,
environment and volume mounts, exactly as deploy/kubernetes/daemonset.yaml states them,
run in a mount namespace of their own whose /models is shared with a "host" namespace
(`mountPropagation: Bidirectional`); a second namespace stands for the inference pod
(`HostToContainer`: a slave of the host's /models), started before the daemon. The pod
sees the model appear and reads it right; after the daemon stops it sees no stale mount.

The only changes to the manifest are the test's origin (MODELFS_ENDPOINT, MODELFS_REPOS,
which beat the config file) and the Secrets' values."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from modelfs.testing.origin import Origin

from ..conftest import fuse_available, sha256
from ..unit.test_deploy_manifests import _resource, daemonset_container

DRIVER = r'''
import json, os, signal, subprocess, sys, time
spec = json.load(open(sys.argv[1]))
created = []
def run(*cmd):
    subprocess.run(cmd, check=True, capture_output=True)
def mounted_at(path, ns_pid="self"):
    with open(f"/proc/{ns_pid}/mountinfo") as f:
        return [ln.split(" - ")[1].split()[0] for ln in f if ln.split()[4] == path]
try:
    # The "host": a private copy of the machine's mounts, with the pod's volumes on it.
    for target, source, shared in spec["binds"]:
        if not os.path.isdir(target):
            os.makedirs(target)
            created.append(target)
        run("mount", "--bind", source, target)
        if shared:
            run("mount", "--make-shared", target)
    # The inference pod, there before the daemon: /models a slave of the host's.
    pod = subprocess.Popen(["unshare", "--mount", "--propagation", "unchanged", "--",
                            sys.executable, "-c", spec["pod"]], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    assert pod.stdout.readline().strip() == "pod ready"
    # The DaemonSet's container: a mount namespace of its own, its /models shared.
    daemon = subprocess.Popen(["unshare", "--mount", "--propagation", "unchanged", "--",
                               *spec["command"]], env=spec["env"])
    deadline = time.monotonic() + 60
    while "fuse.modelfs" not in mounted_at("/models"):
        assert daemon.poll() is None, f"the daemon exited {daemon.returncode}"
        assert time.monotonic() < deadline, "no mount on the host's /models"
        time.sleep(0.05)
    pod.stdin.write("read\n"); pod.stdin.flush()
    read = json.loads(pod.stdout.readline())
    daemon.send_signal(signal.SIGTERM)
    daemon.wait(timeout=30)
    pod.stdin.write("after\n"); pod.stdin.flush()
    after = json.loads(pod.stdout.readline())
    pod.wait(timeout=10)
    print(json.dumps({"read": read, "after": after, "host_after": mounted_at("/models"),
                      "daemon_rc": daemon.returncode}))
finally:
    for target, _, _ in reversed(spec["binds"]):
        subprocess.run(["umount", "-l", target], capture_output=True)
    for d in reversed(created):
        os.rmdir(d)
'''

POD = r'''
import hashlib, json, os, subprocess, sys, time
subprocess.run(["mount", "--make-rslave", "/models"], check=True)
print("pod ready", flush=True)
def types():
    with open("/proc/self/mountinfo") as f:
        return [ln.split(" - ")[1].split()[0] for ln in f if ln.split()[4] == "/models"]
assert sys.stdin.readline().strip() == "read"
path = "/models/org/model/model.safetensors"
deadline = time.monotonic() + 30
while not os.path.exists(path):
    assert time.monotonic() < deadline, f"no {path} in the pod; mounts {types()}"
    time.sleep(0.05)
with open(path, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
print(json.dumps({"sha256": digest, "mounts": types()}), flush=True)
assert sys.stdin.readline().strip() == "after"
print(json.dumps({"mounts": types(), "listing": os.listdir("/models")}), flush=True)
'''


def test_the_daemonset_container_serves_a_pod_on_the_node(tmp_path: Path, origin: Origin,
                                                           repo_data) -> None:
    if not fuse_available() or shutil.which("unshare") is None:
        pytest.skip("needs FUSE and unshare(1)")
    exe = shutil.which("modelfs")
    if exe is None:
        pytest.fail("no modelfs on PATH: the package installs its command")
    c = daemonset_container()
    pod = _resource("DaemonSet")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    binds = []
    for vm in c["volumeMounts"]:
        vol = volumes[vm["name"]]
        if "hostPath" in vol:
            if vol["hostPath"].get("type") == "CharDevice":
                continue  # /dev/fuse: the machine's own
            source = tmp_path / "node" / vol["hostPath"]["path"].lstrip("/")
            source.mkdir(parents=True, exist_ok=True)
        else:
            cm = _resource("ConfigMap")
            assert vol["configMap"]["name"] == cm["metadata"]["name"]
            source = tmp_path / "configmap"
            source.mkdir()
            for name, text in cm["data"].items():
                (source / name).write_text(text)
        binds.append((vm["mountPath"], str(source),
                      vm.get("mountPropagation") == "Bidirectional"))
    env = {"PATH": str(Path(exe).parent) + ":/usr/bin:/bin", "HOME": str(tmp_path)}
    for e in c.get("env", []):
        env[e["name"]] = e.get("value", f"test-{e['name'].lower()}")  # a Secret's value
    env.pop("AWS_ACCESS_KEY_ID", None)  # no S3 here: the chain must not find test keys
    env.pop("AWS_SECRET_ACCESS_KEY", None)
    env.update({"MODELFS_ENDPOINT": origin.url, "MODELFS_REPOS": "org/model"})
    spec = {"binds": binds, "command": [*c["command"], *c["args"]], "env": env, "pod": POD}
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    res = subprocess.run(["unshare", "--mount", "--propagation", "private", "--",
                          sys.executable, "-c", DRIVER, str(spec_file)],
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["read"]["sha256"] == sha256(repo_data["org/model@main"]["model.safetensors"])
    assert "fuse.modelfs" in out["read"]["mounts"]
    assert out["daemon_rc"] == 0
    assert "fuse.modelfs" not in out["after"]["mounts"]  # no stale mount in the pod
    assert out["after"]["listing"] == []
    assert "fuse.modelfs" not in out["host_after"]
