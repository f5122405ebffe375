"""Scatter-gather of one shard Search to every shard, at as little router CPU per shard as possible.

A miss calls every shard, so whatever the router spends per call is multiplied by the shard count
(bench/bench_fanout.py, docs/benchmarks.md "Router fan-out"). Per fan-out, not per shard:

- the request is serialised once; every call sends the same bytes (a Search multicallable without a
  request serialiser);
- the call metadata (request id, trace context, bearer token) and the timeout (the caller's remaining
  deadline capped by the default) are computed once, which is what the channel interceptor would have
  computed for each call; the Search calls use a channel of their own per replica without the
  interceptor, with the same options, so gRPC shares the TCP connection with the replica's other channel;
- one ``asyncio.wait`` over all calls serves every shard's hedge timer: a shard whose call is still
  running when its replica's hedge delay has passed gets a second call on another replica, first success
  wins (the other is cancelled); a failed call is retried once on another replica (ReplicaSet.call's rules,
  which the other shard calls keep using).

Per shard there remain one task (its call and its one failover) and gRPC's own call. What a shard
answered is decoded by the caller (:func:`merge_columns`), all shards' columns at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
from gmco.shard.v1 import shard_service_pb2
from gmco_common.channels import ChannelOptions
from gmco_common.context import REQUEST_ID_HEADER, call_timeout, request_id_var
from opentelemetry import propagate

from gmco_router.replicas import FAILOVERS, HEDGED, Replica, ReplicaSet

log = logging.getLogger(__name__)

Answer = shard_service_pb2.SearchResponse | None


@dataclass(frozen=True)
class Prepared:
    """One fan-out's request: serialised once, with the metadata and timeout every call carries."""

    payload: bytes
    metadata: tuple[tuple[str, str], ...]
    timeout: float | None


def prepare(request: shard_service_pb2.SearchRequest, opts: ChannelOptions) -> Prepared:
    metadata: list[tuple[str, str]] = []
    rid = request_id_var.get()
    if rid:
        metadata.append((REQUEST_ID_HEADER, rid))
    if opts.auth_token:
        metadata.append(("authorization", f"Bearer {opts.auth_token}"))
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    metadata.extend(carrier.items())
    return Prepared(request.SerializeToString(), tuple(metadata), call_timeout(opts.default_timeout))


class FanOut:
    """Sends one prepared Search to one replica of every shard of ``shards`` and gathers the answers."""

    def __init__(self, shards: dict[int, ReplicaSet], opts: ChannelOptions) -> None:
        self._shards = shards
        self._opts = opts

    def prepare(self, request: shard_service_pb2.SearchRequest) -> Prepared:
        return prepare(request, self._opts)

    async def search(self, prepared: Prepared) -> dict[int, Answer]:
        """Every shard's answer, None for a shard that could not answer (logged)."""
        loop = asyncio.get_running_loop()
        answers: dict[int, Answer] = {}
        owner: dict[asyncio.Future[shard_service_pb2.SearchResponse], int] = {}
        primaries: dict[int, Replica] = {}
        delays: dict[int, float] = {}
        running: dict[int, int] = {}  # shard -> calls still running for it
        for sid, rset in self._shards.items():
            replica = rset.pick()
            if replica is None:
                log.warning("shard %s skipped: no healthy replica", sid)
                answers[sid] = None
                continue
            primaries[sid] = replica
            task = loop.create_task(_call_with_failover(rset, replica, prepared))
            owner[task] = sid
            running[sid] = 1
            delay = rset.hedge_delay(replica)
            if delay is not None:
                delays[sid] = delay
        start = loop.time()
        pending = set(owner)
        failures: dict[int, BaseException] = {}
        try:
            while pending:
                timeout = min(delays.values()) - (loop.time() - start) if delays else None
                # While a hedged pair runs, wake at its first answer (to cancel the other call); else at the end.
                pair = any(n > 1 for n in running.values())
                done, pending = await asyncio.wait(
                    pending, timeout=None if timeout is None else max(0.0, timeout),
                    return_when=asyncio.FIRST_COMPLETED if pair else asyncio.ALL_COMPLETED)
                for task in done:
                    sid = owner.pop(task, None)
                    if sid is None:
                        continue  # the other call of a pair that was answered in this same round
                    running[sid] -= 1
                    if sid in answers:
                        continue
                    exc = task.exception()
                    if exc is None:
                        answers[sid] = task.result()
                        delays.pop(sid, None)
                        running[sid] = 0
                        for other, osid in list(owner.items()):  # the other call of a hedged pair
                            if osid == sid:
                                other.cancel()
                                del owner[other]
                                pending.discard(other)
                    elif running[sid] == 0:
                        failures[sid] = exc
                        answers[sid] = None
                        delays.pop(sid, None)
                    else:
                        failures[sid] = exc  # the other of the pair may still succeed
                if delays:
                    elapsed = loop.time() - start
                    for sid in [s for s, d in delays.items() if d <= elapsed]:
                        del delays[sid]  # hedged at most once
                        if sid in answers:
                            continue
                        backup = self._shards[sid].pick(exclude=(primaries[sid],))
                        if backup is None:
                            continue
                        HEDGED.labels(str(sid)).inc()
                        hedge = loop.create_task(_on(backup, prepared))
                        owner[hedge] = sid
                        running[sid] += 1
                        pending.add(hedge)
        finally:
            for task in owner:
                task.cancel()
        for sid, exc in failures.items():
            if answers.get(sid) is None:
                log.warning("shard %s skipped: %s", sid,
                            exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else exc)
        return answers


