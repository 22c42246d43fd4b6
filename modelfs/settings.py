"""Where each setting comes from: flags > `MODELFS_*` environment > TOML file > defaults.

Every setting has one name (the CLI option's, e.g. `cache_size` for
`--cache-size`), one environment variable (`MODELFS_CACHE_SIZE`) and one place
in the file (`[cache] size`). `layer()` merges the three and remembers, for each
value, where it came from, so an error about it can say so. An unknown key or
variable, or a value of the wrong type, is a `ConfigError` naming it and its
file or variable. Turning the values into the layers' configs (and checking
their ranges) is `config.py`'s job.

The file (`--config`, else `$MODELFS_CONFIG`, else `/etc/modelfs/config.toml`
when it exists) looks like docs/configuration.md shows.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cache import CacheConfig
from .errors import ConfigError, flag_of
from .fetch import FetchConfig, PrefetchConfig, SchedulerConfig
from .jobs import JobsConfig
from .remote.config import HttpConfig, HubConfig, S3Config
from .types import printable

DEFAULT_CONFIG = Path("/etc/modelfs/config.toml")
ENV_PREFIX = "MODELFS_"
# Defaults no layer's config holds (the others are the layers' dataclass defaults).
DEFAULT_CACHE_SIZE = "80%"
DEFAULT_REVISION_TTL = 60.0


def size_text(n: int) -> str:
    """Bytes as the settings take them: 4194304 -> `4MiB`."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return f"{n}B"


@dataclass(frozen=True, slots=True)
class Setting:
    name: str  # the option's name: `--cache-size` is `cache_size`
    section: str  # its TOML table ("" for the top level)
    key: str  # its key in that table
    kind: str  # str | int | float | bool | list | table
    # As `config show` and `--help` print it: text, or read from the default of the
    # layer's config that the setting sets, so that each default is stated once.
    default_of: str | Callable[[], object]
    help: str

    @property
    def default(self) -> str:
        value = self.default_of() if callable(self.default_of) else self.default_of
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, tuple):
            return "[" + ", ".join(f'"{x}"' for x in value) + "]"
        return str(value)

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def where(self) -> str:
        return f"[{self.section}] {self.key}" if self.section else self.key

    @property
    def flag(self) -> str:
        return flag_of(self.name)


