"""The sealed segment in Milvus (pymilvus ``MilvusClient``): a remote Milvus by URI and token, or Milvus Lite
in a local ``.db`` file.

Each build makes a fresh collection ``<base>_<time_ns>``: ``row`` (the store's row number, primary key),
``media_id``, the vector, and the attribute fields of :mod:`gmco_shard.index.milvus_filter`. The store's
filtered searches arrive as a ``Filter`` translated into a boolean expression (Milvus cannot take a row
bitmap). Milvus errors are mapped to gmco_common errors with a message that says what to do; the raw
Milvus text is logged, and only errors in the input or the settings quote its first line.

Loading: a collection is created unloaded, filled, flushed, indexed and only then loaded. Milvus Lite
searches rows that were inserted into a loaded collection by brute force until the collection is released
and loaded again (load builds or reads each segment's HNSW index); building unloaded and loading once at
the end avoids that and a second, concurrent index build by Lite's background worker. A failed build drops
its collection. See docs/milvus.md, also for what a Milvus 2.3 server lacks (FLOAT16_VECTOR that works,
HNSW_SQ, GPU index types on its CPU build).
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from gmco_common.config import ConfigError
from gmco_common.context import call_timeout
from gmco_common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    GmcoError,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from pymilvus import DataType, MilvusClient
from pymilvus.client.types import Status
from pymilvus.exceptions import (
    ConnectError,
    ConnectionNotExistException,
    DataNotMatchException,
    DataTypeNotMatchException,
    MilvusException,
    MilvusUnavailableException,
    ParamError,
)
from pymilvus.grpc_gen import common_pb2 as milvus_common

from gmco_shard import bitmaps
from gmco_shard.columns import MAX_GENRES, AttributeColumns, empty_columns
from gmco_shard.index.base import FilteringIndex
from gmco_shard.index.milvus_filter import (
    FORMAT_BITS,
    GENRES,
    MASK_BITS,
    MEDIA_ID,
    RATING,
    REGION_BITS,
    ROW,
    VECTOR,
    YEAR,
    entity_rows,
    filter_expression,
    rows_expression,
)
from gmco_shard.index.params import IndexParams, MilvusParams

log = logging.getLogger(__name__)

_FILE = "milvus.json"
_INSERT_BATCH = 5000
# The search-breadth knob of each index type, which the request's ``ef`` sets (0 = the default).
_BREADTH = {"HNSW": "ef", "HNSW_SQ": "ef", "GPU_CAGRA": "itopk_size", "IVF_FLAT": "nprobe", "IVF_SQ8": "nprobe",
            "GPU_IVF_FLAT": "nprobe"}


# FLOAT16_VECTOR is a Milvus 2.4 feature. A 2.3 server accepts the field type, the rows and the queries,
# and returns wrong scores without an error (2.3.5: IP "distances" of 6.8e-41 or -3.2e10 where the true
# ones lie within +-10), so vector_type=auto stores float32 there. See docs/milvus.md.
FLOAT16_SINCE = (2, 4)


def server_release(version: str) -> tuple[int, int] | None:
    """(major, minor) of a Milvus version string such as ``v2.3.5-lite`` or ``2.4.13``; None if it has none."""
    m = re.match(r"v?(\d+)\.(\d+)", version.strip())
    return (int(m.group(1)), int(m.group(2))) if m else None


def vector_dtype(settings: MilvusParams, version: str | None = None) -> np.dtype:
    """The stored vector type: float32 on Milvus Lite (which has no FP16 vectors); FP16 on a Milvus server
    from 2.4 on (``version`` None: assume one) and float32 on older or unrecognised ones."""
    if settings.vector_type != "auto":
        return np.dtype(settings.vector_type)
    if settings.lite:
        return np.dtype(np.float32)
    release = server_release(version) if version is not None else FLOAT16_SINCE
    return np.dtype(np.float16 if release is not None and release >= FLOAT16_SINCE else np.float32)


def build_params(settings: MilvusParams, params: IndexParams) -> dict[str, Any]:
    """The index build parameters: the defaults of the index type, then GMCO_SHARD_MILVUS_INDEX_PARAMS."""
    defaults: dict[str, Any] = {
        "HNSW": {"M": params.hnsw.m, "efConstruction": params.hnsw.ef_construction},
        "HNSW_SQ": {"M": params.hnsw.m, "efConstruction": params.hnsw.ef_construction},
        "GPU_CAGRA": {"intermediate_graph_degree": 64, "graph_degree": 32},
        "IVF_FLAT": {"nlist": 1024}, "IVF_SQ8": {"nlist": 1024}, "GPU_IVF_FLAT": {"nlist": 1024},
    }.get(settings.index_type, {})
    defaults.update(settings.extra_build_params())
    return defaults


def milvus_error(exc: Exception, action: str, settings: MilvusParams, field: str = "",
                 setting: str = "") -> GmcoError:
    """A gmco_common error for a pymilvus/gRPC failure; the raw text goes to the log only. ``field``: the
    request field the call was made from; ``setting``: the settings it was made from alone (Milvus refusing
    it is then a configuration problem, whatever code it gives: 2.3.5 says 65535 for "invalid index type")."""
    log.warning("milvus %s failed: %s", action, exc)
    where = f"Milvus at {settings.uri}"
    if isinstance(exc, (MilvusUnavailableException, ConnectError, ConnectionNotExistException)) or (
            type(exc) is MilvusException and exc.code == Status.CONNECT_FAILED):
        return Unavailable(f"{where} is unreachable ({action}); check GMCO_SHARD_MILVUS_URI and that it runs, "
                           "then retry")
    code = exc.code() if isinstance(exc, grpc.RpcError) else getattr(exc, "code", None)
    if isinstance(code, grpc.StatusCode):  # a transport error, after pymilvus' own retries
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceeded(f"{where} did not answer {action} in time")
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return FailedPrecondition(f"{where} rejected the credentials; check GMCO_SHARD_MILVUS_TOKEN")
        return Unavailable(f"{where} is unreachable ({action}, {code.name}); retry")
    if not isinstance(exc, MilvusException):
        return Unavailable(f"{action} against {where} failed; see the shard log, then retry")
    legacy = exc.compatible_code
    if code == 100 or legacy == milvus_common.CollectionNotExists:
        return FailedPrecondition(f"{where} has no collection for this shard ({action}); it was dropped or the "
                                  "Milvus data was lost: rebuild it with Compact, or delete the snapshot and restart")
    if code == 8 or legacy in (milvus_common.RateLimit, milvus_common.ForceDeny):
        return ResourceExhausted(f"{where} is rate-limiting or denying {action}; retry later")
    if legacy in (milvus_common.MemoryQuotaExhausted, milvus_common.DiskQuotaExhausted, milvus_common.OutOfMemory,
                  milvus_common.InsufficientMemoryToLoad):
        return ResourceExhausted(f"{where} is out of memory or disk quota ({action}); free space or scale Milvus")
    if legacy == milvus_common.PermissionDenied:
        return FailedPrecondition(f"{where} refused {action}: check GMCO_SHARD_MILVUS_TOKEN and its privileges")
    if code == 101 or legacy in (milvus_common.NotReadyServe, milvus_common.NotReadyCoordActivating) \
            or exc.retriable:  # 101: collection not loaded
        return Unavailable(f"{where} is not ready for {action}; retry")
    reason = exc.message.splitlines()[0][:200] if exc.message else "invalid"
    if setting:
        return FailedPrecondition(f"{where} rejected {action} ({reason}); check {setting}")
    input_error = exc.is_input_error or isinstance(exc, (ParamError, DataNotMatchException,
                                                         DataTypeNotMatchException))
    if input_error or code == 1100 or legacy in (  # 1100: Milvus' "parameter invalid"
            milvus_common.IllegalArgument, milvus_common.IllegalTOPK, milvus_common.IllegalDimension,
            milvus_common.IllegalIndexType, milvus_common.IllegalMetricType):
        if field:
            return InvalidArgument(field, f"Milvus rejected it: {reason}")
        return FailedPrecondition(f"{where} rejected {action} ({reason}); check the GMCO_SHARD_MILVUS_* settings")
    return Unavailable(f"{action} against {where} failed (Milvus code {code}); see the shard log, then retry")


class MilvusIndex(FilteringIndex):
    name = "milvus"

    def __init__(self, dim: int, params: IndexParams) -> None:
        super().__init__(dim, params)
        if params.metric != "ip":
            raise ConfigError("the milvus backend supports GMCO_SHARD_METRIC=ip only (Milvus Lite and Milvus "
                              "report L2 distances differently)")
        if params.milvus is None:
            raise ConfigError("the milvus backend needs GMCO_SHARD_MILVUS_URI: a Milvus URI (http://host:19530) "
                              "or a Milvus Lite file path ending in .db")
        self.settings = params.milvus
        # Until a build asks the server its version (or a load reads the snapshot), assume a current server.
        self.vector_dtype = vector_dtype(self.settings)
        self.build_params = build_params(self.settings, params)
        self.collection: str | None = None
        self._client: MilvusClient | None = None

    # -- plumbing -------------------------------------------------------------------------------
    def _call(self, action: str, method: str, *args: Any, field: str = "", setting: str = "",
              build: bool = False, **kwargs: Any) -> Any:
        """``client.<method>(*args)`` with a deadline (the request's, or the build timeout for the slow steps
        of a build); Milvus failures become gmco_common errors."""
        timeout = self.settings.build_timeout_seconds if build else call_timeout(self.settings.timeout_seconds)
        try:
            if self._client is None:
                self._client = MilvusClient(uri=self.settings.uri, token=self.settings.token,
                                            timeout=self.settings.timeout_seconds)
            return getattr(self._client, method)(*args, timeout=timeout, **kwargs)
        except (MilvusException, grpc.RpcError) as exc:
            raise milvus_error(exc, action, self.settings, field, setting) from exc

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _schema(self):
        s = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        s.add_field(ROW, DataType.INT64, is_primary=True)
        s.add_field(MEDIA_ID, DataType.INT64)
        vtype = DataType.FLOAT16_VECTOR if self.vector_dtype == np.float16 else DataType.FLOAT_VECTOR
        s.add_field(VECTOR, vtype, dim=self.dim)
        s.add_field(GENRES, DataType.ARRAY, element_type=DataType.INT32, max_capacity=MAX_GENRES)
        s.add_field(RATING, DataType.INT32)
        s.add_field(REGION_BITS, DataType.ARRAY, element_type=DataType.INT32, max_capacity=MASK_BITS)
        s.add_field(FORMAT_BITS, DataType.ARRAY, element_type=DataType.INT32, max_capacity=MASK_BITS)
        s.add_field(YEAR, DataType.INT32)
        return s

    def _index_params(self):
        ip = MilvusClient.prepare_index_params()
        ip.add_index(VECTOR, index_type=self.settings.index_type, metric_type="IP", params=self.build_params)
        return ip

    def _count(self, collection: str) -> int:
        rows = self._call("count", "query", collection, filter="", output_fields=["count(*)"],
                          consistency_level="Strong")
        return int(rows[0]["count(*)"])

    def _stored_type(self) -> np.dtype:
        """The vector type a new collection gets: ``vector_dtype`` for this Milvus's version."""
        if self.settings.lite or self.settings.vector_type == "float32":
            return vector_dtype(self.settings)
        version = str(self._call("server version", "get_server_version"))
        if self.settings.vector_type == "float16" and (server_release(version) or (0, 0)) < FLOAT16_SINCE:
            raise FailedPrecondition(f"Milvus at {self.settings.uri} is {version}, whose FLOAT16_VECTOR returns "
                                     f"wrong scores (it works from {'.'.join(map(str, FLOAT16_SINCE))} on): set "
                                     "GMCO_SHARD_MILVUS_VECTOR_TYPE=auto or float32")
        dtype = vector_dtype(self.settings, version)
        if dtype != np.float16:
            log.info("milvus: %s stores float32 vectors (FLOAT16_VECTOR needs Milvus %s+)", version,
                     ".".join(map(str, FLOAT16_SINCE)))
        return dtype

    def _wait_indexed(self, collection: str, n: int) -> None:
        """A remote Milvus indexes sealed segments asynchronously: wait until all rows are indexed."""
        deadline = time.monotonic() + self.settings.build_timeout_seconds
        while True:
            info = self._call("describe index", "describe_index", collection, VECTOR)
            if int(info.get("indexed_rows", n)) >= n and int(info.get("pending_index_rows", 0)) == 0:
                return
            if time.monotonic() > deadline:  # a GPU index type on a CPU Milvus 2.3.5 never finishes (docs/milvus.md)
                raise Unavailable(f"Milvus at {self.settings.uri} has not finished indexing {collection} within "
                                  "GMCO_SHARD_MILVUS_BUILD_TIMEOUT_SECONDS; retry, or check that this Milvus can "
                                  f"build GMCO_SHARD_MILVUS_INDEX_TYPE={self.settings.index_type} (see its log)")
            time.sleep(0.5)

    # -- VectorIndex ----------------------------------------------------------------------------
    def build(self, vectors: np.ndarray, progress: bool = False) -> None:
        self.build_with_columns(vectors, empty_columns(vectors.shape[0]), progress)

    def build_with_columns(self, vectors: np.ndarray, cols: AttributeColumns, progress: bool = False) -> None:
        from tqdm import tqdm

        n = vectors.shape[0]
        self.vector_dtype = self._stored_type()
        name = f"{self.settings.collection}_{time.time_ns()}"
        # Created without index_params, so pymilvus does not load it (with them, create_collection also loads)
        # and it is filled unloaded: searches of rows inserted into a loaded collection are brute force (Milvus
        # Lite), and Lite's background worker would index the same segments a second time, concurrently with
        # load. (Loading and releasing the empty collection also cost a 2.3.5 server about 5 s per build.)
        self._call("create collection", "create_collection", name, schema=self._schema(),
                   consistency_level=self.settings.consistency)
        try:
            self._call("create index", "create_index", name, self._index_params(), build=True,
                       setting="GMCO_SHARD_MILVUS_INDEX_TYPE and GMCO_SHARD_MILVUS_INDEX_PARAMS")
            for start in tqdm(range(0, n, _INSERT_BATCH), desc="milvus insert", unit="batch",
                              disable=not progress):
                stop = min(n, start + _INSERT_BATCH)
                batch = entity_rows(vectors[start:stop], cols.take(np.arange(start, stop)), start,
                                    self.vector_dtype)
                self._call("insert", "insert", name, batch, build=True)
            self._call("flush", "flush", name, build=True)
            self._wait_indexed(name, n)
            self._call("load", "load_collection", name, build=True)
            got = self._count(name)
            if got != n:
                raise Unavailable(f"Milvus collection {name} holds {got} rows after the build, expected {n}; retry")
        except GmcoError:
            self._drop_quietly(name)  # a failed build leaves nothing behind in Milvus
            raise
        self.collection, self.count = name, n
        log.info("milvus: built %s (%d rows, %s, %s)", name, n, self.settings.index_type, self.build_params)

    def _drop_quietly(self, name: str) -> None:
        try:
            self._call("drop collection", "drop_collection", name)
        except GmcoError:
            log.warning("milvus: could not drop the collection %s of a failed build; drop it by hand", name)

    def retire(self) -> None:
        """Drop this index's collection: the store has replaced the segment (and waited for the searches
        that still read it). A snapshot that names it is then refused at load, and the replica rebuilds."""
        if self.collection is not None:
            self._call("drop collection", "drop_collection", self.collection)
            self.collection = None

    def search(self, queries, k, allow=None, ef=0):
        if allow is None:
            return self._search(queries, k, "", ef)
        return self._search(queries, k, rows_expression(bitmaps.to_bools(allow, self.count)), ef)

    def search_filter(self, queries, k, flt, hidden_rows, ef=0):
        return self._search(queries, k, filter_expression(flt, hidden_rows), ef)

    def _search(self, queries: np.ndarray, k: int, expr: str, ef: int) -> tuple[np.ndarray, np.ndarray]:
        if self.collection is None:
            raise FailedPrecondition("the milvus index has not been built or loaded yet")
        q = np.ascontiguousarray(queries, dtype=self.vector_dtype)
        breadth = _BREADTH.get(self.settings.index_type)
        search_params: dict[str, Any] = {"metric_type": "IP", "params": {}}
        if breadth == "ef":
            search_params["params"]["ef"] = max(ef or self.params.hnsw.ef_search, k)
        elif breadth is not None and ef:
            search_params["params"][breadth] = max(ef, k) if breadth == "itopk_size" else ef
        hits = self._call("search", "search", self.collection, data=list(q), limit=k, filter=expr,
                          output_fields=[ROW], search_params=search_params,
                          consistency_level=self.settings.consistency, field="params.ef")
        scores = np.full((q.shape[0], k), -np.inf, np.float32)
        rows = np.full((q.shape[0], k), -1, np.int64)
        for i, found in enumerate(hits):
            for j, hit in enumerate(found[:k]):
                rows[i, j] = hit.id
                scores[i, j] = hit.distance
        return scores, rows

    def save(self, directory: Path) -> None:
        if self.collection is None:
            raise FailedPrecondition("the milvus index has not been built yet; nothing to snapshot")
        meta = {"collection": self.collection, "count": self.count, "index_type": self.settings.index_type,
                "vector_type": str(self.vector_dtype)}
        (directory / _FILE).write_text(json.dumps(meta))

    def load(self, directory: Path, vectors: np.ndarray | None) -> None:
        """Reconnect to the snapshot's collection (its data lives in Milvus, not in the snapshot)."""
        assert vectors is not None
        meta = json.loads((directory / _FILE).read_text())
        name = meta["collection"]
        if not self._call("check collection", "has_collection", name):
            raise FailedPrecondition(f"Milvus at {self.settings.uri} has no collection {name}, which snapshot "
                                     f"{directory} uses; delete the snapshot to rebuild from the catalogue")
        self._call("load", "load_collection", name, build=True)
        got = self._count(name)
        self.vector_dtype = np.dtype(meta["vector_type"])  # the collection's, whatever the settings say now
        if got != vectors.shape[0]:
            raise FailedPrecondition(f"Milvus collection {name} holds {got} rows but snapshot {directory} has "
                                     f"{vectors.shape[0]} sealed rows; delete the snapshot to rebuild")
        self.collection, self.count = name, got

    @property
    def nbytes(self) -> int:
        # Held by Milvus, not by the shard: vectors plus (for graph indexes) ~2*M int32 links per row.
        links = 2 * int(self.build_params.get("M", self.build_params.get("graph_degree", 0))) * 4
        return self.count * (self.dim * self.vector_dtype.itemsize + links)
