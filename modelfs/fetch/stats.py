"""The fetch layer's counters, plain data: the control plane turns them into
metrics and the status document."""

from __future__ import annotations

from dataclasses import dataclass, field

# Upper bounds (seconds) of the fetch-latency histogram's buckets; the last is +Inf.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, float("inf"))


@dataclass(slots=True)
class ReaderStats:
    """Counters since start."""

    hits: int = 0
    misses: int = 0
    fetches: int = 0
    fetch_errors: int = 0
    bytes_fetched: int = 0
    loads: int = 0  # cached chunks a read found neither in memory nor being loaded
    loads_ahead: int = 0  # cached chunks loaded into memory ahead of their reader
    bytes_served: int = 0
    in_flight: int = 0  # chunk fetches holding an origin request now
    errors: dict[str, int] = field(default_factory=dict)  # by `ModelfsError.kind`
    # Chunk fetch latency, slot granted to last byte: counts per LATENCY_BUCKETS, and the sum.
    latency_counts: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    latency_sum: float = 0.0

    def count_error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def observe(self, seconds: float) -> None:
        self.latency_sum += seconds
        self.latency_counts[next(i for i, b in enumerate(LATENCY_BUCKETS) if seconds <= b)] += 1
