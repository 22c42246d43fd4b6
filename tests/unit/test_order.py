"""Fetch orders as runs: every chunk once, first occurrence wins, cost by runs."""

from __future__ import annotations

import time

from hypothesis import given
from hypothesis import strategies as st

from modelfs.fetch.order import ChunkOrder, Frontier
from modelfs.fetch.tensors import loader_chunk_order

RUNS = st.lists(st.tuples(st.integers(-5, 70), st.integers(-5, 70)), max_size=30)


@given(RUNS, st.integers(0, 64))
def test_an_order_is_every_chunk_once_where_it_first_appears(runs, count: int) -> None:
    order = ChunkOrder(runs, count)
    naive = dict.fromkeys(i for a, b in [*runs, (0, count)] for i in range(max(a, 0), min(b, count)))
    assert list(order) == list(naive)
    for rank, idx in enumerate(order):
        assert order.at(rank) == idx and order.rank(idx) == rank
    assert order.window(count - 2, 5) == list(order)[max(count - 2, 0):]


@given(st.integers(0, 50), st.lists(st.integers(-3, 60), max_size=80))
def test_a_frontier_hands_out_each_rank_once_from_where_it_is_asked(count: int, wants) -> None:
    frontier = Frontier(count)
    left = set(range(count))
    for want in [*wants, *([0] * (count + 1))]:
        r = frontier.take(want)
        if not left:
            assert r is None
            continue
        after = [x for x in left if x >= want]
        assert r == (min(after) if after else min(left))
        left.remove(r)
        assert frontier.left == len(left)
    assert not frontier


def test_planning_a_petabyte_file_costs_its_tensors_not_its_chunks() -> None:
    size = 1 << 50
    extents = [(f"t{i}", i * (size >> 10), (i + 1) * (size >> 10)) for i in range(1024)]
    t0 = time.perf_counter()
    order = loader_chunk_order(extents[::-1], 0, size, 1 << 20)
    assert time.perf_counter() - t0 < 1.0
    assert len(order) == 1 << 30 and len(order.runs) <= 1026
    k = sorted(name for name, _, _ in extents).index("t1023")  # tensors come by name
    assert order.at(0) == 0 and order.rank((1 << 30) - 1) == (k + 1) * (1 << 20) - 1
