"""Worker-thread calls with the lifetimes trio's own `to_thread.run_sync` lacks: one
that a cancel (a read deadline) abandons rather than waits for, and one that lets
go of its buffer as soon as it returns."""

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


V = TypeVar("V")


async def run_letting_go(fn: Callable[[V], T], data: V,
                         limiter: trio.CapacityLimiter | None = None) -> T:
    """`fn(data)` in a worker thread that lets go of `data` as soon as `fn` returns.

    trio's worker keeps its job, and so the job's arguments, until it has handed
    the result back and run again under the GIL (up to the 5 ms switch interval
    later, when the event loop is busy). A chunk buffer passed as an argument is
    therefore still referred to for a while after the caller is done with it, so
    it cannot be reused at once and a new one is mapped instead (fresh pages are
    costly to fault in). Here the thread takes `data` out of a box, so only `fn`'s
    own frame refers to it."""
    box = [data]
    del data

    def call() -> T:
        return fn(box.pop())

    result: T = await trio.to_thread.run_sync(call, limiter=limiter)
    return result
