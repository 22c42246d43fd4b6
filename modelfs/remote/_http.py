"""The one place httpx is used: timeouts, retries, redirects, range validation.

Why hand-follow redirects: the token must reach only the endpoint's host, never
a CDN it redirects to, and we need the Hub's `X-Linked-*` headers from the
redirect hop itself. Why validate every 206: a range answered from another
version of the file, or a 200 with the whole body, must never become cache
content. Retries live here and nowhere else.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import logging
import math
import os
import re
import socket
import ssl
import struct
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from urllib.parse import urljoin, urlsplit

import h11
import httpcore
import httpx
import trio

from ..errors import (
    ListingRejected,
    ModelfsError,
    RemoteAuthError,
    RemoteNotFound,
    RemoteProtocolError,
    RemoteStale,
    RemoteUnavailable,
)
from ..redaction import redact, secret_forms
from ..threads import run_letting_go
from ..types import ReadInto, printable
from .config import RECEIVE_BYTES, HttpConfig

log = logging.getLogger(__name__)

# httpcore reads the socket 64 KiB at a time; see RECEIVE_BYTES.
httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = RECEIVE_BYTES

_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,20})-([0-9]{1,20})/([0-9]{1,20})")
_DIGITS = re.compile(r"[0-9]{1,20}")  # `str.isdigit` also takes "²", which `int` refuses
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True, slots=True)
class Expect:
    """What a ranged read must match: the file's total size and, when known, its
    ETag at the endpoint and its sha256 (checked against `X-Linked-Etag`)."""

    size: int
    etag: str | None = None
    sha256: str | None = None
    strict_etag: bool = False  # the ETag *is* the version (plain HTTP): any other is stale
    if_match: bool = False  # ask with If-Match (S3): a 412, never a whole body, when it changed


@dataclass(frozen=True, slots=True)
class HeadResult:
    """A (conditional) HEAD: `changed` is False for a 304 to If-None-Match."""

    changed: bool
    size: int | None
    etag: str | None
    headers: Mapping[str, str] | None = None


@dataclass(slots=True)
class JsonPage:
    data: Any
    next_url: str | None
    headers: Mapping[str, str]


class _Retry(Exception):
    """Internal: this attempt failed in a way worth retrying."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


T = TypeVar("T")

# Of an error answer, this much body is read for `explain` (S3's XML error document).
ERROR_BODY = 64 << 10

# Signs a request in place just before it is sent (S3's SigV4: every attempt anew).
Signer = Callable[[httpx.Request], Awaitable[None]]
# Turns an error answer (status, headers, the start of its body, what was asked) into
# the error to raise, or None for the generic one.
Explainer = Callable[[int, Mapping[str, str], bytes, str], "ModelfsError | None"]


@functools.cache
def tls_context(trust_env: bool) -> ssl.SSLContext:
    """One TLS context (httpx's default: certifi's CA bundle, or SSL_CERT_FILE /
    SSL_CERT_DIR with `trust_env`) for every client of the process: httpx builds
    one per client otherwise, and loading the CA bundle takes about 15 ms of CPU
    each, at the start of every `modelfs prefetch`."""
    return httpx.create_ssl_context(trust_env=trust_env)


