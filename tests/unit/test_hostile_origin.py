"""The sources against a hostile origin: answers crafted to crash, hang or fool them.

Every case runs against the real origin fixture on 127.0.0.1, scripted per
request path (`Origin.script`) or made to misbehave on data requests
(`Origin.misbehave`). Each must end in the project's own error, naming the
repo, within its deadline, or be skipped as a bad entry: never another
exception, never a hang.
"""

from __future__ import annotations

import json

import pytest
import trio

from modelfs.errors import ListingRejected, RemoteProtocolError, RemoteUnavailable
from modelfs.fetch import load_snapshot
from modelfs.remote._http import RAW_FIRST, RAW_MIN, RAW_STEP, check_target
from modelfs.remote.config import RECEIVE_BYTES, HttpConfig, HubConfig
from modelfs.remote.hf import HubSource
from modelfs.testing.origin import Origin
from modelfs.types import RepoRef

from .conftest import Kit

FAST = HttpConfig(retries=2, backoff=0.01, timeout=2, request_deadline=5)
REV = "/api/models/org/model/revision/main"
TREE = "/api/models/org/model/tree/*"


def source(origin: Origin, http: HttpConfig = FAST, **kw: int) -> HubSource:
    return HubSource(HubConfig(endpoint=origin.url, http=http, **kw), None)


async def listing_with(origin: Origin, *entries: dict) -> list[str]:
    """The paths the source keeps of org/model's listing plus `entries`."""
    origin.extra_entries["org/model"] = list(entries)
    src = source(origin)
    try:
        commit = await src.resolve(RepoRef.parse("org/model"))
        return [f.path for f in (await src.list_files("org/model", commit)).files]
    finally:
        await src.aclose()


async def test_commit_sha_with_a_trailing_newline_is_refused(origin: Origin) -> None:
    origin.script(REV, {"sha": "a" * 40 + "\n"})
    src = source(origin)
    with pytest.raises(RemoteProtocolError, match="org/model revision 'main': origin sent no commit"):
        await src.resolve(RepoRef.parse("org/model"))
    await src.aclose()


async def test_hostile_listing_entries_are_skipped(origin: Origin, caplog) -> None:
    good = {"type": "file", "oid": "b" * 40}
    paths = await listing_with(
        origin,
        {**good, "path": "bad-\udcff.json", "size": 3},  # a lone surrogate
        {**good, "path": "huge.bin", "size": 2**64},
        {**good, "path": "huger.bin", "size": 10**30},
        {**good, "path": "negative.bin", "size": -1},
        {**good, "path": "x" * 5000, "size": 1},
        {**good, "path": "fine.json", "size": 3},
    )
    assert "fine.json" in paths and "config.json" in paths
    assert not {"huge.bin", "huger.bin", "negative.bin"} & set(paths)
    assert not any("\udcff" in p or len(p) > 4096 for p in paths)
    assert "not valid UTF-8" in caplog.text and "beyond max_file_size" in caplog.text
    assert max(len(r.getMessage()) for r in caplog.records) < 600  # hostile names shortened


async def test_deeply_nested_json_is_a_protocol_error(origin: Origin) -> None:
    origin.script(REV, "[" * 100_000 + "]" * 100_000)
    src = source(origin)
    with pytest.raises(RemoteProtocolError, match="invalid JSON"):
        await src.resolve(RepoRef.parse("org/model"))
    await src.aclose()


async def test_malformed_link_header_is_a_protocol_error(origin: Origin) -> None:
    origin.script(TREE, [], headers={"Link": '<http://[::1/x>; rel="next"'})
    src = source(origin)
    commit = await src.resolve(RepoRef.parse("org/model"))
    with pytest.raises(RemoteProtocolError, match="unusable Link header"):
        await src.list_files("org/model", commit)
    await src.aclose()


async def test_pages_that_link_to_themselves_end(origin: Origin) -> None:
    src = source(origin)
    commit = await src.resolve(RepoRef.parse("org/model"))
    loop = f"{origin.url}/api/models/org/model/tree/{commit}?recursive=true"
    origin.script(TREE, [], headers={"Link": f'<{loop}>; rel="next"'})
    with trio.fail_after(10):
        with pytest.raises(ListingRejected, match="pages repeat or never end"):
            await src.list_files("org/model", commit)
    assert len([r for r in origin.records if "/tree/" in r.path]) <= 2
    await src.aclose()


