"""The whole local stack from the images (scripts/image_stack.py, `make run-images`), with the e2e smoke
test run against it: the k6 smoke and the stickiness test from tests/e2e, and the chart's `helm test`
script (deploy/helm/gmco/files/helm-test.py), all through the host's Envoy.

Builds the five CPU images first (layers cached) and starts seven containers, which takes minutes, so it
runs only when asked: `make test-images-stack` (GMCO_IMAGES_STACK=1). docs/deployment.md records a run.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from gmco.router.v1 import router_service_pb2_grpc
from gmco_stack.stack import StackConfig

pytestmark = [
    pytest.mark.images,
    pytest.mark.timeout(5400),
    pytest.mark.skipif(os.environ.get("GMCO_IMAGES_STACK") != "1",
                       reason="the image stack takes minutes: make test-images-stack (GMCO_IMAGES_STACK=1)"),
]

CPU_IMAGES = ("router", "cache", "ontology", "rl_state", "shard")


def e2e_module(root: Path):
    """tests/e2e/test_e2e_stack.py, whose tests take the stack as an argument."""
    path = root / "tests" / "e2e" / "test_e2e_stack.py"
    spec = importlib.util.spec_from_file_location("e2e_stack_tests", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def image_stack_running(build_images, image_stack, repo_root, tag) -> Iterator[object]:
    build_images(*CPU_IMAGES)
    run_dir = repo_root / ".run" / "images-stack-test"
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    # The e2e suite's catalogue: 5,000 x 64, two shards, two routers.
    config = StackConfig(items=5000, dim=64, shards=2, routers=2, index_backend="ivf", run_dir=run_dir,
                         base_port=None, start_timeout=900)
    with image_stack.ImageStack(config, tag) as stack:
        yield stack


@pytest.fixture(scope="module")
def envoy(image_stack_running) -> Iterator[router_service_pb2_grpc.RecommendationServiceStub]:
    with grpc.insecure_channel(image_stack_running.envoy_target) as channel:
        yield router_service_pb2_grpc.RecommendationServiceStub(channel)


def test_every_service_runs_in_its_container(image_stack_running, image_stack, tag):
    names = subprocess.run([*image_stack.PODMAN, "ps", "--filter", f"label={image_stack_running.label}",
                            "--format", "{{.Image}}"], check=True, capture_output=True, text=True).stdout.split()
    assert sorted(names) == sorted(image_stack.image_ref(n, tag) for n in
                                   ("cache", "ontology", "rl-state", "router", "router", "shard", "shard"))


def test_e2e_users_stick_to_one_router(envoy, repo_root):
    e2e_module(repo_root).test_a_user_sticks_to_one_router_and_users_spread(envoy)


def test_e2e_k6_smoke_passes(image_stack_running, tmp_path, repo_root):
    e2e_module(repo_root).test_k6_smoke_passes_its_checks(image_stack_running, tmp_path)


def test_helm_test_script_passes(image_stack_running, repo_root):
    script = repo_root / "deploy" / "helm" / "gmco" / "files" / "helm-test.py"
    result = subprocess.run([sys.executable, str(script), image_stack_running.envoy_target, "helm-test", "1"],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SERVING" in result.stdout and "degraded=False" in result.stdout