SETTINGS: tuple[Setting, ...] = (
    Setting("cache_dir", "", "cache_dir", "str", "/var/cache/modelfs (root), else "
            "~/.cache/modelfs", "Chunk cache and index directory."),
    Setting("control_socket", "", "control_socket", "str", "CACHE_DIR/control.sock",
            "Unix socket of the daemon's API."),
    Setting("log_level", "", "log_level", "str", "info", "debug, info, warning or error."),
    Setting("log_file", "", "log_file", "str", "stderr (foreground), else CACHE_DIR/modelfs.log",
            "Where the daemon logs."),
    Setting("cache_size", "cache", "size", "str", DEFAULT_CACHE_SIZE,
            "Disk the cache may use: a size, a share of its file system, or unlimited."),
    Setting("compression", "cache", "compression", "str", lambda: CacheConfig().compression,
            "auto, always or never."),
    Setting("shared_cache", "cache", "shared", "str", "none",
            "s3://BUCKET/PREFIX/ shared by a fleet: chunks missing here are read from it "
            "before the origin, and chunks fetched from the origin are written to it."),
    Setting("shared_cache_required", "cache", "shared_required", "bool", "false",
            "Refuse to start when the shared cache cannot be used (else a warning)."),
    Setting("chunk_size", "cache", "chunk_size", "str",
            lambda: size_text(FetchConfig().chunk_size),
            "Chunk size, a power of two (mount and prefetch share chunks only at one size)."),
    Setting("endpoint", "hub", "endpoint", "str",
            lambda: f"$HF_ENDPOINT, else {HubConfig().endpoint}",
            "Hub endpoint (a mirror)."),
    Setting("token_file", "hub", "token_file", "str", "$HF_TOKEN",
            "File holding the Hub token."),
    Setting("retries", "hub", "retries", "int", lambda: HttpConfig().retries,
            "Retries of a failing origin request."),
    Setting("retry_backoff", "hub", "retry_backoff", "float", lambda: HttpConfig().backoff,
            "First retry delay in seconds, doubled each time."),
    Setting("timeout", "hub", "timeout", "float", lambda: HttpConfig().timeout,
            "Per-request connect/read timeout in seconds."),
    Setting("max_listing_entries", "hub", "max_listing_entries", "int",
            lambda: HubConfig().max_listing_entries,
            "Refuse repo listings larger than this."),
    Setting("request_deadline", "hub", "request_deadline", "float",
            lambda: HttpConfig().request_deadline,
            "Seconds one origin request may take in all, retries included."),
    Setting("min_rate", "hub", "min_rate", "str",
            lambda: size_text(int(HttpConfig().min_rate)) + "/s",
            "Slowest body an origin may send: one attempt gets timeout + bytes / min_rate."),
    Setting("max_response_size", "hub", "max_response_size", "str",
            lambda: size_text(HttpConfig().max_response_size),
            "Refuse API answers (listings, revisions) larger than this."),
    Setting("max_file_size", "hub", "max_file_size", "str",
            lambda: size_text(HubConfig().max_file_size),
            "Skip listing entries that declare a larger file (hostile)."),
    Setting("proxy", "hub", "proxy", "str", "$HTTPS_PROXY/$HTTP_PROXY (and $NO_PROXY)",
            "Forward proxy for origin requests (a P2P or caching proxy such as Dragonfly's "
            "dfdaemon); never used for the shared cache or the local API."),
    Setting("allow_private_redirects", "hub", "allow_private_redirects", "bool",
            lambda: HttpConfig().allow_private_redirects,
            "Follow redirects to private addresses from a public endpoint (in-cluster mirrors)."),
    Setting("s3_endpoint", "s3", "endpoint", "str",
            "$AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, else AWS (https://s3.REGION.amazonaws.com)",
            "S3-compatible store for s3:// repos (MinIO, Ceph RGW, SeaweedFS, R2, ...)."),
    Setting("s3_region", "s3", "region", "str",
            "$AWS_REGION, $AWS_DEFAULT_REGION, the profile's, else us-east-1",
            "Region requests are signed for."),
    Setting("s3_addressing", "s3", "addressing", "str", lambda: S3Config().addressing,
            "auto (virtual-hosted on AWS, path-style on a custom endpoint), path or virtual."),
    Setting("s3_anonymous", "s3", "anonymous", "bool", lambda: S3Config().anonymous,
            "Send unsigned requests (a public bucket); no credentials are looked for."),
    Setting("s3_profile", "s3", "profile", "str", "$AWS_PROFILE, else default",
            "Profile of ~/.aws/config and ~/.aws/credentials to take credentials from."),
    Setting("read_deadline", "limits", "read_deadline", "float",
            lambda: FetchConfig().read_deadline,
            "Seconds a read through the mount waits for the origin before EIO."),
    Setting("max_connections", "limits", "max_connections", "int",
            lambda: SchedulerConfig().max_fetches,
            "Most concurrent origin requests in all; the count in use adapts to the origin's "
            "throughput within it."),
    Setting("per_file_connections", "limits", "per_file_connections", "int",
            lambda: PrefetchConfig().per_file,
            "Concurrent ranged GETs a file's prefetch starts with (a job's or "
            "`modelfs prefetch`'s grow to the connection window)."),
    Setting("request_size", "limits", "request_size", "str",
            lambda: size_text(FetchConfig().request_size),
            "Largest request of a prefetch job or `modelfs prefetch`: consecutive missing "
            "chunks in one ranged GET (whole chunks, at least one)."),
    Setting("parallel_files", "limits", "parallel_files", "int",
            lambda: JobsConfig().parallel_files,
            "Files prefetched at once, over all jobs."),
    Setting("memory_limit", "limits", "memory", "str",
            lambda: size_text(FetchConfig().memory_limit),
            "Memory for chunk buffers: fetches in flight, chunks kept for readers and for "
            "whole-file hashes, load buffers."),
    Setting("bandwidth_limit", "limits", "bandwidth", "str", "none",
            "Cap on origin bandwidth, e.g. 200MiB/s."),
    Setting("mountpoint", "mount", "mountpoint", "str", "none", "Where to mount."),
    Setting("repos", "mount", "repos", "list", "[]",
            "Repos to mount: ORG/NAME[@REV] (Hub), datasets/ORG/NAME[@REV] (Hub dataset), "
            "ORG/NAME=URL (s3://BUCKET/PREFIX/, http(s)://..., file:///path/)."),
    Setting("urls", "mount", "urls", "table", "{}",
            "URL repos as a table, ORG/NAME = URL (the same as ORG/NAME=URL in repos)."),
    Setting("allow_other", "mount", "allow_other", "bool", "false",
            "Let other users read the mount."),
    Setting("prefetch_on_open", "mount", "prefetch_on_open", "list",
            lambda: PrefetchConfig().on_open,
            "Files fetched whole in the background when opened."),
    Setting("revision_ttl", "mount", "revision_ttl", "float", lambda: DEFAULT_REVISION_TTL,
            "Seconds between re-resolving branches and tags."),
    Setting("max_header_size", "mount", "max_header_size", "str",
            lambda: size_text(PrefetchConfig().max_header_size),
            "Largest safetensors header read to prefetch in loader order."),
)
BY_NAME = {s.name: s for s in SETTINGS}
_BY_PLACE = {(s.section, s.key): s for s in SETTINGS}
_SECTIONS = {s.section for s in SETTINGS if s.section}