async def test_pages_that_never_end_are_bounded(origin: Origin) -> None:
    """Each page links to a new URL, empty: bounded by the entries cap, not looping."""
    src = source(origin, max_listing_entries=100)
    commit = await src.resolve(RepoRef.parse("org/model"))
    base = f"{origin.url}/api/models/org/model/tree/{commit}?recursive=true"
    for n in range(40):
        origin.script(f"/api/models/org/model/tree/{commit}", [], times=1,
                      headers={"Link": f'<{base}&cursor=x{n}>; rel="next"'})
    with pytest.raises(ListingRejected, match="never end"):
        await src.list_files("org/model", commit)
    await src.aclose()


async def test_oversized_api_answer_is_refused(origin: Origin) -> None:
    origin.script(REV, {"sha": "a" * 40, "pad": "x" * (2 << 20)})
    src = source(origin, http=HttpConfig(retries=0, timeout=2, max_response_size=1 << 20))
    with pytest.raises(ListingRejected, match="larger than max_response_size"):
        await src.resolve(RepoRef.parse("org/model"))
    await src.aclose()


async def test_listing_redirect_to_another_host_is_refused(origin: Origin) -> None:
    origin.script(REV, b"", status=302, headers={"Location": f"{origin.cdn_url}/api/x"})
    src = source(origin)
    with pytest.raises(RemoteProtocolError, match="redirect leaves the endpoint's host"):
        await src.resolve(RepoRef.parse("org/model"))
    assert not [r for r in origin.records if r.server == "cdn"]
    await src.aclose()


@pytest.mark.parametrize(("location", "why"), [
    ("file:///etc/passwd", "non-http"),
    ("gopher://127.0.0.1/x", "non-http"),
    ("http://metadata.google.internal/computeMetadata/v1/", "metadata host"),
])
async def test_download_redirects_to_unsafe_targets_fail_at_once(
        origin: Origin, location: str, why: str) -> None:
    src = source(origin)
    f = await Kit.remote_file(src)
    origin.script("/org/model/resolve/*", b"", status=302, headers={"Location": location})
    with trio.fail_after(2):  # not retried as if transient
        with pytest.raises(RemoteProtocolError, match=why):
            await src.read(f.repo_id, f.commit, f.entry, 0, 100)
    await src.aclose()


@pytest.mark.parametrize(("target", "source_url", "refused"), [
    ("http://169.254.169.254/latest/meta-data/", "https://huggingface.co/x", "metadata"),
    ("http://169.254.10.1/", "https://huggingface.co/x", "link-local"),
    ("http://[fe80::1]/", "http://127.0.0.1/x", "link-local"),
    ("http://10.0.0.1/x", "https://8.8.8.8/x", "private"),
    ("http://192.168.1.2/x", "https://8.8.8.8/x", "private"),
    ("http://127.0.0.1/x", "https://8.8.8.8/x", "loopback"),
    ("http://[::ffff:10.0.0.1]/x", "https://8.8.8.8/x", "private"),
])
async def test_redirect_targets_refused_without_connecting(target: str, source_url: str,
                                                           refused: str) -> None:
    """Judged from the address alone: nothing is sent to any of these."""
    with pytest.raises(RemoteProtocolError, match=refused):
        await check_target(target, source_url, "repo org/x: f", allow_private=False)


async def test_redirect_targets_allowed() -> None:
    # The same class as the endpoint (a loopback origin, an in-cluster mirror), or by setting.
    await check_target("http://127.0.0.1:9/x", "http://127.0.0.1:8/y", "w", allow_private=False)
    await check_target("http://10.0.0.2/x", "http://10.0.0.1/y", "w", allow_private=False)
    await check_target("http://10.0.0.2/x", "https://8.8.8.8/y", "w", allow_private=True)
    await check_target("https://8.8.4.4/x", "http://10.0.0.1/y", "w", allow_private=False)
    with pytest.raises(RemoteProtocolError, match="link-local"):
        await check_target("http://169.254.1.1/", "http://10.0.0.1/", "w", allow_private=True)


