"""Where cache and sources meet: chunk reads, single-flight fetches, scheduling,
read-ahead and whole-file prefetch."""

from .prefetch import (
    WEIGHT_PATTERNS,
    OpenPrefetcher,
    PrefetchConfig,
    matches,
    next_shard,
    prefetch_file,
)
from .readahead import ReadAheadConfig, StreamTracker
from .reader import ChunkReader, FetchConfig, Got
from .scheduler import FetchScheduler, Priority, SchedulerConfig
from .snapshots import load_snapshot
from .stats import LATENCY_BUCKETS, ReaderStats

__all__ = [
    "LATENCY_BUCKETS", "WEIGHT_PATTERNS", "ChunkReader", "FetchConfig", "FetchScheduler", "Got",
    "OpenPrefetcher",
    "PrefetchConfig", "Priority", "ReadAheadConfig", "ReaderStats", "SchedulerConfig",
    "StreamTracker", "load_snapshot", "matches", "next_shard",
    "prefetch_file",
]
