"""Data: embedding/coordinate files (memory-mapped) and the offline "places" task."""
from locdiff.data.files import DataError, ShardedArray, cache_dir, open_embeddings, read_coords

__all__ = ["DataError", "ShardedArray", "cache_dir", "open_embeddings", "read_coords"]
