"""The Kubernetes manifests (deploy/kubernetes/) validate against the Kubernetes schemas,
offline, and agree with the daemon: its config parses, the sizes are bytes, the memory
limit covers the configured buffers, the grace period covers the daemon's stop."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from modelfs.config import load_mount_config, parse_size
from modelfs.daemon.supervisor import STOP_WAIT

DEPLOY = Path(__file__).parents[2] / "deploy" / "kubernetes"
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))
K8S_VERSION = "1.30.0"  # the oldest release still maintained upstream when written


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _resource(kind: str) -> dict[str, Any]:
    found = [d for p in MANIFESTS for d in _docs(p) if d["kind"] == kind]
    assert len(found) == 1, kind
    return found[0]


def daemonset_container() -> dict[str, Any]:
    """The modelfs container of the DaemonSet, as the node test runs it."""
    spec = _resource("DaemonSet")["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] if c["name"] == "modelfs")


def config_toml() -> str:
    return str(_resource("ConfigMap")["data"]["config.toml"])


def test_there_are_manifests() -> None:
    assert {p.name for p in MANIFESTS} >= {"daemonset.yaml", "config.yaml", "secrets.yaml",
                                           "inference.yaml", "warmup-job.yaml"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
@pytest.mark.parametrize("version", [K8S_VERSION, kubernetes_validate.latest_version()])
def test_every_manifest_validates_against_the_schemas(path: Path, version: str) -> None:
    for doc in _docs(path):
        kubernetes_validate.validate(doc, version, strict=True)


def test_a_broken_manifest_is_refused() -> None:
    ds = _resource("DaemonSet")
    ds["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]["mountPropagation"] = 7
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, K8S_VERSION, strict=True)


def test_the_configmap_is_a_config_the_daemon_takes(tmp_path: Path) -> None:
    conf = tmp_path / "config.toml"
    conf.write_text(config_toml())
    config, _ = load_mount_config({}, config=str(conf))
    assert str(config.mountpoint) == "/models"
    assert config.allow_other  # inference pods run as other users
    size = tomllib.loads(config_toml())["cache"]["size"]
    assert not size.endswith("%")  # a share measures the whole node volume
    assert config.cache.limit == parse_size(size, setting="cache_size")


def test_the_daemonset_fits_the_daemon() -> None:
    ds = _resource("DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    c = daemonset_container()
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["models"]["mountPath"] == "/models"
    assert mounts["models"]["mountPropagation"] == "Bidirectional"
    assert c["securityContext"]["privileged"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" not in volumes["cache"]  # a full cache would get the pod evicted
    assert pod["terminationGracePeriodSeconds"] >= STOP_WAIT + 5
    memory = tomllib.loads(config_toml())["limits"]["memory"]
    limit = c["resources"]["limits"]["memory"]
    assert limit.endswith("Mi")
    assert int(limit[:-2]) << 20 >= parse_size(memory, setting="memory_limit") + (512 << 20)
    assert "livenessProbe" not in c  # a restarted container takes the mount down
    # Upgrades take the mount over (a new pod beside the old one), never unmount it.
    assert "--take-over" in c["args"]
    assert ds["spec"]["updateStrategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert "preStop" not in c.get("lifecycle", {})  # it would unmount the new pod's mount
    assert "status" in c["readinessProbe"]["exec"]["command"]
    # Warm-up pods reach the daemon through the socket the config names.
    socket = tomllib.loads(config_toml())["control_socket"]
    assert socket.startswith(mounts["run"]["mountPath"] + "/")
    inference = _resource("Deployment")["spec"]["template"]["spec"]
    warm = inference["initContainers"][0]
    assert warm["args"][:3] == ["prefetch", "--control-socket", socket]
    models = next(m for m in inference["containers"][0]["volumeMounts"] if m["name"] == "models")
    assert models["mountPropagation"] == "HostToContainer"
