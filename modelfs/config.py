"""The effective configuration of a mount or a prefetch, from flags, environment and file.

`settings.py` merges flags > `MODELFS_*` > the TOML file; this module turns
the merged values into each layer's frozen `XConfig` (`MountConfig` composes
them), checks their ranges, and reads `HF_ENDPOINT` / `HF_TOKEN`. A bad value is
a `ConfigError` naming the flag, variable or file key it came from. Tokens are
kept out of `repr`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .cache import COMPRESSION_MODES, CacheConfig
from .errors import ConfigError
from .fetch import FetchConfig, PrefetchConfig
from .fetch.reader import MIN_MEMORY_CHUNKS
from .fetch.tensors import MAX_HEADER
from .fs.config import FsConfig
from .jobs import JobsConfig, JobSpec, RepoRequest
from .remote.config import (
    S3_ADDRESSING,
    FileSourceConfig,
    HttpConfig,
    HttpSourceConfig,
    HubConfig,
    S3Config,
    SourcesConfig,
)
from .settings import DEFAULT_CACHE_SIZE, DEFAULT_REVISION_TTL, Layered, layer, relabel
from .types import RepoSpec, normalise_url, source_kind

DEFAULT_ENDPOINT = "https://huggingface.co"
_SIZE = re.compile(r"\s*([0-9]{1,30})\s*([KMGT]i?B?|B)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str, *, setting: str) -> int:
    """`4MiB`, `4M`, `4194304` -> bytes; anything else is an error of `setting`."""
    m = _SIZE.fullmatch(text)
    if not m:
        raise ConfigError(f"{text!r} is not a size (e.g. 4MiB)", setting=setting)
    unit = (m.group(2) or "").upper()[:1]
    return int(m.group(1)) * _UNITS[unit]


def parse_rate(text: str, *, setting: str) -> float:
    """`100MiB/s` (or a plain size) -> bytes per second, which must be positive."""
    rate = parse_size(text.removesuffix("/s"), setting=setting)
    if rate <= 0:
        raise ConfigError("must be positive (e.g. 100MiB/s)", setting=setting)
    return float(rate)


def parse_cache_size(text: str, cache_dir: Path, *, setting: str = "cache_size") -> int | None:
    """`200GiB`, or `80%` of the cache dir's file system, or `unlimited` -> bytes or None."""
    text = text.strip()
    if text.lower() in ("unlimited", "none"):
        return None
    if text.endswith("%"):
        try:
            pct = float(text[:-1])
        except ValueError:
            pct = -1.0
        if not 0 < pct <= 100:
            raise ConfigError(f"{text!r} is not a percentage between 0 and 100", setting=setting)
        probe = cache_dir
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        st = os.statvfs(probe)
        return int(st.f_blocks * st.f_frsize * pct / 100)
    size = parse_size(text, setting=setting)
    if size <= 0:
        raise ConfigError("must be positive (or `unlimited`)", setting=setting)
    return size


Values = Mapping[str, Any]  # setting name -> value, as `settings.layer` merged them


def build_cache_config(v: Values, cache_dir: Path) -> CacheConfig:
    limit = parse_cache_size(v.get("cache_size") or DEFAULT_CACHE_SIZE, cache_dir)
    mode = v.get("compression") or CacheConfig().compression
    if mode not in COMPRESSION_MODES:
        raise ConfigError(f"{mode!r} is not one of {', '.join(COMPRESSION_MODES)}",
                          setting="compression")
    return CacheConfig(limit=limit, compression=mode)


def default_cache_dir(env: Mapping[str, str]) -> Path:
    if env.get("MODELFS_CACHE_DIR"):
        return Path(env["MODELFS_CACHE_DIR"])
    if os.geteuid() == 0:
        return Path("/var/cache/modelfs")
    return Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "modelfs"


def cache_dir_path(cache_dir: str | None, env: Mapping[str, str]) -> Path:
    """The cache directory a setting names, or the default one."""
    return Path(cache_dir).absolute() if cache_dir else default_cache_dir(env)