def _on(replica: Replica, prepared: Prepared) -> Awaitable[shard_service_pb2.SearchResponse]:
    """``prepared`` on ``replica``, with its accounting (in flight, breaker, latency window)."""
    return replica.invoke(lambda _stub: replica.search(prepared.payload, prepared.timeout, prepared.metadata))


async def _call_with_failover(rset: ReplicaSet, primary: Replica, prepared: Prepared
                              ) -> shard_service_pb2.SearchResponse:
    try:
        return await _on(primary, prepared)
    except grpc.aio.AioRpcError:
        backup = rset.pick(exclude=(primary,))
        if backup is None:
            raise
        FAILOVERS.labels(str(rset.shard_id)).inc()
        return await _on(backup, prepared)


_EMPTY_IDS = np.empty(0, np.uint64)
_EMPTY_F32 = np.empty(0, np.float32)


def merge_columns(answers: dict[int, Answer], row: int, limit: int, feature_dim: int = 0
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """The global top-``limit`` of query row ``row`` over every shard's columnar answer, best score first,
    each media id once (its best-scored copy): (ids, scores, popularities, features, shard ids, feature
    version). Each shard's columns are joined as bytes and decoded once, not one array per shard.
    ``feature_dim`` is the width of the zero features given to candidates whose shard sent none."""
    results: list[shard_service_pb2.QueryResult] = []
    shard_ids: list[int] = []
    version = ""
    for sid, answer in answers.items():
        if answer is None or row >= len(answer.results):
            continue
        results.append(answer.results[row])
        shard_ids.append(sid)
        if not version:
            version = answer.feature_version
    if not results:
        return (_EMPTY_IDS, _EMPTY_F32, _EMPTY_F32, np.zeros((0, feature_dim), np.float32),
                np.empty(0, np.int32), version)
    id_bytes = [r.media_ids for r in results]
    counts = np.fromiter((len(b) >> 3 for b in id_bytes), np.int64, len(results))
    ids = np.frombuffer(b"".join(id_bytes), "<u8")
    scores = np.frombuffer(b"".join([r.scores for r in results]), "<f4")
    pops = np.frombuffer(b"".join([r.popularities for r in results]), "<f4")
    feats = _features(results, counts, feature_dim)
    shards = np.repeat(np.asarray(shard_ids, np.int32), counts)
    order = np.argsort(-scores, kind="stable")
    _, first = np.unique(ids[order], return_index=True)  # the best-scored copy of each id
    keep = order[np.sort(first)][:limit]
    return ids[keep], scores[keep], pops[keep], feats[keep], shards[keep], version


def _features(results: Sequence[shard_service_pb2.QueryResult], counts: np.ndarray, feature_dim: int) -> np.ndarray:
    dims = {r.features.dimension for r, n in zip(results, counts.tolist(), strict=True) if n and r.features.count}
    if len(dims) == 1 and all(r.features.count or not n for r, n in zip(results, counts.tolist(), strict=True)):
        dim = dims.pop()
        return np.frombuffer(b"".join([r.features.data for r in results]), "<f4").reshape(int(counts.sum()), dim)
    # Some shard sent no features (or another width): zeros of the widest width for those rows.
    dim = max(dims | {feature_dim})
    out = np.zeros((int(counts.sum()), dim), np.float32)
    at = 0
    for r, n in zip(results, counts.tolist(), strict=True):
        if n and r.features.count and r.features.dimension == dim:
            out[at:at + n] = np.frombuffer(r.features.data, "<f4").reshape(n, dim)
        at += n
    return out
