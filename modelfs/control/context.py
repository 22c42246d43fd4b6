"""What the control API serves from: the job manager, the reader's counters and
the mount's description, and the origin throughput sampled once a second."""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from ..cache import ChunkCache
from ..fetch import ChunkReader
from ..fetch.plans import Plans
from ..jobs import JobManager
from ..types import RemoteFile


class Throughput:
    """Origin bytes per second over the last `window` seconds, sampled once a second."""

    def __init__(self, reader: ChunkReader, window: int = 5) -> None:
        self._reader = reader
        self._samples: deque[tuple[float, int]] = deque(maxlen=window + 1)

    async def run(self) -> None:
        while True:
            self._samples.append((trio.current_time(), self._reader.statistics().bytes_fetched))
            await trio.sleep(1.0)

    def rate(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0


@dataclass(slots=True)
class ControlContext:
    """What the API serves from. `describe()` gives the mount part of the status."""

    jobs: JobManager
    reader: ChunkReader
    cache: ChunkCache
    describe: Callable[[], dict[str, Any]]
    started: float = field(default_factory=time.time)
    throughput: Throughput | None = None
    plans: Plans | None = None  # span plans (`fetch/plans.py`): with a mount
    resolve: Callable[[str], RemoteFile | None] = lambda _path: None  # mount path -> file

    def _tier(self) -> dict[str, Any]:
        tier = self.reader.tier
        fields = ("hits", "misses", "damaged", "errors", "bytes_read", "bytes_written",
                  "writes_skipped", "writes_refused", "lease_waits", "lease_wait_hits")
        if tier is None:
            return {"url": None, **dict.fromkeys(fields, 0)}
        return {"url": tier.url, **{k: getattr(tier.stats, k) for k in fields}}

    def status(self) -> dict[str, Any]:
        """`/v1/status` (`schema.STATUS`)."""
        s = self.reader.statistics()
        cache = self.cache
        states = [j.state for j in self.jobs.jobs.values()]
        return {
            **self.describe(),
            "pid": os.getpid(),
            "started": self.started,
            "cache": {"usage_bytes": cache.index.usage(), "limit_bytes": cache.config.limit,
                      "compression": cache.config.compression},
            "reads": {"hits": s.hits, "misses": s.misses, "bytes_served": s.bytes_served,
                      "chunk_loads": s.loads, "chunk_loads_ahead": s.loads_ahead},
            "fetch": {"bytes_fetched": s.bytes_fetched, "fetches": s.fetches,
                      "in_flight": s.in_flight, "errors": s.errors,
                      "requests": {name.lower(): n for name, n in
                                   self.reader.scheduler.statistics().granted.items()},
                      "connections": self.reader.scheduler.window.size,
                      "max_connections": self.reader.scheduler.config.max_fetches,
                      "throughput_bytes_per_s": round(self.throughput.rate()
                                                      if self.throughput else 0.0)},
            "shared_cache": self._tier(),
            "memory": self.reader.memory(),
            "jobs": {state: states.count(state) for state in sorted(set(states))},
        }
