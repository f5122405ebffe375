"""A background index build leaves searches a core: seal, merge and compact run their faiss work on
``maintenance_threads`` OpenMP threads, while a build on another thread keeps every core."""

from __future__ import annotations

import subprocess
import sys
import textwrap
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


def test_a_background_build_without_faiss_leaves_it_unloaded() -> None:
    """The exact backend needs no faiss, and a background seal must not import it just to cap its threads:
    the import costs about 40 MB of RSS, which the soak saw as every shard growing 25 % at its first seal.
    In a fresh interpreter, since this one has faiss loaded already."""
    code = textwrap.dedent("""
        import sys, threading
        import numpy as np
        from gmco.common.v1 import common_pb2
        from gmco_shard.index.params import IndexParams
        from gmco_shard.store import ShardStore
        store = ShardStore(8, "exact", IndexParams(), seal_rows=100, maintenance_threads=1)
        store.upsert(np.arange(150, dtype=np.uint64), np.ones((150, 8), np.float32),
                     [common_pb2.MediaAttributes()] * 150)
        worker = threading.Thread(target=store.maintain)
        worker.start()
        worker.join()
        print(len(store._sealed), "faiss" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["1", "False"]  # sealed, and faiss never loaded
