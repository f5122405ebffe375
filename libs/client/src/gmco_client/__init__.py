"""Typed clients for GMC-O's public ``gmco.router.v1.RecommendationService``, sync and async.

    from gmco_client import RecommendationClient

    with RecommendationClient("127.0.0.1:8080") as client:
        reply = client.recommend("u42", k=10, context={"region": "GB"})

What they do for the caller, per the contract in ``protos/gmco/router/v1/router_service.proto``:

- set the ``x-user-id`` metadata that Envoy's ring hash keeps a user on one router with (every call that
  concerns a single user: Recommend, a RecommendBatch or RecordFeedback of one user);
- give every call a deadline (``timeout`` per call, else the client's), shared by all its attempts;
- retry only UNAVAILABLE ("retry", in the contract), with exponential backoff and full jitter, while the
  deadline allows. Nothing else is retried: INVALID_ARGUMENT and FAILED_PRECONDITION will not change,
  RESOURCE_EXHAUSTED (the router's admission limit) is the caller's to back off from, and a
  DEADLINE_EXCEEDED has used up the deadline. Writes stay safe to retry: RecordFeedback events carry their
  own ``event_id``, and UpsertMedia / DeleteMedia get a ``request_id`` (generated when not given) that the
  catalogue log acknowledges once.

A context may be a ``RequestContext`` or a mapping such as ``{"surface": "HOMEPAGE", "region": "US",
"device": "smart_tv"}``; whatever it leaves out the router fills with its defaults.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self, TypeVar

import grpc
from gmco.common.v1 import common_pb2
from gmco.rl_state.v1 import rl_state_service_pb2
from gmco.router.v1 import router_service_pb2 as pb
from gmco.router.v1 import router_service_pb2_grpc

__all__ = ["AsyncRecommendationClient", "RecommendationClient", "RetryPolicy", "make_context", "pb"]

USER_HEADER = "x-user-id"
T = TypeVar("T")
ContextLike = common_pb2.RequestContext | Mapping[str, Any] | None
PreferencesLike = common_pb2.UserPreferences | Mapping[str, Sequence[str]] | None


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts on UNAVAILABLE: up to ``attempts`` in all, the n-th retry after a random wait in
    ``[0, min(max_backoff, initial_backoff * multiplier**(n-1))]``, never past the call's deadline."""

    attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 1.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be >= 1")

    def backoff(self, retry: int) -> float:
        return random.uniform(0, min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry - 1)))


NO_RETRY = RetryPolicy(attempts=1)


def make_context(context: ContextLike = None, **fields: Any) -> common_pb2.RequestContext:
    """A RequestContext from a message, a mapping or keywords; ``surface`` may be "HOMEPAGE" or
    "SURFACE_HOMEPAGE" or the enum value."""
    if isinstance(context, common_pb2.RequestContext):
        if not fields:
            return context
        merged = common_pb2.RequestContext()
        merged.CopyFrom(context)
        context = None
    else:
        merged = common_pb2.RequestContext()
    values = {**(dict(context) if context else {}), **fields}
    for name, value in values.items():
        if name == "surface" and isinstance(value, str):
            key = value.upper() if value.upper().startswith("SURFACE_") else f"SURFACE_{value.upper()}"
            value = common_pb2.Surface.Value(key)
        setattr(merged, name, value)
    return merged


def _preferences(preferences: PreferencesLike) -> common_pb2.UserPreferences | None:
    if preferences is None or isinstance(preferences, common_pb2.UserPreferences):
        return preferences
    return common_pb2.UserPreferences(blocked_genres=list(preferences.get("blocked_genres", ())),
                                      allowed_genres=list(preferences.get("allowed_genres", ())))


