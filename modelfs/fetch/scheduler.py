"""One gate for every origin request: priorities, connection limits, bandwidth.

Every fetch asks for a slot with a priority and the bytes it will move (memory
is the reader's budget, `memory.MemoryBudget`, charged once a slot is held):

- DEMAND (a reader is blocked) > READAHEAD (a sequential stream will need it soon)
  > PREFETCH (whole files in the background). No PREFETCH request starts while a
  DEMAND request is in flight: the blocked reader gets the bandwidth.
- `max_fetches` bounds concurrent requests; `demand_reserve` of them are never
  given to read-ahead or prefetch, so a demand read never queues behind
  background work that already holds every slot.
- `bandwidth` (bytes/s, optional) is a token bucket charged when a slot is granted.
- A granted request that has made no progress (`progress`) for `stall_after`
  seconds is stalled: it no longer counts against `max_fetches` nor holds back
  prefetch, so one stuck origin (or file) cannot starve demand reads of the
  others. Stalled requests end by their own deadlines; at most
  `STALLED_FACTOR * max_fetches` requests are granted in all.

Waiters are served strictly by (priority, arrival). The state is plain data
mutated without checkpoints, so it needs no lock.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import IntEnum

import trio


class Priority(IntEnum):
    DEMAND = 0
    READAHEAD = 1
    PREFETCH = 2


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_fetches: int = 16
    demand_reserve: int = 4
    bandwidth: float | None = None  # bytes per second; None = unlimited
    stall_after: float = 5.0


# Granted requests, stalled ones included, are at most this many times `max_fetches`.
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

    def statistics(self) -> SchedulerStats:
        waiting = sum(1 for p, _, t in self._heap if t.state == "waiting" and p == t.priority)
        stalled = self._stalled()
        return SchedulerStats(self._active, waiting, self._in_flight, dict(self._granted),
                              len(stalled))

    def progress(self, ticket: Ticket) -> None:
        """`ticket`'s request received bytes: it is not stalled."""
        ticket.last_progress = trio.current_time()

    def _stalled(self) -> list[Ticket]:
        limit = trio.current_time() - self.config.stall_after
        return [t for t in self._granted_tickets if t.last_progress < limit]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Notice requests that stall (so waiters behind them go on); until cancelled."""
        task_status.started()
        while True:
            await trio.sleep(self.config.stall_after / 4)
            if self._heap:
                self._wake()

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
        limit = cfg.max_fetches if priority == Priority.DEMAND else max(
            1, cfg.max_fetches - cfg.demand_reserve)
        if self._active >= limit:
            if self._active >= STALLED_FACTOR * cfg.max_fetches:
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
