"""S3-compatible object stores (AWS S3, MinIO, Ceph RGW, SeaweedFS, R2, GCS XML).

`--repo ORG/NAME=s3://BUCKET/PREFIX/` mounts the keys under PREFIX as a repo.
Like plain HTTP there are no commits: a file's version is its ETag (and its
VersionId in a versioned bucket), its content id a hash of bucket, key and
version, and the repo's "commit" a hash of the whole listing, so `resolve`
(ListObjectsV2, paginated) is the re-listing `revision_ttl` drives. Ranged
GETs carry `If-Match` on the listed ETag: an object overwritten at the origin
answers 412 (stale), never a blend of two versions; with a VersionId the old
version stays readable.

Each object seen for the first time is asked for its full-object
`x-amz-checksum-sha256` (HEAD with `x-amz-checksum-mode: ENABLED`); when the
store keeps one, the whole file is checked against it like a Hub LFS file.

Signing is botocore's SigV4 (`S3SigV4Auth`) and credentials come from
botocore's standard chain (environment, profile and shared files, web identity,
container and instance roles), refreshed before they expire; requests go out
through the project's `HttpClient`, so retries, deadlines and range checks are
the same as for every other origin.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import logging
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import httpx
import trio

from ..errors import (
    ListingRejected,
    ModelfsError,
    RemoteAuthError,
    RemoteNotFound,
    RemoteProtocolError,
    RemoteStale,
)
from ..threads import run_abandonable
from ..types import FileEntry, ReadInto, RepoRef, Snapshot, printable
from ._http import Expect, HttpClient
from .config import S3Config
from .listing import Listings, bad_size_reason, clean_listing

log = logging.getLogger(__name__)
# botocore logs each canonical request and signature at debug level.
logging.getLogger("botocore").setLevel(logging.WARNING)

# Keys a ListObjectsV2 page holds at most (the S3 maximum); a listing whose pages
# average fewer than MIN_PAGE_KEYS (beyond a few) is paging for ever, not listing.
PAGE_KEYS = 1000
MIN_PAGE_KEYS = 10
# An ETag or VersionId goes into a header or a query: printable ASCII, bounded.
_HEADER_VALUE = re.compile(r'[\x21-\x7e]{1,1024}')
# HEADs for checksums and version ids in flight at once, and at most per listing
# (beyond that, objects are checked by chunk checksums only).
HEAD_PARALLEL = 16
MAX_HEADS = 10_000
# How long finding credentials may take (an instance role asks the metadata service).
CREDENTIALS_TIMEOUT = 30.0
# Headers that are part of the signature; the rest (User-Agent, Accept, ...) may be
# changed by a proxy without breaking it.
_SIGNED = frozenset({"host", "range", "if-match", "if-none-match", "x-amz-checksum-mode"})
_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


def content_id(store: str, bucket: str, key: str, etag: str, version: str | None) -> str:
    return "s3-" + hashlib.sha256(
        f"{store}\n{bucket}\n{key}\n{etag}\n{version or ''}".encode()).hexdigest()


def split_url(url: str) -> tuple[str, str]:
    """`s3://bucket/prefix/` -> (bucket, prefix); the URL was checked by `RepoSpec`."""
    parts = urlsplit(url)
    return parts.netloc, parts.path.lstrip("/")


def bucket_url(config: S3Config, bucket: str, region: str) -> str:
    """The URL of `bucket`, path-style or virtual-hosted as `config.addressing` says."""
    endpoint = (config.endpoint or f"https://s3.{region}.amazonaws.com").rstrip("/")
    ep = urlsplit(endpoint)
    virtual = config.addressing == "virtual" or (
        config.addressing == "auto" and config.endpoint is None and "." not in bucket)
    return f"{ep.scheme}://{bucket}.{ep.netloc}" if virtual else f"{endpoint}/{bucket}"


class S3Auth:
    """Credentials from botocore's chain, found once (in a thread: it may ask a metadata
    service or STS) and refreshed before they expire; signs requests in place."""

    def __init__(self, config: S3Config) -> None:
        self._config = config
        self._credentials: Any = None
        self._lock = trio.Lock()
        self.region = config.region or "us-east-1"

    async def _frozen(self) -> Any:
        async with self._lock:
            if self._credentials is None:
                with trio.move_on_after(CREDENTIALS_TIMEOUT) as scope:
                    self._credentials, region = await run_abandonable(self._find)
                if scope.cancelled_caught:
                    raise RemoteAuthError(f"no AWS credentials within {CREDENTIALS_TIMEOUT:.0f}s "
                                          "(an instance metadata service that does not answer?)")
                self.region = self._config.region or region or "us-east-1"
            creds = self._credentials
            if getattr(creds, "refresh_needed", lambda: False)():
                try:
                    return await trio.to_thread.run_sync(creds.get_frozen_credentials)
                except Exception as exc:
                    raise RemoteAuthError(f"could not refresh AWS credentials "
                                          f"({type(exc).__name__})") from None
            return creds.get_frozen_credentials()

    def _find(self) -> tuple[Any, str | None]:
        fast = self._from_environment()
        if fast is not None:
            return fast
        import botocore.exceptions
        import botocore.session

        try:
            session = botocore.session.Session(profile=self._config.profile)
            region = session.get_config_variable("region")
            creds = session.get_credentials()
        except botocore.exceptions.ProfileNotFound:
            raise RemoteAuthError(f"AWS profile {self._config.profile!r} is not in the shared "
                                  "config or credentials files") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise RemoteAuthError(f"AWS credentials: {type(exc).__name__}: "
                                  f"{printable(str(exc), 160)}") from None
        if creds is None:
            raise RemoteAuthError(
                "no AWS credentials found (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
                "~/.aws/credentials, a web identity token or an instance role); "
                "for a public bucket set s3_anonymous")
        return creds, region

    def _from_environment(self) -> tuple[Any, str | None] | None:
        """Keys in the environment, when they are what the chain would find: no
        profile named in the settings (one named there skips the environment) and a
        region that does not need the config file. The chain's own first provider
        (`EnvProvider`), without the session: that imports and loads all of botocore
        (~70 ms of a `modelfs prefetch` start)."""
        env = os.environ
        if self._config.profile is not None or not env.get("AWS_ACCESS_KEY_ID") \
                or not env.get("AWS_SECRET_ACCESS_KEY"):
            return None
        region = self._config.region or env.get("AWS_DEFAULT_REGION")
        config_file = Path(env.get("AWS_CONFIG_FILE", "~/.aws/config")).expanduser()
        if region is None and config_file.exists():  # its region may apply
            return None
        from botocore.credentials import EnvProvider

        creds = EnvProvider().load()
        return (creds, region) if creds is not None else None

    async def ready(self, what: str) -> None:
        """Find the credentials now, so that a mount without any fails naming `what`."""
        try:
            await self._frozen()
        except RemoteAuthError as exc:
            raise RemoteAuthError(f"{what}: {exc}") from None

    async def sign(self, req: httpx.Request) -> None:
        """Sign `req` (SigV4). A PUT's body is signed too, by its sha256 in
        X-Amz-Content-SHA256: a caller that set that header already (the shared
        tier, which hashes each chunk in a worker thread anyway) saves hashing the
        body again here, on the event loop: 4 MiB took it ~5 ms."""
        from botocore.awsrequest import AWSRequest

        frozen = await self._frozen()
        known = req.headers.get("X-Amz-Content-SHA256") if req.method == "PUT" else None
        aws = AWSRequest(method=req.method, url=str(req.url),
                         headers={k: v for k, v in req.headers.items() if k.lower() in _SIGNED},
                         data=req.content if req.method == "PUT" and known is None else None)
        signer = _signer_class()(frozen, "s3", self.region)
        signer.payload_sha256 = known
        signer.add_auth(aws)
        for name in ("Authorization", "X-Amz-Date", "X-Amz-Content-SHA256",
                     "X-Amz-Security-Token"):
            if name in aws.headers:
                req.headers[name] = aws.headers[name]


@functools.cache
def _signer_class() -> Any:
    """botocore's S3 signer, told a PUT body's sha256 where its caller knows it.
    Built on first use: botocore's signer is imported only by commands that sign."""
    from botocore.auth import S3SigV4Auth

    class Signer(S3SigV4Auth):
        payload_sha256: str | None = None

        def payload(self, request: Any) -> str:
            return self.payload_sha256 or str(super().payload(request))

    return Signer


