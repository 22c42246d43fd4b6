"""Which source reads a repo: the Hub for `ORG/NAME`, and one source per URL for
`ORG/NAME=URL` (S3 prefix, HTTP(S) file or directory, local directory).

Sources are made when first asked for and closed together; the S3 sources share
one set of credentials (found once, refreshed by botocore).
"""

from __future__ import annotations

import logging

from ..errors import ModelfsError
from ..types import RepoSpec, Source, source_kind
from .config import SourcesConfig
from .file import FileSource
from .hf import HubSource
from .http import HttpSource
from .s3 import S3Auth, S3Source
from .tier import SharedTier

log = logging.getLogger(__name__)


class Sources:
    """The mount's (or a prefetch's) sources, by the URL a repo spec names."""

    def __init__(self, config: SourcesConfig, token: str | None) -> None:
        self.config = config
        self.hub = HubSource(config.hub, token)
        self._by_url: dict[str, Source] = {}
        self._s3_auth: S3Auth | None = None
        self._tier: SharedTier | None = None

    def get(self, url: str | None) -> Source:
        """The source of a repo spec's URL (None: the Hub); the URL was checked by
        `RepoSpec.parse`."""
        if url is None:
            return self.hub
        source = self._by_url.get(url)
        if source is None:
            source = self._make(url)
            self._by_url[url] = source
        return source

    def for_spec(self, spec: RepoSpec) -> Source:
        return self.get(spec.url)

    def _auth(self) -> S3Auth | None:
        if self.config.s3.anonymous:
            return None
        self._s3_auth = self._s3_auth or S3Auth(self.config.s3)
        return self._s3_auth

    async def tier(self) -> SharedTier | None:
        """The shared chunk tier, when one is set and usable: without credentials it is
        left out with a warning, or with `shared_cache_required` refused."""
        url = self.config.shared_cache
        if url is None:
            return None
        if self._tier is None:
            tier = SharedTier(url, self.config.s3, self._auth())
            try:
                await tier.ready()
            except ModelfsError as exc:
                await tier.aclose()
                if self.config.shared_cache_required:
                    raise
                log.warning("%s; going on without it", exc)
                return None
            self._tier = tier
        return self._tier

    def _make(self, url: str) -> Source:
        scheme = source_kind(url)
        if scheme == "s3":
            return S3Source(url, self.config.s3, self._auth())
        if scheme == "file":
            return FileSource(url, self.config.file)
        return HttpSource(url, self.config.http)

    async def aclose(self) -> None:
        for source in [self.hub, *self._by_url.values()]:
            await source.aclose()
        self._by_url.clear()
        if self._tier is not None:
            await self._tier.aclose()
            self._tier = None
