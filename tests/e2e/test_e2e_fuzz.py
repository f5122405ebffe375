"""Hypothesis-generated requests sent through Envoy to the running stack.

Whatever a caller sends, the answer is OK, INVALID_ARGUMENT naming the field, or RESOURCE_EXHAUSTED;
never UNAVAILABLE, UNKNOWN or INTERNAL (a retry of bad input cannot succeed, so it must not look
retryable), the message stays short (status details travel in an HTTP/2 trailer), and no process dies.

Writes use media ids far above the stack's catalogue (or the edge ids 0 and 2**64-1), so the fuzzing
does not change what the other e2e tests see.
"""

from __future__ import annotations

import math
import re

import grpc
import numpy as np
import pytest
from gmco.common.v1 import common_pb2
from gmco.rl_state.v1 import rl_state_service_pb2 as rlpb
from gmco.router.v1 import router_service_pb2 as rpb
from gmco_common.errors import MAX_MESSAGE_CHARS
from gmco_common.ids import (
    MAX_DELETE_IDS,
    MAX_FEEDBACK_EVENTS,
    MAX_ID_CHARS,
    MAX_NAME_CHARS,
    MAX_PREFERENCE_GENRES,
    MAX_WRITE_ITEMS,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.e2e

E2E_DIM = 64  # conftest.E2E_DIM: the strategies need it when the module loads (checked below)

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
# "field: reason" (gmco_common.errors.InvalidArgument), the field a dotted path with optional [i] indexes
FIELD = re.compile(r"^[a-z_]+(\[\d+\])?(\.[a-z_]+(\[\d+\])?)*: ")
FUZZ_SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, print_blob=True,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                HealthCheck.function_scoped_fixture])

UINT32 = st.integers(0, 2**32 - 1)
UINT64 = st.integers(0, 2**64 - 1)
WRITE_IDS = st.one_of(st.sampled_from([0, 2**64 - 1]), st.integers(2**40, 2**64 - 1))
# Any unicode a protobuf string can carry (no lone surrogates), sometimes very long.
TEXT = st.one_of(st.text(st.characters(exclude_categories=("Cs",)), max_size=40),
                 st.integers(200, 100_000).map(lambda n: "u" * n),
                 st.sampled_from(["", "{user}", "x" * 256, "x" * 257, "é" * 300, "\x00", "US", "smart_tv"]))
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0.0, 1.0, -1.0]))


@st.composite
def vectors(draw: st.DrawFn) -> common_pb2.Vector:
    """Right or wrong dimension, dtype, byte count; finite, NaN, Inf or huge values."""
    dtype = draw(st.sampled_from([common_pb2.D_TYPE_FLOAT16, common_pb2.D_TYPE_FLOAT32, common_pb2.D_TYPE_UNSPECIFIED,
                                  7]))
    dim = draw(st.sampled_from([E2E_DIM, E2E_DIM, 0, 1, E2E_DIM - 1, E2E_DIM + 1, 2**32 - 1]))
    kind = draw(st.sampled_from(["random", "nan", "inf", "huge", "zero"]))
    np_dtype = np.float32 if dtype == common_pb2.D_TYPE_FLOAT32 else np.float16
    rows = min(dim, 4096)
    values = np.random.default_rng(draw(UINT32)).standard_normal(rows).astype(np.float32)
    if kind == "nan" and rows:
        values[0] = np.nan
    elif kind == "inf" and rows:
        values[-1] = np.inf
    elif kind == "huge":
        values *= 1e6
    elif kind == "zero":
        values[:] = 0
    with np.errstate(over="ignore"):
        data = values.astype(np_dtype).tobytes()
    if draw(st.booleans()) and data:
        data = data[: draw(st.integers(0, len(data) - 1))]  # a byte count that matches nothing
    return common_pb2.Vector(data=data, dtype=dtype, dimension=dim)


def contexts() -> st.SearchStrategy[common_pb2.RequestContext]:
    return st.builds(common_pb2.RequestContext, surface=st.integers(-5, 10), region=TEXT, device=TEXT,
                     max_rating=TEXT, anchor_media_id=UINT64)


def preferences() -> st.SearchStrategy[common_pb2.UserPreferences]:
    genres = st.one_of(st.lists(TEXT, max_size=5), st.integers(100, 20_000).map(lambda n: ["drama"] * n))
    return st.builds(common_pb2.UserPreferences, blocked_genres=genres, allowed_genres=genres)


def recommend_requests() -> st.SearchStrategy[rpb.RecommendRequest]:
    return st.builds(rpb.RecommendRequest, user_id=TEXT, context=contexts(), preferences=preferences(),
                     k=st.one_of(UINT32, st.integers(0, 120)), min_lsn=UINT64, skip_cache=st.booleans())


def attributes() -> st.SearchStrategy[common_pb2.MediaAttributes]:
    return st.builds(common_pb2.MediaAttributes, genre_ids=st.lists(UINT32, max_size=12), rating=UINT32,
                     region_mask=UINT64, format_mask=UINT64, release_year=UINT32, popularity=FLOATS)


def items() -> st.SearchStrategy[common_pb2.MediaItem]:
    return st.builds(common_pb2.MediaItem, media_id=WRITE_IDS, vector=vectors(), attributes=attributes())


def events() -> st.SearchStrategy[rlpb.FeedbackEvent]:
    return st.builds(rlpb.FeedbackEvent, event_id=TEXT, user_id=TEXT, media_id=UINT64, reward=FLOATS,
                     timestamp_unix_ms=st.integers(-(2**63), 2**63 - 1), context=contexts(),
                     media_vector=st.one_of(st.none(), vectors()), propensity=FLOATS)


