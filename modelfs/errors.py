"""One exception tree for modelfs.

Every class carries the errno a FUSE request answers with, so the FUSE boundary
(`modelfs.fs.operations`) translates them in one place. Messages say what happened
and what to do; they never contain a token.
"""

from __future__ import annotations

import errno as _errno


class ModelfsError(Exception):
    """Base of all modelfs errors."""

    errno: int = _errno.EIO
    kind: str = "other"  # the `kind` label of the errors metric


class ConfigError(ModelfsError):
    """A bad option, flag or environment value; the message names it."""

    errno = _errno.EINVAL
    kind = "config"


class RemoteError(ModelfsError):
    """The origin answered something we cannot use."""


class RemoteNotFound(RemoteError):
    """Repo, revision or path does not exist (HTTP 404)."""

    errno = _errno.ENOENT
    kind = "not_found"


class RemoteAuthError(RemoteError):
    """Gated or private repo and no (valid) token (HTTP 401/403)."""

    errno = _errno.EACCES
    kind = "auth"


class RemoteStale(RemoteError):
    """The origin now serves a different version than the one we opened."""

    errno = _errno.ESTALE
    kind = "stale"


class RemoteUnavailable(RemoteError):
    """Timeouts, resets, 429 and 5xx: retryable, and still failing after the retries."""

    errno = _errno.EIO
    kind = "unavailable"


class RemoteProtocolError(RemoteError):
    """The origin broke the protocol (e.g. a 206 for a range we did not ask for)."""

    errno = _errno.EIO
    kind = "protocol"


class IntegrityError(RemoteError):
    """The origin's bytes do not hash to what its listing says they are."""

    errno = _errno.EIO
    kind = "integrity"


class ListingRejected(RemoteError):
    """A repo listing is not sane (e.g. far more entries than the configured cap)."""

    errno = _errno.EIO
    kind = "listing"


class CacheError(ModelfsError):
    """The cache directory cannot be used (permissions, not a directory, ...)."""

    errno = _errno.EIO
    kind = "cache"


class CacheFull(CacheError):
    """The cache's file system is full (ENOSPC), even after evicting."""

    errno = _errno.ENOSPC
    kind = "cache_full"


class CacheCorrupt(CacheError):
    """A chunk on disk does not hash to its name, or the index is unusable."""

    errno = _errno.EIO
    kind = "integrity"


class UnknownJob(ModelfsError):
    """No prefetch job (or item) with that id."""

    errno = _errno.ENOENT
    kind = "not_found"


class ControlError(ModelfsError):
    """The daemon refused a request of its local API; the message is its reason."""

    kind = "control"


class DaemonNotRunning(ModelfsError):
    """No daemon answers on the control socket."""

    kind = "control"