async def test_retry_after_beyond_the_deadline_fails_at_once(origin: Origin) -> None:
    origin.script(REV, b"slow down", status=429, headers={"Retry-After": "3600"})
    src = source(origin)
    with trio.fail_after(2):
        with pytest.raises(RemoteUnavailable, match="retry after 3600s"):
            await src.resolve(RepoRef.parse("org/model"))
    await src.aclose()


@pytest.mark.parametrize("kind", ["trickle", "stall_body", "stall_headers"])
async def test_a_stalled_or_trickling_body_ends_within_the_deadline(
        origin: Origin, kind: str) -> None:
    http = HttpConfig(retries=5, backoff=0.01, timeout=1, min_rate=1 << 20, request_deadline=3)
    src = source(origin, http)
    f = await Kit.remote_file(src)
    origin.misbehave(kind, 100, rate=1000, after_bytes=1000)
    t0 = trio.current_time()
    with pytest.raises(RemoteUnavailable, match="deadline|within|Timeout"):
        await src.read(f.repo_id, f.commit, f.entry, 0, 1 << 20)
    assert trio.current_time() - t0 < 5
    await src.aclose()


async def test_whole_body_answer_with_the_same_etag_is_served(origin: Origin, repo_data) -> None:
    """A server that ignores Range answers If-Range with 200 and the ETag sent: the
    same version, so its bytes are good."""
    data = repo_data["org/model@main"]["model.safetensors"]
    src = source(origin)
    f = await Kit.remote_file(src)
    first = await src.read(f.repo_id, f.commit, f.entry, 0, 1000)  # learns the CDN's ETag
    origin.misbehave("ignore_range", 1)
    second = await src.read(f.repo_id, f.commit, f.entry, 5000, 1000)  # sent with If-Range
    assert bytes(first) == data[:1000] and bytes(second) == data[5000:6000]
    assert [r.status for r in origin.data_requests("/cdn/*")][-1] == 200
    await src.aclose()


async def test_a_wrong_content_range_is_never_served(origin: Origin, repo_data) -> None:
    data = repo_data["org/model@main"]["model.safetensors"]
    src = source(origin)
    f = await Kit.remote_file(src)
    origin.misbehave("wrong_range", 1)  # once: retried, and the retry is right
    assert bytes(await src.read(f.repo_id, f.commit, f.entry, 4096, 8192)) == data[4096:12288]
    origin.misbehave("wrong_range", 100)  # for ever: an error, never those bytes
    with pytest.raises(RemoteUnavailable, match="asked for bytes 4096-12287, origin sent 4097"):
        await src.read(f.repo_id, f.commit, f.entry, 4096, 8192)
    await src.aclose()


@pytest.mark.parametrize("kind", ["short_body", "long_body"])
async def test_bodies_of_the_wrong_length_are_retried(origin: Origin, repo_data, kind: str) -> None:
    data = repo_data["org/model@main"]["model.safetensors"]
    src = source(origin)
    f = await Kit.remote_file(src)
    origin.misbehave(kind, 1)
    got = await src.read(f.repo_id, f.commit, f.entry, 4096, 8192)  # retried, then right
    assert bytes(got) == data[4096:4096 + 8192]
    assert len(origin.data_requests("/cdn/*")) == 2
    await src.aclose()


