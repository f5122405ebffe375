"""Typed settings read from environment variables.

A settings class is a frozen dataclass. Each field is read from ``<PREFIX><FIELD_NAME_UPPER>`` and
converted by its annotation (``int``, ``float``, ``bool``, ``str``, ``Path``, ``tuple[str, ...]``,
``X | None``). A field may carry ``choices`` or a ``check`` in its metadata (see :func:`setting`).
A missing required variable or a bad value raises :class:`ConfigError` naming the variable, so a
service fails at start with a message that says what to fix.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names the environment variable."""


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str = "",
    choices: tuple[str, ...] | None = None,
    check: Callable[[Any], bool] | None = None,
    check_msg: str = "",
) -> Any:
    """A dataclass field with documentation and validation for :func:`load_settings`."""
    meta = {"help": help, "choices": choices, "check": check, "check_msg": check_msg}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for sequence defaults")
    return dataclasses.field(default=default, metadata=meta)


def _convert(raw: str, annotation: Any, var: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        if raw == "":
            return None
        return _convert(raw, inner[0], var)
    if origin is tuple:
        (item_type, *_rest) = typing.get_args(annotation)
        return tuple(_convert(p.strip(), item_type, var) for p in raw.split(",") if p.strip())
    if annotation is bool:
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"{var}={raw!r} is not a boolean; use true/false")
    if annotation is int:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{var}={raw!r} is not an integer") from None
    if annotation is float:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{var}={raw!r} is not a number") from None
    if annotation is Path:
        return Path(raw)
    return raw


def load_settings(cls: type[T], prefix: str, environ: Mapping[str, str] | None = None) -> T:
    """Build ``cls`` from ``environ`` (default ``os.environ``), failing fast with the variable's name."""
    env = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        var = prefix + field.name.upper()
        annotation = hints[field.name]
        if var in env:
            value = _convert(env[var], annotation, var)
        elif field.default is not dataclasses.MISSING:
            value = field.default
        else:
            help_text = field.metadata.get("help", "")
            raise ConfigError(f"{var} is required but not set" + (f" ({help_text})" if help_text else ""))
        choices = field.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{var}={value!r} is not one of {', '.join(choices)}")
        check = field.metadata.get("check")
        if check is not None and value is not None and not check(value):
            raise ConfigError(f"{var}={value!r} is invalid: {field.metadata.get('check_msg') or 'check failed'}")
        values[field.name] = value
    return cls(**values)


def describe_settings(cls: type, prefix: str) -> str:
    """One line per variable: name, default and help; used by ``--help`` and the README."""
    lines = []
    for field in dataclasses.fields(cls):
        default = "(required)" if field.default is dataclasses.MISSING else repr(field.default)
        extra = field.metadata.get("help", "")
        choices = field.metadata.get("choices")
        if choices:
            extra += f" [{'|'.join(choices)}]"
        lines.append(f"  {prefix + field.name.upper():<40} {default:<16} {extra}")
    return "\n".join(lines)


def _positive(v: float) -> bool:
    return v > 0


def _port(v: int) -> bool:
    return 0 <= v <= 65535


def port_setting(default: int, help: str = "gRPC port; 0 picks a free port") -> Any:
    """A port field with the range check: what a service uses to give ``port`` its own default."""
    return setting(default, help=help, check=_port, check_msg="0..65535")


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """Settings every gRPC service shares. Service settings subclass this."""

    host: str = setting("127.0.0.1", help="address to listen on (0.0.0.0 in containers)")
    port: int = port_setting(50051)
    metrics_port: int = setting(
        0, help="Prometheus /metrics port; 0 disables", check=_port, check_msg="0..65535"
    )
    max_message_bytes: int = setting(
        64 * 1024 * 1024, help="largest gRPC message accepted or sent", check=_positive, check_msg="must be > 0"
    )
    grace_seconds: float = setting(5.0, help="drain time on SIGTERM", check=lambda v: v >= 0, check_msg=">= 0")
    auth_token: str | None = setting(None, help="if set, require 'authorization: Bearer <token>'")
    tls_cert_file: Path | None = setting(None, help="server certificate (PEM); enables TLS")
    tls_key_file: Path | None = setting(None, help="server private key (PEM)")
    tls_client_ca_file: Path | None = setting(None, help="CA for client certificates; enables mTLS")
    log_level: str = setting("INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    log_format: str = setting("json", choices=("json", "text"))
    otel_exporter: str = setting("none", help="span exporter", choices=("none", "console", "otlp"))
    instance_id: str = setting("", help="name of this process in logs and responses; default host:port")
    blas_threads: int = setting(
        1, help="threads numpy's BLAS may use per call; 1 serves concurrent requests best (a small matrix "
        "product split across threads waits for them on a busy machine)", check=_positive, check_msg="must be > 0"
    )
    event_loop: str = setting(
        "uvloop", help="the asyncio event loop: uvloop (libuv; the miss path's p99 at 200 req/s on the local "
        "stack 47.8 against 74.8 ms with asyncio's own, side by side: docs/benchmarks.md) or asyncio",
        choices=("uvloop", "asyncio"))
    gc_threshold: int = setting(
        2_000, help="allocations between two young-generation collections of Python's cyclic garbage collector "
        "(CPython's default is 700). What exists once the service is up is frozen out of collection, so a full "
        "collection only walks what requests left behind (a full collection of a router's startup objects "
        "paused it for up to 87 ms). Most young garbage is grpc.aio's own reference cycle, five objects a call: "
        "collected every 20,000 allocations it paused a router 10-26 ms at 1,000 hits a second and a shard or "
        "rl_state 5-13 ms at 200 misses a second, every 2,000 about 0.7 ms, with less GC time in all "
        "(docs/benchmarks.md, 'Miss and hit paths'). 0 = CPython's defaults, nothing frozen",
        check=lambda v: v >= 0, check_msg=">= 0")

    def __post_init__(self) -> None:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("TLS needs both *_TLS_CERT_FILE and *_TLS_KEY_FILE")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ConfigError("*_TLS_CLIENT_CA_FILE (mTLS) needs *_TLS_CERT_FILE and *_TLS_KEY_FILE")
        for path in (self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file):
            if path is not None and not path.is_file():
                raise ConfigError(f"TLS file {path} does not exist")
