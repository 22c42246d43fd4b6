"""The fleet's shared chunk tier: chunks kept on an S3-compatible store, so that
the nodes of a fleet read from it what one of them fetched from the origin.

- Key: `PREFIX` + `chunks/` + sha256(content id, chunk size, index). A content id
  names one immutable version of one file (an LFS sha256, a git blob id, an S3
  ETag and VersionId, an HTTP ETag, a file's size-mtime-inode), so a key names
  the same bytes on every node.
- Body: the chunk's bytes and then their sha256 (32 bytes). A body whose size or
  digest does not match is never served: the chunk comes from the origin and its
  object is written again. Other bytes under a key with a right digest (only a
  broken writer makes them) are caught where the file has a whole-file sha256,
  as origin bytes are.
- Single flight across nodes: a node that misses a chunk claims it with a lease
  object (`PREFIX` + `leases/` + the same name), written with `If-None-Match: *`
  so that one claim wins. The winner fetches the chunk from the origin; the
  others poll the tier for it, and fetch it themselves once the lease is older
  than `LEASE_TTL` (its node died) or `LEASE_WAIT` has passed. Ages come from
  the store's own clock (`Last-Modified` against `Date`). A store that ignores
  the condition is found at start (a probe claimed twice) and said once; the
  tier then works without leases (a chunk may be fetched by two nodes).
- The tier is an optimisation, never a dependency: its requests have short
  deadlines and no retries, and after `FAILURES` reads in a row failed it is
  left alone for `BACKOFF` seconds (logged once per outage), so a tier that is
  down or hangs costs readers one short wait, not an error. Only reads do that:
  a lease or a write that fails (a store slow under a fleet's writes) costs
  the sharing of that one chunk, since backing off would send the node to the
  origin for every chunk for `BACKOFF`. A store that refuses writes
  (credentials that may only read, a bucket policy) is still read from: only
  writes and leases rest for `BACKOFF`, said once until a write goes through.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, replace
from email.utils import parsedate_to_datetime
from urllib.parse import quote

import trio

from ..chunks import position_name
from ..errors import ModelfsError, RemoteAuthError, RemoteNotFound, RemoteStale
from ._http import Expect, HttpClient
from .config import S3Config
from .s3 import S3Auth, bucket_url, explain, split_url

log = logging.getLogger(__name__)

DIGEST = 32
# Reads failed in a row that leave the tier alone for BACKOFF seconds.
FAILURES = 3
BACKOFF = 30.0
# Tier requests: one attempt each, this quick (a LAN store answers in milliseconds).
TIMEOUT = 5.0
# A lease older than this is its dead node's; a node waits at most LEASE_WAIT for a
# chunk another node claimed, looking first after LEASE_POLL seconds, then after
# half as long again each time, up to LEASE_POLL_MAX (`claim_or_wait`).
LEASE_TTL = 20.0
LEASE_WAIT = 30.0
LEASE_POLL = 0.1
LEASE_POLL_MAX = 0.5


def framed(data: bytes | memoryview) -> tuple[bytes, str]:
    """A chunk's object (its bytes, then their sha256) and the object's own sha256
    in hex, which a signed PUT carries: both from one pass over the bytes (the
    object's hash goes on from the state after the chunk's), and one copy."""
    h = hashlib.sha256(data)
    digest = h.digest()
    h.update(digest)
    return b"".join((data, digest)), h.hexdigest()


@dataclass(slots=True)
class TierStats:
    hits: int = 0
    misses: int = 0
    damaged: int = 0  # objects whose size or digest did not match
    errors: int = 0  # requests that failed (down, slow, refused)
    bytes_read: int = 0
    bytes_written: int = 0
    writes: int = 0
    writes_skipped: int = 0  # not written: too many in flight, or the tier backing off
    writes_refused: int = 0  # writes and leases the store refused (access denied)
    lease_waits: int = 0  # misses another node had claimed: waited for its write
    lease_wait_hits: int = 0  # ... and found it written in time


class _Body:
    """Where a tier object's body goes (`types.Segments`): the chunk's bytes into
    the reader's buffer, then its digest."""

    def __init__(self, chunk: memoryview) -> None:
        self.digest = bytearray(DIGEST)
        self._parts = [chunk, memoryview(self.digest)]

    async def next(self) -> memoryview:
        return self._parts.pop(0)


