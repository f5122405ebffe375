"""Render the one Envoy configuration template (``deploy/envoy/envoy.yaml.tmpl``).

:func:`render_envoy_config` is a pure function of the template text and :class:`EnvoyParams`; the local
stack and the tests call it, and the Helm chart fills the same ``${NAME}`` placeholders.
"""

from __future__ import annotations

import json
import string
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[4]
TEMPLATE_PATH = REPO_ROOT / "deploy" / "envoy" / "envoy.yaml.tmpl"


def _duration(seconds: float) -> str:
    return f"{seconds:g}s"


@dataclass(frozen=True)
class EnvoyParams:
    """Everything the template needs. ``routers`` are (host, port) pairs: IPs with STATIC discovery, or
    DNS names (a headless Service) with STRICT_DNS."""

    listen_port: int
    admin_port: int  # the admin interface, always on 127.0.0.1
    routers: tuple[tuple[str, int], ...]
    listen_address: str = "127.0.0.1"
    # the read-only listener for /ready and /stats/prometheus; 0 = admin_port + 1
    metrics_port: int = 0
    metrics_address: str = "127.0.0.1"
    router_discovery: str = "STATIC"
    ring_min: int = 1024
    ring_max: int = 8192
    retries: int = 2
    route_timeout: float = 10.0
    health_interval: float = 1.0
    health_timeout: float = 0.5
    health_no_traffic_interval: float = 1.0
    health_unhealthy_threshold: int = 2
    health_healthy_threshold: int = 1
    outlier_consecutive_5xx: int = 5
    outlier_interval: float = 2.0
    outlier_base_ejection: float = 10.0
    max_requests: int = 10_000
    max_retries: int = 1_000

    def __post_init__(self) -> None:
        if not self.routers:
            raise ValueError("Envoy needs at least one router endpoint")
        if self.router_discovery not in ("STATIC", "STRICT_DNS", "LOGICAL_DNS"):
            raise ValueError(f"router_discovery must be STATIC, STRICT_DNS or LOGICAL_DNS, got {self.router_discovery}")
        if not 0 < self.ring_min <= self.ring_max:
            raise ValueError("need 0 < ring_min <= ring_max")


def render_envoy_config(template: str, params: EnvoyParams) -> str:
    """The Envoy YAML for ``params``. Raises KeyError when the template has a placeholder not filled here."""
    endpoints = [
        {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
        for host, port in params.routers
    ]
    values = {
        "LISTEN_ADDRESS": params.listen_address,
        "LISTEN_PORT": params.listen_port,
        "ADMIN_PORT": params.admin_port,
        "METRICS_ADDRESS": params.metrics_address,
        "METRICS_PORT": params.metrics_port or params.admin_port + 1,
        "ROUTER_DISCOVERY": params.router_discovery,
        # JSON is YAML: a flow sequence that fits on the placeholder's line.
        "ROUTER_ENDPOINTS": json.dumps(endpoints),
        "RING_MIN": params.ring_min,
        "RING_MAX": params.ring_max,
        "RETRIES": params.retries,
        "ROUTE_TIMEOUT": _duration(params.route_timeout),
        "HEALTH_INTERVAL": _duration(params.health_interval),
        "HEALTH_TIMEOUT": _duration(params.health_timeout),
        "HEALTH_NO_TRAFFIC_INTERVAL": _duration(params.health_no_traffic_interval),
        "HEALTH_UNHEALTHY_THRESHOLD": params.health_unhealthy_threshold,
        "HEALTH_HEALTHY_THRESHOLD": params.health_healthy_threshold,
        "OUTLIER_CONSECUTIVE_5XX": params.outlier_consecutive_5xx,
        "OUTLIER_INTERVAL": _duration(params.outlier_interval),
        "OUTLIER_BASE_EJECTION": _duration(params.outlier_base_ejection),
        "MAX_REQUESTS": params.max_requests,
        "MAX_RETRIES": params.max_retries,
    }
    return string.Template(template).substitute({k: str(v) for k, v in values.items()})


def load_template(path: Path = TEMPLATE_PATH) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"Envoy template {path} is missing; it lives in deploy/envoy/ of the repository")
    return path.read_text()


def healthy_endpoints(admin_port: int, cluster: str = "routers") -> int:
    """How many of ``cluster``'s endpoints the Envoy whose admin interface is on 127.0.0.1:``admin_port``
    reports healthy (its /clusters page); only healthy endpoints are on the ring."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/clusters", timeout=1) as resp:
        text = resp.read().decode()
    return sum(1 for line in text.splitlines()
               if line.startswith(f"{cluster}::") and "::health_flags::healthy" in line)