@dataclass(frozen=True, slots=True)
class MountConfig:
    mountpoint: Path
    repos: tuple[RepoSpec, ...]  # Hub repos, and ORG/NAME=URL ones (`--repo`, `--url`)
    cache_dir: Path
    sources: SourcesConfig
    fetch: FetchConfig
    fs: FsConfig
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    allow_other: bool = False
    force: bool = False
    rebuild_index: bool = False  # a damaged index is rebuilt at start instead of refused
    revision_ttl: float = DEFAULT_REVISION_TTL  # branches and tags are re-resolved this often
    jobs: JobsConfig = field(default_factory=JobsConfig)
    control_socket: Path | None = None  # the API's Unix socket (None: no API)
    token: str | None = field(default=None, repr=False)

    @property
    def hub(self) -> HubConfig:
        return self.sources.hub


def _at_least(value: int | float | None, minimum: float, setting: str, what: str) -> None:
    """Refuse a value below `minimum` (or not finite: `nan`, `inf`) of `setting`."""
    if value is not None and (not math.isfinite(value) or value < minimum):
        raise ConfigError(f"must be {what}", setting=setting)


def _number(v: Values, setting: str, minimum: float, what: str) -> Any:
    value = v.get(setting)
    _at_least(value, minimum, setting, what)
    return value


def build_hub_config(v: Values, env: Mapping[str, str]) -> HubConfig:
    endpoint = v.get("endpoint")
    ep = endpoint or env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    if not re.match(r"^https?://[^/\s]+", ep):
        raise ConfigError(f"{ep!r} is not an http(s) URL", setting="endpoint",
                          label=None if endpoint else "HF_ENDPOINT")
    changes: dict[str, Any] = {}
    for setting, field_, minimum, what in (
            ("retries", "retries", 0, "0 or more"),
            ("retry_backoff", "backoff", 1e-6, "a positive number of seconds"),
            ("timeout", "timeout", 1e-6, "a positive number of seconds"),
            ("request_deadline", "request_deadline", 1e-3, "a positive number of seconds")):
        if (value := _number(v, setting, minimum, what)) is not None:
            changes[field_] = value
    if v.get("min_rate"):
        changes["min_rate"] = parse_rate(v["min_rate"], setting="min_rate")
    if proxy := v.get("proxy"):
        # No credentials: the setting is shown by `config show` and in errors.
        if "@" in proxy:
            raise ConfigError("credentials in the proxy URL are not supported",
                              setting="proxy")
        if not re.fullmatch(r"https?://[^/\s?#]+/?", proxy):
            raise ConfigError("expected http://HOST:PORT", setting="proxy",
                              subject=repr(proxy[:80]))
        changes["proxy"] = proxy
    if v.get("max_response_size"):
        cap = parse_size(v["max_response_size"], setting="max_response_size")
        if cap < 64 << 10:
            raise ConfigError("must be at least 64KiB", setting="max_response_size")
        changes["max_response_size"] = cap
    http = replace(HttpConfig(), allow_private_redirects=bool(v.get("allow_private_redirects")),
                   **changes)
    hub = HubConfig(endpoint=ep.rstrip("/"), http=http)
    if (entries := _number(v, "max_listing_entries", 1, "1 or more")) is not None:
        hub = replace(hub, max_listing_entries=entries)
    if v.get("max_file_size"):
        limit = parse_size(v["max_file_size"], setting="max_file_size")
        if not 0 < limit < 1 << 63:
            raise ConfigError("must be between 1 byte and 8EiB", setting="max_file_size")
        hub = replace(hub, max_file_size=limit)
    return hub


def build_s3_config(v: Values, env: Mapping[str, str], hub: HubConfig) -> S3Config:
    """The S3 store's settings; `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, `AWS_REGION`
    / `AWS_DEFAULT_REGION` and `AWS_PROFILE` stand in for settings not given, as the
    AWS tools read them. Retries and deadlines are the other origins' (`hub.http`)."""
    endpoint = v.get("s3_endpoint") or env.get("AWS_ENDPOINT_URL_S3") or env.get(
        "AWS_ENDPOINT_URL")
    label = None if v.get("s3_endpoint") else (
        "AWS_ENDPOINT_URL_S3" if env.get("AWS_ENDPOINT_URL_S3") else "AWS_ENDPOINT_URL")
    if endpoint and not re.match(r"^https?://[^/\s]+/?$", endpoint):
        raise ConfigError(f"{endpoint!r} is not an http(s) URL with no path "
                          "(e.g. http://127.0.0.1:8333)", setting="s3_endpoint", label=label)
    region = v.get("s3_region") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region is not None and not re.fullmatch(r"[a-z0-9-]{1,40}", region):
        raise ConfigError(f"{region!r} is not a region name (e.g. us-east-1)",
                          setting="s3_region",
                          label=None if v.get("s3_region") else "AWS_REGION")
    addressing = v.get("s3_addressing") or S3Config().addressing
    if addressing not in S3_ADDRESSING:
        raise ConfigError(f"{addressing!r} is not one of {', '.join(S3_ADDRESSING)}",
                          setting="s3_addressing")
    return S3Config(endpoint=endpoint.rstrip("/") if endpoint else None, region=region,
                    addressing=addressing, anonymous=bool(v.get("s3_anonymous")),
                    profile=v.get("s3_profile") or env.get("AWS_PROFILE") or None,
                    max_listing_entries=hub.max_listing_entries,
                    max_file_size=hub.max_file_size, http=hub.http)


