"""The public RecommendationService: request validation, then the flow, feedback and catalogue writes."""

from __future__ import annotations

import logging

import grpc
from gmco.common.v1 import common_pb2
from gmco.rl_state.v1 import rl_state_service_pb2, rl_state_service_pb2_grpc
from gmco.router.v1 import router_service_pb2, router_service_pb2_grpc
from gmco_common.admission import Admission, QueueDelay, edge_wait_seconds
from gmco_common.cache_key import ContextDefaults, with_defaults
from gmco_common.errors import InvalidArgument, echo, from_rpc_error
from gmco_common.ids import MAX_PREFERENCE_GENRES, check_count, check_id, check_name, check_user_id

from gmco_router.catalogue import Catalogue
from gmco_router.config import Settings
from gmco_router.recommend import Recommender

log = logging.getLogger(__name__)

USER_HEADER = "x-user-id"
_SURFACES = frozenset(common_pb2.Surface.values()) - {common_pb2.SURFACE_UNSPECIFIED}


def metadata_user(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == USER_HEADER:
            return value if isinstance(value, str) else value.decode()
    return ""


def answer_trailers(response: router_service_pb2.RecommendResponse) -> tuple[tuple[str, str], ...]:
    """The trailing metadata of every Recommend answer: what a proxy's access log, or a caller that does not
    decode the body (the load test), needs to judge it: ``gmco-items`` (how many), ``gmco-cache-hit`` (0/1)
    and ``gmco-degraded`` (the components skipped, comma-separated; empty when none)."""
    return (("gmco-items", str(len(response.items))), ("gmco-cache-hit", "1" if response.cache_hit else "0"),
            ("gmco-degraded", ",".join(response.degraded_components)))


def apply_defaults(request: router_service_pb2.RecommendRequest, settings: Settings) -> None:
    """A context without a surface, region or device gets the router's defaults (GMCO_ROUTER_DEFAULT_*), before
    the cache key is computed (gmco_common.cache_key.with_defaults, which the warmer applies too)."""
    request.context.CopyFrom(with_defaults(request.context, ContextDefaults(
        settings.default_surface, settings.default_region, settings.default_device)))


def validate(request: router_service_pb2.RecommendRequest, header_user: str, max_k: int,
             prefix: str = "", strict_header: bool = True) -> str:
    """The request's user id; raises INVALID_ARGUMENT naming the first bad field."""
    user = request.user_id or header_user
    if not user:
        raise InvalidArgument(f"{prefix}user_id", f"missing: set user_id or the {USER_HEADER} metadata")
    check_user_id(user, f"{prefix}user_id")
    if strict_header and request.user_id and header_user and request.user_id != header_user:
        raise InvalidArgument(f"{prefix}user_id",
                              f"{echo(request.user_id)} does not match {USER_HEADER} {echo(header_user)}")
    if request.k == 0:
        raise InvalidArgument(f"{prefix}k", "must be >= 1")
    if request.k > max_k:
        raise InvalidArgument(f"{prefix}k", f"is {request.k}; the maximum is {max_k}")
    ctx = request.context
    for name in ("region", "device", "max_rating"):
        check_name(getattr(ctx, name), f"{prefix}context.{name}")
    for name in ("allowed_genres", "blocked_genres"):
        genres = getattr(request.preferences, name)
        check_count(genres, f"{prefix}preferences.{name}", MAX_PREFERENCE_GENRES, required=False)
        for i, genre in enumerate(genres):
            check_name(genre, f"{prefix}preferences.{name}[{i}]")
    if request.context.surface not in _SURFACES:
        raise InvalidArgument(
            f"{prefix}context.surface",
            f"unknown value {request.context.surface}; use one of "
            + ", ".join(common_pb2.Surface.Name(s) for s in sorted(_SURFACES)))
    return user


class RecommendationServicer(router_service_pb2_grpc.RecommendationServiceServicer):
    def __init__(self, recommender: Recommender, catalogue: Catalogue,
                 rl_state: rl_state_service_pb2_grpc.RLStateServiceStub, settings: Settings) -> None:
        self._recommender = recommender
        self._catalogue = catalogue
        self._rl = rl_state
        self._settings = settings
        self._max_k = settings.max_k
        self._max_batch = settings.max_batch
        queue = (QueueDelay(settings.queue_target_ms / 1000, settings.queue_interval_ms / 1000)
                 if settings.queue_target_ms > 0 else None)
        self.admission = Admission(settings.max_in_flight, settings.min_in_flight, queue=queue)

    async def Recommend(self, request: router_service_pb2.RecommendRequest,
                        context: grpc.aio.ServicerContext) -> router_service_pb2.RecommendResponse:
        apply_defaults(request, self._settings)
        user = validate(request, metadata_user(context), self._max_k)
        with self.admission.admit("Recommend", waited=edge_wait_seconds(context.invocation_metadata())):
            (response,) = await self._recommender.recommend([(user, request)], batched=False)
        context.set_trailing_metadata(answer_trailers(response))
        return response

    async def RecommendBatch(self, request: router_service_pb2.RecommendBatchRequest,
                             context: grpc.aio.ServicerContext) -> router_service_pb2.RecommendBatchResponse:
        if not request.requests:
            raise InvalidArgument("requests", "the batch is empty")
        if len(request.requests) > self._max_batch:
            raise InvalidArgument("requests", f"has {len(request.requests)} entries; the maximum is {self._max_batch}")
        header = metadata_user(context)
        for r in request.requests:
            apply_defaults(r, self._settings)
        users = [validate(r, header, self._max_k, f"requests[{i}].", strict_header=False)
                 for i, r in enumerate(request.requests)]
        with self.admission.admit("RecommendBatch", len(users),
                                  waited=edge_wait_seconds(context.invocation_metadata())):
            responses = await self._recommender.recommend(list(zip(users, request.requests, strict=True)),
                                                          batched=True)
        return router_service_pb2.RecommendBatchResponse(responses=responses)

    async def RecordFeedback(self, request: router_service_pb2.RecordFeedbackRequest,
                             context: grpc.aio.ServicerContext) -> router_service_pb2.RecordFeedbackResponse:
        if not request.events:
            raise InvalidArgument("events", "the batch is empty")
        check_count(request.events, "events", self._settings.max_feedback_events)
        events = request.events
        missing = {e.media_id for e in events if not e.media_vector.dimension and e.media_id}
        if missing:
            vectors = await self._catalogue.get_media(missing)
            for event in events:
                item = vectors.get(event.media_id)
                if not event.media_vector.dimension and item is not None:
                    event.media_vector.CopyFrom(item.vector)
        try:
            resp = await self._rl.RecordFeedback(rl_state_service_pb2.RecordFeedbackRequest(events=events))
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "rl_state", hint="retry with the same event ids") from None
        for uv in resp.user_versions:
            self._recommender.note_version(uv.user_id, uv.version)
        return router_service_pb2.RecordFeedbackResponse(
            applied_count=resp.applied_count, duplicate_count=resp.duplicate_count, user_versions=resp.user_versions)

    async def UpsertMedia(self, request: router_service_pb2.UpsertMediaRequest,
                          context: grpc.aio.ServicerContext) -> router_service_pb2.UpsertMediaResponse:
        check_count(request.items, "items", self._settings.max_write_items, required=False)
        check_id(request.request_id, "request_id", required=False)
        count, lsn = await self._catalogue.upsert(request.items, request.request_id)
        return router_service_pb2.UpsertMediaResponse(lsn=lsn, upserted_count=count)

    async def DeleteMedia(self, request: router_service_pb2.DeleteMediaRequest,
                          context: grpc.aio.ServicerContext) -> router_service_pb2.DeleteMediaResponse:
        check_count(request.media_ids, "media_ids", self._settings.max_delete_ids, required=False)
        check_id(request.request_id, "request_id", required=False)
        count, lsn = await self._catalogue.delete(request.media_ids, request.request_id)
        return router_service_pb2.DeleteMediaResponse(lsn=lsn, deleted_count=count)
