"""Sequential-stream detection and read-ahead windows (sans-I/O).

Streams are tracked per file version (content id), not per handle: several
processes sharing one descriptor, or a loader faulting pages from several
threads, still look sequential. Up to `max_streams` interleaved streams per
file are followed. A read continues a stream when it starts at most
`forward_tolerance` after, or `backward_tolerance` before, where the stream's
last read ended (kernel read-ahead and page faults arrive slightly out of
order). Read-ahead starts once a stream has read `trigger` bytes, covering at
least half of its span: one small read makes the kernel ask for its own
read-ahead (1 MiB) too, which must not look like a sequential reader, and random
reads that land within a stream's tolerance jump ahead of what they read. The
window starts at `min_window` and doubles each time the reader has consumed half
of what was fetched ahead, up to `max_window`; a read that continues no stream
starts a new one, with no read-ahead until it proves sequential.

Measured and not kept (docs/benchmarks.md, "A CDN-like origin"): keeping the
window full as the reader moves, and a first window of 32 MiB. Each made a cold
`cat` on a CDN-like origin faster (0.74 -> 0.57 s together with a wider
connection window), and each made 4 shards loaded at once in tensor-name order
slower (1.2-1.3x): offset-order read-ahead beside the loader-order prefetch
filled the memory budget, and most chunks were read back from disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ReadAheadConfig:
    min_window: int = 8 << 20
    max_window: int = 256 << 20
    forward_tolerance: int = 16 << 20
    backward_tolerance: int = 8 << 20
    max_streams: int = 8
    trigger: int = 3 << 20


@dataclass(slots=True)
class _Stream:
    start: int
    next_offset: int
    window: int
    issued_until: int = 0  # read-ahead was requested up to here (exclusive)
    read: int = 0  # bytes its reads asked for

    def sequential(self, trigger: int) -> bool:
        """`trigger` bytes read, and at least half of the span they cover: random
        reads that happen to land within a stream's tolerance (dense ones over a
        small region often do) jump ahead of what they read, and are no stream.
        Neither is one small read and the kernel's own read-ahead of it."""
        return self.read >= trigger and 2 * self.read >= self.next_offset - self.start


@dataclass(slots=True)
class StreamTracker:
    """The streams of one file."""

    config: ReadAheadConfig
    streams: list[_Stream] = field(default_factory=list)

    def on_read(self, offset: int, end: int, file_size: int) -> tuple[int, int] | None:
        """Record a read of [offset, end); return a byte range to fetch ahead, if any."""
        cfg = self.config
        for i, s in enumerate(self.streams):
            if s.next_offset - cfg.backward_tolerance <= offset <= s.next_offset + cfg.forward_tolerance:
                self.streams.append(self.streams.pop(i))  # most recently used last
                s.next_offset = max(s.next_offset, end)
                s.read += end - offset
                if not s.sequential(cfg.trigger):
                    return None
                if s.issued_until - s.next_offset >= s.window // 2 or s.issued_until >= file_size:
                    return None  # still well covered
                if s.issued_until > s.next_offset:
                    # The reader consumed half of what was asked for: it keeps up, so double.
                    s.window = min(cfg.max_window, s.window * 2)
                start = max(s.issued_until, s.next_offset)
                stop = min(file_size, s.next_offset + s.window)
                s.issued_until = stop
                return (start, stop) if start < stop else None
        if len(self.streams) >= cfg.max_streams:
            self.streams.pop(0)
        self.streams.append(_Stream(start=offset, next_offset=end, window=cfg.min_window,
                                    issued_until=end, read=end - offset))
        return None

    def ahead(self) -> tuple[int, int] | None:
        """The next `window` bytes of the most recent stream, once it has proved
        sequential: what it will read next."""
        if not self.streams:
            return None
        s = self.streams[-1]
        if not s.sequential(self.config.trigger):
            return None
        return s.next_offset, s.next_offset + s.window

    def position(self) -> int | None:
        """Where the most recent stream is reading (for prefetch ordering)."""
        return self.streams[-1].next_offset if self.streams else None