@dataclass(frozen=True, slots=True)
class Layered:
    """Merged setting values (as the CLI option would give them) and their origins."""

    values: dict[str, Any]
    origins: dict[str, str]  # name -> "--flag", "MODELFS_X", or "FILE: [section] key"
    file: Path | None

    def origin(self, name: str) -> str:
        return self.origins.get(name, "default")


def config_path(flag: str | None, env: Mapping[str, str]) -> Path | None:
    """The config file to read: `--config`, `$MODELFS_CONFIG`, or the default if present."""
    if flag:
        return Path(flag)
    if env.get("MODELFS_CONFIG"):
        return Path(env["MODELFS_CONFIG"])
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def read_file(path: Path) -> dict[str, tuple[Any, str]]:
    """The settings in a TOML file: name -> (value as the option takes it, origin)."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML ({exc})") from None
    out: dict[str, tuple[Any, str]] = {}
    for key, value in doc.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: [{key}] must be a table")
            pairs = [((key, k), v) for k, v in value.items()]
        else:
            pairs = [(("", key), value)]
        for place, v in pairs:
            setting = _BY_PLACE.get(place)
            label = f"[{place[0]}] {place[1]}" if place[0] else place[1]
            if setting is None:
                raise ConfigError(f"{path}: unknown key {label}")
            out[setting.name] = (_from_toml(setting, v, f"{path}: {label}"),
                                 f"{path}: {label}")
    return out


def _from_toml(s: Setting, v: Any, where: str) -> Any:
    want = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
            "list": "a list of strings", "table": "a table of strings"}[s.kind]
    ok = {
        "str": isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)),
        "int": isinstance(v, int) and not isinstance(v, bool),
        "float": isinstance(v, int | float) and not isinstance(v, bool),
        "bool": isinstance(v, bool),
        "list": isinstance(v, list) and all(isinstance(x, str) for x in v),
        "table": isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
    }[s.kind]
    if not ok:
        raise ConfigError(f"{where}: expected {want}, got {printable(v, 60)}")
    if s.kind == "str":
        return str(v)
    if s.kind == "table":
        return tuple(f"{k}={u}" for k, u in v.items())
    if s.kind == "list":
        return tuple(v)
    return v


def read_env(env: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    """`MODELFS_*` variables: name -> (value, origin). Unknown ones are errors."""
    out: dict[str, tuple[Any, str]] = {}
    for var, raw in env.items():
        if not var.startswith(ENV_PREFIX) or var == "MODELFS_CONFIG":
            continue
        setting = BY_NAME.get(var[len(ENV_PREFIX):].lower())
        if setting is None or var != setting.env:
            raise ConfigError(f"{var} (environment): unknown setting")
        out[setting.name] = (_from_text(setting, raw, f"{var} (environment)"), var)
    return out


def _from_text(s: Setting, raw: str, where: str) -> Any:
    try:
        if s.kind == "int":
            return int(raw)
        if s.kind == "float":
            return float(raw)
    except ValueError:
        raise ConfigError(f"{where}: {printable(raw, 60)} is not a"
                          f"{'n integer' if s.kind == 'int' else ' number'}") from None
    if s.kind == "bool":
        low = raw.strip().lower()
        if low not in ("1", "0", "true", "false", "yes", "no"):
            raise ConfigError(f"{where}: {printable(raw, 60)} is not true or false")
        return low in ("1", "true", "yes")
    if s.kind in ("list", "table"):
        return tuple(x.strip() for x in raw.split(",") if x.strip())
    return raw


def layer(flags: Mapping[str, Any], *, config: str | None = None,
          env: Mapping[str, str] | None = None) -> Layered:
    """Merge `flags` (option name -> value; None, False or () when not given) over
    the environment over the config file."""
    env = os.environ if env is None else env
    path = config_path(config, env)
    merged: dict[str, tuple[Any, str]] = {}
    if path is not None:
        merged.update(read_file(path))
    merged.update(read_env(env))
    for name, value in flags.items():
        if value is not None and value is not False and value != ():
            merged[name] = (value, BY_NAME[name].flag if name in BY_NAME else f"--{name}")
    return Layered({k: v for k, (v, _) in merged.items()},
                   {k: o for k, (_, o) in merged.items()}, path)


def relabel(exc: ConfigError, layered: Layered) -> ConfigError:
    """`exc` named as the front end its setting's value came through names it: the
    flag (as raised), `MODELFS_X (environment)`, or `FILE: [section] key`."""
    origin = layered.origins.get(exc.setting) if exc.setting else None
    if origin is None or origin.startswith("--"):
        return exc
    return exc.labelled(f"{origin} (environment)" if origin.startswith(ENV_PREFIX) else origin)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, tuple | list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_settings(layered: Layered, env: Mapping[str, str]) -> str:
    """The effective settings as TOML, each with where it came from. The token itself
    is never shown: only whether there is one and where it came from."""
    lines = [f"# config file: {layered.file or 'none'}"]
    for section in ["", *sorted(_SECTIONS, key=[s.section for s in SETTINGS].index)]:
        if section:
            lines += ["", f"[{section}]"]
        for s in (s for s in SETTINGS if s.section == section):
            if s.name in layered.values:
                v = layered.values[s.name]
                if s.kind == "table":
                    pairs = (x.partition("=") for x in v)
                    text = "{ " + ", ".join(f'"{k}" = {_toml_value(u)}' for k, _, u in pairs) + " }"
                else:
                    text = _toml_value(v)
                lines.append(f"{s.key} = {text}  # {layered.origin(s.name)}")
            else:
                lines.append(f"# {s.key} = {s.default}  (default)")
        if section == "hub":
            token = ("token_file" in layered.values and "from token_file") or (
                env.get("HF_TOKEN") and "from HF_TOKEN")
            lines.append(f'# token = {"***" if token else "none"}  '
                         f'({token or "no token_file, no HF_TOKEN"})')
    return "\n".join(lines)
