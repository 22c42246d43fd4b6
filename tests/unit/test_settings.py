"""Flags > MODELFS_* environment > TOML file > defaults; every bad key or value is an
error naming it and where it came from; `config show` never shows a token."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from modelfs.config import load_job_config, load_mount_config
from modelfs.errors import ConfigError
from modelfs.jobs import JobsConfig
from modelfs.settings import SETTINGS, layer

CONFIG = """
cache_dir = "/srv/cache"
[cache]
size = "10GiB"
chunk_size = "2MiB"
[hub]
endpoint = "http://mirror.internal:8080"
retries = 3
[limits]
max_connections = 32
parallel_files = 6
[mount]
mountpoint = "/models"
repos = ["org/a", "org/b@v1"]
urls = { "web/x" = "http://files.internal/x/" }
allow_other = true
revision_ttl = 30
"""


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "config.toml"
    p.write_text(text)
    return str(p)


def test_the_file_sets_everything_and_env_and_flags_override_it(tmp_path: Path) -> None:
    path = write(tmp_path, CONFIG)
    c, layered = load_mount_config({}, config=path, env={})
    assert str(c.mountpoint) == "/models" and str(c.cache_dir) == "/srv/cache"
    assert [str(r) for r in c.repos] == ["org/a", "org/b@v1", "web/x=http://files.internal/x/"]
    assert c.fetch.chunk_size == 2 << 20 and c.cache.limit == 10 << 30
    assert c.hub.endpoint == "http://mirror.internal:8080" and c.hub.http.retries == 3
    assert c.fetch.scheduler.max_fetches == 32 and c.jobs.parallel_files == 6
    assert c.allow_other and c.revision_ttl == 30
    assert c.control_socket == Path("/srv/cache/control.sock")
    assert layered.origin("chunk_size") == f"{path}: [cache] chunk_size"
    env = {"MODELFS_CHUNK_SIZE": "8MiB", "MODELFS_MAX_CONNECTIONS": "8",
           "HF_ENDPOINT": "http://env-mirror"}
    c, layered = load_mount_config({"max_connections": 4}, config=path, env=env)
    assert c.fetch.chunk_size == 8 << 20  # env beats file
    assert c.fetch.scheduler.max_fetches == 4  # flag beats env
    assert c.hub.endpoint == "http://env-mirror"  # HF_ENDPOINT is environment too
    assert layered.origin("max_connections") == "--max-connections"
    assert layered.origin("chunk_size") == "MODELFS_CHUNK_SIZE"


def test_defaults_shown_by_config_show_are_the_real_defaults() -> None:
    c, _ = load_mount_config({"mountpoint": "/m", "repos": ("o/n",)}, env={})
    real = {"chunk_size": "4MiB" if c.fetch.chunk_size == 4 << 20 else "?",
            "retries": str(c.hub.http.retries), "retry_backoff": str(c.hub.http.backoff),
            "timeout": str(c.hub.http.timeout),
            "max_listing_entries": str(c.hub.max_listing_entries),
            "max_connections": str(c.fetch.scheduler.max_fetches),
            "per_file_connections": str(c.prefetch.per_file),
            "parallel_files": str(JobsConfig().parallel_files),
            "memory_limit": f"{c.fetch.memory_limit >> 20}MiB",
            "revision_ttl": str(c.revision_ttl), "compression": c.cache.compression,
            "prefetch_on_open": "[" + ", ".join(f'"{p}"' for p in c.prefetch.on_open) + "]"}
    shown = {s.name: s.default for s in SETTINGS if s.name in real}
    assert shown == real


@pytest.mark.parametrize(("text", "env", "message"), [
    ("[cache]\nsise = '1GiB'\n", {}, r"config.toml: unknown key \[cache\] sise"),
    ("[caches]\nsize = '1GiB'\n", {}, r"config.toml: unknown key caches"),
    ("[limits]\nmax_connections = 'lots'\n", {},
     r"config.toml: \[limits\] max_connections: expected an integer, got 'lots'"),
    ("[mount]\nallow_other = 1\n", {}, r"\[mount\] allow_other: expected true or false"),
    ("[cache]\nchunk_size = '3MiB'\n", {},
     r"config.toml: \[cache\] chunk_size: must be a power of two"),
    ("[mount]\nrevision_ttl = 0\n", {}, r"config.toml: \[mount\] revision_ttl: must be at least"),
    ("cache = 3\n", {}, r"\[cache\] must be a table"),
    ("[hub\n", {}, r"not valid TOML"),
    ("", {"MODELFS_CHUNK_SIZ": "1MiB"}, r"MODELFS_CHUNK_SIZ \(environment\): unknown setting"),
    ("", {"MODELFS_RETRIES": "many"}, r"MODELFS_RETRIES \(environment\): 'many' is not an "
                                      r"integer"),
    ("", {"MODELFS_CHUNK_SIZE": "3MiB"},
     r"MODELFS_CHUNK_SIZE \(environment\): must be a power of two"),
    ("", {"MODELFS_REPOS": "not-a-repo"}, r"MODELFS_REPOS \(environment\) 'not-a-repo'"),
])
def test_bad_keys_and_values_name_themselves_and_their_origin(
        tmp_path: Path, text: str, env: dict[str, str], message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message):
        load_mount_config({"mountpoint": "/m", "repos": ("o/n",)} if "REPOS" not in str(env)
                          else {"mountpoint": "/m"}, config=path, env=env)


def test_a_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.toml"):
        layer({}, config=str(tmp_path / "nope.toml"), env={})


def test_prefetch_reads_the_same_file_and_ignores_mount_only_keys(tmp_path: Path) -> None:
    path = write(tmp_path, CONFIG)
    c, _ = load_job_config({"repos": ("org/c",), "include": ("*.json",)}, config=path, env={})
    assert [r.id for r in c.spec.repos] == ["org/c"] and c.spec.repos[0].include == ("*.json",)
    assert c.jobs.parallel_files == 6 and c.fetch.chunk_size == 2 << 20
    assert c.control_socket == Path("/srv/cache/control.sock")


def test_cli_bad_config_is_a_usage_error_and_config_show_redacts(tmp_path: Path) -> None:
    path = write(tmp_path, "[cache]\nsise = 1\n")
    res = subprocess.run([sys.executable, "-m", "modelfs", "mount", "--config", path],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "unknown key [cache] sise" in res.stderr
    token = "hf_secretsecretsecret"
    tok = tmp_path / "token"
    tok.write_text(token)
    path = write(tmp_path, CONFIG.replace("retries = 3", f'retries = 3\ntoken_file = "{tok}"'))
    res = subprocess.run([sys.executable, "-m", "modelfs", "config", "show", "--config", path],
                         capture_output=True, text=True, env={"HF_TOKEN": token, "PATH": "/usr/bin"})
    assert res.returncode == 0, res.stderr
    assert token not in res.stdout
    assert "token = ***" in res.stdout
    assert f'chunk_size = "2MiB"  # {path}: [cache] chunk_size' in res.stdout
    assert "# compression = auto  (default)" in res.stdout