def many(strategy: st.SearchStrategy, huge: int, filler: object) -> st.SearchStrategy[list]:
    """A short list of fuzzed elements, or a list far above any documented bound: ``filler`` repeated
    ``huge``..``4 * huge`` times, behind one fuzzed element (small parts keep each request well under
    the message-size limit, so what is fuzzed is the count)."""
    return st.one_of(st.lists(strategy, max_size=4),
                     st.tuples(strategy, st.integers(huge, huge * 4)).map(lambda t: [t[0]] + [filler] * t[1]))


# Header values travel as HTTP/2 headers: printable ASCII (anything else the client refuses to send).
HEADER = st.one_of(st.none(), st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300))


def _call(method, request, header: str | None = None) -> None:
    metadata = None if header is None else (("x-user-id", header),)
    try:
        method(request, timeout=20, metadata=metadata)
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
        assert code in ALLOWED, f"{code.name} for bad input: {details[:300]!r}"
        assert len(details) <= MAX_MESSAGE_CHARS, f"a {len(details)}-character message"
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            assert FIELD.match(details), f"INVALID_ARGUMENT that names no field: {details[:200]!r}"


@pytest.fixture(scope="module")
def pids_before(stack):
    assert stack.config.dim == E2E_DIM
    pids = stack.pids()
    yield pids
    dead = {name: svc.proc.returncode for name, svc in stack.services.items() if not svc.running()}
    assert not dead, f"processes died while fuzzed: {dead}"


@FUZZ_SETTINGS
@given(request=recommend_requests(), header=HEADER)
def test_fuzzed_recommend(envoy, pids_before, request, header) -> None:
    _call(envoy.Recommend, request, header)


@FUZZ_SETTINGS
@given(requests=many(recommend_requests(), 100, rpb.RecommendRequest(user_id="u", k=1)), header=HEADER)
def test_fuzzed_recommend_batch(envoy, pids_before, requests, header) -> None:
    _call(envoy.RecommendBatch, rpb.RecommendBatchRequest(requests=requests), header)


@FUZZ_SETTINGS
@given(events=many(events(), 2000, rlpb.FeedbackEvent(event_id="e", user_id="u", media_id=1, reward=1)))
def test_fuzzed_record_feedback(envoy, pids_before, events) -> None:
    _call(envoy.RecordFeedback, rpb.RecordFeedbackRequest(events=events))


@FUZZ_SETTINGS
@given(items=many(items(), 2000, common_pb2.MediaItem(media_id=2**50)), request_id=TEXT)
def test_fuzzed_upsert_media(envoy, pids_before, items, request_id) -> None:
    _call(envoy.UpsertMedia, rpb.UpsertMediaRequest(items=items, request_id=request_id))


@FUZZ_SETTINGS
@given(media_ids=many(WRITE_IDS, 20_000, 2**50), request_id=TEXT)
def test_fuzzed_delete_media(envoy, pids_before, media_ids, request_id) -> None:
    _call(envoy.DeleteMedia, rpb.DeleteMediaRequest(media_ids=media_ids, request_id=request_id))


def test_a_100k_character_user_id_is_invalid_argument_not_unavailable(envoy) -> None:
    """The case that first showed the problem: a 100,000-character id that does not match x-user-id came
    back from Envoy as UNAVAILABLE, because the error echoed the whole id into the status trailer."""
    with pytest.raises(grpc.RpcError) as err:
        envoy.Recommend(rpb.RecommendRequest(user_id="u" * 100_000, k=5), metadata=(("x-user-id", "someone"),),
                        timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("user_id: ")
    assert len(err.value.details()) < 300


def test_nan_in_a_vector_is_refused_naming_the_item(envoy) -> None:
    vec = np.ones(E2E_DIM, np.float16)
    vec[3] = math.nan
    item = common_pb2.MediaItem(media_id=2**50, vector=common_pb2.Vector(
        data=vec.tobytes(), dtype=common_pb2.D_TYPE_FLOAT16, dimension=E2E_DIM))
    with pytest.raises(grpc.RpcError) as err:
        envoy.UpsertMedia(rpb.UpsertMediaRequest(items=[item]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("items[0].vector")


@pytest.mark.parametrize(("method", "request_", "field"), [
    ("RecordFeedback", rpb.RecordFeedbackRequest(events=[rlpb.FeedbackEvent(event_id="e", user_id="u", media_id=1)]
                                                 * (MAX_FEEDBACK_EVENTS + 1)), "events"),
    ("UpsertMedia", rpb.UpsertMediaRequest(items=[common_pb2.MediaItem(media_id=2**50)] * (MAX_WRITE_ITEMS + 1)),
     "items"),
    ("DeleteMedia", rpb.DeleteMediaRequest(media_ids=[2**50] * (MAX_DELETE_IDS + 1)), "media_ids"),
    ("DeleteMedia", rpb.DeleteMediaRequest(media_ids=[2**50], request_id="r" * (MAX_ID_CHARS + 1)), "request_id"),
    ("Recommend", rpb.RecommendRequest(user_id="u", k=1, preferences=common_pb2.UserPreferences(
        blocked_genres=["drama"] * (MAX_PREFERENCE_GENRES + 1))), "preferences.blocked_genres"),
    ("Recommend", rpb.RecommendRequest(user_id="u", k=1, context=common_pb2.RequestContext(
        region="R" * (MAX_NAME_CHARS + 1))), "context.region"),
])
def test_every_documented_bound_is_invalid_argument_naming_the_field(envoy, method, request_, field) -> None:
    with pytest.raises(grpc.RpcError) as err:
        getattr(envoy, method)(request_, timeout=20)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{field}: ")
