"""The router image, built here with buildah from the local Debian base and run with podman: its
metadata, --help, gRPC health from outside and from its own probe command, the restricted runtime (UID
10001, read-only root filesystem) and a graceful stop."""

from __future__ import annotations

import json
import subprocess
import urllib.request
import uuid

import pytest
from gmco_testing.procs import free_port, grpc_serving, wait_until

pytestmark = [pytest.mark.images, pytest.mark.timeout(3600)]

ROUTER_SERVICE = "gmco.router.v1.RecommendationService"


def podman(image_stack, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*image_stack.PODMAN, *args], check=False, capture_output=True, text=True,
                          timeout=timeout)


def test_router_image_metadata(image_stack, router_image):
    result = podman(image_stack, "image", "inspect", router_image)
    assert result.returncode == 0, result.stderr
    image = json.loads(result.stdout)[0]
    config = image["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["/app/bin/gmco-service"]
    assert set(config["ExposedPorts"]) == {"50050/tcp", "9090/tcp"}
    assert image["Healthcheck"]["Test"] == ["CMD", "/app/bin/gmco-healthcheck"]  # docker format keeps it
    assert "GMCO_IMAGE_SERVICE=router" in config["Env"]


def test_router_image_help_lists_its_settings(image_stack, router_image):
    result = podman(image_stack, "run", "--rm", *image_stack.RUN_FLAGS, router_image, "--help")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "GMCO_ROUTER_PORT" in result.stdout and "GMCO_ROUTER_SHARDS" in result.stdout


def test_router_image_has_the_otlp_exporter(image_stack, router_image):
    """*_OTEL_EXPORTER=otlp works in the image: the service's `otlp` extra is installed."""
    result = podman(image_stack, "run", "--rm", *image_stack.RUN_FLAGS, "--entrypoint", "/app/.venv/bin/python",
                    router_image, "-c", "from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import "
                    "OTLPSpanExporter; import opentelemetry.instrumentation.grpc; print('otlp ok')")
    assert result.returncode == 0 and "otlp ok" in result.stdout, result.stdout + result.stderr


def test_router_container_serves_health_read_only_as_uid_10001_and_drains_on_stop(image_stack, router_image):
    port, metrics_port, no_shard = free_port(), free_port(), free_port()
    name = f"gmco-router-test-{uuid.uuid4().hex[:8]}"
    started = podman(image_stack, "run", "-d", "--name", name, *image_stack.RUN_FLAGS,
                     f"--env=GMCO_ROUTER_PORT={port}", f"--env=GMCO_ROUTER_METRICS_PORT={metrics_port}",
                     f"--env=GMCO_ROUTER_SHARDS=0=127.0.0.1:{no_shard}", router_image)
    assert started.returncode == 0, started.stderr
    try:
        target = f"127.0.0.1:{port}"
        wait_until(lambda: grpc_serving(target, ROUTER_SERVICE), 120, f"the router container on {target}",
                   interval=0.5)
        probe = podman(image_stack, "exec", name, "gmco-healthcheck")
        assert probe.returncode == 0 and "SERVING" in probe.stdout, probe.stdout + probe.stderr
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
            assert b"gmco_router_replica_healthy" in reply.read()

        assert podman(image_stack, "exec", name, "id", "-u").stdout.strip() == "10001"
        write = podman(image_stack, "exec", name, "touch", "/app/written")
        assert write.returncode != 0 and "Read-only file system" in write.stderr
        assert podman(image_stack, "exec", name, "touch", "/tmp/written").returncode == 0

        stopped = podman(image_stack, "stop", "--time", "30", name)
        assert stopped.returncode == 0, stopped.stderr
        state = json.loads(podman(image_stack, "inspect", name).stdout)[0]["State"]
        assert state["ExitCode"] == 0  # SIGTERM: NOT_SERVING, drain, exit 0 (not killed after the timeout)
        logs = podman(image_stack, "logs", name)
        assert "draining" in logs.stdout + logs.stderr
    finally:
        podman(image_stack, "rm", "-f", name)