class SharedTier:
    """One bucket and prefix of chunks shared by a fleet."""

    def __init__(self, url: str, config: S3Config, auth: S3Auth | None) -> None:
        self._bucket, self._prefix = split_url(url)
        self.url = url
        self._config = config
        self._auth = auth
        # Never through the origin's proxy: the tier is the fleet's own store. One attempt,
        # bounded by request_deadline (the client raises RemoteUnavailable past it).
        http = replace(config.http, retries=0, timeout=TIMEOUT, request_deadline=TIMEOUT * 2,
                       proxy=None, trust_env=False)
        # A chunk read off the socket costs its connection here (`keep_raw=False`):
        # kept, 8 nodes warming 1 GiB on one SeaweedFS asked more of it at once than
        # it answered within TIMEOUT, and chunks went to the origin (docs/fleet.md).
        self._http = HttpClient(http, auth_host=None, token=None,
                                sign=auth.sign if auth is not None else None,
                                explain=explain, follow_redirects=False, keep_raw=False)
        self._base = bucket_url(config, self._bucket, config.region or "us-east-1")
        self._skip_until = 0.0
        self._no_writes_until = 0.0
        self._refusing = False  # writes refused since the last one that went through
        self._slow_said = 0.0  # a failed lease or write is said again from then on
        self._failures = 0  # reads failed in a row
        self.leases = False  # the store refuses a second `If-None-Match: *` write
        self.stats = TierStats()

    async def ready(self) -> None:
        """Find credentials now (a mount names the tier if there are none); then address
        the bucket in the region they name, and find whether leases work there."""
        if self._auth is not None:
            await self._auth.ready(f"shared cache {self.url}")
            self._base = bucket_url(self._config, self._bucket, self._auth.region)
        probe = f"probe-{os.getpid()}-{time.time_ns()}"
        try:
            first, second = await self._claim(probe), await self._claim(probe)
        except ModelfsError as exc:  # unreachable at start: counts as a failed read
            self._failed(exc, "a lease")
            return
        self.leases = first is True and second is False
        if first is not None and not self.leases:
            log.warning("shared cache %s: the store does not refuse a second conditional "
                        "write (If-None-Match: *): nodes that miss a chunk at once may each "
                        "fetch it from the origin", self.url)

    async def aclose(self) -> None:
        await self._http.aclose()

    @property
    def available(self) -> bool:
        return trio.current_time() >= self._skip_until

    @property
    def writable(self) -> bool:
        """Available, and not resting after the store refused a write."""
        return self.available and trio.current_time() >= self._no_writes_until

    def _url(self, content_id: str, chunk_size: int, idx: int) -> str:
        return self._key_url(f"chunks/{position_name(content_id, chunk_size, idx)}")

    def _key_url(self, name: str) -> str:
        return f"{self._base}/{quote(self._prefix + name, safe='/')}"

    async def _claim(self, name: str) -> bool | None:
        """Write lease `name` unless it exists: True when this node's write made it,
        False when it was there, None when the store refused the write. Raises
        `ModelfsError` when the store did not answer in time or failed."""
        what = f"shared cache {self.url}: lease {name[:16]}"
        try:
            await self._http.put(self._key_url(f"leases/{name}"), b"", what=what,
                                 auth_msg=f"shared cache {self.url}: access denied",
                                 headers={"If-None-Match": "*"})
        except RemoteStale:
            return False
        except RemoteAuthError as exc:
            self._refused(exc, "a lease")
            return None
        self._accepted()
        return True

    async def _lease_age(self, name: str) -> float | None:
        """Seconds since lease `name` was written, by the store's clock; None if unknown."""
        try:
            head = await self._http.head(self._key_url(f"leases/{name}"),
                                         what=f"shared cache {self.url}: lease",
                                         auth_msg=f"shared cache {self.url}: access denied")
            h = head.headers or {}
            written = parsedate_to_datetime(h.get("Last-Modified", ""))
            return (parsedate_to_datetime(h.get("Date", "")) - written).total_seconds()
        except (ModelfsError, ValueError, TypeError):
            return None

    async def claim_or_wait(self, content_id: str, chunk_size: int, idx: int,
                            into: memoryview) -> bool:
        """After a miss: claim the chunk (False: fetch it from the origin, and the
        tier will have it from this node), or, when another node holds a live claim,
        wait for its write and read the chunk into `into` (True); False once the
        claim is stale or the wait is over (fetch it here)."""
        if not self.leases or not self.writable:
            return False
        name = position_name(content_id, chunk_size, idx)
        try:
            if await self._claim(name) is not False:
                return False
        except ModelfsError as exc:  # this chunk from the origin, unclaimed
            self._slow(exc, "a lease")
            return False
        self.stats.lease_waits += 1
        # Every look costs a signed request of this node and work of the store's,
        # and a warming node waits on many chunks at once: 8 nodes looking every
        # 0.1 s (and asking each lease's age each time) kept the store and
        # themselves busy with it. So the looks slow down as a wait goes on, and
        # the claim's age is asked at the start and then only once it could be
        # stale.
        stale_at = await self._stale_at(name)
        poll = LEASE_POLL
        with trio.move_on_after(LEASE_WAIT):
            while stale_at is not None:
                await trio.sleep(poll)
                poll = min(poll * 1.5, LEASE_POLL_MAX)
                found, missing = await self.get(content_id, chunk_size, idx, into, count=False)
                if found:
                    self.stats.lease_wait_hits += 1
                    return True
                if not missing:  # damaged, or the tier failing: fetch it here
                    return False
                if trio.current_time() >= stale_at:
                    stale_at = await self._stale_at(name)
        return False

    async def _stale_at(self, name: str) -> float | None:
        """When (trio's clock) lease `name` goes stale, by its age now; None if it
        is stale or its age cannot be found (the waiter fetches the chunk itself)."""
        age = await self._lease_age(name)
        if age is None or age > LEASE_TTL:
            return None
        return trio.current_time() + LEASE_TTL - age

    def _refused(self, exc: ModelfsError, doing: str) -> None:
        """The store refused a write: read from it still, write nothing for BACKOFF."""
        self.stats.writes_refused += 1
        if not self._refusing:
            log.warning("shared cache %s: %s was refused (%s); reading from it still, "
                        "writing to it again in %.0fs", self.url, doing, exc, BACKOFF)
        self._refusing = True
        self._no_writes_until = trio.current_time() + BACKOFF

    def _accepted(self) -> None:
        if self._refusing:
            log.info("shared cache %s: writes go through again", self.url)
        self._refusing = False

    def _slow(self, exc: ModelfsError, doing: str) -> None:
        """A lease or a write failed (most often: not answered within TIMEOUT by a
        store busy with a fleet's writes). Nobody waits for them, so they cost one
        chunk's sharing, not the tier: reads go on (a store that is down fails
        them too, and they back off). Said once per BACKOFF."""
        self.stats.errors += 1
        now = trio.current_time()
        if now >= self._slow_said:
            log.warning("shared cache %s: %s failed (%s); that chunk is not shared, the "
                        "tier is still read from (said once in %.0fs)", self.url, doing, exc,
                        BACKOFF)
            self._slow_said = now + BACKOFF

    def _failed(self, exc: ModelfsError, doing: str) -> None:
        """A read failed: that chunk comes from the origin; after `FAILURES` in a row,
        so does every chunk for `BACKOFF`. One slow answer from a store busy with a
        fleet's writes is no outage (backing off on it sent a node of 8 warming
        1 GiB to the origin for 30 s); a store that is down fails at once, and
        one that hangs fails the reads under way together, so either is found
        within one wait."""
        self.stats.errors += 1
        self._failures += 1
        if self._failures < FAILURES:
            return
        self._failures = 0
        if self.available:
            log.warning("shared cache %s: %s failed (%s); reading from the origin for %.0fs",
                        self.url, doing, exc, BACKOFF)
        self._skip_until = trio.current_time() + BACKOFF

    async def read(self, content_id: str, chunk_size: int, idx: int,
                   into: memoryview) -> bool:
        """Read the fleet's copy of chunk `idx` of `content_id` into `into` (the
        chunk's own buffer, of its length), checked: True when it is there; on a
        miss, claim it or wait for the node that did (`claim_or_wait`). False: fetch
        it from the origin (a claim of this node's, a damaged object, a tier that
        fails); `into` then holds nothing to serve."""
        found, missing = await self.get(content_id, chunk_size, idx, into)
        if found or not missing:
            return found
        return await self.claim_or_wait(content_id, chunk_size, idx, into)

    async def get(self, content_id: str, chunk_size: int, idx: int, into: memoryview, *,
                  count: bool = True) -> tuple[bool, bool]:
        """Read chunk `idx` of `content_id` into `into` (of the chunk's length) and
        check it: whether it is there, and whether the tier lacks it: (False, True)
        for a miss, (False, False) for an object found damaged or a tier that cannot
        be asked now. The body goes straight into `into` and its digest into 32
        bytes of its own: no copy of the chunk. `count`: a miss counts (not while
        waiting for another node's write)."""
        if not self.available:
            return False, False
        length = len(into)
        what = f"shared cache {self.url}: chunk {idx} of {content_id[:16]}"
        body = _Body(into)
        try:
            await self._http.get_range(
                self._url(content_id, chunk_size, idx), 0, length + DIGEST,
                Expect(size=length + DIGEST), what=what,
                auth_msg=f"shared cache {self.url}: access denied",
                content_id=f"tier:{position_name(content_id, chunk_size, idx)}", into=body)
        except RemoteNotFound:
            self.stats.misses += count
            self._failures = 0
            return False, True
        except RemoteStale:  # another size than a chunk of this length has
            self.stats.damaged += 1
            log.warning("%s: damaged object (wrong size); fetching it from the origin", what)
            return False, False
        except ModelfsError as exc:
            self._failed(exc, "a read")
            return False, False
        good = await trio.to_thread.run_sync(
            lambda: hashlib.sha256(into).digest() == bytes(body.digest))
        if not good:
            self.stats.damaged += 1
            log.warning("%s: damaged object (digest); fetching it from the origin", what)
            return False, False
        self._failures = 0
        self.stats.hits += 1
        self.stats.bytes_read += length
        return True, False

    async def put(self, content_id: str, chunk_size: int, idx: int,
                  data: bytes | memoryview) -> None:
        """Write a chunk fetched from the origin; a failure is counted and logged once."""
        if not self.writable:
            self.stats.writes_skipped += 1
            return
        body, signed = await trio.to_thread.run_sync(framed, data)
        what = f"shared cache {self.url}: chunk {idx} of {content_id[:16]}"
        try:
            await self._http.put(self._url(content_id, chunk_size, idx), body, what=what,
                                 auth_msg=f"shared cache {self.url}: access denied",
                                 headers={"X-Amz-Content-SHA256": signed})
        except RemoteAuthError as exc:
            self._refused(exc, "a write")
            return
        except ModelfsError as exc:
            self._slow(exc, "a write")
            return
        self._accepted()
        self.stats.writes += 1
        self.stats.bytes_written += len(data)
