"""The RLStateService handlers: validation, then the store and the ranking policy."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np
from gmco.common.v1 import common_pb2
from gmco.rl_state.v1 import rl_state_service_pb2 as pb
from gmco.rl_state.v1 import rl_state_service_pb2_grpc
from gmco_common.errors import FailedPrecondition, InvalidArgument, Unavailable, echo
from gmco_common.ids import MAX_FEEDBACK_EVENTS, MAX_RANK_BATCH, check_count, check_id, check_user_id
from gmco_common.vectors import decode_batch, decode_vector, encode_vector, normalize

from gmco_rl_state import metrics
from gmco_rl_state.config import Settings
from gmco_rl_state.model import U64, Event, Learner, ModelConfig, StateRow
from gmco_rl_state.policy import PolicyConfig, Ranker, Ranking
from gmco_rl_state.rollout import Rollout
from gmco_rl_state.store import StateStore

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RLStateService"].full_name


def _optional_floats(values: Sequence[float], n: int, field: str) -> np.ndarray | None:
    if not values:
        return None
    if len(values) != n:
        raise InvalidArgument(field, f"has {len(values)} values; give none or one per candidate ({n})")
    arr = np.asarray(values, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise InvalidArgument(field, "contains NaN or Inf")
    return arr


def dedupe(events: Sequence[Event]) -> tuple[dict[str, list[Event]], int]:
    """Events grouped by user in arrival order, first delivery of each event_id only; and the repeats."""
    seen: set[str] = set()
    groups: dict[str, list[Event]] = {}
    for event in events:
        if event.event_id not in seen:
            seen.add(event.event_id)
            groups.setdefault(event.user_id, []).append(event)
    return groups, len(events) - len(seen)


@dataclass(frozen=True)
class Candidates:
    """What Rank was given: full vectors, or the shards' bandit features."""

    vectors: np.ndarray | None = None
    features: np.ndarray | None = None


@dataclass(frozen=True)
class _RankInput:
    """A checked RankRequest."""

    user: str
    ids: np.ndarray
    candidates: Candidates
    k: int
    surface: int
    retrieval: np.ndarray | None
    popularity: np.ndarray | None


@dataclass(frozen=True)
class RankOutcome:
    ranking: Ranking
    media_ids: np.ndarray
    excluded: int
    version: int


