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
    assert [(s.ref.repo_id, s.url) for s in c.repos if s.url] == [
        ("mirror/m", "http://127.0.0.1:8/models/")]
    with pytest.raises(ConfigError, match="--cache-size"):
        build({}, cache_size="150%")
    with pytest.raises(ConfigError, match="--cache-size"):
        build({}, cache_size="lots")
    with pytest.raises(ConfigError, match="--compression"):
        build({}, compression="max")
    with pytest.raises(ConfigError, match="--revision-ttl"):
        build({}, revision_ttl=0)
    with pytest.raises(ConfigError, match="--url 'mirror/m': expected ORG/NAME=URL"):
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


@pytest.mark.parametrize(("text", "path", "url"), [
    ("org/a", "org/a", None),
    ("org/a@v1.0", "org/a@v1.0", None),
    ("datasets/org/d", "datasets/org/d", None),
    ("datasets/org/d@main", "datasets/org/d@main", None),
    ("org/a=s3://bucket/models/llama", "org/a", "s3://bucket/models/llama/"),
    ("org/a=s3://my.bucket", "org/a", "s3://my.bucket/"),
    ("org/a=https://h/x/", "org/a", "https://h/x/"),
    ("org/a=file:///srv/models/x", "org/a", "file:///srv/models/x/"),
    ("org/a=file://localhost/srv/m/", "org/a", "file:///srv/m/"),
])
def test_one_spec_grammar_for_every_source(text: str, path: str, url: str | None) -> None:
    from modelfs.types import RepoSpec

    spec = RepoSpec.parse(text)
    assert (spec.ref.mount_path, spec.url) == (path, url)


@pytest.mark.parametrize(("text", "reason"), [
    ("org", "expected ORG/NAME"),
    ("a/b/c", "expected ORG/NAME"),
    ("models/a/b", "expected ORG/NAME"),
    ("org/a=ftp://h/x", "scheme 'ftp'"),
    ("org/a=s3://Bucket/x", "not an S3 bucket name"),
    ("org/a=s3://b/x", "not an S3 bucket name"),
    ("org/a=s3://bucket/a//b/", "empty, '.' or '..'"),
    ("org/a=s3://bucket/../x", "empty, '.' or '..'"),
    ("org/a=s3://bucket/x?versionId=1", "query"),
    ("org/a=file://nfs-host/x", "local path"),
    ("org/a=file:relative", "absolute path"),
    ("org/a@v1=s3://bucket/x", "no revisions"),
    ("datasets/org/d=s3://bucket/", "Hub dataset"),
    ("org/a=http:///x", r"http\(s\)://host"),
    ("org/a=http://h/x y", "spaces"),
])
def test_a_bad_spec_is_refused_naming_it(text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason) as exc:
        build({}, repos=(text,))
    assert str(exc.value).startswith(f"--repo {text!r}") or repr(text)[1:-1] in str(exc.value)


def test_repos_that_nest_or_repeat_are_refused() -> None:
    with pytest.raises(ConfigError, match="listed twice"):
        build({}, repos=("org/a", "org/a=s3://bucket/x/"))
    with pytest.raises(ConfigError, match="nest"):
        build({}, repos=("datasets/org", "datasets/org/d"))
    c = build({}, repos=("org/a", "datasets/org/a", "org/b=s3://bucket/x/"))
    assert [s.scheme for s in c.repos] == ["hf", "hf", "s3"]


def test_s3_settings_and_the_aws_environment() -> None:
    c = build({"AWS_ENDPOINT_URL": "http://127.0.0.1:8333/", "AWS_REGION": "eu-west-1",
               "AWS_PROFILE": "ci"}, repos=("org/a=s3://bucket/",))
    assert (c.sources.s3.endpoint, c.sources.s3.region, c.sources.s3.profile) == (
        "http://127.0.0.1:8333", "eu-west-1", "ci")
    c = build({"AWS_ENDPOINT_URL": "http://a:1", "AWS_ENDPOINT_URL_S3": "http://b:2"},
              s3_endpoint=None, s3_anonymous=True)
    assert (c.sources.s3.endpoint, c.sources.s3.anonymous) == ("http://b:2", True)
    assert build({"AWS_REGION": "x"}, s3_region="us-east-2").sources.s3.region == "us-east-2"
    with pytest.raises(ConfigError, match="AWS_ENDPOINT_URL.*not an http"):
        build({"AWS_ENDPOINT_URL": "s3.local"})
    with pytest.raises(ConfigError, match="--s3-region"):
        build({}, s3_region="EU West")
    with pytest.raises(ConfigError, match="--s3-addressing"):
        build({}, s3_addressing="dns")


def test_the_shared_cache_is_an_s3_prefix() -> None:
    c = build({}, shared_cache="s3://fleet/models")
    assert c.sources.shared_cache == "s3://fleet/models/"  # a prefix: one spelling
    assert build({}).sources.shared_cache is None
    assert build({}, shared_cache="s3://fleet/x/", shared_cache_required=True
                 ).sources.shared_cache_required
    for bad in ("https://fleet/models/", "s3://Bad_Bucket/x/", "fleet/models"):
        with pytest.raises(ConfigError, match="--shared-cache"):
            build({}, shared_cache=bad)
