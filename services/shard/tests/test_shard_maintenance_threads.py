"""A background index build leaves searches a core: seal, merge and compact run their faiss work on
``maintenance_threads`` OpenMP threads, while a build on another thread keeps every core."""

from __future__ import annotations

import threading

import faiss
import numpy as np
import pytest
from gmco.common.v1 import common_pb2


@pytest.mark.parametrize("step", ["seal", "compact"])
def test_background_builds_use_the_maintenance_threads_only(small_catalogue, make_store, step) -> None:
    store = make_store("ivf", seal_rows=100, maintenance_threads=1)
    vectors = np.asarray(small_catalogue.vectors)
    store.upsert(np.arange(90_000, 90_150, dtype=np.uint64), vectors[:150], [common_pb2.MediaAttributes()] * 150)
    seen: list[int] = []
    build = store._seal

    def recording(*args, **kw):
        seen.append(faiss.omp_get_max_threads())
        return build(*args, **kw)

    store._seal = recording  # type: ignore[method-assign]
    everywhere = faiss.omp_get_max_threads()
    worker = threading.Thread(target=store.maintain if step == "seal" else store.compact)
    worker.start()
    worker.join()
    assert seen == [1]
    assert faiss.omp_get_max_threads() == everywhere  # the caller's own builds are not capped
    if everywhere > 1:
        store.maintenance_threads = everywhere
        store.upsert(np.arange(91_000, 91_100, dtype=np.uint64), vectors[:100], [common_pb2.MediaAttributes()] * 100)
        seen.clear()
        store.compact()
        assert seen == [everywhere]
