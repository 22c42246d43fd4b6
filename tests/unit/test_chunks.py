"""Chunk arithmetic: pure functions, checked by property."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modelfs.chunks import Piece, chunk_count, chunk_extent, pieces


def test_examples() -> None:
    assert pieces(0, 10, 100, 16) == [Piece(0, 0, 10)]
    assert pieces(10, 10, 100, 16) == [Piece(0, 10, 16), Piece(1, 0, 4)]
    assert pieces(90, 50, 100, 16) == [Piece(5, 10, 16), Piece(6, 0, 4)]
    assert pieces(100, 5, 100, 16) == []
    assert chunk_count(0, 16) == 0
    assert chunk_count(100, 16) == 7
    assert chunk_extent(6, 100, 16) == (96, 4)
    with pytest.raises(ValueError, match="outside"):
        chunk_extent(7, 100, 16)


@given(file_size=st.integers(0, 10_000), chunk=st.sampled_from([1, 7, 64, 4096]),
       offset=st.integers(0, 11_000), size=st.integers(0, 5_000))
def test_pieces_cover_exactly_the_clipped_range(file_size: int, chunk: int, offset: int,
                                               size: int) -> None:
    ps = pieces(offset, size, file_size, chunk)
    covered = [p.index * chunk + i for p in ps for i in range(p.start, p.end)]
    assert covered == list(range(offset, min(offset + size, file_size)))
    for p in ps:
        start, length = chunk_extent(p.index, file_size, chunk)
        assert 0 <= p.start < p.end <= length
        assert start == p.index * chunk
