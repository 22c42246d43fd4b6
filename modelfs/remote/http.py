"""Plain HTTP(S) origins: a file URL, or a directory served with a JSON index.

`--repo ORG/NAME=URL` (or `--url`) mounts one URL as a repo. A URL ending in `/` is a
directory whose listing is nginx's `autoindex_format json` (a JSON list of
`{"name", "type": "file"|"directory", "size"}`), walked recursively; any other
URL is a single file. There are no commits: a file's version is its ETag, its
content id a hash of URL and ETag, and the repo's "commit" a hash of the whole
listing. `resolve` revalidates every file with `If-None-Match`, so an unchanged
repo costs one 304 per file; a changed ETag is a new version (new content id),
and reads of the old one fail as stale rather than mix versions.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from urllib.parse import quote, unquote, urljoin, urlsplit

from ..errors import ConfigError, ListingRejected, RemoteProtocolError
from ..types import FileEntry, ReadInto, RepoRef, Snapshot
from ._http import Expect, HttpClient
from .config import HttpSourceConfig
from .listing import Listings, bad_size_reason, clean_listing

# Directory levels a walk descends (a directory that lists itself recurses for ever).
MAX_DEPTH = 64

log = logging.getLogger(__name__)


def content_id(url: str, etag: str) -> str:
    return "http-" + hashlib.sha256(f"{url}\n{etag}".encode()).hexdigest()


class HttpSource:
    """One URL (a file, or a directory tree), mounted as any number of repo ids."""

    # The index names plain HTTP listings by repo id alone (their commits hash the
    # ETags, so one URL's listing is never taken for another's bytes).
    key = "http"

    def __init__(self, url: str, config: HttpSourceConfig) -> None:
        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
            raise ConfigError("not an http(s) URL", setting="repos", subject=url)
        self._base = url
        self._config = config
        self._http = HttpClient(config.http, auth_host=None, token=None)
        self._listings = Listings()
        self._last: dict[str, dict[str, FileEntry]] = {}  # repo -> path -> entry last seen

    async def aclose(self) -> None:
        await self._http.aclose()

    def _url(self, repo_id: str) -> str:
        return self._base

    def file_url(self, repo_id: str, commit: str, path: str) -> str:
        """The URL a file is read from (`commit`, an ETag digest here, does not change it)."""
        base = self._url(repo_id)
        return urljoin(base, quote(path)) if base.endswith("/") else base

    async def resolve(self, ref: RepoRef) -> str:
        """Walk the listing and revalidate every file; the 'commit' is a hash of
        (path, size, ETag) over all files, so it changes exactly when one does."""
        base = self._url(ref.repo_id)
        paths = await self._walk(ref.repo_id, base) if base.endswith("/") else [
            unquote(urlsplit(base).path.rsplit("/", 1)[-1]) or "index"]
        last = self._last.get(ref.repo_id, {})
        files: list[FileEntry | tuple[str, str]] = []
        for path in paths:
            url = self.file_url(ref.repo_id, "", path)
            old = last.get(path)
            head = await self._http.head(url, what=f"{ref.repo_id}: {path}", auth_msg=(
                f"{ref.repo_id}: {url} needs credentials"), if_none_match=old.etag if old else None)
            if not head.changed and old is not None:
                files.append(old)
                continue
            if not head.etag or head.etag.startswith("W/"):
                raise RemoteProtocolError(f"{ref.repo_id}: {path}: the origin sends no strong "
                                          "ETag, so versions cannot be told apart")
            assert head.size is not None
            if (bad := bad_size_reason(head.size, self._config.max_file_size)) is not None:
                files.append((path, bad))
                continue
            files.append(FileEntry(path, head.size, content_id(url, head.etag), etag=head.etag))
        kept, dirs = clean_listing(ref.repo_id, files)
        self._last[ref.repo_id] = {f.path: f for f in kept}
        return self._listings.add(ref.repo_id, kept, dirs)

    async def _walk(self, repo_id: str, base: str) -> list[str]:
        out: list[str] = []
        todo = [""]
        cap = self._config.max_listing_entries
        entries = 0
        while todo:
            prefix = todo.pop()
            if prefix.count("/") > MAX_DEPTH:
                raise ListingRejected(f"{repo_id}: directories under {base} nest more than "
                                      f"{MAX_DEPTH} deep (a directory that lists itself?)")
            page = await self._http.get_json(urljoin(base, quote(prefix)),
                                             what=f"{repo_id}: listing of /{prefix}",
                                             auth_msg=f"{repo_id}: {base} needs credentials")
            if not isinstance(page.data, list):
                raise RemoteProtocolError(f"{repo_id}: {base}{prefix} is not a JSON directory "
                                          "index (nginx: autoindex on; autoindex_format json)")
            entries += len(page.data)
            if entries > cap:
                raise ListingRejected(f"{repo_id}: more than {cap} entries under {base}; raise "
                                      "max_listing_entries if it really is that large")
            for item in page.data:
                name = item.get("name") if isinstance(item, dict) else None
                if not isinstance(name, str) or "/" in name or name in ("", ".", ".."):
                    continue
                if item.get("type") == "directory":
                    todo.append(f"{prefix}{name}/")
                elif item.get("type") == "file":
                    out.append(prefix + name)
        return sorted(out)

    async def list_files(self, repo_id: str, commit: str) -> Snapshot:
        return self._listings.get(repo_id, commit)

    async def read(self, repo_id: str, commit: str, entry: FileEntry, start: int, length: int,
                   *, into: ReadInto | None = None,
                   progress: Callable[[int], None] | None = None) -> bytearray | memoryview:
        url = self.file_url(repo_id, commit, entry.path)
        expect = Expect(size=entry.size, etag=entry.etag, strict_etag=True)
        return await self._http.get_range(
            url, start, length, expect, what=f"{repo_id}: {entry.path}",
            auth_msg=f"{repo_id}: {url} needs credentials", content_id=entry.content_id,
            into=into, progress=progress)
