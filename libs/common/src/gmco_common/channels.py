"""Client channels: retries on UNAVAILABLE with jittered backoff (gRPC retry policy), deadline and
request-id propagation, a CLIENT span per call with its trace context injected (the standard
OpenTelemetry gRPC interceptors, :mod:`gmco_common.tracing`), optional TLS and bearer token."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import grpc

from gmco_common.context import REQUEST_ID_HEADER, call_timeout, request_id_var
from gmco_common.tracing import client_interceptors


def retry_service_config(max_attempts: int = 3, idempotent: bool = True) -> str:
    codes = ["UNAVAILABLE"] + (["DEADLINE_EXCEEDED"] if idempotent else [])
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{}],
                    "retryPolicy": {
                        "maxAttempts": max_attempts,
                        "initialBackoff": "0.02s",
                        "maxBackoff": "0.5s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": codes,
                    },
                }
            ]
        }
    )


class _PropagatingInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Caps each call's timeout by the caller's remaining deadline and forwards the request id and token."""

    def __init__(self, default_timeout: float | None, token: str | None) -> None:
        self._default_timeout = default_timeout
        self._token = token

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        metadata = list(client_call_details.metadata or [])
        rid = request_id_var.get()
        if rid:
            metadata.append((REQUEST_ID_HEADER, rid))
        if self._token:
            metadata.append(("authorization", f"Bearer {self._token}"))
        timeout = client_call_details.timeout
        capped = call_timeout(timeout if timeout is not None else self._default_timeout)
        details = grpc.aio.ClientCallDetails(
            client_call_details.method, capped, metadata, client_call_details.credentials,
            client_call_details.wait_for_ready,
        )
        return await continuation(details, request)


@dataclass(frozen=True)
class ChannelOptions:
    max_message_bytes: int = 64 * 1024 * 1024
    default_timeout: float | None = 5.0
    max_attempts: int = 3
    idempotent: bool = True
    auth_token: str | None = None
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None


def make_channel(target: str, opts: ChannelOptions | None = None, *, interceptors: bool = True) -> grpc.aio.Channel:
    """An ``aio`` channel to ``target`` (host:port) with retries and deadline propagation; without
    ``interceptors`` (tracing, deadline, ids, token per call) for a caller that sets those itself."""
    opts = opts or ChannelOptions()
    options = [
        ("grpc.max_receive_message_length", opts.max_message_bytes),
        ("grpc.max_send_message_length", opts.max_message_bytes),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", retry_service_config(opts.max_attempts, opts.idempotent)),
        ("grpc.keepalive_time_ms", 30000),
    ]
    # The tracing interceptors first (outermost): the CLIENT span covers the call, retries included.
    chain = ([*client_interceptors(), _PropagatingInterceptor(opts.default_timeout, opts.auth_token)]
             if interceptors else None)
    if opts.tls_ca_file is not None:
        creds = grpc.ssl_channel_credentials(
            root_certificates=opts.tls_ca_file.read_bytes(),
            private_key=opts.tls_key_file.read_bytes() if opts.tls_key_file else None,
            certificate_chain=opts.tls_cert_file.read_bytes() if opts.tls_cert_file else None,
        )
        return grpc.aio.secure_channel(target, creds, options=options, interceptors=chain)
    return grpc.aio.insecure_channel(target, options=options, interceptors=chain)
