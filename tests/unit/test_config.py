"""Flags and environment compose into a MountConfig; bad input names its source."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelfs.config import build_mount_config, parse_size
from modelfs.errors import ConfigError


def build(env: dict[str, str], **kw: object):
    args: dict[str, object] = dict(mountpoint="/m", repos=("org/a",), endpoint=None, cache_dir=None,
                                   token_file=None, allow_other=False, chunk_size=None)
    args.update(kw)
    return build_mount_config(args, env)


def test_endpoint_and_token_sources(tmp_path: Path) -> None:
    c = build({})
    assert c.hub.endpoint == "https://huggingface.co"
    assert c.token is None
    c = build({"HF_ENDPOINT": "http://mirror:8080/", "HF_TOKEN": "hf_env"})
    assert c.hub.endpoint == "http://mirror:8080"
    assert c.token == "hf_env"
    assert "hf_env" not in repr(c)
    tf = tmp_path / "tok"
    tf.write_text("hf_file\n")
    c = build({"HF_TOKEN": "hf_env"}, endpoint="http://x", token_file=str(tf))
    assert (c.hub.endpoint, c.token) == ("http://x", "hf_file")
    assert build({"MODELFS_CACHE_DIR": "/cache"}).cache_dir == Path("/cache")


def test_bad_values_name_their_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="HF_ENDPOINT"):
        build({"HF_ENDPOINT": "ftp://x"})
    with pytest.raises(ConfigError, match="--endpoint"):
        build({}, endpoint="nope")
    with pytest.raises(ConfigError, match="--chunk-size"):
        build({}, chunk_size="3MiB")
    with pytest.raises(ConfigError, match="--chunk-size"):
        build({}, chunk_size="lots")
    with pytest.raises(ConfigError, match="--token-file"):
        build({}, token_file=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="--repo/--url org/a: listed twice"):
        build({}, repos=("org/a", "org/a"))
    with pytest.raises(ConfigError, match="--retries"):
        build({}, retries=-1)
    with pytest.raises(ConfigError, match="--repo: give at least one"):
        build({}, repos=())


def test_parse_size() -> None:
    assert parse_size("4MiB", setting="x") == 4 << 20
    assert parse_size("64K", setting="x") == 64 << 10
    assert parse_size("123", setting="x") == 123
    assert parse_size("1G", setting="x") == 1 << 30


def test_cache_and_url_options(tmp_path: Path) -> None:
    c = build({}, cache_dir=str(tmp_path), cache_size="2GiB", compression="never", force=True)
    assert (c.cache.limit, c.cache.compression, c.force) == (2 << 30, "never", True)
    assert build({}, cache_dir=str(tmp_path), cache_size="unlimited").cache.limit is None
    half = build({}, cache_dir=str(tmp_path / "not" / "yet"), cache_size="50%").cache.limit
    assert half is not None and half > 0  # a share of the file system the dir will be on
    c = build({}, urls=("mirror/m=http://127.0.0.1:8/models/",))
    assert [(r.repo_id, u) for r, u in c.urls] == [("mirror/m", "http://127.0.0.1:8/models/")]
    with pytest.raises(ConfigError, match="--cache-size"):
        build({}, cache_size="150%")
    with pytest.raises(ConfigError, match="--cache-size"):
        build({}, cache_size="lots")
    with pytest.raises(ConfigError, match="--compression"):
        build({}, compression="max")
    with pytest.raises(ConfigError, match="--revision-ttl"):
        build({}, revision_ttl=0)
    with pytest.raises(ConfigError, match="--url 'mirror/m': expected"):
        build({}, urls=("mirror/m",))
    with pytest.raises(ConfigError, match="no revisions"):
        build({}, urls=("mirror/m@v1=http://h/x",))
    with pytest.raises(ConfigError, match="listed twice"):
        build({}, repos=("org/a",), urls=("org/a=http://h/x",))


def test_a_config_error_carries_its_setting_and_each_front_end_names_it(tmp_path) -> None:
    from click.testing import CliRunner

    from modelfs.cli import main
    from modelfs.config import load_mount_config

    flags = {"mountpoint": str(tmp_path), "repos": ("org/model",)}
    with pytest.raises(ConfigError) as by_flag:
        load_mount_config({**flags, "cache_size": "lots"}, env={})
    with pytest.raises(ConfigError) as by_env:
        load_mount_config(flags, env={"MODELFS_CACHE_SIZE": "lots"})
    cfg = tmp_path / "c.toml"
    cfg.write_text('[cache]\nsize = "lots"\n')
    with pytest.raises(ConfigError) as by_file:
        load_mount_config(flags, config=str(cfg), env={})
    for e in (by_flag, by_env, by_file):
        assert (e.value.setting, e.value.reason) == ("cache_size", "'lots' is not a size (e.g. 4MiB)")
    assert str(by_flag.value) == "--cache-size: 'lots' is not a size (e.g. 4MiB)"
    assert str(by_env.value) == "MODELFS_CACHE_SIZE (environment): 'lots' is not a size (e.g. 4MiB)"
    assert str(by_file.value) == f"{cfg}: [cache] size: 'lots' is not a size (e.g. 4MiB)"
    from modelfs.cache import Index

    Index(tmp_path / "c" / "index").close()
    out = CliRunner().invoke(main, ["cache", "ls", "no-slash", "--cache-dir", str(tmp_path / "c")])
    assert out.exit_code == 2
    assert "REPO 'no-slash': expected ORG/NAME[@REVISION]" in out.output
