"""The fetch scheduler: priorities, reserved demand slots, memory budget, promotion."""

from __future__ import annotations

import trio
import trio.testing

from modelfs.fetch import FetchScheduler, Priority, SchedulerConfig


async def test_priorities_reserve_and_promotion() -> None:
    s = FetchScheduler(SchedulerConfig(max_fetches=3, demand_reserve=1))
    gates = {name: trio.Event() for name in ["p1", "p2", "p3", "r1", "d1"]}
    tickets = {"p1": s.ticket(Priority.PREFETCH, 10), "p2": s.ticket(Priority.PREFETCH, 10),
               "p3": s.ticket(Priority.PREFETCH, 10), "r1": s.ticket(Priority.READAHEAD, 10),
               "d1": s.ticket(Priority.DEMAND, 10)}

    async def hold(name: str) -> None:
        async with s.slot(tickets[name]):
            await gates[name].wait()

    def granted() -> set[str]:
        return {n for n, t in tickets.items() if t.state == "granted"}

    async with trio.open_nursery() as n:
        for name in ["p1", "p2", "p3", "r1"]:
            n.start_soon(hold, name)
            await trio.testing.wait_all_tasks_blocked()
        # Background work takes every slot it may (2 of 3), in arrival order.
        assert granted() == {"p1", "p2"}
        # A demand read still gets the reserved slot at once.
        n.start_soon(hold, "d1")
        await trio.testing.wait_all_tasks_blocked()
        assert granted() == {"p1", "p2", "d1"}
        assert s.statistics().waiting == 2
        # Promoted to demand, the queued read-ahead takes the next free slot before p3.
        s.promote(tickets["r1"], Priority.DEMAND)
        gates["p1"].set()
        await trio.testing.wait_all_tasks_blocked()
        assert "r1" in granted()
        assert tickets["p3"].state == "waiting"
        for g in gates.values():
            g.set()
    assert s.statistics().active == 0
    assert s.statistics().granted == {"DEMAND": 2, "READAHEAD": 0, "PREFETCH": 3}


async def test_cancelled_waiter_leaves_no_slot_behind() -> None:
    s = FetchScheduler(SchedulerConfig(max_fetches=2, demand_reserve=0))
    gate = trio.Event()

    async def hold() -> None:
        async with s.slot(s.ticket(Priority.PREFETCH, 1)):
            await gate.wait()

    async with trio.open_nursery() as n:
        n.start_soon(hold)
        n.start_soon(hold)
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(0.05):
            async with s.slot(s.ticket(Priority.DEMAND, 1)):
                raise AssertionError("no slot should be free")
        gate.set()
    assert s.statistics().active == 0
    async with s.slot(s.ticket(Priority.DEMAND, 1)):
        assert s.statistics().active == 1


async def test_bandwidth_limit_paces_grants() -> None:
    s = FetchScheduler(SchedulerConfig(max_fetches=4, demand_reserve=0, bandwidth=1000.0))
    start = trio.current_time()
    for _ in range(3):
        async with s.slot(s.ticket(Priority.PREFETCH, 500)):
            pass
    # 1500 bytes at 1000 B/s, with a full bucket of 1000 at the start: at least 0.5 s.
    assert trio.current_time() - start >= 0.45


async def test_prefetch_waits_while_a_demand_read_is_in_flight() -> None:
    s = FetchScheduler(SchedulerConfig(max_fetches=8, demand_reserve=2))
    gate = trio.Event()
    demand = s.ticket(Priority.DEMAND, 1)
    background = s.ticket(Priority.PREFETCH, 1)
    ahead = s.ticket(Priority.READAHEAD, 1)

    async def hold(t) -> None:
        async with s.slot(t):
            await gate.wait()

    async with trio.open_nursery() as n:
        n.start_soon(hold, demand)
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(hold, background)
        n.start_soon(hold, ahead)
        await trio.testing.wait_all_tasks_blocked()
        assert (demand.state, ahead.state, background.state) == ("granted", "granted", "waiting")
        gate.set()
    assert background.state == "granted"


async def test_promoting_a_ticket_that_never_asked_for_a_slot_grants_nothing() -> None:
    """A demand reader joining a chunk load (from disk: no slot) promotes its ticket;
    that must not grant it a slot nobody releases (every later fetch would wait
    once such leaks took them all)."""
    s = FetchScheduler(SchedulerConfig(max_fetches=2, demand_reserve=0))
    for _ in range(5):
        s.promote(s.ticket(Priority.READAHEAD, 10), Priority.DEMAND)
    assert s.statistics().active == 0
    t = s.ticket(Priority.PREFETCH, 10)
    s.promote(t, Priority.DEMAND)  # a load that failed and falls back to a fetch
    with trio.fail_after(1):
        async with s.slot(t):
            assert t.granted_as == Priority.DEMAND
    assert s.statistics().active == 0
