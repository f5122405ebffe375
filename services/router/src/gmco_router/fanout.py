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

Per call there remain one task (its call and its one failover) and gRPC's own call, about 0.3 ms of
router CPU however small the answer (the bare-gRPC floor in bench/bench_fanout.py), which is why calls, not
shards, are the unit of cost: shards listed at the same replicas (one process serving several logical
shards, ``GMCO_SHARD_SHARD_IDS``) form one :class:`Group` and get one call, whose request names them
(``SearchRequest.shard_ids``, checked by the shard) and whose results say which shard each came from
(``QueryResult.shard_ids``). The slot map stays the unit of placement: a logical shard moves between
processes by changing where it is listed. What a shard answered is decoded by the caller
(:func:`merge_columns`), all groups' columns at once.
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
Answers = dict[tuple[int, ...], Answer]  # keyed by a group's shard ids


@dataclass(frozen=True)
class Group:
    """Shards whose replicas are the same processes: one Search answers for all of them."""

    shard_ids: tuple[int, ...]
    replicas: ReplicaSet  # the first shard's (the others list the same targets)
    suffix: bytes  # the serialised ``shard_ids`` field, appended to every fan-out's request bytes

    @property
    def label(self) -> str:
        return shard_label(self.shard_ids)


def shard_label(ids: Sequence[int]) -> str:
    """``(3,)`` -> ``'3'``, ``(0, 1, 2)`` -> ``'0-2'``, else the ids joined by commas."""
    if len(ids) > 1 and list(ids) == list(range(ids[0], ids[0] + len(ids))):
        return f"{ids[0]}-{ids[-1]}"
    return ",".join(map(str, ids))


def groups_of(shards: dict[int, ReplicaSet]) -> list[Group]:
    """The shards grouped by their replicas' targets (a shard with no replica yet stays alone)."""
    by_targets: dict[frozenset[str] | int, list[int]] = {}
    for sid, rset in shards.items():
        key: frozenset[str] | int = frozenset(r.target for r in rset.replicas) or -1 - sid
        by_targets.setdefault(key, []).append(sid)
    return [Group(tuple(ids), shards[ids[0]], shard_service_pb2.SearchRequest(shard_ids=ids).SerializeToString())
            for ids in by_targets.values()]


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
        self._groups: list[Group] = []
        self._topology: tuple[int, ...] = ()

    def prepare(self, request: shard_service_pb2.SearchRequest) -> Prepared:
        return prepare(request, self._opts)

    def groups(self) -> list[Group]:
        """The current groups, recomputed when some shard's replica list has changed."""
        topology = tuple(rset.generation for rset in self._shards.values())
        if topology != self._topology:
            self._groups, self._topology = groups_of(self._shards), topology
        return self._groups

    async def search(self, prepared: Prepared) -> Answers:
        """Every group's answer (keyed by its shard ids), None for a group that could not answer (logged)."""
        loop = asyncio.get_running_loop()
        groups = {g.shard_ids: g for g in self.groups()}
        answers: Answers = {}
        owner: dict[asyncio.Future[shard_service_pb2.SearchResponse], tuple[int, ...]] = {}
        primaries: dict[tuple[int, ...], Replica] = {}
        delays: dict[tuple[int, ...], float] = {}
        running: dict[tuple[int, ...], int] = {}  # group -> calls still running for it
        for sid, group in groups.items():
            rset = group.replicas
            replica = rset.pick()
            if replica is None:
                log.warning("shard %s skipped: no healthy replica", group.label)
                answers[sid] = None
                continue
            primaries[sid] = replica
            task = loop.create_task(_call_with_failover(rset, replica, prepared, group.suffix))
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
                        group = groups[sid]
                        backup = group.replicas.pick(exclude=(primaries[sid],))
                        if backup is None:
                            continue
                        HEDGED.labels(str(group.replicas.shard_id)).inc()
                        hedge = loop.create_task(_on(backup, prepared, group.suffix))
                        owner[hedge] = sid
                        running[sid] += 1
                        pending.add(hedge)
        finally:
            for task in owner:
                task.cancel()
        for sid, exc in failures.items():
            if answers.get(sid) is None:
                log.warning("shard %s skipped: %s", groups[sid].label,
                            _reason(exc) if isinstance(exc, grpc.aio.AioRpcError) else exc)
        return answers


def _reason(exc: grpc.aio.AioRpcError) -> str:
    if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:  # e.g. the process serves other shards: say which
        return f"{exc.code().name}: {(exc.details() or '')[:300]}"
    return exc.code().name


def _on(replica: Replica, prepared: Prepared, suffix: bytes = b"") -> Awaitable[shard_service_pb2.SearchResponse]:
    """``prepared`` (plus the group's ``suffix``) on ``replica``, with its accounting (in flight, breaker,
    latency window)."""
    payload = prepared.payload + suffix
    return replica.invoke(lambda _stub: replica.search(payload, prepared.timeout, prepared.metadata))


async def _call_with_failover(rset: ReplicaSet, primary: Replica, prepared: Prepared, suffix: bytes = b""
                              ) -> shard_service_pb2.SearchResponse:
    try:
        return await _on(primary, prepared, suffix)
    except grpc.aio.AioRpcError:
        backup = rset.pick(exclude=(primary,))
        if backup is None:
            raise
        FAILOVERS.labels(str(rset.shard_id)).inc()
        return await _on(backup, prepared, suffix)


_EMPTY_IDS = np.empty(0, np.uint64)
_EMPTY_F32 = np.empty(0, np.float32)


def merge_columns(answers: Answers, row: int, limit: int, feature_dim: int = 0
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """The global top-``limit`` of query row ``row`` over every group's columnar answer, best score first,
    each media id once (its best-scored copy): (ids, scores, popularities, features, shard ids, feature
    version). Each answer's columns are joined as bytes and decoded once, not one array per shard.
    ``feature_dim`` is the width of the zero features given to candidates whose shard sent none."""
    results: list[shard_service_pb2.QueryResult] = []
    shard_ids: list[int] = []
    per_result = False  # some answer names each result's shard (a group of several logical shards)
    version = ""
    for sids, answer in answers.items():
        if answer is None or row >= len(answer.results):
            continue
        results.append(answer.results[row])
        shard_ids.append(sids[0])
        per_result = per_result or bool(answer.results[row].shard_ids)
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
    shards = (np.concatenate([np.frombuffer(r.shard_ids, "<u4").astype(np.int32)
                              if len(r.shard_ids) == 4 * n else np.full(n, sid, np.int32)
                              for r, sid, n in zip(results, shard_ids, counts.tolist(), strict=True)])
              if per_result else np.repeat(np.asarray(shard_ids, np.int32), counts))
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
