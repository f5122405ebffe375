from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from gmco_common.datagen import Catalogue, generate_catalogue
from gmco_shard.columns import columns_from_catalogue
from gmco_shard.index.params import HnswParams, IndexParams
from gmco_shard.store import ShardStore
from shard_testkit import DIM, write_catalogue


@pytest.fixture(scope="session")
def small_catalogue() -> Catalogue:
    return generate_catalogue(3000, dim=DIM, n_clusters=12, seed=11)


@pytest.fixture(scope="session")
def catalogue_dir(small_catalogue, tmp_path_factory) -> Path:
    """``small_catalogue`` on disk, as a shard's GMCO_SHARD_DATA_DIR."""
    return write_catalogue(small_catalogue, tmp_path_factory.mktemp("catalogue"))


@pytest.fixture
def make_store(small_catalogue) -> Callable[..., ShardStore]:
    def make(backend: str = "exact", **kw) -> ShardStore:
        params = kw.pop("params", IndexParams(hnsw=HnswParams(m=16, ef_construction=80, ef_search=64)))
        store = ShardStore(DIM, backend, params, **kw)
        store.bulk_load(np.asarray(small_catalogue.vectors), columns_from_catalogue(small_catalogue))
        return store

    return make
