"""Component tests of the server bootstrap: a real grpc.aio server on port 0 and a real channel."""

from __future__ import annotations

import math

import grpc
import pytest
from gmco_common.channels import ChannelOptions, make_channel
from gmco_common.config import ServerSettings
from gmco_common.errors import InvalidArgument, Unavailable
from gmco_common.server import Registration, start_server
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

SERVICE = "test.v1.EchoService"


class Echo:
    async def Echo(self, request: bytes, context) -> bytes:
        if request == b"bad":
            raise InvalidArgument("payload", "must not be 'bad'")
        if request == b"down":
            raise Unavailable("backend down")
        if request == b"boom":
            raise RuntimeError("secret internals")
        return request


def _add(servicer: Echo, server: grpc.aio.Server) -> None:
    handler = grpc.unary_unary_rpc_method_handler(servicer.Echo)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {"Echo": handler})])


async def _start(**kw):
    settings = ServerSettings(port=0, max_message_bytes=1024, **kw)
    return await start_server(settings, [Registration(_add, Echo(), SERVICE)])


async def _call(port: int, payload: bytes, token: str | None = None) -> bytes:
    async with make_channel(f"127.0.0.1:{port}", ChannelOptions(auth_token=token, max_attempts=2)) as ch:
        return await ch.unary_unary(f"/{SERVICE}/Echo")(payload, timeout=5)


async def test_status_codes_and_no_exception_text() -> None:
    running = await _start()
    try:
        assert await _call(running.port, b"hi") == b"hi"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _call(running.port, b"bad")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "payload" in err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _call(running.port, b"down")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _call(running.port, b"boom")
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "secret" not in err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _call(running.port, b"x" * 4096)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await running.server.stop(0)


async def test_metrics_count_codes() -> None:
    def value(code: str) -> float:
        v = REGISTRY.get_sample_value(
            "grpc_server_handled_total", {"grpc_service": SERVICE, "grpc_method": "Echo", "grpc_code": code}
        )
        return v or 0.0

    before_ok, before_bad = value("OK"), value("INVALID_ARGUMENT")
    running = await _start()
    try:
        await _call(running.port, b"hi")
        with pytest.raises(grpc.aio.AioRpcError):
            await _call(running.port, b"bad")
    finally:
        await running.server.stop(0)
    assert value("OK") == before_ok + 1
    assert value("INVALID_ARGUMENT") == before_bad + 1
    assert not math.isnan(value("OK"))


async def test_auth_and_open_health() -> None:
    running = await _start(auth_token="s3cret")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _call(running.port, b"hi")
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _call(running.port, b"hi", token="wrong")
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert await _call(running.port, b"hi", token="s3cret") == b"hi"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
            await running.drain(0.1)
    finally:
        await running.server.stop(0)


async def test_interceptors_wrap_each_method_once_and_still_count_every_code() -> None:
    from gmco_common.interceptors import _PerMethod

    built = []
    cache = _PerMethod()
    handler = grpc.unary_unary_rpc_method_handler(Echo().Echo)
    for _ in range(3):
        got = cache.get("/x/Echo", handler, lambda: built.append(1) or handler)
    assert got is handler and len(built) == 1
    assert cache.get("/x/Missing", None, lambda: built.append(1) or handler) is None and len(built) == 1
    other = grpc.unary_unary_rpc_method_handler(Echo().Echo)  # the server's handler changed: built anew
    assert cache.get("/x/Echo", other, lambda: built.append(1) or other) is other and len(built) == 2

    def value(code: str) -> float:
        return REGISTRY.get_sample_value("grpc_server_handled_total", {
            "grpc_service": SERVICE, "grpc_method": "Echo", "grpc_code": code}) or 0.0

    before = {c: value(c) for c in ("OK", "INVALID_ARGUMENT", "UNAVAILABLE")}
    running = await _start()
    try:
        for payload in (b"a", b"bad", b"b", b"down", b"bad"):
            try:
                await _call(running.port, payload)
            except grpc.aio.AioRpcError:
                pass
    finally:
        await running.server.stop(0)
    assert value("OK") - before["OK"] == 2
    assert value("INVALID_ARGUMENT") - before["INVALID_ARGUMENT"] == 2
    assert value("UNAVAILABLE") - before["UNAVAILABLE"] >= 1  # the channel may retry UNAVAILABLE once
