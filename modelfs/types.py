"""Plain data shared by the layers: repo references, snapshots and file entries."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True, slots=True)
class RepoRef:
    """`org/name` at a revision. `pinned` is True when the user wrote `@rev`."""

    repo_id: str
    revision: str = "main"
    pinned: bool = False

    @classmethod
    def parse(cls, text: str) -> RepoRef:
        """Parse `ORG/NAME[@REV]` and refuse anything that is not a plain repo id."""
        repo_id, sep, rev = text.partition("@")
        parts = repo_id.split("/")
        if len(parts) != 2 or not all(_NAME.match(p) and p not in (".", "..") for p in parts):
            raise ConfigError(f"--repo {text!r}: expected ORG/NAME[@REVISION]")
        if sep and (not rev or "\0" in rev or rev.startswith("/") or ".." in rev.split("/")):
            raise ConfigError(f"--repo {text!r}: bad revision {rev!r}")
        return cls(repo_id, rev if sep else "main", pinned=bool(sep))

    @property
    def mount_name(self) -> str:
        """Directory name under the org: `name` or `name@rev`."""
        name = self.repo_id.split("/")[1]
        return f"{name}@{self.revision.replace('/', '%2F')}" if self.pinned else name

    @property
    def is_commit(self) -> bool:
        return bool(COMMIT_RE.match(self.revision))

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.pinned else self.repo_id


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file of a snapshot.

    `content_id` names the bytes, not the path: the LFS sha256 when there is one,
    else the git blob id; for plain HTTP, a hash of URL and ETag (the ETag is the
    version there). Cache keys use it, so identical files in two repos or
    revisions share their chunks. `sha256` is set when the origin vouches for
    the whole-file hash.
    """

    path: str
    size: int
    content_id: str
    sha256: str | None = None
    etag: str | None = None  # plain HTTP: the version the content id stands for


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A repo at one immutable commit: what `ls` shows."""

    repo_id: str
    commit: str
    files: tuple[FileEntry, ...]
    directories: tuple[str, ...] = ()
