"""Index backends behind one small interface; see :mod:`gmco_shard.index.base`."""

from gmco_shard.index.base import BACKENDS, VectorIndex, create_index
from gmco_shard.index.params import IndexParams

__all__ = ["BACKENDS", "IndexParams", "VectorIndex", "create_index"]
