"""A worker-thread call that a cancel (a read deadline) abandons rather than waits for."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")
# trio 0.23 renamed `cancellable` to `abandon_on_cancel`.
_ABANDON = ("abandon_on_cancel" if "abandon_on_cancel"
            in inspect.signature(trio.to_thread.run_sync).parameters else "cancellable")


async def run_abandonable(fn: Callable[..., T], *args: Any,
                          limiter: trio.CapacityLimiter | None = None) -> T:
    """`fn(*args)` in a thread; on cancel the caller goes on at once and the thread
    finishes (or hangs, on a dead NFS server) on its own, still holding `limiter`."""
    result: T = await trio.to_thread.run_sync(fn, *args, limiter=limiter, **{_ABANDON: True})
    return result
