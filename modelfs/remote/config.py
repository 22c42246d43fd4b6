"""The sources' settings as plain data (no httpx here: config building and the
CLI import this without loading the HTTP stack)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .listing import MAX_FILE_SIZE

# Bytes one socket read of a response body may return (httpcore's read size, raised
# from 64 KiB: for multi-MiB range bodies the per-read overhead dominated; loopback,
# 8 streams: 370 MB/s at 64 KiB vs 840 MB/s at 1 MiB, with half the CPU; 512 KiB
# was as fast as 1 MiB in a same-run A/B, and holds half the memory). A read
# returns what the socket has, so small responses are unaffected.
RECEIVE_BYTES = 512 << 10
# What one request in flight holds beside its chunk, at most: the bytes a read
# returned, h11's receive buffer they are appended to, and the body piece cut
# from it (measured with tracemalloc, tests/unit/test_memory.py). The fetch
# layer charges it to the memory budget.
RECEIVE_HELD = 3 * RECEIVE_BYTES


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """Knobs of the HTTP client.

    Deadlines, so that no origin can hold a request (and the reader behind it)
    for ever: `timeout` bounds every connect and every socket read; one attempt
    must end within `timeout + bytes / min_rate` (a body trickling one byte a
    second never trips a read timeout); one operation, retries included, within
    `request_deadline`. `retries` and `backoff` bound how often a failing origin
    is retried (backoff doubles up to `max_backoff`; a `Retry-After` is honoured
    up to `max_retry_after`, and one that points past the deadline fails at once).
    A redirect target (a CDN URL) is reused for the same file for `redirect_ttl`
    seconds, then asked for again (signed URLs expire). API answers (JSON) larger
    than `max_response_size` are refused. Redirects to link-local and cloud
    metadata addresses are refused, and to private ranges unless the request
    was to one already or `allow_private_redirects` is set.
    """

    timeout: float = 30.0
    min_rate: float = 256 << 10
    request_deadline: float = 120.0
    retries: int = 5
    backoff: float = 0.25
    max_backoff: float = 8.0
    max_retry_after: float = 60.0
    max_connections: int = 64
    max_redirects: int = 5
    redirect_ttl: float = 300.0
    max_response_size: int = 8 << 20
    allow_private_redirects: bool = False
    user_agent: str = "modelfs/0.1"
    # Origin requests go through `proxy` (a forward proxy such as Dragonfly's dfdaemon),
    # else, with `trust_env`, the one HTTPS_PROXY/HTTP_PROXY/NO_PROXY name.
    proxy: str | None = None
    trust_env: bool = True

    def attempt_time(self, nbytes: int) -> float:
        """How long one attempt that moves `nbytes` of body may take."""
        return self.timeout + nbytes / self.min_rate


@dataclass(frozen=True, slots=True)
class HubConfig:
    """`max_listing_entries` caps a repo's tree (files and directories): a listing
    beyond it is refused rather than held in memory and the index; so is one whose
    pages repeat or average fewer than `MIN_PAGE_ENTRIES` entries. A file declared
    larger than `max_file_size` is skipped as hostile."""

    endpoint: str = "https://huggingface.co"
    max_listing_entries: int = 200_000
    max_file_size: int = MAX_FILE_SIZE
    http: HttpConfig = field(default_factory=HttpConfig)

    @property
    def key(self) -> str:
        """How the cache index names this origin (listings and pins are per origin)."""
        return f"hf:{self.endpoint.rstrip('/')}"


@dataclass(frozen=True, slots=True)
class HttpSourceConfig:
    """`max_listing_entries` caps a directory walk (files and directories), which
    also goes at most `MAX_DEPTH` directories deep."""

    max_listing_entries: int = 100_000
    max_file_size: int = MAX_FILE_SIZE
    http: HttpConfig = field(default_factory=HttpConfig)


S3_ADDRESSING = ("auto", "path", "virtual")


@dataclass(frozen=True, slots=True)
class S3Config:
    """One S3-compatible store. `endpoint` None is AWS (`https://s3.REGION.amazonaws.com`);
    `region` None is the profile's, else us-east-1; `addressing` `auto` is
    virtual-hosted on AWS (bucket names without dots) and path-style on a custom
    endpoint; `anonymous` sends unsigned requests (public buckets); `profile` names
    a profile of the shared config files (None: `AWS_PROFILE`, else default)."""

    endpoint: str | None = None
    region: str | None = None
    addressing: str = "auto"
    anonymous: bool = False
    profile: str | None = None
    max_listing_entries: int = 100_000
    max_file_size: int = MAX_FILE_SIZE
    http: HttpConfig = field(default_factory=HttpConfig)


@dataclass(frozen=True, slots=True)
class FileSourceConfig:
    """`max_listing_entries` caps a directory walk, which also goes at most
    `MAX_DEPTH` directories deep; `threads` bounds the reads in flight (an NFS
    server that hangs holds at most that many threads)."""

    max_listing_entries: int = 100_000
    max_file_size: int = MAX_FILE_SIZE
    threads: int = 16
    # A read or a walk that takes longer (a hung share) fails as unavailable.
    http: HttpConfig = field(default_factory=HttpConfig)
    listing_deadline: float = 300.0


@dataclass(frozen=True, slots=True)
class SourcesConfig:
    """Every origin's settings: what `remote.sources.Sources` builds sources from."""

    hub: HubConfig = field(default_factory=HubConfig)
    s3: S3Config = field(default_factory=S3Config)
    http: HttpSourceConfig = field(default_factory=HttpSourceConfig)
    file: FileSourceConfig = field(default_factory=FileSourceConfig)
    # The fleet's shared chunk tier (`remote.tier`): an s3:// prefix on the store of `s3`.
    shared_cache: str | None = None
    shared_cache_required: bool = False
