"""Prometheus metrics, read from the daemon's counters when scraped.

The fetch and cache layers keep plain counters (`ReaderStats`, the index's
usage); this collector turns them into metric families on each scrape, so the
lower layers do not depend on prometheus_client and nothing is counted twice.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ..fetch import LATENCY_BUCKETS
from ..schema import JOB_STATES
from .context import ControlContext


class _Collector(Collector):
    def __init__(self, ctx: ControlContext) -> None:
        self._ctx = ctx

    def collect(self) -> Iterator[Metric]:
        ctx = self._ctx
        s = ctx.reader.statistics()
        yield CounterMetricFamily("modelfs_cache_hits", "Chunk reads answered from the cache.",
                                  value=s.hits)
        yield CounterMetricFamily("modelfs_cache_misses", "Chunk reads that had to fetch.",
                                  value=s.misses)
        yield CounterMetricFamily("modelfs_fetched_bytes", "Bytes fetched from origins.",
                                  value=s.bytes_fetched)
        yield CounterMetricFamily("modelfs_served_bytes", "Bytes served to readers of the mount.",
                                  value=s.bytes_served)
        yield CounterMetricFamily("modelfs_fetches", "Chunk fetches from origins.",
                                  value=s.fetches)
        yield CounterMetricFamily("modelfs_chunk_loads", "Cached chunks loaded from disk "
                                  "(and checked) on a read's own time.", value=s.loads)
        yield CounterMetricFamily("modelfs_chunk_loads_ahead", "Cached chunks loaded from "
                                  "disk (and checked) ahead of their reader.",
                                  value=s.loads_ahead)
        yield GaugeMetricFamily("modelfs_fetches_in_flight", "Origin requests in flight.",
                                value=s.in_flight)
        sched = ctx.reader.scheduler
        requests = CounterMetricFamily("modelfs_origin_requests",
                                       "Origin requests sent, by what asked for them.",
                                       labels=["priority"])
        for name, n in sched.statistics().granted.items():
            requests.add_metric([name.lower()], n)
        yield requests
        yield GaugeMetricFamily("modelfs_connections", "Origin requests allowed at once now "
                                "(the window, adapted to the throughput).",
                                value=sched.window.size)
        yield GaugeMetricFamily("modelfs_max_connections", "The window's ceiling "
                                "(--max-connections).", value=sched.config.max_fetches)
        cumulative, total = [], 0
        for bound, count in zip(LATENCY_BUCKETS, s.latency_counts, strict=True):
            total += count
            cumulative.append(("+Inf" if bound == float("inf") else repr(bound), total))
        yield HistogramMetricFamily("modelfs_fetch_duration_seconds",
                                    "Chunk fetch latency, request to last byte.",
                                    buckets=cumulative, sum_value=s.latency_sum)
        if (tier := ctx.reader.tier) is not None:
            t = tier.stats
            yield CounterMetricFamily("modelfs_shared_cache_hits",
                                      "Chunks read from the shared tier.", value=t.hits)
            yield CounterMetricFamily("modelfs_shared_cache_misses",
                                      "Chunks the shared tier did not have.", value=t.misses)
            yield CounterMetricFamily("modelfs_shared_cache_read_bytes",
                                      "Bytes read from the shared tier.", value=t.bytes_read)
            yield CounterMetricFamily("modelfs_shared_cache_written_bytes",
                                      "Bytes written to the shared tier.", value=t.bytes_written)
            yield CounterMetricFamily("modelfs_shared_cache_errors",
                                      "Shared tier requests that failed.", value=t.errors)
            yield CounterMetricFamily("modelfs_shared_cache_lease_waits",
                                      "Misses another node had claimed: waits for its write.",
                                      value=t.lease_waits)
        errors = CounterMetricFamily("modelfs_errors", "Errors by kind.", labels=["kind"])
        for kind, n in sorted(s.errors.items()):
            errors.add_metric([kind], n)
        yield errors
        cache = ctx.cache
        yield GaugeMetricFamily("modelfs_cache_usage_bytes", "Disk used by cached chunks.",
                                value=cache.index.usage())
        if cache.config.limit is not None:
            yield GaugeMetricFamily("modelfs_cache_limit_bytes", "The cache size limit.",
                                    value=cache.config.limit)
        jobs = GaugeMetricFamily("modelfs_jobs", "Prefetch jobs by state.", labels=["state"])
        states = [j.state for j in ctx.jobs.jobs.values()]
        for state in JOB_STATES:
            jobs.add_metric([state], states.count(state))
        yield jobs


def render(ctx: ControlContext) -> bytes:
    """The Prometheus text exposition of the daemon's metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(ctx))
    return generate_latest(registry)
