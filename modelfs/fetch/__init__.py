"""Where cache and sources meet: chunk reads, single-flight fetches, read-ahead."""

from .chunks import Piece, chunk_count, chunk_extent, pieces
from .reader import ChunkReader, FetchConfig, ReaderStats, RemoteFile

__all__ = ["ChunkReader", "FetchConfig", "Piece", "ReaderStats", "RemoteFile", "chunk_count",
           "chunk_extent", "pieces"]
