"""Index backends behind one small interface; see :mod:`gmco_shard.index.base`."""

from gmco_shard.index.base import BACKENDS, IndexParams, VectorIndex, create_index

__all__ = ["BACKENDS", "IndexParams", "VectorIndex", "create_index"]
