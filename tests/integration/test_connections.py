"""Adaptive connections through a real mount: on the loopback origin, where the
daemon's CPU is the limit, the window stays small; when the origin caps each
connection (a far CDN), it grows while the throughput does."""

from __future__ import annotations

import random

from modelfs.testing.origin import Origin

from ..conftest import MiB


def _cold_cat(m, path: str) -> int:  # type: ignore[no-untyped-def]
    with open(m.p(path), "rb", buffering=0) as f:
        while f.read(1 << 20):
            pass
    with m.client() as c:
        return int(c.status()["fetch"]["connections"])


def test_the_window_grows_only_where_connections_are_capped(mount_factory,
                                                            origin: Origin) -> None:
    origin.put_file("org/big", "main", "a.bin", random.Random(7).randbytes(96 * MiB))
    # Long enough at 1 MB/s per connection for the window to climb (a step is judged
    # every 0.25 s, and one that did not pay holds it for 2.5 s).
    origin.put_file("org/big", "main", "b.bin", random.Random(8).randbytes(192 * MiB))
    m = mount_factory(["org/big"])
    loopback = _cold_cat(m, "org/big/a.bin")
    origin.throttle = 1e6  # bytes per second per connection
    try:
        capped = _cold_cat(m, "org/big/b.bin")
    finally:
        origin.throttle = 0.0
    print(f"\nconnections in use: loopback {loopback}, 1 MB/s per connection {capped}")
    # From 16: on loopback a step pays only while the stream ramps up; capped, each does.
    assert loopback <= 36
    assert capped >= 54  # 16 -> 24 -> 36 -> 54 -> 64
