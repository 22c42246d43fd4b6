"""Plain data shared by the layers: repo references, snapshots, file entries, the
`Source` interface every origin answers, and `RemoteFile`, one version of one
file as the mount and the fetch layer see it."""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from .errors import ConfigError

# Matched with `fullmatch` only: `$` also matches before a trailing "\n".
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
COMMIT_RE = re.compile(r"[0-9a-f]{40}")
GIT_OID_RE = COMMIT_RE  # a git object id: 40 hex digits
# The prefix of a Hub dataset's repo id, as in the Hub's URLs: `datasets/ORG/NAME`.
DATASETS = "datasets"
# Longest revision (branch or tag name) accepted from a user or an API request.
MAX_REVISION = 255


def printable(text: object, limit: int = 200) -> str:
    """`repr` of untrusted text for a log line or an error: escaped (a lone surrogate,
    a control character or a newline cannot break the line) and cut to `limit`."""
    shown = repr(text)
    return shown if len(shown) <= limit else f"{shown[:limit]}... ({len(str(text))} chars)"


def bad_revision_reason(rev: str) -> str | None:
    """Why `rev` cannot name a branch, tag or commit, or None when it can."""
    if not rev:
        return "empty"
    if len(rev) > MAX_REVISION:
        return f"longer than {MAX_REVISION} characters"
    try:
        rev.encode()
    except UnicodeEncodeError:
        return "not valid UTF-8"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in rev):
        return "contains a control character"
    if rev.startswith("/") or ".." in rev.split("/"):
        return "absolute or has a '..' component"
    return None


@dataclass(frozen=True, slots=True)
class RepoRef:
    """`org/name` at a revision. `pinned` is True when the user wrote `@rev`."""

    repo_id: str
    revision: str = "main"
    pinned: bool = False

    @classmethod
    def parse(cls, text: str) -> RepoRef:
        """Parse `ORG/NAME[@REV]` or `datasets/ORG/NAME[@REV]` (a Hub dataset) and
        refuse anything that is not a plain repo id."""
        repo_id, sep, rev = text.partition("@")
        parts = repo_id.split("/")
        if parts[0] == DATASETS and len(parts) == 3:
            parts = parts[1:]
        if len(parts) != 2 or not all(_NAME.fullmatch(p) and p not in (".", "..") for p in parts):
            raise ConfigError("expected ORG/NAME[@REVISION] or datasets/ORG/NAME[@REVISION]",
                              setting="repos", subject=printable(text))
        if sep and (bad := bad_revision_reason(rev)):
            raise ConfigError(f"bad revision ({bad})", setting="repos", subject=printable(text))
        return cls(repo_id, rev if sep else "main", pinned=bool(sep))

    @property
    def mount_name(self) -> str:
        """Directory name under the org: `name` or `name@rev`."""
        name = self.repo_id.rsplit("/", 1)[1]
        return f"{name}@{self.revision.replace('/', '%2F')}" if self.pinned else name

    @property
    def parent(self) -> str:
        """The directories above the repo's own: `org`, or `datasets/org`."""
        return self.repo_id.rsplit("/", 1)[0]

    @property
    def mount_path(self) -> str:
        """Where the repo shows under the mount: `org/name[@rev]` (`datasets/org/name`)."""
        return f"{self.parent}/{self.mount_name}"

    @property
    def is_dataset(self) -> bool:
        return self.repo_id.startswith(DATASETS + "/")

    @property
    def is_commit(self) -> bool:
        return COMMIT_RE.fullmatch(self.revision) is not None

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.pinned else self.repo_id


# S3 bucket names (the rules of every store: 3-63 of lowercase, digits, `.` and `-`).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
URL_SCHEMES = ("s3", "http", "https", "file")


@dataclass(frozen=True, slots=True)
class RepoSpec:
    """What one `--repo` names: a Hub repo (`url` None), or `ORG/NAME=URL`, a repo read
    from an S3 prefix, an HTTP(S) file or directory, or a local (NFS) directory."""

    ref: RepoRef
    url: str | None = None

    @property
    def scheme(self) -> str:
        """`hf`, `s3`, `http` or `file`."""
        return source_kind(self.url)

    @classmethod
    def parse(cls, text: str, *, setting: str = "repos") -> RepoSpec:
        """`ORG/NAME[@REV]`, `datasets/ORG/NAME[@REV]` or `ORG/NAME=URL`; the URL is
        normalised (an S3 prefix and a directory end in `/`). Anything else is a
        `ConfigError` naming the spec and what is wrong with it."""
        name, sep, url = text.partition("=")
        if not sep:
            return cls(RepoRef.parse(text))
        ref = RepoRef.parse(name)
        subject = printable(text)
        if ref.pinned:
            raise ConfigError(f"a URL repo has no revisions (its versions are the origin's); "
                              f"drop @{ref.revision}", setting=setting, subject=subject)
        if ref.is_dataset:
            raise ConfigError("datasets/ names a Hub dataset; a URL repo is ORG/NAME=URL",
                              setting=setting, subject=subject)
        return cls(ref, normalise_url(url, setting=setting, subject=subject))

    def __str__(self) -> str:
        return f"{self.ref}={self.url}" if self.url else str(self.ref)


