"""Sources: where model files come from (hf and plain http now; s3, file later).

Every source answers the same small interface (`Source`): resolve a
repo+revision to an immutable commit, list its files, read a byte range of one
version of a file. Nothing here knows about the cache or FUSE.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ..types import FileEntry, RepoRef, Snapshot
from ._http import HttpConfig
from .hf import HubConfig, HubSource
from .http import HttpSource, HttpSourceConfig


class Source(Protocol):
    key: str

    async def resolve(self, ref: RepoRef) -> str: ...
    async def list_files(self, repo_id: str, commit: str) -> Snapshot: ...
    def file_url(self, repo_id: str, commit: str, path: str) -> str: ...
    async def read(self, repo_id: str, commit: str, entry: FileEntry, start: int, length: int,
                   *, into: bytearray | None = None,
                   progress: Callable[[int], None] | None = None) -> bytearray: ...
    async def aclose(self) -> None: ...


__all__ = ["HttpConfig", "HttpSource", "HttpSourceConfig", "HubConfig", "HubSource", "Source"]