def recommend_request(user_id: str, k: int = 10, *, context: ContextLike = None, preferences: PreferencesLike = None,
                      min_lsn: int = 0, skip_cache: bool = False) -> pb.RecommendRequest:
    request = pb.RecommendRequest(user_id=user_id, k=k, min_lsn=min_lsn, skip_cache=skip_cache)
    if context is not None:
        request.context.CopyFrom(make_context(context))
    prefs = _preferences(preferences)
    if prefs is not None:
        request.preferences.CopyFrom(prefs)
    return request


def _one_user(users: Iterable[str]) -> tuple[tuple[str, str], ...]:
    distinct = {u for u in users if u}
    return ((USER_HEADER, distinct.pop()),) if len(distinct) == 1 else ()


def _metadata(extra: tuple[tuple[str, str], ...], token: str | None) -> tuple[tuple[str, str], ...]:
    return extra + ((("authorization", f"Bearer {token}"),) if token else ())


def _retryable(exc: grpc.RpcError) -> bool:
    code = getattr(exc, "code", None)  # grpc.Call (sync) and grpc.aio.AioRpcError both have code()
    return callable(code) and code() == grpc.StatusCode.UNAVAILABLE


def _channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    # The retries are this module's (one policy, one deadline), so gRPC's own transparent retries stay as
    # they are and no retry service config is set.
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]


class _Base:
    def __init__(self, timeout: float, retry: RetryPolicy | None, token: str | None) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.token = token

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (self.timeout if timeout is None else timeout)


class RecommendationClient(_Base):
    """A blocking client. ``target`` is host:port (Envoy, or a router); TLS with ``credentials``; a bearer
    token with ``token``; or pass a ready ``channel``."""

    def __init__(self, target: str = "127.0.0.1:8080", *, timeout: float = 1.0, retry: RetryPolicy | None = None,
                 token: str | None = None, credentials: grpc.ChannelCredentials | None = None,
                 channel: grpc.Channel | None = None, max_message_bytes: int = 64 * 1024 * 1024) -> None:
        super().__init__(timeout, retry, token)
        self._own = channel is None
        if channel is None:
            options = _channel_options(max_message_bytes)
            channel = (grpc.secure_channel(target, credentials, options) if credentials
                       else grpc.insecure_channel(target, options))
        self.channel = channel
        self.stub = router_service_pb2_grpc.RecommendationServiceStub(channel)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._own:
            self.channel.close()

    def _call(self, method: Callable[..., T], request: Any, users: Iterable[str], timeout: float | None) -> T:
        deadline = self._deadline(timeout)
        metadata = _metadata(_one_user(users), self.token)
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - time.monotonic()
            try:
                return method(request, timeout=max(remaining, 0.001), metadata=metadata)
            except grpc.RpcError as exc:
                if not _retryable(exc) or attempt >= self.retry.attempts:
                    raise
                pause = self.retry.backoff(attempt)
                if time.monotonic() + pause >= deadline:
                    raise
                time.sleep(pause)

    def recommend(self, user_id: str, k: int = 10, *, context: ContextLike = None,
                  preferences: PreferencesLike = None, min_lsn: int = 0, skip_cache: bool = False,
                  timeout: float | None = None) -> pb.RecommendResponse:
        request = recommend_request(user_id, k, context=context, preferences=preferences, min_lsn=min_lsn,
                                    skip_cache=skip_cache)
        return self._call(self.stub.Recommend, request, [user_id], timeout)

    def recommend_batch(self, requests: Sequence[pb.RecommendRequest], *,
                        timeout: float | None = None) -> pb.RecommendBatchResponse:
        return self._call(self.stub.RecommendBatch, pb.RecommendBatchRequest(requests=requests),
                          [r.user_id for r in requests], timeout)

    def record_feedback(self, events: Sequence[rl_state_service_pb2.FeedbackEvent], *,
                        timeout: float | None = None) -> pb.RecordFeedbackResponse:
        return self._call(self.stub.RecordFeedback, pb.RecordFeedbackRequest(events=events),
                          [e.user_id for e in events], timeout)

    def upsert_media(self, items: Sequence[common_pb2.MediaItem], *, request_id: str | None = None,
                     timeout: float | None = None) -> pb.UpsertMediaResponse:
        request = pb.UpsertMediaRequest(items=items, request_id=request_id or uuid.uuid4().hex)
        return self._call(self.stub.UpsertMedia, request, (), timeout)

    def delete_media(self, media_ids: Sequence[int], *, request_id: str | None = None,
                     timeout: float | None = None) -> pb.DeleteMediaResponse:
        request = pb.DeleteMediaRequest(media_ids=media_ids, request_id=request_id or uuid.uuid4().hex)
        return self._call(self.stub.DeleteMedia, request, (), timeout)


