"""Where cache and sources meet: chunk reads, single-flight fetches, scheduling,
read-ahead and whole-file prefetch."""

from ..chunks import Piece, chunk_count, chunk_extent, pieces
from .prefetch import WEIGHT_PATTERNS, OpenPrefetcher, PrefetchConfig, matches, prefetch_file
from .readahead import ReadAheadConfig, StreamTracker
from .reader import LATENCY_BUCKETS, ChunkReader, FetchConfig, ReaderStats
from .scheduler import FetchScheduler, Priority, SchedulerConfig
from .snapshots import load_snapshot

__all__ = [
    "LATENCY_BUCKETS", "WEIGHT_PATTERNS", "ChunkReader", "FetchConfig", "FetchScheduler",
    "OpenPrefetcher", "Piece",
    "PrefetchConfig", "Priority", "ReadAheadConfig", "ReaderStats", "SchedulerConfig",
    "StreamTracker", "chunk_count", "chunk_extent", "load_snapshot", "matches", "pieces",
    "prefetch_file",
]
