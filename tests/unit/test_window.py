"""The adaptive connection window (`fetch.scheduler.Window`): it settles on a small
count where more connections add nothing (a loopback origin, the daemon's CPU the
limit) and climbs to the ceiling where each connection is capped (a far CDN)."""

from __future__ import annotations

from modelfs.fetch.scheduler import WINDOW_HOLD, Window


def run(window: Window, rate_of, samples: int = 200) -> list[int]:  # type: ignore[no-untyped-def]
    sizes = []
    for _ in range(samples):
        sizes.append(window.sample(rate_of(window.size), saturated=True))
    return sizes


def test_a_cpu_bound_origin_keeps_the_window_small() -> None:
    w = Window(start=8, ceiling=64)
    sizes = run(w, lambda n: 900e6 if n >= 4 else n * 225e6)  # flat beyond 4
    assert max(sizes) <= 12  # it probes one step, sees no gain, steps back
    assert sizes[-50:].count(8) > 40


def test_capped_connections_make_it_climb_to_the_ceiling() -> None:
    w = Window(start=8, ceiling=64)
    sizes = run(w, lambda n: n * 32e6, samples=30)  # 32 MB/s each, no other limit
    assert sizes[-1] == 64
    assert sizes.index(64) < 10  # x1.5 a step: 8 -> 64 in a few steps


def test_it_stops_where_the_link_is_full() -> None:
    w = Window(start=8, ceiling=64)
    sizes = run(w, lambda n: min(n, 20) * 32e6)  # the node's link: 640 MB/s
    settled = max(set(sizes[-50:]), key=sizes[-50:].count)  # between its probes
    assert 20 <= settled <= 30


def test_a_refusal_halves_and_holds() -> None:
    w = Window(start=32, ceiling=64)
    assert w.refused() == 16
    for _ in range(WINDOW_HOLD):
        assert w.sample(1e9, saturated=True) == 16
    assert w.sample(1e9, saturated=True) > 16  # then it probes again
    assert Window(start=2, ceiling=64).refused() == 2  # never below the floor


def test_nothing_waiting_means_no_step() -> None:
    w = Window(start=8, ceiling=64)
    for _ in range(50):
        assert w.sample(1e6, saturated=False) == 8


def test_a_step_followed_by_a_fall_steps_back() -> None:
    """Throughput that fell under a step up may be the step's doing (an overloaded
    origin or node): the window goes back, and probes again at the next sample."""
    w = Window(start=16, ceiling=64)
    assert w.sample(1000e6, saturated=True) == 24
    assert w.sample(600e6, saturated=True) == 16
    assert w.sample(600e6, saturated=True) == 24