class RLStateServicer(rl_state_service_pb2_grpc.RLStateServiceServicer):
    def __init__(self, store: StateStore, learner: Learner, rollout: Rollout, rank_state_timeout: float) -> None:
        self._store = store
        self._learner = learner
        self.rollout = rollout
        self._rank_state_timeout = rank_state_timeout
        self._media_dim = learner.config.media_dim

    # --- GetUserState -------------------------------------------------------------------------------
    async def GetUserState(self, request: pb.GetUserStateRequest,
                           context: grpc.aio.ServicerContext) -> pb.GetUserStateResponse:
        user = check_user_id(request.user_id, "user_id")
        row = await self._store.get(user, None)
        return pb.GetUserStateResponse(state=self._state_message(user, row))

    def _state_message(self, user: str, row: StateRow | None) -> pb.UserState:
        """Cold start (no row): zero vector, version 0, nothing seen, cold_start=true."""
        if row is None:
            state = self._learner.fresh(user)
        else:
            state = self._learner.decode(row)
        vector = state.pref if state.pref is not None else np.zeros(self._media_dim, dtype=np.float32)
        return pb.UserState(user_id=user, vector=encode_vector(vector, "float16"), version=state.version,
                            seen_media_ids=state.seen.tolist(), cold_start=row is None,
                            event_count=state.event_count)

    # --- RecordFeedback -----------------------------------------------------------------------------
    def _event(self, ev: pb.FeedbackEvent, field: str, vector: np.ndarray | None) -> Event:
        event_id = check_id(ev.event_id, f"{field}.event_id")
        user = check_user_id(ev.user_id, f"{field}.user_id")
        if not math.isfinite(ev.reward) or not -1.0 <= ev.reward <= 1.0:
            raise InvalidArgument(f"{field}.reward", f"is {ev.reward}; must be a number in [-1, 1]")
        if not math.isfinite(ev.propensity) or not 0.0 <= ev.propensity <= 1.0:
            raise InvalidArgument(f"{field}.propensity", f"is {ev.propensity}; must be in [0, 1] (0 = unknown)")
        return Event(event_id, user, ev.media_id, float(ev.reward), ev.timestamp_unix_ms, ev.context.surface,
                     ev.context.region, ev.context.device, float(ev.propensity), vector)

    def _event_vectors(self, events: Sequence[pb.FeedbackEvent]) -> list[np.ndarray | None]:
        """Each event's unit media vector (or None), decoded as one batch when the vectors allow it."""
        present = [i for i, ev in enumerate(events) if ev.HasField("media_vector")]
        out: list[np.ndarray | None] = [None] * len(events)
        if not present:
            return out
        first = events[present[0]].media_vector
        rows = None
        if all(events[i].media_vector.dtype == first.dtype and len(events[i].media_vector.data) == len(first.data)
               for i in present):
            batch = common_pb2.VectorBatch(data=b"".join(events[i].media_vector.data for i in present),
                                           dtype=first.dtype, dimension=first.dimension, count=len(present))
            try:
                rows = decode_batch(batch, "events.media_vector", self._media_dim)
            except InvalidArgument:
                rows = None  # decode one by one below, so the error names the event
        if rows is None:
            rows = np.stack([decode_vector(events[i].media_vector, f"events[{i}].media_vector", self._media_dim)
                             .astype(np.float32) for i in present])
        for i, row in zip(present, normalize(rows), strict=True):
            out[i] = row
        return out

    async def RecordFeedback(self, request: pb.RecordFeedbackRequest,
                             context: grpc.aio.ServicerContext) -> pb.RecordFeedbackResponse:
        if not request.events:
            raise InvalidArgument("events", "the batch is empty")
        check_count(request.events, "events", MAX_FEEDBACK_EVENTS)
        vectors = self._event_vectors(request.events)
        events = [self._event(ev, f"events[{i}]", vectors[i]) for i, ev in enumerate(request.events)]
        events = [dataclasses.replace(e, policy=self.rollout.policy_of(e.user_id, e.media_id)) for e in events]
        groups, repeats = dedupe(events)
        new: dict[str, Sequence[Event]] = {}  # the events the store found new, per user (the last attempt's)

        def apply(row: StateRow | None, user: str, events: Sequence[Event]) -> StateRow:
            new[user] = events
            return self._learner.apply(row, user, events)

        outcomes = await self._store.record(groups, apply)
        self._count_rewards({u: new[u] for u, o in outcomes.items() if o.applied and u in new})
        applied = sum(o.applied for o in outcomes.values())
        duplicates = repeats + sum(o.duplicates for o in outcomes.values())
        metrics.EVENTS_APPLIED.inc(applied)
        metrics.DUPLICATES_IGNORED.inc(duplicates)
        return pb.RecordFeedbackResponse(
            applied_count=applied, duplicate_count=duplicates,
            user_versions=[pb.UserVersion(user_id=u, version=o.version) for u, o in outcomes.items()],
        )

    def _count_rewards(self, applied: dict[str, Sequence[Event]]) -> None:
        """Per-policy rewards of the events applied now (first deliveries only)."""
        by_policy: dict[str, list[float]] = {}
        for events in applied.values():
            for e in events:
                by_policy.setdefault(e.policy, []).append(e.reward)
        for policy, rewards in by_policy.items():
            self.rollout.rewarded(policy, rewards)

    # --- Rank ---------------------------------------------------------------------------------------
    async def Rank(self, request: pb.RankRequest, context: grpc.aio.ServicerContext) -> pb.RankResponse:
        start = time.perf_counter()
        return await self._rank_one(self._parse(request, ""), start)

    async def RankBatch(self, request: pb.RankBatchRequest,
                        context: grpc.aio.ServicerContext) -> pb.RankBatchResponse:
        """Every entry is checked before any is ranked, so a bad entry fails the call with nothing shown."""
        check_count(request.requests, "requests", MAX_RANK_BATCH)
        parsed = [self._parse(r, f"requests[{i}].") for i, r in enumerate(request.requests)]
        metrics.RANK_BATCH_ENTRIES.observe(len(parsed))
        # Concurrently, as separate Rank calls would be: each entry's state read overlaps the others'.
        start = time.perf_counter()
        return pb.RankBatchResponse(responses=await asyncio.gather(*(self._rank_one(p, start) for p in parsed)))

    def _parse(self, request: pb.RankRequest, prefix: str) -> _RankInput:
        """One RankRequest checked; INVALID_ARGUMENT / FAILED_PRECONDITION name ``prefix`` + the field."""
        user = check_user_id(request.user_id, f"{prefix}user_id")
        n = len(request.candidate_media_ids)
        if n == 0:
            raise InvalidArgument(f"{prefix}candidate_media_ids", "no candidates to rank")
        candidates = self._candidates(request, n, prefix)
        if request.k == 0:
            raise InvalidArgument(f"{prefix}k", "must be > 0")
        if request.k > n:
            raise InvalidArgument(f"{prefix}k", f"is {request.k}, more than the {n} candidates")
        return _RankInput(user, np.asarray(request.candidate_media_ids, dtype=U64), candidates, request.k,
                          request.context.surface,
                          _optional_floats(request.retrieval_scores, n, f"{prefix}retrieval_scores"),
                          _optional_floats(request.popularities, n, f"{prefix}popularities"))

    async def _rank_one(self, r: _RankInput, start: float) -> pb.RankResponse:
        degraded = False
        try:
            row = await self._store.get(r.user, self._rank_state_timeout)
        except Unavailable:
            row, degraded = None, True
            metrics.RANK_DEGRADED.inc()
        ranker = self.rollout.cold if row is None else self.rollout.ranker(r.user)
        args = (ranker, row, r.ids, r.candidates, r.k, r.surface, r.retrieval, r.popularity)
        if r.candidates.features is not None:
            # Features (32 floats a candidate): a few hundred microseconds of numpy, cheaper on the event loop
            # than the hop to a thread and back (profiled: the hop was about a tenth of rl_state's CPU).
            out = self._rank(*args)
        else:  # 1024-d vectors, projected here: off the event loop
            out = await asyncio.get_running_loop().run_in_executor(None, self._rank, *args)
        ranking = out.ranking
        self.rollout.shown(r.user, ranking.policy, out.media_ids[ranking.indices].tolist(), ranking.propensities)
        items = [
            common_pb2.ScoredItem(media_id=int(out.media_ids[i]), score=float(ranking.scores[pos]),
                                  exploration=bool(ranking.exploration[pos]),
                                  propensity=float(ranking.propensities[pos]))
            for pos, i in enumerate(ranking.indices)
        ]
        metrics.RANK_SECONDS.labels(ranking.policy).observe(time.perf_counter() - start)
        return pb.RankResponse(items=items, policy=ranking.policy, degraded=degraded, user_version=out.version,
                               excluded_seen_count=out.excluded, feature_version=self._learner.feature_version)

    def _candidates(self, request: pb.RankRequest, n: int, prefix: str = "") -> Candidates:
        """The candidates as vectors (projected here) or as the shards' features (version checked)."""
        if request.HasField("candidate_features") and request.candidate_features.count:
            if request.feature_version != self._learner.feature_version:
                raise FailedPrecondition(
                    f"candidate features are {echo(request.feature_version)} but this rl_state ranks in "
                    f"{self._learner.feature_version!r}: set GMCO_SHARD_FEATURE_DIM / GMCO_SHARD_FEATURE_SEED to "
                    "GMCO_RL_STATE_BANDIT_DIM / GMCO_RL_STATE_PROJECTION_SEED (or send candidate_vectors)")
            z = decode_batch(request.candidate_features, f"{prefix}candidate_features", self._learner.dim)
            if z.shape[0] != n:
                raise InvalidArgument(f"{prefix}candidate_features.count", f"is {z.shape[0]}; expected {n}, one per "
                                      "candidate_media_ids")
            return Candidates(features=z.astype(np.float64))
        vectors = decode_batch(request.candidate_vectors, f"{prefix}candidate_vectors", self._media_dim)
        if vectors.shape[0] != n:
            raise InvalidArgument(f"{prefix}candidate_vectors.count", f"is {vectors.shape[0]}; expected {n}, one per "
                                  "candidate_media_ids")
        return Candidates(vectors=vectors)

    def _rank(self, ranker: Ranker, row: StateRow | None, ids: np.ndarray, candidates: Candidates, k: int,
              surface: int, retrieval: np.ndarray | None, popularity: np.ndarray | None) -> RankOutcome:
        rng = np.random.default_rng()
        if row is None:
            similar = candidates.features if candidates.features is not None else candidates.vectors
            return RankOutcome(ranker.rank_cold(len(ids), k, surface, retrieval, popularity, rng, similar), ids, 0, 0)
        state = self._learner.decode(row)
        keep = np.flatnonzero(~np.isin(ids, state.seen))
        if candidates.vectors is not None:
            ranking = ranker.rank_user(state, normalize(candidates.vectors[keep]), min(k, len(keep)), rng)
        else:
            assert candidates.features is not None
            preference = None if retrieval is None else retrieval[keep]
            ranking = ranker.rank_features(state, candidates.features[keep], preference, min(k, len(keep)), rng)
        return RankOutcome(ranking, ids[keep], len(ids) - len(keep), state.version)


def model_config(settings: Settings) -> ModelConfig:
    return ModelConfig(settings.media_dim, settings.bandit_dim, settings.projection_seed, settings.ridge,
                       settings.preference_rate, settings.seen_capacity)


def build_servicer(settings: Settings, store: StateStore) -> RLStateServicer:
    """The servicer with the learner and ranker the settings describe."""
    learner = Learner(model_config(settings))
    base = PolicyConfig(settings.policy, settings.prior_scale, settings.preference_weight,
                        settings.propensity_samples, settings.cold_start_temperature, settings.diversity_lambda)
    rollout = Rollout(base, lambda cfg: Ranker(learner, cfg), settings.experiments_file)
    return RLStateServicer(store, learner, rollout, settings.rank_state_timeout_seconds)
