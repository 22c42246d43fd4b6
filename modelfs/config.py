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
from .remote.config import HttpConfig, HubConfig
from .settings import Layered, layer, relabel
from .types import RepoRef

DEFAULT_ENDPOINT = "https://huggingface.co"
_SIZE = re.compile(r"\s*([0-9]{1,30})\s*([KMGT]i?B?|B)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
DEFAULT_CACHE_SIZE = "80%"
DEFAULT_REVISION_TTL = 60.0


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


def build_cache_config(*, cache_dir: Path, cache_size: str | None,
                       compression: str | None) -> CacheConfig:
    limit = parse_cache_size(cache_size or DEFAULT_CACHE_SIZE, cache_dir)
    mode = compression or "auto"
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
    repos: tuple[RepoRef, ...]  # Hub repos
    cache_dir: Path
    hub: HubConfig
    fetch: FetchConfig
    fs: FsConfig
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    urls: tuple[tuple[RepoRef, str], ...] = ()  # plain HTTP repos (`--url ORG/NAME=URL`)
    allow_other: bool = False
    force: bool = False
    rebuild_index: bool = False  # a damaged index is rebuilt at start instead of refused
    revision_ttl: float = DEFAULT_REVISION_TTL  # branches and tags are re-resolved this often
    jobs: JobsConfig = field(default_factory=JobsConfig)
    control_socket: Path | None = None  # the API's Unix socket (None: no API)
    token: str | None = field(default=None, repr=False)


def _at_least(value: int | float | None, minimum: float, setting: str, what: str) -> None:
    """Refuse a value below `minimum` (or not finite: `nan`, `inf`) of `setting`."""
    if value is not None and (not math.isfinite(value) or value < minimum):
        raise ConfigError(f"must be {what}", setting=setting)


def build_hub_config(*, endpoint: str | None, retries: int | None = None,
                     retry_backoff: float | None = None, timeout: float | None = None,
                     max_listing_entries: int | None = None,
                     request_deadline: float | None = None, min_rate: str | None = None,
                     max_response_size: str | None = None, max_file_size: str | None = None,
                     allow_private_redirects: bool = False,
                     env: Mapping[str, str]) -> HubConfig:
    ep = endpoint or env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    if not re.match(r"^https?://[^/\s]+", ep):
        raise ConfigError(f"{ep!r} is not an http(s) URL", setting="endpoint",
                          label=None if endpoint else "HF_ENDPOINT")
    http = HttpConfig()
    _at_least(retries, 0, "retries", "0 or more")
    _at_least(retry_backoff, 1e-6, "retry_backoff", "a positive number of seconds")
    _at_least(timeout, 1e-6, "timeout", "a positive number of seconds")
    _at_least(max_listing_entries, 1, "max_listing_entries", "1 or more")
    if retries is not None:
        http = replace(http, retries=retries)
    if retry_backoff is not None:
        http = replace(http, backoff=retry_backoff)
    if timeout is not None:
        http = replace(http, timeout=timeout)
    _at_least(request_deadline, 1e-3, "request_deadline", "a positive number of seconds")
    if request_deadline is not None:
        http = replace(http, request_deadline=request_deadline)
    if min_rate:
        http = replace(http, min_rate=parse_rate(min_rate, setting="min_rate"))
    if max_response_size:
        cap = parse_size(max_response_size, setting="max_response_size")
        if cap < 64 << 10:
            raise ConfigError("must be at least 64KiB", setting="max_response_size")
        http = replace(http, max_response_size=cap)
    http = replace(http, allow_private_redirects=bool(allow_private_redirects))
    hub = HubConfig(endpoint=ep.rstrip("/"), http=http)
    if max_listing_entries is not None:
        hub = replace(hub, max_listing_entries=max_listing_entries)
    if max_file_size:
        limit = parse_size(max_file_size, setting="max_file_size")
        if not 0 < limit < 1 << 63:
            raise ConfigError("must be between 1 byte and 8EiB", setting="max_file_size")
        hub = replace(hub, max_file_size=limit)
    return hub


def build_fetch_config(*, chunk_size: str | None = None, max_connections: int | None = None,
                       memory_limit: str | None = None,
                       bandwidth_limit: str | None = None,
                       read_deadline: float | None = None) -> FetchConfig:
    fetch = FetchConfig()
    _at_least(read_deadline, 1e-3, "read_deadline", "a positive number of seconds")
    if read_deadline is not None:
        fetch = replace(fetch, read_deadline=read_deadline)
    if chunk_size:
        cs = parse_size(chunk_size, setting="chunk_size")
        if cs < 64 << 10 or cs > 256 << 20 or cs & (cs - 1):
            raise ConfigError("must be a power of two between 64KiB and 256MiB",
                              setting="chunk_size")
        fetch = replace(fetch, chunk_size=cs)
    sched = fetch.scheduler
    _at_least(max_connections, 2, "max_connections", "2 or more")
    if max_connections is not None:
        sched = replace(sched, max_fetches=max_connections,
                        demand_reserve=min(sched.demand_reserve, max_connections // 2))
    if memory_limit:
        mem = parse_size(memory_limit, setting="memory_limit")
        if mem < MIN_MEMORY_CHUNKS * fetch.chunk_size:
            raise ConfigError(f"must hold at least {MIN_MEMORY_CHUNKS} chunks "
                              f"({MIN_MEMORY_CHUNKS * fetch.chunk_size >> 20}MiB at this "
                              "chunk size)", setting="memory_limit")
        fetch = replace(fetch, memory_limit=mem)
    if bandwidth_limit:
        sched = replace(sched, bandwidth=parse_rate(bandwidth_limit, setting="bandwidth_limit"))
    return replace(fetch, scheduler=sched)


def build_prefetch_config(per_file: int | None, on_open: str | tuple[str, ...] | None,
                          max_header_size: str | None = None) -> PrefetchConfig:
    cfg = PrefetchConfig()
    if max_header_size:
        cap = parse_size(max_header_size, setting="max_header_size")
        if not 64 <= cap <= MAX_HEADER:
            raise ConfigError(f"must be between 64B and {MAX_HEADER >> 20}MiB",
                              setting="max_header_size")
        cfg = replace(cfg, max_header_size=cap)
    _at_least(per_file, 1, "per_file_connections", "1 or more")
    if per_file is not None:
        cfg = replace(cfg, per_file=per_file)
    if on_open is not None:
        parts = on_open.split(",") if isinstance(on_open, str) else on_open
        pats = tuple(p.strip() for p in parts if p.strip())
        cfg = replace(cfg, on_open=pats)
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


def build_jobs_config(parallel_files: int | None, per_file: int | None) -> JobsConfig:
    _at_least(parallel_files, 1, "parallel_files", "1 or more")
    _at_least(per_file, 1, "per_file_connections", "1 or more")
    cfg = JobsConfig()
    if parallel_files is not None:
        cfg = replace(cfg, parallel_files=parallel_files)
    if per_file is not None:
        cfg = replace(cfg, per_file=per_file)
    return cfg


def control_socket_path(control_socket: str | None, cache_dir: Path) -> Path:
    return Path(control_socket).absolute() if control_socket else cache_dir / "control.sock"


def build_mount_config(
    *,
    mountpoint: str | None,
    repos: tuple[str, ...],
    endpoint: str | None = None,
    urls: tuple[str, ...] = (),
    cache_dir: str | None = None,
    token_file: str | None = None,
    allow_other: bool = False,
    chunk_size: str | None = None,
    retries: int | None = None,
    retry_backoff: float | None = None,
    timeout: float | None = None,
    max_listing_entries: int | None = None,
    request_deadline: float | None = None,
    min_rate: str | None = None,
    max_response_size: str | None = None,
    max_file_size: str | None = None,
    allow_private_redirects: bool = False,
    read_deadline: float | None = None,
    max_connections: int | None = None,
    per_file_connections: int | None = None,
    memory_limit: str | None = None,
    bandwidth_limit: str | None = None,
    prefetch_on_open: str | None = None,
    max_header_size: str | None = None,
    cache_size: str | None = None,
    compression: str | None = None,
    force: bool = False,
    rebuild_index: bool = False,
    revision_ttl: float | None = None,
    parallel_files: int | None = None,
    control_socket: str | None = None,
    env: Mapping[str, str] | None = None,
) -> MountConfig:
    env = os.environ if env is None else env
    if not mountpoint:
        raise ConfigError("give MOUNTPOINT (or [mount] mountpoint in the config file)",
                          setting="mountpoint")
    if not repos and not urls:
        raise ConfigError("give at least one ORG/NAME[@REVISION] (or --url ORG/NAME=URL)",
                          setting="repos")
    refs = tuple(RepoRef.parse(r) for r in repos)
    url_refs = tuple(_parse_url(u) for u in urls)
    seen: dict[tuple[str, str], RepoRef] = {}
    for ref in refs + tuple(r for r, _ in url_refs):
        key = (ref.repo_id.split("/")[0], ref.mount_name)
        if key in seen:
            raise ConfigError("listed twice", setting="repos", label="--repo/--url",
                              subject=str(ref))
        seen[key] = ref
    hub = build_hub_config(endpoint=endpoint, retries=retries, retry_backoff=retry_backoff,
                           timeout=timeout, max_listing_entries=max_listing_entries,
                           request_deadline=request_deadline, min_rate=min_rate,
                           max_response_size=max_response_size, max_file_size=max_file_size,
                           allow_private_redirects=allow_private_redirects, env=env)
    fetch = build_fetch_config(chunk_size=chunk_size, max_connections=max_connections,
                               memory_limit=memory_limit, bandwidth_limit=bandwidth_limit,
                               read_deadline=read_deadline)
    prefetch = build_prefetch_config(per_file_connections, prefetch_on_open, max_header_size)
    _at_least(revision_ttl, 0.1, "revision_ttl", "at least 0.1 seconds")
    cdir = cache_dir_path(cache_dir, env)
    return MountConfig(
        mountpoint=Path(mountpoint).absolute(),
        repos=refs,
        urls=url_refs,
        cache_dir=cdir,
        hub=hub,
        fetch=fetch,
        fs=FsConfig(),
        prefetch=prefetch,
        cache=build_cache_config(cache_dir=cdir, cache_size=cache_size, compression=compression),
        allow_other=allow_other,
        force=force,
        rebuild_index=rebuild_index,
        revision_ttl=DEFAULT_REVISION_TTL if revision_ttl is None else revision_ttl,
        jobs=build_jobs_config(parallel_files, per_file_connections),
        control_socket=control_socket_path(control_socket, cdir),
        token=load_token(token_file, env),
    )


def _parse_url(text: str) -> tuple[RepoRef, str]:
    """`ORG/NAME=URL` -> (ref, url)."""
    name, sep, url = text.partition("=")
    if not sep or not re.match(r"^https?://[^/\s]+", url):
        raise ConfigError("expected ORG/NAME=http(s)://host/path[/]", setting="urls",
                          subject=repr(text))
    ref = RepoRef.parse(name)
    if ref.pinned:
        raise ConfigError(f"a plain URL has no revisions; drop @{ref.revision}", setting="urls",
                          subject=repr(text))
    return ref, url


@dataclass(frozen=True, slots=True)
class PrefetchJobConfig:
    """What `modelfs prefetch` needs: the job, and how to run it in-process (no daemon)."""

    spec: JobSpec
    jobs: JobsConfig
    cache_dir: Path
    control_socket: Path
    hub: HubConfig
    fetch: FetchConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    token: str | None = field(default=None, repr=False)


def build_job_config(
    *,
    repos: tuple[str, ...],
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    endpoint: str | None = None,
    cache_dir: str | None = None,
    token_file: str | None = None,
    chunk_size: str | None = None,
    retries: int | None = None,
    retry_backoff: float | None = None,
    timeout: float | None = None,
    request_deadline: float | None = None,
    min_rate: str | None = None,
    max_response_size: str | None = None,
    max_file_size: str | None = None,
    allow_private_redirects: bool = False,
    max_connections: int | None = None,
    per_file_connections: int | None = None,
    parallel_files: int | None = None,
    memory_limit: str | None = None,
    bandwidth_limit: str | None = None,
    cache_size: str | None = None,
    compression: str | None = None,
    control_socket: str | None = None,
    force: bool = False,
    pin: bool = False,
    env: Mapping[str, str] | None = None,
    **_mount_only: object,
) -> PrefetchJobConfig:
    """`_mount_only`: settings of the mount (from the config file) a prefetch ignores."""
    env = os.environ if env is None else env
    if not repos:
        raise ConfigError("give at least one ORG/NAME[@REVISION]", setting="repos", label="REPO")
    reqs = []
    for text in repos:
        ref = RepoRef.parse(text)
        reqs.append(RepoRequest(ref.repo_id, ref.revision, tuple(include), tuple(exclude)))
    hub = build_hub_config(endpoint=endpoint, retries=retries, retry_backoff=retry_backoff,
                           timeout=timeout, request_deadline=request_deadline, min_rate=min_rate,
                           max_response_size=max_response_size, max_file_size=max_file_size,
                           allow_private_redirects=allow_private_redirects, env=env)
    fetch = build_fetch_config(chunk_size=chunk_size, max_connections=max_connections,
                               memory_limit=memory_limit, bandwidth_limit=bandwidth_limit)
    # Nothing else reads through this process: no slots need holding back for demand reads.
    fetch = replace(fetch, scheduler=replace(fetch.scheduler, demand_reserve=0))
    cdir = cache_dir_path(cache_dir, env)
    return PrefetchJobConfig(
        spec=JobSpec(tuple(dict.fromkeys(reqs)), pin=pin, force=force),
        jobs=build_jobs_config(parallel_files, per_file_connections),
        cache_dir=cdir, control_socket=control_socket_path(control_socket, cdir), hub=hub,
        fetch=fetch,
        cache=build_cache_config(cache_dir=cdir, cache_size=cache_size, compression=compression),
        token=load_token(token_file, env))


def _hf_env_wins(layered: Layered, env: Mapping[str, str]) -> dict[str, Any]:
    """`HF_ENDPOINT` / `HF_TOKEN` are environment too: they beat the config file."""
    values = dict(layered.values)
    for name, var in (("endpoint", "HF_ENDPOINT"), ("token_file", "HF_TOKEN")):
        origin = layered.origin(name)
        if env.get(var) and origin != "default" and not origin.startswith(("--", "MODELFS_")):
            values.pop(name, None)
    return values


def load_mount_config(flags: Mapping[str, Any], *, config: str | None = None,
                      env: Mapping[str, str] | None = None) -> tuple[MountConfig, Layered]:
    """Flags > environment > file > defaults, for `modelfs mount`."""
    env = os.environ if env is None else env
    layered = layer(flags, config=config, env=env)
    values = _hf_env_wins(layered, env)
    values.pop("log_level", None)
    values.pop("log_file", None)
    values.setdefault("repos", ())
    values.setdefault("mountpoint", None)
    try:
        return build_mount_config(env=env, **values), layered
    except ConfigError as exc:
        raise relabel(exc, layered) from None


def load_job_config(flags: Mapping[str, Any], *, config: str | None = None,
                    env: Mapping[str, str] | None = None) -> tuple[PrefetchJobConfig, Layered]:
    """Flags > environment > file > defaults, for `modelfs prefetch`."""
    env = os.environ if env is None else env
    layered = layer(flags, config=config, env=env)
    values = _hf_env_wins(layered, env)
    values.setdefault("repos", ())
    for mount_only in ("log_level", "log_file", "mountpoint", "urls", "allow_other",
                       "prefetch_on_open", "revision_ttl", "max_listing_entries",
                       "read_deadline", "max_header_size"):
        values.pop(mount_only, None)
    try:
        return build_job_config(env=env, **values), layered
    except ConfigError as exc:
        raise relabel(exc, layered) from None
