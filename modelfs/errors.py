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
    """A bad setting (flag, environment variable, config file key, API field).

    `setting` is the setting's name (`cache_size`), `subject` what of it is wrong
    when that is not the whole value (one repo of several), `reason` why. The
    message is `LABEL [SUBJECT]: REASON`, where LABEL is how the front end the
    value came through names the setting: the flag by default (`--cache-size`);
    `labelled` gives the same error under another name (`MODELFS_CACHE_SIZE
    (environment)`, `FILE: [cache] size`, `REPO`), with no rewriting of text.
    """

    errno = _errno.EINVAL
    kind = "config"

    def __init__(self, reason: str, *, setting: str | None = None, subject: str = "",
                 label: str | None = None) -> None:
        self.reason = reason
        self.setting = setting
        self.subject = subject
        self.label = label if label is not None else flag_of(setting) if setting else ""
        head = " ".join(x for x in (self.label, subject) if x)
        super().__init__(f"{head}: {reason}" if head else reason)

    def labelled(self, label: str) -> ConfigError:
        return ConfigError(self.reason, setting=self.setting, subject=self.subject, label=label)


# Settings whose flag is not their name (lists are given one value a flag).
_FLAGS = {"repos": "--repo", "urls": "--url"}


def flag_of(setting: str) -> str:
    """The command-line flag of a setting: `cache_size` -> `--cache-size`."""
    return _FLAGS.get(setting) or "--" + setting.replace("_", "-")


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