def source_kind(url: str | None) -> str:
    """Which source reads a (checked) repo URL: `hf` for None, `s3`, `http` or `file`."""
    if url is None:
        return "hf"
    scheme = url.split(":", 1)[0]
    return "http" if scheme == "https" else scheme


def normalise_url(url: str, *, setting: str, subject: str) -> str:
    """Check a repo URL and give it its one spelling (see `RepoSpec.parse`)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ConfigError("the URL does not parse", setting=setting, subject=subject) from None
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise ConfigError("the URL holds spaces or control characters", setting=setting,
                          subject=subject)
    scheme = parts.scheme.lower()
    if scheme not in URL_SCHEMES:
        raise ConfigError(f"URL scheme {scheme or '(none)'!r} is not one of "
                          "s3://, http(s)://, file://", setting=setting, subject=subject)
    if parts.query or parts.fragment:
        raise ConfigError("the URL may not have a query or fragment", setting=setting,
                          subject=subject)
    if scheme == "s3":
        if not _BUCKET.fullmatch(parts.netloc) or ".." in parts.netloc:
            raise ConfigError(f"{printable(parts.netloc, 80)} is not an S3 bucket name "
                              "(3-63 lowercase letters, digits, '.' and '-')",
                              setting=setting, subject=subject)
        prefix = parts.path.lstrip("/")
        if prefix and not prefix.endswith("/"):
            prefix += "/"  # a key prefix is a directory: s3://b/models/x lists models/x/
        if "//" in prefix or any(p in (".", "..") for p in prefix.split("/")):
            raise ConfigError("the S3 prefix has an empty, '.' or '..' part", setting=setting,
                              subject=subject)
        return f"s3://{parts.netloc}/{prefix}"
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ConfigError("a file:// URL names a local path (file:///path/)",
                              setting=setting, subject=subject)
        path = unquote(parts.path)
        if not path.startswith("/") or "\0" in path:
            raise ConfigError("a file:// URL needs an absolute path (file:///path/)",
                              setting=setting, subject=subject)
        return "file://" + posixpath.normpath(path).rstrip("/") + "/"
    if not parts.netloc:
        raise ConfigError("expected http(s)://host/path[/]", setting=setting, subject=subject)
    return url


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
    etag: str | None = None  # plain HTTP and S3: the version the content id stands for
    version: str | None = None  # S3: the object's VersionId in a versioned bucket

    @property
    def git_oid(self) -> str | None:
        """The git blob id the bytes must hash to (a Hub file outside LFS), or None."""
        if self.sha256 is None and self.etag is None and GIT_OID_RE.fullmatch(self.content_id):
            return self.content_id
        return None

    @property
    def versioned(self) -> bool:
        """Whether the content id names one immutable version of the bytes: the sha256
        the origin vouches for, or a hash of an ETag (S3, plain HTTP) or of (size,
        mtime, inode) (`file://`). Chunks of such a file are named by position."""
        return self.sha256 is not None or self.etag is not None

    @property
    def checkable(self) -> bool:
        """Whether the origin vouches for a whole-file hash (`whole_hash`)."""
        return bool(self.sha256) or self.git_oid is not None

    def whole_hash(self) -> tuple[Any, str, str] | None:
        """(a hash to feed the file's bytes to, the digest it must end at, its name),
        when the origin vouches for one: the LFS sha256, else the git blob id
        (sha1 over `blob SIZE\0` and the bytes); None for plain HTTP files."""
        if self.sha256:
            return hashlib.sha256(), self.sha256, "sha256"
        if (oid := self.git_oid) is not None:
            return hashlib.sha1(b"blob %d\0" % self.size), oid, "git blob id"
        return None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A repo at one immutable commit: what `ls` shows."""

    repo_id: str
    commit: str
    files: tuple[FileEntry, ...]
    directories: tuple[str, ...] = ()


class Segments(Protocol):
    """Where a ranged read puts its bytes when one request fills several chunk
    buffers: `next()` is the buffer for the bytes that come next (awaited, so the
    memory of a chunk is taken only when its bytes arrive); their lengths add up
    to the range's."""

    async def next(self) -> memoryview: ...


# A read's destination: one buffer of the range's length, or `Segments`.
ReadInto = bytearray | memoryview | Segments


class Source(Protocol):
    """What every origin answers: resolve a repo+revision to an immutable commit,
    list its files, read a byte range of one version of a file. `key` names the
    origin in the cache index."""

    key: str

    async def resolve(self, ref: RepoRef) -> str: ...
    async def list_files(self, repo_id: str, commit: str) -> Snapshot: ...
    def file_url(self, repo_id: str, commit: str, path: str) -> str: ...
    async def read(self, repo_id: str, commit: str, entry: FileEntry, start: int, length: int,
                   *, into: ReadInto | None = None,
                   progress: Callable[[int], None] | None = None) -> bytearray | memoryview:
        """The bytes, in `into` when given (with `Segments`, in them: the result is
        then empty); `progress(n)`: the first n bytes are in place."""
        ...
    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class RemoteFile:
    """One version of one file: what a FUSE file handle reads."""

    source: Source
    repo_id: str
    commit: str
    entry: FileEntry

    @property
    def name(self) -> str:
        return f"{self.repo_id}/{self.entry.path}"