class HttpClient:
    """An httpx client that only speaks the few request shapes sources need.

    `sign` and `explain` let a source (S3) sign each attempt and turn its error
    documents into messages; with `follow_redirects` False a 3xx is an error
    (a signed request must not be replayed to another host)."""

    def __init__(self, config: HttpConfig, *, auth_host: str | None, token: str | None,
                 sign: Signer | None = None, explain: Explainer | None = None,
                 follow_redirects: bool = True, keep_raw: bool = True) -> None:
        self._config = config
        # A connection whose body was read off the socket goes back to the pool
        # (`_hand_back`); False: it is closed after (a new connection per body).
        self._keep_raw = keep_raw
        self._auth_host = auth_host
        self._token = token
        self._sign = sign
        self._explain = explain
        self._follow = follow_redirects
        self._secret_forms = secret_forms(token) if token else []
        self._client = httpx.AsyncClient(
            follow_redirects=False,
            timeout=httpx.Timeout(config.timeout),
            limits=httpx.Limits(
                max_connections=config.max_connections,
                max_keepalive_connections=config.max_connections,
            ),
            headers={"User-Agent": config.user_agent, "Accept-Encoding": "identity"},
            # A proxy in front of the origin (a P2P one, a caching one): the setting's,
            # else HTTP(S)_PROXY/NO_PROXY.
            proxy=config.proxy, trust_env=config.trust_env,
            verify=tls_context(config.trust_env),
        )
        # ETags seen per (host, content id): lets a resumed or later range read on a
        # redirect target (a CDN whose ETag is its own) carry If-Range.
        self._host_etags: dict[tuple[str, str], str] = {}
        # Where the endpoint redirected a resolve URL (commit-pinned, so the target
        # holds the same bytes), until `redirect_ttl`: halves requests per chunk.
        self._redirects: dict[str, tuple[str, float]] = {}
        # Threads receiving bodies (`_receive_raw`): one per connection at most.
        self._raw_limiter = trio.CapacityLimiter(config.max_connections)

    async def aclose(self) -> None:
        await self._client.aclose()

    def _describe(self, exc: httpx.TransportError) -> str:
        """A transport error in a line, without the token (h11 quotes a header it refuses)."""
        return redact(_describe(exc), self._secret_forms)

    def _headers(self, url: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = dict(extra or {})
        if self._token and urlsplit(url).netloc == self._auth_host:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    async def _with_retries(self, what: str, attempt_fn: Any, nbytes: int = 0) -> Any:
        """Run `attempt_fn()` until it returns, retrying `_Retry` with backoff.

        Each attempt ends within `attempt_time(nbytes)`, the whole operation within
        `request_deadline`; past either, it is a retry or the final error."""
        cfg = self._config
        delay = cfg.backoff
        end = trio.current_time() + cfg.request_deadline
        for attempt in range(cfg.retries + 1):
            try:
                with trio.fail_at(min(end, trio.current_time() + cfg.attempt_time(nbytes))):
                    return await attempt_fn()
            except (_Retry, trio.TooSlowError) as exc:
                if isinstance(exc, _Retry):
                    reason, retry_after = exc.reason, exc.retry_after
                else:
                    reason, retry_after = (f"no complete answer within "
                                           f"{cfg.attempt_time(nbytes):.0f}s"), None
                left = end - trio.current_time()
                wait = delay if retry_after is None else min(retry_after, cfg.max_retry_after)
                if attempt == cfg.retries or wait >= left:
                    why = (f"gave up after {attempt + 1} attempts" if attempt == cfg.retries
                           else f"request deadline of {cfg.request_deadline:.0f}s")
                    if retry_after is not None and retry_after >= left:
                        why = f"origin asks to retry after {retry_after:.0f}s; {why}"
                    raise RemoteUnavailable(f"{what}: {reason} ({why})") from None
                log.warning("%s: %s; retry %d/%d in %.2fs", what, reason, attempt + 1,
                            cfg.retries, wait)
                await trio.sleep(wait)
                delay = min(delay * 2, cfg.max_backoff)
        raise AssertionError("unreachable")

    async def _redirect(self, resp: httpx.Response, what: str, *, same_host: bool) -> str:
        """Where a redirect points, once it is known safe to follow (see `check_target`)."""
        try:
            nxt = urljoin(str(resp.url), resp.headers.get("Location", ""))
        except ValueError:
            raise RemoteProtocolError(f"{what}: unusable redirect Location") from None
        if same_host and urlsplit(nxt).netloc != urlsplit(str(resp.url)).netloc:
            raise RemoteProtocolError(f"{what}: redirect leaves the endpoint's host "
                                      f"({printable_host(nxt)})")
        await check_target(nxt, str(resp.url), what,
                           allow_private=self._config.allow_private_redirects)
        return nxt

    async def _send(self, method: str, url: str, headers: Mapping[str, str]) -> httpx.Response:
        """Build, sign (when the source signs) and send one request, streaming the answer."""
        req = self._client.build_request(method, url, headers=self._headers(url, headers))
        if self._sign is not None:
            await self._sign(req)
        return await self._client.send(req, stream=True)

    def _redirects_to_follow(self, resp: httpx.Response) -> bool:
        return self._follow and resp.status_code in _REDIRECT_STATUS

    async def _check(self, resp: httpx.Response, what: str, auth_msg: str) -> None:
        """`_check_status`, after letting the source explain an error answer."""
        status = resp.status_code
        if status < 300 or status == 304:
            return
        if self._explain is not None:
            body = b"" if resp.request.method == "HEAD" else await _read_prefix(resp, ERROR_BODY)
            err = self._explain(status, resp.headers, body, what)
            if err is not None:
                raise err
        if status < 400:
            raise RemoteProtocolError(f"{what}: unexpected redirect (HTTP {status})")
        self._check_status(resp, what, auth_msg)

    @staticmethod
    def _check_status(resp: httpx.Response, what: str, auth_msg: str) -> None:
        """Turn an unusable status into the matching modelfs error (or `_Retry`)."""
        status = resp.status_code
        if status < 400:
            return
        code = resp.headers.get("X-Error-Code", "")
        detail = f"HTTP {status}" + (f" {code}" if code else "")
        if status in _RETRY_STATUS:
            raise _Retry(detail, _parse_retry_after(resp.headers.get("Retry-After")))
        if status in (401, 403):
            raise RemoteAuthError(auth_msg)
        if status == 404:
            raise RemoteNotFound(f"{what}: not found ({detail})")
        if status in (412, 416):
            raise RemoteStale(f"{what}: the origin's copy changed ({detail})")
        raise RemoteProtocolError(f"{what}: unexpected {detail}")

    async def get_json(self, url: str, *, what: str, auth_msg: str) -> JsonPage:
        """GET a JSON document, following redirects on the same host only. The body is
        capped at `max_response_size` and parsed in a worker thread; JSON that does
        not parse (or nests too deep to) is a `RemoteProtocolError`."""

        async def parse(body: bytes, resp: httpx.Response) -> JsonPage:
            data = await trio.to_thread.run_sync(_parse_json, body)
            if data is _BAD_JSON:
                raise RemoteProtocolError(f"{what}: origin sent invalid JSON")
            return JsonPage(data, next_page_url(resp, what), resp.headers)

        return await self.get_document(url, parse, what=what, auth_msg=auth_msg)

    async def get_document(self, url: str, parse: Callable[[bytes, httpx.Response],
                                                              Awaitable[T]],
                              *, what: str, auth_msg: str) -> T:
        """GET a document (a listing page) and `parse` its body, retried as one
        operation; redirects on the same host only; the body capped at
        `max_response_size`."""
        cap = self._config.max_response_size

        async def attempt() -> T:
            nxt = url
            try:
                for _ in range(self._config.max_redirects + 1):
                    resp = await self._send("GET", nxt, {})
                    try:
                        if not self._redirects_to_follow(resp):
                            await self._check(resp, what, auth_msg)
                            body = await _read_capped(resp, cap, what)
                            break
                        await resp.aread()
                    finally:
                        await resp.aclose()
                    nxt = await self._redirect(resp, what, same_host=True)
                else:
                    raise RemoteProtocolError(f"{what}: too many redirects")
            except httpx.TransportError as exc:
                raise _Retry(self._describe(exc)) from None
            return await parse(body, resp)

        result: T = await self._with_retries(what, attempt, cap)
        return result

    async def put(self, url: str, body: bytes, *, what: str, auth_msg: str,
                  headers: Mapping[str, str] | None = None) -> None:
        """PUT `body` at `url` (an object of a store that sources do not write, such as
        the shared chunk tier), retried as one operation; no redirects. A failed
        precondition (`If-None-Match: *` on an object that exists) is `RemoteStale`."""

        async def attempt() -> None:
            try:
                req = self._client.build_request(
                    "PUT", url, content=body, headers=self._headers(url, headers or {}))
                if self._sign is not None:
                    await self._sign(req)
                resp = await self._client.send(req, stream=True)
                try:
                    await self._check(resp, what, auth_msg)
                    # The answer's (small) body read to its end keeps the connection:
                    # one closed unread is closed, and a store of chunks is written often.
                    await _read_prefix(resp, ERROR_BODY)
                finally:
                    await resp.aclose()
            except httpx.TransportError as exc:
                raise _Retry(self._describe(exc)) from None

        await self._with_retries(what, attempt, len(body))

    async def head(self, url: str, *, what: str, auth_msg: str,
                   if_none_match: str | None = None,
                   headers: Mapping[str, str] | None = None) -> HeadResult:
        """Size and ETag of the resource at `url`; with `if_none_match`, a 304
        (unchanged) costs no body and no listing work."""

        async def attempt() -> HeadResult:
            extra = dict(headers or {})
            if if_none_match:
                extra["If-None-Match"] = if_none_match
            try:
                # Read to its end (a HEAD answer has no body), so h11 sees the answer
                # end and the connection is kept; closed unread, it would be closed.
                resp = await self._send("HEAD", url, extra)
                await resp.aread()
                hops = 0
                while self._redirects_to_follow(resp) and hops < self._config.max_redirects:
                    nxt = await self._redirect(resp, what, same_host=False)
                    resp = await self._send("HEAD", nxt, extra)
                    await resp.aread()
                    hops += 1
            except httpx.TransportError as exc:
                raise _Retry(self._describe(exc)) from None
            if resp.status_code == 304:
                return HeadResult(False, None, if_none_match)
            await self._check(resp, what, auth_msg)
            clen = resp.headers.get("Content-Length", "")
            if not _DIGITS.fullmatch(clen):
                raise RemoteProtocolError(f"{what}: origin sent no Content-Length")
            return HeadResult(True, int(clen), resp.headers.get("ETag"), resp.headers)

        result: HeadResult = await self._with_retries(what, attempt)
        return result

    async def get_range(
        self, url: str, start: int, length: int, expect: Expect, *, what: str, auth_msg: str,
        content_id: str, into: ReadInto | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> bytearray | memoryview:
        """Return exactly `length` bytes of the file at `url` from `start`.

        A body broken off mid-way is resumed from where it broke, with If-Range
        so the rest comes from the same version. Any answer that could be another
        version (416, 412, a 200 to a conditional request, a wrong total size or
        `X-Linked-Etag`) raises `RemoteStale`. Bytes are written into `into` (or a
        new buffer; with `Segments`, into them, and the result is empty) as they
        arrive; `progress(n)` says the first `n` are in place, and it is only
        called once the response carrying them was validated.
        """
        if length <= 0:
            return bytearray()
        # One buffer, allocated once and filled in place (also across resumed attempts):
        # fresh multi-MiB allocations cost page faults, copies cost CPU.
        if isinstance(into, bytearray | memoryview) and len(into) != length:
            raise ValueError("buffer size does not match the range")
        buf = _Buffer(length, bytearray(length) if into is None else into, progress=progress)

        async def attempt() -> None:
            if buf.filled < length:  # else a validated body broke off after our last byte
                await self._fetch_into(url, start, length, expect, buf, what, auth_msg, content_id)

        await self._with_retries(f"{what} at offset {start}", attempt, length)
        return buf.data if isinstance(buf.data, bytearray | memoryview) else bytearray()

    async def _fetch_into(
        self, url: str, start: int, length: int, expect: Expect, buf: _Buffer, what: str,
        auth_msg: str, content_id: str,
    ) -> None:
        first = start + buf.filled
        last = start + length - 1
        hops = 0
        origin_url = url
        cached = self._redirects.get(origin_url)
        via_cache = cached is not None and cached[1] > trio.current_time()
        if via_cache:
            url = cached[0]  # type: ignore[index]
        try:
            while True:
                host = urlsplit(url).netloc
                extra = {"Range": f"bytes={first}-{last}"}
                # Only a validator this host gave us for this content: a foreign one
                # (the Hub's id sent to a CDN or a plain mirror) would never match.
                validator = self._host_etags.get((host, content_id))
                if expect.strict_etag:
                    validator = expect.etag
                if expect.if_match and expect.etag:
                    extra["If-Match"] = expect.etag
                elif validator and not validator.startswith("W/"):
                    extra["If-Range"] = validator
                resp = await self._send("GET", url, extra)
                try:
                    if self._redirects_to_follow(resp):
                        _check_linked(resp.headers, expect, what)
                        hops += 1
                        if hops > self._config.max_redirects:
                            raise RemoteProtocolError(f"{what}: too many redirects")
                        await resp.aread()  # an empty body: read it so the connection is reused
                        url = await self._redirect(resp, what, same_host=False)
                        self._redirects[origin_url] = (
                            url, trio.current_time() + self._config.redirect_ttl)
                        continue
                    if via_cache and resp.status_code >= 400:
                        # The remembered CDN URL expired or went away: ask the endpoint again.
                        self._redirects.pop(origin_url, None)
                        via_cache, url = False, origin_url
                        continue
                    await self._check(resp, what, auth_msg)
                    _check_linked(resp.headers, expect, what)
                    if resp.headers.get("Content-Encoding", "identity") != "identity":
                        raise RemoteProtocolError(f"{what}: origin ignored Accept-Encoding")
                    skip = self._check_body_range(resp, first, last, expect, what,
                                                  extra.get("If-Range"))
                    etag = resp.headers.get("ETag")
                    _check_content_etag(etag, expect, what)
                    if expect.strict_etag and etag != expect.etag:
                        raise RemoteStale(f"{what}: the origin's copy changed (ETag {etag}, "
                                          f"opened as {expect.etag})")
                    if etag:
                        old = self._host_etags.setdefault((host, content_id), etag)
                        if old != etag:
                            raise RemoteStale(f"{what}: ETag changed from {old} to {etag}")
                    await _read_body(resp, buf, skip, self._config.timeout,
                                     self._raw_limiter, self._keep_raw)
                finally:
                    await resp.aclose()
                if buf.filled < length:
                    raise _Retry(f"body ended after {buf.filled} of {length} bytes")
                return
        except httpx.TransportError as exc:
            if via_cache:
                self._redirects.pop(origin_url, None)
            raise _Retry(self._describe(exc)) from None

    @staticmethod
    def _check_body_range(
        resp: httpx.Response, first: int, last: int, expect: Expect, what: str,
        validator: str | None,
    ) -> int:
        """Validate a range answer; return how many leading body bytes to skip."""
        if resp.status_code == 206:
            parsed = parse_content_range(resp.headers.get("Content-Range", ""))
            if parsed is None:
                raise RemoteProtocolError(f"{what}: 206 without a usable Content-Range")
            a, b, total = parsed
            if total != expect.size:
                raise RemoteStale(f"{what}: origin size is {total}, listing said {expect.size}")
            if a != first or b != last:
                # Never used, and worth another try: a flaky CDN node or proxy.
                raise _Retry(f"asked for bytes {first}-{last}, origin sent {a}-{b}")
            clen = resp.headers.get("Content-Length")
            if clen is not None and clen != str(last - first + 1):
                # Its body and its range disagree (a broken proxy?): try again.
                raise _Retry(f"Content-Length {printable(clen, 30)} does not match "
                             f"Content-Range {a}-{b}")
            return 0
        if resp.status_code == 200:
            # A whole-body answer: to a conditional request it means "changed", unless
            # it carries the very ETag we sent (a server that ignores Range); then,
            # as without a validator, we read only what we need.
            if validator is not None and resp.headers.get("ETag") != validator:
                raise RemoteStale(f"{what}: the origin's copy changed (If-Range did not match)")
            clen = resp.headers.get("Content-Length")
            if clen is not None and (not _DIGITS.fullmatch(clen) or int(clen) != expect.size):
                raise RemoteStale(f"{what}: origin size is {clen}, listing said {expect.size}")
            return first
        raise RemoteProtocolError(f"{what}: unexpected HTTP {resp.status_code} to a range request")


class _Buffer:
    """Where a body goes: one preallocated buffer or `Segments`, and how much of
    it is filled (across resumed attempts)."""

    __slots__ = ("_at", "_room", "data", "filled", "length", "progress")

    def __init__(self, length: int, data: ReadInto,
                 progress: Callable[[int], None] | None = None) -> None:
        self.length = length
        self.data = data
        self.filled = 0
        self.progress = progress
        self._room = memoryview(data) if isinstance(data, bytearray | memoryview) else None
        self._at = 0  # where `_room` starts in the range

    async def room(self) -> memoryview:
        """Where the byte at `filled` goes, and the room after it in that buffer."""
        if self._room is None or self.filled >= self._at + len(self._room):
            assert not isinstance(self.data, bytearray | memoryview)
            if self._room is not None:
                self._at += len(self._room)
                # A view kept while the next buffer is waited for keeps the full
                # one's buffer from reuse (`fetch.memory.LoadBuffers`).
                self._room = None
            self._room = await self.data.next()
        return self._room[self.filled - self._at:]

    async def place(self, piece: memoryview) -> int:
        """Copy `piece` in at `filled`; its length. (A function of its own: a view of
        the room left in a caller's frame would keep a finished chunk's buffer from
        reuse.)"""
        placed = len(piece)
        while piece:
            room = await self.room()
            n = min(len(piece), len(room))
            room[:n] = piece[:n]
            piece = piece[n:]
            self.filled += n
        return placed


async def _read_body(resp: httpx.Response, buf: _Buffer, skip: int, idle_limit: float,
                     limiter: trio.CapacityLimiter, keep: bool) -> None:
    """Copy body bytes into `buf` after skipping `skip` of them, until it is full.

    A 206 body is read to its end (its size was checked): leaving httpx's nested
    async generators half-consumed makes trio warn when they are collected. Only
    a whole-file 200 is cut short once we have what we need. A large 206 body on
    a plaintext connection is read straight off the socket (`_receive_raw`).
    """
    size = buf.length
    fd = _raw_socket(resp, size - buf.filled) if skip == 0 else None
    async with _body(resp, resp.aiter_raw()) as body:
        async for part in body:
            if skip:
                cut = min(skip, len(part))
                part, skip = part[cut:], skip - cut
            placed = await buf.place(memoryview(part)[:size - buf.filled])
            if buf.progress is not None and placed:
                buf.progress(buf.filled)
            if buf.filled >= size and resp.status_code == 200:
                break
            if fd is not None and buf.filled < size:
                break  # h11 handed over what it had buffered: the rest comes off the socket
        else:
            return
        # Cut short: a whole-file 200 with all we need, or a body whose rest is read
        # straight off the socket. A body read whole off the socket is handed back to
        # h11 (`_hand_back`): its generators run to their end and the connection goes
        # back to the pool. Otherwise the connection is closed (h11 never saw the body
        # end).
        if fd is not None and buf.filled < size:
            before = buf.filled
            await _receive_raw(fd, buf, idle_limit, limiter)
            if buf.filled == size and keep and _hand_back(resp, size - before):
                async for _ in body:  # h11's end of the body: the connection is kept
                    pass


@asynccontextmanager
async def _body(resp: httpx.Response,
                parts: AsyncIterator[bytes]) -> AsyncIterator[AsyncGenerator[bytes, None]]:
    """Iterate a body; left before its end (a break, an error, a deadline while the
    bytes waited for a buffer), the response is closed and httpx's nested
    generators are run to their end (they end with an error at once). Closing
    only the outer one leaves the inner ones half-consumed for the garbage
    collector, and trio warns when it collects them."""
    body = cast(AsyncGenerator[bytes, None], parts)
    try:
        yield body
    finally:
        if getattr(body, "ag_frame", None) is not None:  # not at its end
            with trio.CancelScope(shield=True):
                await resp.aclose()
                with contextlib.suppress(httpx.HTTPError, httpx.StreamError,
                                         httpcore.ReadError):
                    async for _ in body:
                        pass
                await body.aclose()


# Bodies at least this large are received in worker threads (`_receive_raw`).
RAW_MIN = 1 << 20
# One worker-thread call fills at most this much and returns within RAW_WAIT seconds
# (the socket's receive timeout), so progress is reported and a cancel seen that often.
# Steps start at RAW_FIRST and double: a reader waiting on a chunk's first MiB (one
# FUSE request) is answered when that MiB is in, not the whole chunk (on a link of
# 32 MB/s, 31 ms against 125 ms).
RAW_FIRST = 1 << 20
RAW_STEP = 4 << 20
RAW_WAIT = 0.25


def _raw_socket(resp: httpx.Response, remaining: int) -> int | None:
    """The socket descriptor a large plaintext 206 body can be read from directly,
    or None: TLS (the bytes are ciphertext), a chunked or unsized body, a small one,
    or a peer on a public address. A body read around h11 that does not end as
    expected (cut short, cancelled) costs the connection: on a local network (an
    in-cluster mirror or S3 store, a proxy on the node) a new one costs next to
    nothing, across the internet a handshake and TCP's slow start."""
    if resp.status_code != 206 or remaining < RAW_MIN or "Transfer-Encoding" in resp.headers \
            or resp.headers.get("Content-Length") != str(remaining):
        return None
    stream = resp.extensions.get("network_stream")
    if stream is None or stream.get_extra_info("ssl_object") is not None:
        return None
    try:
        peer = ipaddress.ip_address(stream.get_extra_info("server_addr")[0])
        sock = stream.get_extra_info("socket")
    except (TypeError, IndexError, ValueError, OSError):
        return None
    return None if peer.is_global or sock is None else int(sock.fileno())


try:  # private to h11 (`_hand_back`): without it, a body read off the socket costs its connection
    from h11._readers import ContentLengthReader as _ContentLengthReader
except ImportError:  # pragma: no cover
    _ContentLengthReader = None  # type: ignore[assignment,misc]


def _hand_back(resp: httpx.Response, received: int) -> bool:
    """Tell h11 that the last `received` bytes of `resp`'s body were read around it,
    so that the response ends as if h11 had read them and its connection is kept for
    the next request; False where that cannot be shown safe (the connection is then
    closed, as it was before this existed).

    Why: a new connection for every request read off the socket cost a loopback
    cold `cat` ~19% of its event loop in connects and closes; kept, A B in one run,
    a cold `cat` of 1 GiB took 14% less daemon CPU on loopback and one of 512 MiB
    19% less from SeaweedFS. (Not for the fleet's tier: `HttpClient`'s `keep_raw`.)
    How: h11 counts the body bytes it still expects in its reader; set to 0, its
    next event is the end of the message. Safe only when h11 expected exactly those bytes and holds none
    unread. The state machine is private to httpcore (`_h11_state` of the
    connection under the response's streams) and h11's reader is private to h11:
    each step is checked, and a version that moved them just loses the reuse."""
    try:
        stream: Any = resp.stream
        state = stream._stream._httpcore_stream._stream._connection._h11_state
    except AttributeError:
        return False
    if not isinstance(state, h11.Connection) or state.their_state is not h11.SEND_BODY:
        return False
    reader = getattr(state, "_reader", None)
    if _ContentLengthReader is None or not isinstance(reader, _ContentLengthReader) \
            or getattr(reader, "_remaining", None) != received \
            or len(getattr(state, "_receive_buffer", b"x")) != 0:
        return False
    reader._remaining = 0
    return True


async def _receive_raw(fd: int, buf: _Buffer, idle_limit: float,
                       limiter: trio.CapacityLimiter) -> None:
    """Receive the rest of a body from `fd` straight into `buf`, in worker threads.

    Why: through httpx every byte is read into a new `bytes`, appended to h11's
    buffer, cut out again and copied into place, all on the event loop under the
    GIL; here the kernel copies it once into place and the GIL is free meanwhile.
    The socket is made blocking for this (and non-blocking again after), and each
    thread call is one `recv_into(MSG_WAITALL)` of a step: the GIL is taken back
    once per step, not once per socket read (a thread taking it back waits for a
    busy event loop, up to the 5 ms switch interval). A receive
    timeout of RAW_WAIT bounds each call, so a cancel takes effect that often and
    the thread is never abandoned (it writes into `buf`). A body that ends early
    returns (the caller resumes from `buf.filled`); a reset or silence is an httpx
    transport error."""
    sock = socket.socket(fileno=os.dup(fd))  # a second handle on the same socket
    try:
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                        struct.pack("ll", 0, int(RAW_WAIT * 1e6)))
        idle = 0.0
        while buf.filled < buf.length:
            room = await buf.room()
            step = min(RAW_STEP, max(RAW_FIRST - buf.filled, buf.filled))
            room = room[:min(len(room), buf.length - buf.filled, step)]
            try:
                n = await run_letting_go(
                    lambda r: sock.recv_into(r, len(r), socket.MSG_WAITALL), room,
                    limiter=limiter)
            except BlockingIOError:  # nothing within RAW_WAIT
                idle += RAW_WAIT
                if idle >= idle_limit:
                    raise httpx.ReadTimeout(f"no body bytes for {idle_limit:g}s") from None
                continue
            except OSError as exc:  # a reset: the bytes before it were returned by then
                raise httpx.ReadError(str(exc)) from None
            del room  # a view of a buffer the chunk completed by this may give back
            if n == 0:
                return
            idle = 0.0
            buf.filled += n
            if buf.progress is not None:
                buf.progress(buf.filled)
    finally:
        # As trio left it, for the next request on the connection or its close.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 0))
        os.set_blocking(fd, False)
        sock.close()


_CONTENT_ID = re.compile(r'"?([0-9a-f]{40}|[0-9a-f]{64})"?')


def _check_content_etag(etag: str | None, expect: Expect, what: str) -> None:
    """An ETag that is a git or LFS id (the Hub's own) must be the listing's id.

    Other ETags (a CDN's, nginx's `"mtime-size"`) say nothing about the listing.
    """
    m = _CONTENT_ID.fullmatch(etag or "")
    if m and expect.etag and m.group(1) not in (expect.etag.strip('"'), expect.sha256):
        raise RemoteStale(f"{what}: origin now serves another version (ETag {etag})")


def _check_linked(headers: Mapping[str, str], expect: Expect, what: str) -> None:
    """The Hub names LFS content on the resolve hop: it must be what the listing said."""
    linked = headers.get("X-Linked-Etag")
    if linked and expect.sha256 and linked.strip('"').removeprefix("W/").strip('"') != expect.sha256:
        raise RemoteStale(f"{what}: origin now serves another version ({linked})")
    size = headers.get("X-Linked-Size")
    if size and _DIGITS.fullmatch(size) and int(size) != expect.size:
        raise RemoteStale(f"{what}: origin size is {size}, listing said {expect.size}")


def parse_content_range(value: str) -> tuple[int, int, int] | None:
    """`bytes A-B/TOTAL` -> (A, B, TOTAL), or None for anything else (or A > B, B >= TOTAL)."""
    m = _CONTENT_RANGE.fullmatch(value)
    if not m:
        return None
    a, b, total = (int(x) for x in m.groups())
    return (a, b, total) if a <= b < total else None


def next_page_url(resp: httpx.Response, what: str) -> str | None:
    """The `Link: <URL>; rel="next"` of a paginated answer, resolved against its URL;
    an http(s) URL or None, and a `RemoteProtocolError` for one that does not parse."""
    try:
        link = resp.links.get("next", {}).get("url")
        url = urljoin(str(resp.url), link) if link else None
        if url is not None and urlsplit(url).scheme not in ("http", "https"):
            raise ValueError(url)
    except ValueError:
        raise RemoteProtocolError(f"{what}: unusable Link header") from None
    return url


_BAD_JSON = object()


def _parse_json(body: bytes) -> Any:
    """`json.loads`, or `_BAD_JSON` for anything it cannot take (including nesting
    too deep for the recursion limit)."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return _BAD_JSON


async def _read_prefix(resp: httpx.Response, cap: int) -> bytes:
    """Up to `cap` bytes of an (error) body; the rest is left unread (the connection
    is closed with the response). A body that breaks off gives what came."""
    parts, size = [], 0
    try:
        async with _body(resp, resp.aiter_bytes()) as body:
            async for part in body:
                parts.append(part)
                size += len(part)
                if size >= cap:
                    break
    except httpx.HTTPError:
        pass
    return b"".join(parts)[:cap]


async def _read_capped(resp: httpx.Response, cap: int, what: str) -> bytes:
    """The whole body, refusing one larger than `cap` bytes (declared or sent)."""
    clen = resp.headers.get("Content-Length", "")
    if _DIGITS.fullmatch(clen) and int(clen) > cap:
        raise ListingRejected(f"{what}: answer of {clen} bytes is larger than "
                              f"max_response_size ({cap})")
    parts, size = [], 0
    async with _body(resp, resp.aiter_bytes()) as body:
        async for part in body:
            size += len(part)
            if size > cap:
                raise ListingRejected(f"{what}: answer is larger than max_response_size ({cap})")
            parts.append(part)
    return b"".join(parts)


# Hosts that are never a redirect target: cloud metadata services.
_METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata", "metadata.azure.com",
                             "instance-data", "169.254.169.254", "fd00:ec2::254"})


def printable_host(url: str) -> str:
    try:
        return urlsplit(url).netloc[:100] or url[:100]
    except ValueError:
        return url[:100]


def _address_class(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved:
        return "link-local"
    if ip.is_private:
        return "private"
    return "public"


async def _address_classes(host: str) -> set[str]:
    """The classes of every address `host` names (an IP literal, or resolved)."""
    try:
        return {_address_class(ipaddress.ip_address(host))}
    except ValueError:
        pass
    try:
        with trio.fail_after(10):
            infos = await trio.socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, trio.TooSlowError):
        return set()  # unresolvable: the request itself will fail and say so
    return {_address_class(ipaddress.ip_address(str(info[4][0]).split("%")[0]))
            for info in infos}


async def check_target(url: str, came_from: str, what: str, *, allow_private: bool) -> None:
    """Refuse a redirect an attacker could use to reach what the node can reach: a
    scheme other than http(s), a cloud metadata host, a link-local address, and a
    private or loopback one unless the request was to such an address already
    (an in-cluster mirror) or `allow_private` is set."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RemoteProtocolError(f"{what}: redirect to a non-http(s) URL refused "
                                  f"({parts.scheme or 'no scheme'})")
    host = parts.hostname.lower().rstrip(".")
    if host in _METADATA_HOSTS:
        raise RemoteProtocolError(f"{what}: redirect to metadata host {host} refused")
    classes = await _address_classes(host)
    if "link-local" in classes:
        raise RemoteProtocolError(f"{what}: redirect to link-local address {host} refused")
    inner = classes & {"private", "loopback"}
    source = (urlsplit(came_from).hostname or "").lower()
    if inner and not allow_private and not inner <= await _address_classes(source):
        raise RemoteProtocolError(
            f"{what}: redirect to {'/'.join(sorted(inner))} address {host} refused "
            "(allow_private_redirects allows it for in-cluster mirrors)")


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP-date: fall back to our own backoff
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _describe(exc: httpx.TransportError) -> str:
    kind = type(exc).__name__
    return f"{kind}: {exc}" if str(exc) else kind


__all__ = ["Expect", "HeadResult", "HttpClient", "HttpConfig", "JsonPage"]