def explain(status: int, headers: Mapping[str, str], body: bytes, what: str) -> ModelfsError | None:
    """S3's error document (or, for a HEAD, its status) as one line naming the fix."""
    code, message, region = _error_fields(body)
    region = headers.get("x-amz-bucket-region") or region
    detail = f"HTTP {status}" + (f" {code}" if code else "")
    if code in ("PermanentRedirect", "AuthorizationHeaderMalformed",
                "IllegalLocationConstraintException") or (300 <= status < 400 and region):
        where = f"region {region}" if region else "another region or endpoint"
        return RemoteProtocolError(f"{what}: the bucket is in {where} ({detail}); set s3_region"
                                   + (f" = {region!r}" if region else " or s3_endpoint"))
    if code == "NoSuchBucket":
        return RemoteNotFound(f"{what}: no such bucket ({detail})")
    if code in ("NoSuchKey", "NoSuchVersion"):
        return RemoteNotFound(f"{what}: not found ({detail})")
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
                "InvalidSecurity", "AuthorizationQueryParametersError"):
        return RemoteAuthError(f"{what}: bad credentials ({detail})")
    if code in ("ExpiredToken", "TokenRefreshRequired"):
        return RemoteAuthError(f"{what}: the credentials have expired ({detail})")
    if code == "RequestTimeTooSkewed":
        return RemoteAuthError(f"{what}: this machine's clock is off ({detail})")
    if code in ("AccessDenied", "AllAccessDisabled", "AccountProblem") or status == 403:
        return RemoteAuthError(f"{what}: access denied ({detail})")
    if status == 404:
        return RemoteNotFound(f"{what}: not found ({detail})")
    if code == "PreconditionFailed" or status == 412:
        return RemoteStale(f"{what}: the object changed at the origin ({detail})")
    if code and status == 400:
        shown = f": {printable(message, 120)}" if message else ""
        return RemoteProtocolError(f"{what}: refused ({detail}{shown})")
    return None  # the generic handling (retries for 5xx, 429)


