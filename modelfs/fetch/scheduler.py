"""One gate for every origin request: priorities, connection limits, bandwidth.

Every fetch asks for a slot with a priority and the bytes it will move (memory
is the reader's budget, `memory.MemoryBudget`, charged once a slot is held):

- DEMAND (a reader is blocked) > READAHEAD (a sequential stream will need it soon)
  > PREFETCH (whole files in the background). No PREFETCH request starts while a
  DEMAND request is in flight: the blocked reader gets the bandwidth.
- The window (`Window`, at most `max_fetches`) bounds concurrent requests;
  `demand_reserve` of them (at most half) are never given to read-ahead or
  prefetch, so a demand read never queues behind background work that already
  holds every slot.
- `bandwidth` (bytes/s, optional) is a token bucket charged when a slot is granted.
- A granted request that has made no progress (`progress`) for `stall_after`
  seconds is stalled: it no longer counts against the window nor holds back
  prefetch, so one stuck origin (or file) cannot starve demand reads of the
  others. Stalled requests end by their own deadlines; at most
  `STALLED_FACTOR` times the window are granted in all.

Waiters are served strictly by (priority, arrival). The state is plain data
mutated without checkpoints, so it needs no lock.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import IntEnum

import trio

log = logging.getLogger(__name__)


class Priority(IntEnum):
    DEMAND = 0
    READAHEAD = 1
    PREFETCH = 2


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """`max_fetches` is the ceiling: the requests actually allowed at once (the
    window) adapt to what the origin gives (`Window`); `adaptive=False` holds the
    window at the ceiling."""

    max_fetches: int = 64
    demand_reserve: int = 4
    bandwidth: float | None = None  # bytes per second; None = unlimited
    stall_after: float = 5.0
    adaptive: bool = True
    # Where the window starts. 24 took a cold `cat` of 256 MiB on an origin that
    # caps each connection at 32 MB/s from 0.89 to 0.80 s, but with read-ahead that
    # refills at half its window a cold read then never kept more than 20 requests
    # waiting, and the window never grew where each connection gives 1 MB/s
    # (tests/integration/test_connections.py: 24 against at least 54).
    window_start: int = 16


# The window is re-judged this often (seconds of throughput per sample).
WINDOW_INTERVAL = 0.25
# A step up multiplies the window by this; it is kept if it raised throughput by
# WINDOW_GAIN (a smaller step, up to the ceiling, by proportionally less), else the
# window steps back.
WINDOW_STEP = 1.5
WINDOW_GAIN = 0.10
# After a step back (or an origin's refusal), the window holds this many intervals
# (2.5 s) before it probes upward again (an origin's capacity changes).
WINDOW_HOLD = 10
# Throughput that fell this much under a step up: the work changed or the step
# overloaded something; the window steps back without holding.
WINDOW_CHANGED = 0.3
WINDOW_FLOOR = 2


class Window:
    """How many origin requests to allow at once: the count that maximises throughput.

    Per-connection throughput ranges from 10 MB/s (a far CDN) to over 1 GB/s
    (loopback, where the daemon's CPU is the limit), so any fixed count is wrong
    somewhere. Hill climbing, sans-I/O: while requests queue for slots (more would
    be used), step the window up (x`WINDOW_STEP` each `WINDOW_INTERVAL`); keep the step if throughput rose by
    `WINDOW_GAIN`, else step back and hold. An origin that refuses (429, 503, resets)
    halves it. Samples while nothing waited for a slot say nothing and change nothing.
    """

    def __init__(self, start: int, ceiling: int, floor: int = WINDOW_FLOOR) -> None:
        self.ceiling = ceiling
        self.floor = min(floor, ceiling)
        self.size = max(self.floor, min(start, ceiling))
        self._before: tuple[int, float] | None = None  # (size, rate) before a step up
        self._hold = 0

    def sample(self, rate: float, saturated: bool) -> int:
        """One interval's throughput (bytes/s) and whether requests waited for slots."""
        if self._before is not None:
            size, before = self._before
            self._before = None
            if rate < before * (1 - WINDOW_CHANGED):
                # Fell under the step: the work changed, or the step overloaded
                # something. Back to where it was, and probe again next time.
                self.size = size
                return self.size
            if rate <= before * (1 + WINDOW_GAIN * (self.size - size) / size
                                 / (WINDOW_STEP - 1)):
                self.size = size  # no gain: back to where it was
                self._hold = WINDOW_HOLD
                return self.size
            if not saturated:
                return self.size  # it helped, and now nothing waits: enough
        if self._hold > 0:
            self._hold -= 1
            return self.size
        if saturated and self.size < self.ceiling:
            self._before = (self.size, rate)
            self.size = min(self.ceiling, max(self.size + 2, int(self.size * WINDOW_STEP)))
        return self.size

    def refused(self) -> int:
        """The origin pushed back: halve, and hold."""
        self.size = max(self.floor, self.size // 2)
        self._before = None
        self._hold = WINDOW_HOLD
        return self.size


# Granted requests, stalled ones included, are at most this many times the window.
STALLED_FACTOR = 4


@dataclass(slots=True)
class SchedulerStats:
    active: int
    waiting: int
    bytes_in_flight: int
    granted: dict[str, int] = field(default_factory=dict)
    stalled: int = 0


@dataclass(slots=True, eq=False)
class Ticket:
    """A request for a slot. `promote` may raise its priority before it is granted
    (a demand reader joining a queued read-ahead fetch). A ticket is "new" until
    it asks for a slot: one that never does (a chunk loaded from disk, not
    fetched) holds nothing and must not be granted one."""

    priority: int
    nbytes: int
    event: trio.Event = field(default_factory=trio.Event)
    state: str = "new"  # new | waiting | granted | cancelled
    granted_as: int = -1
    last_progress: float = 0.0  # when it was granted or last received bytes
    received: int = 0  # bytes counted as they arrived (the rest count at release)


class FetchScheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self._active = 0
        self._in_flight = 0
        self._demand_active = 0
        self._heap: list[tuple[int, int, Ticket]] = []
        self._granted_tickets: set[Ticket] = set()
        self._seq = itertools.count()
        self._granted = {p.name: 0 for p in Priority}
        self._tokens = float(config.bandwidth or 0)
        self._last_refill = trio.current_time() if config.bandwidth else 0.0
        self.window = Window(config.window_start if config.adaptive else config.max_fetches,
                             config.max_fetches)
        self._done_bytes = 0  # bytes received (the window's throughput)
        self._saturated = False  # a request waited for a slot since the last sample

    def statistics(self) -> SchedulerStats:
        waiting = sum(1 for p, _, t in self._heap if t.state == "waiting" and p == t.priority)
        stalled = self._stalled()
        return SchedulerStats(self._active, waiting, self._in_flight, dict(self._granted),
                              len(stalled))

    def progress(self, ticket: Ticket, nbytes: int = 0) -> None:
        """`ticket`'s request received `nbytes` more: it is not stalled, and the
        window's throughput counts them now, not when a 16 MiB request ends (at
        32 MB/s a connection that is half a second: one sample interval)."""
        ticket.last_progress = trio.current_time()
        if nbytes > 0:
            ticket.received += nbytes
            self._done_bytes += nbytes

    def _stalled(self) -> list[Ticket]:
        limit = trio.current_time() - self.config.stall_after
        return [t for t in self._granted_tickets if t.last_progress < limit]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Notice requests that stall (so waiters behind them go on), and adapt the
        window; until cancelled."""
        task_status.started()
        async with trio.open_nursery() as nursery:
            if self.config.adaptive:
                nursery.start_soon(self._adapt)
            while True:
                await trio.sleep(self.config.stall_after / 4)
                if self._heap:
                    self._wake()

    async def _adapt(self) -> None:
        while True:
            done, t0 = self._done_bytes, trio.current_time()
            self._saturated = bool(self._heap)
            await trio.sleep(WINDOW_INTERVAL)
            rate = (self._done_bytes - done) / max(1e-6, trio.current_time() - t0)
            before = self.window.size
            after = self.window.sample(rate, self._saturated)
            if after != before:
                log.debug("connection window %d -> %d (%.1f MB/s, %s)", before, after,
                          rate / 1e6, "saturated" if self._saturated else "idle")
            if after > before:
                self._wake()

    def refused(self) -> None:
        """The origin refused a request (429, 503, a reset): fewer at once."""
        if self.config.adaptive:
            self.window.refused()

    def ticket(self, priority: Priority, nbytes: int) -> Ticket:
        return Ticket(int(priority), nbytes)

    def promote(self, ticket: Ticket, priority: Priority) -> None:
        if ticket.state not in ("new", "waiting") or priority >= ticket.priority:
            return
        ticket.priority = int(priority)
        if ticket.state == "waiting":
            heapq.heappush(self._heap, (ticket.priority, next(self._seq), ticket))
            self._wake()

    def _fits(self, priority: int, nbytes: int) -> bool:
        cfg = self.config
        size = self.window.size
        limit = size if priority == Priority.DEMAND else max(
            1, size - min(cfg.demand_reserve, size // 2))
        if self._active >= limit:
            if self._active >= STALLED_FACTOR * size:
                return False
            stalled = self._stalled()
            if self._active - len(stalled) >= limit:
                return False
        else:
            stalled = None
        if priority == Priority.PREFETCH and self._demand_active:
            # A blocked reader gets the bandwidth; prefetch resumes after (or when
            # every demand request is stalled: no bandwidth to give it).
            if stalled is None:
                stalled = self._stalled()
            if self._demand_active > sum(t.granted_as == Priority.DEMAND for t in stalled):
                return False
        return True

    def _wake(self) -> None:
        while self._heap:
            prio, _, t = self._heap[0]
            if t.state != "waiting" or prio != t.priority:
                heapq.heappop(self._heap)  # cancelled, or superseded by a promotion
                continue
            if not self._fits(prio, t.nbytes):
                self._saturated = True
                return  # strict order: nothing of lower priority jumps ahead
            heapq.heappop(self._heap)
            self._active += 1
            self._in_flight += t.nbytes
            self._demand_active += prio == Priority.DEMAND
            self._granted[Priority(prio).name] += 1
            t.state = "granted"
            t.granted_as = prio
            t.last_progress = trio.current_time()
            self._granted_tickets.add(t)
            t.event.set()

    def _release(self, ticket: Ticket) -> None:
        self._done_bytes += max(0, ticket.nbytes - ticket.received)
        self._granted_tickets.discard(ticket)
        self._active -= 1
        self._in_flight -= ticket.nbytes
        # A promotion after the grant does not count: it was granted as what it was.
        self._demand_active -= ticket.granted_as == Priority.DEMAND
        self._wake()

    async def _throttle(self, nbytes: int) -> None:
        rate = self.config.bandwidth
        if not rate:
            return
        now = trio.current_time()
        self._tokens = min(rate, self._tokens + (now - self._last_refill) * rate)
        self._last_refill = now
        self._tokens -= nbytes
        if self._tokens < 0:
            await trio.sleep(-self._tokens / rate)

    @asynccontextmanager
    async def slot(self, ticket: Ticket) -> AsyncIterator[None]:
        """Hold one request slot."""
        ticket.state = "waiting"
        heapq.heappush(self._heap, (ticket.priority, next(self._seq), ticket))
        self._wake()
        try:
            await ticket.event.wait()  # a checkpoint even when granted at once
        except BaseException:
            if ticket.state == "granted":
                self._release(ticket)
            ticket.state = "cancelled"
            raise
        try:
            await self._throttle(ticket.nbytes)
            yield
        finally:
            self._release(ticket)
