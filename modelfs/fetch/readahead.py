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
window starts at `min_window` and doubles each time the reader has read half a
window since it last grew, up to `max_window`; a read that continues no stream
starts a new one, with no read-ahead until it proves sequential.

The window is kept full: whenever the reader has used `refill` bytes of it, that
much more is asked for. Refilling only once half the window was used leaves an
origin idle: requests asked for together end together, the reader drains them at
memory speed, and the next batch starts a whole request's latency later (on a
CDN-like origin, gaps of 30-140 ms between waves of requests). What a file's
read-ahead may ask for is capped by its caller (`cap`: its share of the memory
budget among the files being read at once): uncapped, 4 shards loaded at once
filled the budget with chunks read later and pushed out the ones read next.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ReadAheadConfig:
    min_window: int = 32 << 20
    max_window: int = 256 << 20
    forward_tolerance: int = 16 << 20
    backward_tolerance: int = 8 << 20
    max_streams: int = 8
    trigger: int = 3 << 20
    refill: int = 4 << 20


@dataclass(slots=True)
class _Stream:
    start: int
    next_offset: int
    window: int
    issued_until: int = 0  # read-ahead was requested up to here (exclusive)
    read: int = 0  # bytes its reads asked for
    grown_at: int = -1  # where the reader was when the window last grew (-1: not begun)

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

    def on_read(self, offset: int, end: int, file_size: int,
                cap: int | None = None) -> tuple[int, int] | None:
        """Record a read of [offset, end); return a byte range to fetch ahead, if any.
        `cap`: the most this file's read-ahead may ask for now (its share of memory)."""
        cfg = self.config
        top = cfg.max_window if cap is None else max(cfg.refill, min(cfg.max_window, cap))
        for i, s in enumerate(self.streams):
            if s.next_offset - cfg.backward_tolerance <= offset <= s.next_offset + cfg.forward_tolerance:
                self.streams.append(self.streams.pop(i))  # most recently used last
                s.next_offset = max(s.next_offset, end)
                s.read += end - offset
                if not s.sequential(cfg.trigger):
                    return None
                if s.issued_until >= file_size:
                    return None
                if s.grown_at < 0:  # read-ahead begins here
                    s.grown_at = s.next_offset
                elif s.next_offset - s.grown_at >= s.window // 2:
                    # Half a window read since it last grew: the reader keeps up, so double.
                    s.window = min(cfg.max_window, s.window * 2)
                    s.grown_at = s.next_offset
                window = min(s.window, top)
                if s.issued_until - s.next_offset > window - min(cfg.refill, window):
                    return None  # (nearly) full
                start = max(s.issued_until, s.next_offset)
                stop = min(file_size, s.next_offset + window)
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

    def streamed(self) -> int:
        """The most bytes one stream that proved sequential has read (0: none has):
        how far a reader has read in order. Any stream, not the latest: a header
        read at offset 0 after a loader's stream starts a stream of its own."""
        return max((s.read for s in self.streams if s.sequential(self.config.trigger)),
                   default=0)

    def position(self) -> int | None:
        """Where the most recent stream is reading (for prefetch ordering)."""
        return self.streams[-1].next_offset if self.streams else None
