"""Read-ahead windows: grow while sequential, per file, across interleaved streams."""

from __future__ import annotations

import itertools

from modelfs.fetch.readahead import ReadAheadConfig, StreamTracker

MiB = 1 << 20
CFG = ReadAheadConfig(min_window=8 * MiB, max_window=64 * MiB, forward_tolerance=16 * MiB,
                      backward_tolerance=2 * MiB, max_streams=3, trigger=2 * MiB)
SIZE = 1 << 30


def run(t: StreamTracker, reads: list[int], size: int = MiB) -> list[tuple[int, int]]:
    out = []
    for off in reads:
        r = t.on_read(off, off + size, SIZE)
        if r:
            out.append(r)
    return out


def test_first_read_fetches_nothing_ahead() -> None:
    assert StreamTracker(CFG).on_read(0, MiB, SIZE) is None


def test_window_grows_while_sequential_and_covers_everything_once() -> None:
    t = StreamTracker(CFG)
    issued = run(t, [i * MiB for i in range(300)])
    assert issued[0] == (2 * MiB, 10 * MiB)
    sizes = [b - a for a, b in issued]
    assert max(sizes) <= 64 * MiB
    for (_, b), (c, _) in itertools.pairwise(issued):
        assert b == c  # contiguous, nothing asked twice
    assert t.streams[0].window == 64 * MiB  # grew


def test_seek_starts_a_new_stream_without_read_ahead() -> None:
    t = StreamTracker(CFG)
    run(t, [0, MiB, 2 * MiB])
    assert t.on_read(500 * MiB, 501 * MiB, SIZE) is None
    assert t.on_read(501 * MiB, 502 * MiB, SIZE) == (502 * MiB, 510 * MiB)


def test_interleaved_streams_and_small_jumps_stay_sequential() -> None:
    t = StreamTracker(CFG)
    a = [i * MiB for i in range(10)]
    b = [700 * MiB + i * MiB for i in range(10)]
    issued = run(t, [x for pair in zip(a, b, strict=True) for x in pair])
    assert any(s < 100 * MiB for s, _ in issued)
    assert any(s > 700 * MiB for s, _ in issued)
    # page faults a little out of order still count as the same stream
    t2 = StreamTracker(CFG)
    assert run(t2, [0, 2 * MiB, MiB, 4 * MiB, 3 * MiB, 6 * MiB]) != []
    assert len(t2.streams) == 1


def test_stream_count_is_bounded_and_end_of_file_clips() -> None:
    t = StreamTracker(CFG)
    for k in range(10):
        t.on_read(k * 100 * MiB, k * 100 * MiB + MiB, SIZE)
    assert len(t.streams) == 3
    small = StreamTracker(CFG)
    assert small.on_read(0, MiB, 3 * MiB) is None
    assert small.on_read(MiB, 2 * MiB, 3 * MiB) == (2 * MiB, 3 * MiB)
    assert small.on_read(2 * MiB, 3 * MiB, 3 * MiB) is None


def test_a_probe_and_the_kernels_own_read_ahead_do_not_trigger_read_ahead() -> None:
    t = StreamTracker(ReadAheadConfig())  # defaults: trigger after 3 MiB in a row
    assert t.on_read(0, MiB, SIZE) is None  # the read
    assert t.on_read(MiB, 2 * MiB, SIZE) is None  # the kernel's read-ahead of it
    assert t.on_read(2 * MiB, 3 * MiB, SIZE) == (3 * MiB, 35 * MiB)  # a reader going on


def test_random_reads_are_no_stream() -> None:
    """Random 1 MiB reads often land within a stream's tolerance of another one
    (8 streams, 24 MiB of tolerance each); they jump ahead of what they read, so
    they prove no stream and fetch little ahead (before this rule: 0.9 GiB sparse
    and 2.4 GiB dense here, most of it never read)."""
    import random

    def issued(region: int) -> int:
        t = StreamTracker(ReadAheadConfig())
        blocks = random.Random(3).sample(range(region), 256)
        return sum(b - a for a, b in run(t, [b * MiB for b in blocks]))

    assert issued(1024) <= 128 * MiB  # 256 of 1,024 blocks
    assert issued(256) <= 512 * MiB  # every block of 256 MiB: whatever lands past it is waste


def test_the_window_is_kept_full_within_its_cap() -> None:
    """Once the reader has used `refill` bytes of the window, that much more is
    asked for (requests go out as the reader moves, not in waves that end
    together); a cap (the file's share of memory) bounds what is ahead."""
    t = StreamTracker(CFG)
    run(t, [i * MiB for i in range(200)])  # grown to 64 MiB
    s = t.streams[0]
    for i in range(200, 300):
        t.on_read(i * MiB, (i + 1) * MiB, SIZE)
        ahead = s.issued_until - s.next_offset
        assert s.window - CFG.refill <= ahead <= s.window, (i, ahead)
    for i in range(300, 400):
        t.on_read(i * MiB, (i + 1) * MiB, SIZE, cap=16 * MiB)
    assert s.issued_until - s.next_offset <= 64 * MiB  # asked before the cap, not more
    for i in range(400, 500):
        t.on_read(i * MiB, (i + 1) * MiB, SIZE, cap=16 * MiB)
        assert s.issued_until - s.next_offset <= 16 * MiB
