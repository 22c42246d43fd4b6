"""The Hugging Face Hub source (and compatible mirrors).

Speaks the Hub's HTTP API the way `huggingface_hub` does: revision -> commit
via `/api/models/{repo}/revision/{rev}`, one recursive, unexpanded tree listing
per commit (paginated by `Link: rel="next"`), and ranged GETs on
`/{repo}/resolve/{commit}/{path}` that may redirect to a CDN. A dataset's repo id
is `datasets/ORG/NAME`, as in the Hub's URLs: its API is `/api/datasets/ORG/NAME`
and its files `/datasets/ORG/NAME/resolve/...`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from urllib.parse import quote, urlsplit

from ..errors import ListingRejected, RemoteNotFound, RemoteProtocolError
from ..types import COMMIT_RE, DATASETS, FileEntry, ReadInto, RepoRef, Snapshot
from ._http import Expect, HttpClient
from .config import HubConfig
from .listing import clean_listing, hub_entry

# A listing whose pages average fewer entries than this (beyond a few pages) is
# paging for ever, not listing: the Hub sends 1,000 a page.
MIN_PAGE_ENTRIES = 10

log = logging.getLogger(__name__)


class HubSource:
    """Resolve, list and read Hub repos. `key` names the origin in the cache index."""

    def __init__(self, config: HubConfig, token: str | None) -> None:
        self._endpoint = config.endpoint.rstrip("/")
        self._config = config
        self._http = HttpClient(config.http, auth_host=urlsplit(self._endpoint).netloc, token=token)
        self.key = config.key

    async def aclose(self) -> None:
        await self._http.aclose()

    def _api(self, repo_id: str) -> str:
        """`/api/models/ORG/NAME`, or `/api/datasets/ORG/NAME` for `datasets/ORG/NAME`."""
        kind, _, name = repo_id.partition("/")
        if kind == DATASETS and "/" in name:
            return f"{self._endpoint}/api/datasets/{name}"
        return f"{self._endpoint}/api/models/{repo_id}"

    @staticmethod
    def _auth_msg(repo_id: str) -> str:
        return f"gated or private repo {repo_id}: set HF_TOKEN or --token-file"

    async def resolve(self, ref: RepoRef) -> str:
        """The commit sha `ref.revision` points at now."""
        url = f"{self._api(ref.repo_id)}/revision/{quote(ref.revision, safe='')}"
        what = f"repo {ref.repo_id} revision {ref.revision!r}"
        page = await self._http.get_json(url, what=what, auth_msg=self._auth_msg(ref.repo_id))
        sha = page.data.get("sha") if isinstance(page.data, dict) else None
        if not isinstance(sha, str) or not COMMIT_RE.fullmatch(sha):
            raise RemoteProtocolError(f"{what}: origin sent no commit sha")
        return sha

    async def list_files(self, repo_id: str, commit: str) -> Snapshot:
        """Every file at `commit`, with sizes and content ids, cleaned of unsafe paths."""
        url: str | None = f"{self._api(repo_id)}/tree/{commit}?recursive=true"
        what = f"repo {repo_id} at {commit[:12]}"
        cap = self._config.max_listing_entries
        files: list[FileEntry | tuple[str, str]] = []
        dirs: list[str] = []
        count = 0
        seen: set[str] = set()
        while url:
            if url in seen or len(seen) > 10 + cap // MIN_PAGE_ENTRIES:
                raise ListingRejected(f"{what}: tree listing pages repeat or never end "
                                      f"(after {len(seen)} pages, {count} entries)")
            seen.add(url)
            page = await self._http.get_json(url, what=what, auth_msg=self._auth_msg(repo_id))
            if not isinstance(page.data, list):
                raise RemoteProtocolError(f"{what}: tree listing is not a JSON list")
            count += len(page.data)
            if count > cap:
                raise ListingRejected(
                    f"{what}: listing has more than {cap} entries; raise max_listing_entries "
                    "if this repo really is that large")
            for raw in page.data:
                if not isinstance(raw, dict):
                    continue
                if raw.get("type") == "directory" and isinstance(raw.get("path"), str):
                    dirs.append(raw["path"])
                elif raw.get("type") == "file":
                    parsed = hub_entry(raw, self._config.max_file_size)
                    files.append(parsed if isinstance(parsed, FileEntry)
                                 else (str(raw.get("path")), parsed))
            url = page.next_url
            if url and urlsplit(url).netloc != urlsplit(self._endpoint).netloc:
                raise RemoteProtocolError(f"{what}: pagination link leaves the endpoint")
        kept, directories = clean_listing(repo_id, files, dirs)
        return Snapshot(repo_id, commit, kept, directories)

    def file_url(self, repo_id: str, commit: str, path: str) -> str:
        return f"{self._endpoint}/{repo_id}/resolve/{commit}/{quote(path)}"

    async def read(self, repo_id: str, commit: str, entry: FileEntry, start: int, length: int,
                   *, into: ReadInto | None = None,
                   progress: Callable[[int], None] | None = None) -> bytearray | memoryview:
        """Exactly `length` bytes of `entry` at `commit` from offset `start`, written
        into `into` when given; `progress(n)`: the first n bytes have arrived."""
        if start < 0 or start + length > entry.size:
            raise RemoteNotFound(f"repo {repo_id}: {entry.path}: range beyond end of file")
        url = self.file_url(repo_id, commit, entry.path)
        expect = Expect(size=entry.size, etag=f'"{entry.content_id}"', sha256=entry.sha256)
        return await self._http.get_range(
            url, start, length, expect, what=f"repo {repo_id}: {entry.path}",
            auth_msg=self._auth_msg(repo_id), content_id=entry.content_id, into=into,
            progress=progress)