def _xml(body: bytes) -> ET.Element | None:
    """Parse an answer's XML; None for anything that is not plain XML (a DTD or
    entities are refused outright rather than trusted to the parser)."""
    if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
        return None
    try:
        return ET.fromstring(body)
    except ET.ParseError:
        return None


def _text(elem: ET.Element | None, name: str) -> str | None:
    if elem is None:
        return None
    found = elem.find(_NS + name)
    if found is None:
        found = elem.find(name)
    return found.text if found is not None and found.text is not None else None


def _error_fields(body: bytes) -> tuple[str | None, str | None, str | None]:
    root = _xml(body) if body else None
    if root is None or root.tag.removeprefix(_NS) != "Error":
        return None, None, None
    code = _text(root, "Code")
    return (printable(code, 60).strip("'\"") if code else None, _text(root, "Message"),
            _text(root, "Region"))


class S3Source:
    """One bucket and prefix, mounted as any number of repo ids."""

    def __init__(self, url: str, config: S3Config, auth: S3Auth | None) -> None:
        self._bucket, self._prefix = split_url(url)
        self._config = config
        self._auth = auth
        # The store as the index and content ids name it: its endpoint, or `aws`, whose
        # regional endpoint is known only once the region is (it may come from the
        # profile, read with the credentials).
        self._store = config.endpoint or "aws"
        self.key = f"s3:{self._store}/{self._bucket}/{self._prefix}"
        self._base = self._bucket_url(config.region or "us-east-1")
        self._http = HttpClient(config.http, auth_host=None, token=None,
                                sign=auth.sign if auth is not None else None,
                                explain=explain, follow_redirects=False)
        self._listings = Listings()
        # What the last listing found per key: (etag, size) -> entry, so an unchanged
        # object costs no HEAD at the next one.
        self._known: dict[str, FileEntry] = {}

    async def aclose(self) -> None:
        await self._http.aclose()

    def _bucket_url(self, region: str) -> str:
        return bucket_url(self._config, self._bucket, region)

    @property
    def _where(self) -> str:
        return f"s3://{self._bucket}/{self._prefix}"

    def _auth_msg(self, repo_id: str) -> str:
        return f"{repo_id}: {self._where}: access denied"

    def _object_url(self, key: str, version: str | None = None) -> str:
        url = f"{self._base}/{quote(key, safe='/')}"
        return f"{url}?versionId={quote(version, safe='')}" if version else url

    def file_url(self, repo_id: str, commit: str, path: str) -> str:
        return f"s3://{self._bucket}/{self._prefix}{path}"

    async def resolve(self, ref: RepoRef) -> str:
        """List the prefix; the 'commit' is a hash of (path, size, ETag, VersionId)
        over all files, so it changes exactly when one does."""
        what = f"{ref.repo_id}: {self._where}"
        if self._auth is not None:
            await self._auth.ready(what)
            self._base = self._bucket_url(self._auth.region)
        objects, dirs = await self._list(what)
        files: list[FileEntry | tuple[str, str]] = []
        for path, key, size, etag in objects:
            if (bad := bad_size_reason(size, self._config.max_file_size)) is not None:
                files.append((path, bad))
            elif self._same(key, size, etag):
                files.append(self._known[key])
            else:
                files.append(FileEntry(path, size, "", etag=etag))
        listed, directories = clean_listing(ref.repo_id, files, dirs)
        # Only what is kept is asked about: a hostile key is never requested.
        fresh = [f for f in listed if not f.content_id]
        if len(fresh) > MAX_HEADS:
            log.warning("%s: %d new objects; asking the first %d for checksums, the rest are "
                        "checked by chunk checksums only", what, len(fresh), MAX_HEADS)
        heads = await self._heads(ref.repo_id, [self._prefix + f.path for f in fresh[:MAX_HEADS]])
        kept = []
        for f in listed:
            if not f.content_id:
                key = self._prefix + f.path
                assert f.etag is not None
                sha256, version = heads.get(key, (None, None))
                f = FileEntry(f.path, f.size, content_id(self._store, self._bucket, key,
                                                         f.etag, version),
                              sha256=sha256, etag=f.etag, version=version)
            kept.append(f)
        self._known = {self._prefix + f.path: f for f in kept}
        return self._listings.add(ref.repo_id, tuple(kept), directories)

    def _same(self, key: str, size: int, etag: str) -> bool:
        known = self._known.get(key)
        return known is not None and known.size == size and known.etag == etag

    async def _list(self, what: str) -> tuple[list[tuple[str, str, int, str]], list[str]]:
        """Every object under the prefix: (path below it, key, size, ETag), and the
        "directories" that zero-byte `dir/` marker objects stand for."""
        cap = self._config.max_listing_entries
        objects: list[tuple[str, str, int, str]] = []
        dirs: list[str] = []
        token: str | None = None
        seen: set[str] = set()
        pages = 0
        while True:
            query = (f"list-type=2&encoding-type=url&max-keys={PAGE_KEYS}"
                     f"&prefix={quote(self._prefix, safe='')}")
            if token is not None:
                query += f"&continuation-token={quote(token, safe='')}"
            page = await self._http.get_document(
                f"{self._base}/?{query}", self._parse_page, what=f"{what}: listing",
                auth_msg=self._auth_msg(what))
            pages += 1
            if pages > 10 + cap // MIN_PAGE_KEYS:
                raise ListingRejected(f"{what}: listing pages never end (after {pages} pages, "
                                      f"{len(objects)} keys)")
            for key, size, etag in page[0]:
                path = key[len(self._prefix):] if key.startswith(self._prefix) else None
                if path is None:
                    log.warning("%s: skipping listing key %s: outside the prefix", what,
                                printable(key))
                elif not _HEADER_VALUE.fullmatch(etag):
                    log.warning("%s: skipping listing key %s: unusable ETag %s", what,
                                printable(key), printable(etag, 80))
                elif path.endswith("/") and size == 0:
                    if path.rstrip("/"):
                        dirs.append(path.rstrip("/"))
                else:
                    objects.append((path, key, size, etag))
            if len(objects) + len(dirs) > cap:
                raise ListingRejected(f"{what}: more than {cap} keys under the prefix; raise "
                                      "max_listing_entries if it really is that large")
            token = page[1]
            if token is None:
                return objects, dirs
            if token in seen:
                raise ListingRejected(f"{what}: listing pages repeat (continuation token seen "
                                      "before)")
            seen.add(token)

    @staticmethod
    async def _parse_page(body: bytes, resp: httpx.Response) -> tuple[
            list[tuple[str, int, str]], str | None]:
        root = await trio.to_thread.run_sync(_xml, body)
        if root is None or root.tag.removeprefix(_NS) != "ListBucketResult":
            raise RemoteProtocolError("the store's answer is not a ListObjectsV2 result")
        encoded = _text(root, "EncodingType") == "url"
        out = []
        for item in list(root.findall(_NS + "Contents")) + list(root.findall("Contents")):
            key, size, etag = _text(item, "Key"), _text(item, "Size"), _text(item, "ETag")
            if key is None or size is None or not size.isascii() or not size.isdigit():
                continue
            if encoded:
                key = unquote(key)
            out.append((key, int(size), _quoted(etag or "")))
        truncated = _text(root, "IsTruncated") == "true"
        token = _text(root, "NextContinuationToken") if truncated else None
        if truncated and not token:
            raise RemoteProtocolError("a truncated listing page without a continuation token")
        return out, token

    async def _heads(self, repo_id: str, keys: list[str]) -> dict[str, tuple[str | None,
                                                                           str | None]]:
        """key -> (full-object sha256 in hex, VersionId) for the keys that have them."""
        out: dict[str, tuple[str | None, str | None]] = {}
        limiter = trio.CapacityLimiter(HEAD_PARALLEL)

        async def one(key: str) -> None:
            async with limiter:
                head = await self._http.head(
                    self._object_url(key), what=f"{repo_id}: s3://{self._bucket}/{key}",
                    auth_msg=self._auth_msg(repo_id), headers={"x-amz-checksum-mode": "ENABLED"})
            h = head.headers or {}
            version = h.get("x-amz-version-id")
            if not version or version == "null" or not _HEADER_VALUE.fullmatch(version):
                version = None
            out[key] = (_full_sha256(h), version)

        async with trio.open_nursery() as nursery:
            for key in keys:
                nursery.start_soon(one, key)
        return out

    async def list_files(self, repo_id: str, commit: str) -> Snapshot:
        return self._listings.get(repo_id, commit)

    async def read(self, repo_id: str, commit: str, entry: FileEntry, start: int, length: int,
                   *, into: ReadInto | None = None,
                   progress: Callable[[int], None] | None = None) -> bytearray | memoryview:
        key = self._prefix + entry.path
        if start < 0 or start + length > entry.size:
            raise RemoteNotFound(f"{repo_id}: {entry.path}: range beyond end of file")
        expect = Expect(size=entry.size, etag=entry.etag, strict_etag=True, if_match=True)
        return await self._http.get_range(
            self._object_url(key, entry.version), start, length, expect,
            what=f"{repo_id}: s3://{self._bucket}/{key}", auth_msg=self._auth_msg(repo_id),
            content_id=entry.content_id, into=into, progress=progress)


def _quoted(etag: str) -> str:
    etag = etag.strip()
    return etag if etag.startswith('"') else f'"{etag}"'


def _full_sha256(headers: Mapping[str, str]) -> str | None:
    """The object's sha256 in hex when the store vouches for the whole object's (not a
    multipart upload's checksum of part checksums, which ends in `-N`)."""
    value = headers.get("x-amz-checksum-sha256")
    kind = headers.get("x-amz-checksum-type", "FULL_OBJECT")
    if not value or "-" in value or kind.upper() != "FULL_OBJECT":
        return None
    try:
        digest = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return digest.hex() if len(digest) == 32 else None