async def test_a_large_body_from_a_local_origin_comes_off_the_socket_and_keeps_its_connection(
        origin: Origin, repo_data) -> None:
    """A body of at least RAW_MIN from a local plaintext origin is received in worker
    threads straight into its buffer; read whole, it is handed back to h11 and its
    connection serves the next request, small or large. The bytes are right also
    when the body stalls past h11's first read or is reset there (resumed from
    where it broke, on a new connection)."""
    data = repo_data["org/model@main"]["model.safetensors"]
    src = source(origin)
    f = await Kit.remote_file(src)
    origin.reset_stats()

    async def read(offset: int, size: int) -> None:
        got = await src.read(f.repo_id, f.commit, f.entry, offset, size)
        assert bytes(got) == data[offset:offset + size]

    await read(0, 8192)
    await read(8192, 8192)
    await read(1 << 20, 2 * RAW_MIN)
    await read(5 << 20, 2 * RAW_MIN)
    await read(16384, 8192)
    ports = [r.client_port for r in origin.data_requests("/cdn/*")]
    assert len(set(ports)) == 1, ports  # one connection, kept alive throughout
    origin.misbehave("stall_body", 1, seconds=3, after_bytes=RECEIVE_BYTES + 4096)
    await read(3 << 20, 2 * RAW_MIN)  # FAST's 2 s read timeout, then the rest
    origin.reset_next(1, after_bytes=RECEIVE_BYTES + 12345, match="model.safetensors")
    await read(1 << 20, 3 * RAW_MIN)
    await read(16384, 8192)
    tail = origin.data_requests("/cdn/*")[-5:]
    # A body cut short costs its connection; the one that resumed it is kept.
    assert tail[0].client_port == ports[0] and len({r.client_port for r in tail}) == 3, tail
    assert tail[3].client_port == tail[4].client_port, tail
    tail = tail[:4]
    assert tail[1].range == f"bytes={(3 << 20) + RECEIVE_BYTES + 4096}-{(5 << 20) - 1}", tail
    # Resumed after what arrived (a reset drops what the socket held unread).
    resumed = tail[3].range.removeprefix("bytes=").split("-")
    assert int(resumed[0]) > 1 << 20 and resumed[1] == str((4 << 20) - 1), tail
    # A reader waiting on the body's first MiB hears of it when it is in, not when
    # the whole step is: steps start at RAW_FIRST and double.
    seen: list[int] = []
    got = await src.read(f.repo_id, f.commit, f.entry, 0, RAW_STEP, progress=seen.append)
    assert bytes(got) == data[:RAW_STEP]
    assert seen[-1] == RAW_STEP and RAW_FIRST in seen and 2 * RAW_FIRST in seen, seen
    await src.aclose()


async def test_load_snapshot_turns_anything_unexpected_into_an_error_naming_the_repo(
        origin: Origin, tmp_path) -> None:
    """The repo boundary: a bug tripped by origin data is this repo's error."""
    from modelfs.cache import Index

    class Broken(HubSource):
        async def list_files(self, repo_id: str, commit: str):  # type: ignore[override]
            return json.loads("{" * 10) if commit else None

    src = Broken(HubConfig(endpoint=origin.url, http=FAST), None)
    index = Index(tmp_path / "index")
    with pytest.raises(RemoteProtocolError, match="repo org/model: the origin sent something"):
        await load_snapshot(src, index, RepoRef.parse("org/model"))
    index.close()
    await src.aclose()


async def test_a_directory_that_lists_itself_ends(origin: Origin) -> None:
    """nginx-style: every directory lists a subdirectory `a`, for ever."""
    from modelfs.remote.config import HttpSourceConfig
    from modelfs.remote.http import HttpSource

    origin.script("/plain/loop/*", [{"name": "a", "type": "directory", "mtime": "-"}])
    src = HttpSource(f"{origin.url}/plain/loop/x/", HttpSourceConfig(http=FAST))
    with trio.fail_after(20), pytest.raises(ListingRejected, match="nest more than 64 deep"):
        await src.resolve(RepoRef.parse("org/loop"))
    assert len(origin.records) <= 66
    await src.aclose()


async def test_a_directory_walk_counts_directories_against_the_cap(origin: Origin) -> None:
    from modelfs.remote.config import HttpSourceConfig
    from modelfs.remote.http import HttpSource

    origin.script("/plain/wide/*", [{"name": f"d{i}", "type": "directory"} for i in range(50)])
    src = HttpSource(f"{origin.url}/plain/wide/x/",
                     HttpSourceConfig(max_listing_entries=120, http=FAST))
    with pytest.raises(ListingRejected, match="more than 120 entries"):
        await src.resolve(RepoRef.parse("org/wide"))
    assert len(origin.records) <= 4
    await src.aclose()