class AsyncRecommendationClient(_Base):
    """The same over ``grpc.aio``; use ``async with`` or ``await client.close()``."""

    def __init__(self, target: str = "127.0.0.1:8080", *, timeout: float = 1.0, retry: RetryPolicy | None = None,
                 token: str | None = None, credentials: grpc.ChannelCredentials | None = None,
                 channel: grpc.aio.Channel | None = None, max_message_bytes: int = 64 * 1024 * 1024) -> None:
        super().__init__(timeout, retry, token)
        self._own = channel is None
        if channel is None:
            options = _channel_options(max_message_bytes)
            channel = (grpc.aio.secure_channel(target, credentials, options) if credentials
                       else grpc.aio.insecure_channel(target, options))
        self.channel = channel
        self.stub = router_service_pb2_grpc.RecommendationServiceStub(channel)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own:
            await self.channel.close()

    async def _call(self, method: Callable[..., Awaitable[T]], request: Any, users: Iterable[str],
                    timeout: float | None) -> T:
        deadline = self._deadline(timeout)
        metadata = _metadata(_one_user(users), self.token)
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - time.monotonic()
            try:
                return await method(request, timeout=max(remaining, 0.001), metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                if not _retryable(exc) or attempt >= self.retry.attempts:
                    raise
                pause = self.retry.backoff(attempt)
                if time.monotonic() + pause >= deadline:
                    raise
                await asyncio.sleep(pause)

    async def recommend(self, user_id: str, k: int = 10, *, context: ContextLike = None,
                        preferences: PreferencesLike = None, min_lsn: int = 0, skip_cache: bool = False,
                        timeout: float | None = None) -> pb.RecommendResponse:
        request = recommend_request(user_id, k, context=context, preferences=preferences, min_lsn=min_lsn,
                                    skip_cache=skip_cache)
        return await self._call(self.stub.Recommend, request, [user_id], timeout)

    async def recommend_batch(self, requests: Sequence[pb.RecommendRequest], *,
                              timeout: float | None = None) -> pb.RecommendBatchResponse:
        return await self._call(self.stub.RecommendBatch, pb.RecommendBatchRequest(requests=requests),
                                [r.user_id for r in requests], timeout)

    async def record_feedback(self, events: Sequence[rl_state_service_pb2.FeedbackEvent], *,
                              timeout: float | None = None) -> pb.RecordFeedbackResponse:
        return await self._call(self.stub.RecordFeedback, pb.RecordFeedbackRequest(events=events),
                                [e.user_id for e in events], timeout)

    async def upsert_media(self, items: Sequence[common_pb2.MediaItem], *, request_id: str | None = None,
                           timeout: float | None = None) -> pb.UpsertMediaResponse:
        request = pb.UpsertMediaRequest(items=items, request_id=request_id or uuid.uuid4().hex)
        return await self._call(self.stub.UpsertMedia, request, (), timeout)

    async def delete_media(self, media_ids: Sequence[int], *, request_id: str | None = None,
                           timeout: float | None = None) -> pb.DeleteMediaResponse:
        request = pb.DeleteMediaRequest(media_ids=media_ids, request_id=request_id or uuid.uuid4().hex)
        return await self._call(self.stub.DeleteMedia, request, (), timeout)