def build_sources_config(v: Values, env: Mapping[str, str]) -> SourcesConfig:
    """The settings of every origin; listing caps and HTTP deadlines are shared."""
    hub = build_hub_config(v, env)
    shared = v.get("shared_cache") or None
    if shared is not None:
        text, shared = shared, normalise_url(shared, setting="shared_cache", subject=repr(shared))
        if source_kind(shared) != "s3":
            raise ConfigError("the shared cache is an s3://BUCKET/PREFIX/ URL",
                              setting="shared_cache", subject=repr(text))
    return SourcesConfig(
        shared_cache=shared, shared_cache_required=bool(v.get("shared_cache_required")),
        hub=hub, s3=build_s3_config(v, env, hub),
        http=HttpSourceConfig(max_listing_entries=hub.max_listing_entries,
                              max_file_size=hub.max_file_size, http=hub.http),
        file=FileSourceConfig(max_listing_entries=hub.max_listing_entries,
                              max_file_size=hub.max_file_size, http=hub.http))


def build_fetch_config(v: Values, *, demand_reserve: bool = True) -> FetchConfig:
    """`demand_reserve`: keep connections for demand reads (a mount; a prefetch in
    its own process has none to keep them for)."""
    fetch = FetchConfig()
    if (deadline := _number(v, "read_deadline", 1e-3, "a positive number of seconds")) is not None:
        fetch = replace(fetch, read_deadline=deadline)
    if v.get("chunk_size"):
        cs = parse_size(v["chunk_size"], setting="chunk_size")
        if cs < 64 << 10 or cs > 256 << 20 or cs & (cs - 1):
            raise ConfigError("must be a power of two between 64KiB and 256MiB",
                              setting="chunk_size")
        fetch = replace(fetch, chunk_size=cs)
    if v.get("request_size"):
        rs = parse_size(v["request_size"], setting="request_size")
        if rs < 64 << 10 or rs > 1 << 30:
            raise ConfigError("must be between 64KiB and 1GiB", setting="request_size")
        fetch = replace(fetch, request_size=rs)
    sched = fetch.scheduler
    if (conns := _number(v, "max_connections", 2, "2 or more")) is not None:
        sched = replace(sched, max_fetches=conns,
                        demand_reserve=min(sched.demand_reserve, conns // 2))
    if not demand_reserve:
        sched = replace(sched, demand_reserve=0)
    if v.get("memory_limit"):
        mem = parse_size(v["memory_limit"], setting="memory_limit")
        if mem < MIN_MEMORY_CHUNKS * fetch.chunk_size:
            raise ConfigError(f"must hold at least {MIN_MEMORY_CHUNKS} chunks "
                              f"({MIN_MEMORY_CHUNKS * fetch.chunk_size >> 20}MiB at this "
                              "chunk size)", setting="memory_limit")
        fetch = replace(fetch, memory_limit=mem)
    if v.get("bandwidth_limit"):
        sched = replace(sched, bandwidth=parse_rate(v["bandwidth_limit"],
                                                    setting="bandwidth_limit"))
    return replace(fetch, scheduler=sched)


def build_prefetch_config(v: Values) -> PrefetchConfig:
    cfg = PrefetchConfig()
    if v.get("max_header_size"):
        cap = parse_size(v["max_header_size"], setting="max_header_size")
        if not 64 <= cap <= MAX_HEADER:
            raise ConfigError(f"must be between 64B and {MAX_HEADER >> 20}MiB",
                              setting="max_header_size")
        cfg = replace(cfg, max_header_size=cap)
    if (per_file := _number(v, "per_file_connections", 1, "1 or more")) is not None:
        cfg = replace(cfg, per_file=per_file)
    on_open = v.get("prefetch_on_open")
    if on_open is not None:
        parts = on_open.split(",") if isinstance(on_open, str) else on_open
        cfg = replace(cfg, on_open=tuple(p.strip() for p in parts if p.strip()))
    return cfg


def load_token(token_file: str | None, env: Mapping[str, str]) -> str | None:
    """The Hub token, stripped of surrounding whitespace (`$(cat token.txt)` of a
    file with Windows line endings ends in "\r"). One with characters an HTTP
    header cannot carry is refused without being shown."""
    if token_file:
        try:
            token = Path(token_file).read_text(errors="replace").strip()
        except OSError as exc:
            raise ConfigError(str(exc.strerror), setting="token_file",
                              subject=token_file) from None
        if not token:
            raise ConfigError("file is empty", setting="token_file", subject=token_file)
        where = {"setting": "token_file", "subject": token_file}
    else:
        token = (env.get("HF_TOKEN") or "").strip()
        if not token:
            return None
        where = {"setting": "token_file", "label": "HF_TOKEN"}
    if not all(0x21 <= ord(c) <= 0x7E for c in token):
        raise ConfigError("the token holds spaces or characters that are not printable ASCII "
                          "(a pasted line break?); it was not used", **where)
    return token


def build_jobs_config(v: Values) -> JobsConfig:
    cfg = JobsConfig()
    if (files := _number(v, "parallel_files", 1, "1 or more")) is not None:
        cfg = replace(cfg, parallel_files=files)
    if (per_file := _number(v, "per_file_connections", 1, "1 or more")) is not None:
        cfg = replace(cfg, per_file=per_file)
    return cfg


def control_socket_path(control_socket: str | None, cache_dir: Path) -> Path:
    return Path(control_socket).absolute() if control_socket else cache_dir / "control.sock"


@dataclass(frozen=True, slots=True)
class _Shared:
    """What a mount and a prefetch build alike from their settings."""

    cache_dir: Path
    control_socket: Path
    sources: SourcesConfig
    cache: CacheConfig
    jobs: JobsConfig
    token: str | None = field(repr=False)


def _shared(v: Values, env: Mapping[str, str]) -> _Shared:
    cdir = cache_dir_path(v.get("cache_dir"), env)
    return _Shared(cache_dir=cdir, control_socket=control_socket_path(v.get("control_socket"), cdir),
                   sources=build_sources_config(v, env), cache=build_cache_config(v, cdir),
                   jobs=build_jobs_config(v), token=load_token(v.get("token_file"), env))


def build_mount_config(v: Values, env: Mapping[str, str] | None = None) -> MountConfig:
    env = os.environ if env is None else env
    repos, urls = tuple(v.get("repos") or ()), tuple(v.get("urls") or ())
    if not v.get("mountpoint"):
        raise ConfigError("give MOUNTPOINT (or [mount] mountpoint in the config file)",
                          setting="mountpoint")
    if not repos and not urls:
        raise ConfigError("give at least one ORG/NAME[@REVISION], datasets/ORG/NAME[@REVISION] "
                          "or ORG/NAME=URL", setting="repos")
    specs = tuple(RepoSpec.parse(r) for r in repos) + tuple(_parse_url(u) for u in urls)
    check_specs(specs)
    ttl = _number(v, "revision_ttl", 0.1, "at least 0.1 seconds")
    shared = _shared(v, env)
    return MountConfig(
        mountpoint=Path(v["mountpoint"]).absolute(), repos=specs,
        cache_dir=shared.cache_dir, sources=shared.sources, fetch=build_fetch_config(v), fs=FsConfig(),
        prefetch=build_prefetch_config(v), cache=shared.cache,
        allow_other=bool(v.get("allow_other")), force=bool(v.get("force")),
        rebuild_index=bool(v.get("rebuild_index")),
        revision_ttl=DEFAULT_REVISION_TTL if ttl is None else ttl, jobs=shared.jobs,
        control_socket=shared.control_socket, token=shared.token)


def _parse_url(text: str) -> RepoSpec:
    """`--url ORG/NAME=URL`, the older spelling of `--repo ORG/NAME=URL`."""
    if "=" not in text:
        raise ConfigError("expected ORG/NAME=URL", setting="urls", subject=repr(text))
    return RepoSpec.parse(text, setting="urls")


def check_specs(specs: tuple[RepoSpec, ...]) -> None:
    """Refuse two repos at one place of the mount, or one inside another's directory
    (`datasets/x` the model and `datasets/x/y` the dataset)."""
    seen: dict[str, RepoSpec] = {}
    for spec in specs:
        path = spec.ref.mount_path
        if path in seen:
            raise ConfigError("listed twice", setting="repos", label="--repo/--url",
                              subject=str(spec))
        clash = next((p for p in seen if path.startswith(p + "/") or p.startswith(path + "/")),
                     None)
        if clash is not None:
            raise ConfigError(f"its directory {path} and {clash}'s nest", setting="repos",
                              subject=str(spec))
        seen[path] = spec


@dataclass(frozen=True, slots=True)
class PrefetchJobConfig:
    """What `modelfs prefetch` needs: the job, and how to run it in-process (no daemon)."""

    spec: JobSpec
    jobs: JobsConfig
    cache_dir: Path
    control_socket: Path
    sources: SourcesConfig
    fetch: FetchConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    token: str | None = field(default=None, repr=False)

    @property
    def hub(self) -> HubConfig:
        return self.sources.hub


def build_job_config(v: Values, env: Mapping[str, str] | None = None) -> PrefetchJobConfig:
    """What `modelfs prefetch` runs: `repos` with `include`/`exclude` globs; settings
    of the mount only (from the config file) are not read."""
    env = os.environ if env is None else env
    if not v.get("repos"):
        raise ConfigError("give at least one ORG/NAME[@REVISION] or ORG/NAME=URL",
                          setting="repos", label="REPO")
    include, exclude = tuple(v.get("include") or ()), tuple(v.get("exclude") or ())
    reqs = []
    for text in v["repos"]:
        spec = RepoSpec.parse(text)
        reqs.append(RepoRequest(spec.ref.repo_id, spec.ref.revision, include, exclude,
                                url=spec.url))
    shared = _shared(v, env)
    return PrefetchJobConfig(
        spec=JobSpec(tuple(dict.fromkeys(reqs)), pin=bool(v.get("pin")),
                     force=bool(v.get("force"))),
        jobs=shared.jobs, cache_dir=shared.cache_dir, control_socket=shared.control_socket,
        sources=shared.sources, fetch=build_fetch_config(v, demand_reserve=False), cache=shared.cache,
        token=shared.token)


# Variables of the Hugging Face and AWS tools that stand for settings.
_TOOL_ENV = (("endpoint", ("HF_ENDPOINT",)), ("token_file", ("HF_TOKEN",)),
             ("s3_endpoint", ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")),
             ("s3_region", ("AWS_REGION", "AWS_DEFAULT_REGION")), ("s3_profile", ("AWS_PROFILE",)))


def _hf_env_wins(layered: Layered, env: Mapping[str, str]) -> dict[str, Any]:
    """`HF_ENDPOINT`, `HF_TOKEN`, `AWS_REGION`, ... are environment too: they beat the
    config file (not flags or `MODELFS_*`)."""
    values = dict(layered.values)
    for name, names in _TOOL_ENV:
        origin = layered.origin(name)
        if any(env.get(var) for var in names) and origin != "default" \
                and not origin.startswith(("--", "MODELFS_")):
            values.pop(name, None)
    return values


def load_mount_config(flags: Mapping[str, Any], *, config: str | None = None,
                      env: Mapping[str, str] | None = None) -> tuple[MountConfig, Layered]:
    """Flags > environment > file > defaults, for `modelfs mount`."""
    env = os.environ if env is None else env
    layered = layer(flags, config=config, env=env)
    try:
        return build_mount_config(_hf_env_wins(layered, env), env), layered
    except ConfigError as exc:
        raise relabel(exc, layered) from None


def load_job_config(flags: Mapping[str, Any], *, config: str | None = None,
                    env: Mapping[str, str] | None = None) -> tuple[PrefetchJobConfig, Layered]:
    """Flags > environment > file > defaults, for `modelfs prefetch`."""
    env = os.environ if env is None else env
    layered = layer(flags, config=config, env=env)
    try:
        return build_job_config(_hf_env_wins(layered, env), env), layered
    except ConfigError as exc:
        raise relabel(exc, layered) from None
