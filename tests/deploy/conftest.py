"""Rendering the Helm chart for the deploy tests: the real helm CLI (.tools/bin/helm), no cluster.

Test modules get everything through fixtures (pytest runs with --import-mode=importlib, so they cannot
import this file): ``chart`` renders and lints; ``default_objects``, ``production_objects`` and
``dev_objects`` are the umbrella chart rendered with values.yaml, values-production.yaml and
values-dev.yaml; ``rendered`` is each of the layouts in :data:`LAYOUTS` in turn (a :class:`Manifests`
whose ``layout`` says which), the store backends included: embedded (dev), in-cluster PostgreSQL and
Redis, external stores with existing Secrets (default, production) or with Secrets the chart creates.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
HELM = ROOT / ".tools" / "bin" / "helm"

Manifest = dict[str, Any]


# GMC-O's own components; the other workloads are the in-cluster stores (postgres, redis).
COMPONENTS = ("router", "shard", "cache", "ontology", "rl-state", "envoy")
# The in-cluster stores (global.<store>.mode: in-cluster) on top of the dev layout.
IN_CLUSTER_SETS = (
    "global.postgres.mode=in-cluster", "global.catalog.enabled=true", "rl-state.backend=postgres",
    "global.redis.mode=in-cluster", "cache.backend=redis",
)
# External stores whose Secrets the chart creates from the passwords given in values.
EXTERNAL_SECRETS_SETS = (
    "global.postgres.existingSecret=", "global.postgres.password=pg-secret",
    "global.redis.existingSecret=", "global.redis.password=redis-secret",
    "global.neo4j.existingSecret=", "global.neo4j.password=neo4j-secret",
    "global.auth.token=a-bearer-token",
)


class Manifests(list[Manifest]):
    """Rendered objects, with the look-ups the tests need; ``layout`` names the values they came from."""

    layout: str = ""

    def of_kind(self, kind: str) -> list[Manifest]:
        return [o for o in self if o["kind"] == kind]

    def find(self, kind: str, name: str) -> Manifest:
        matches = [o for o in self if o["kind"] == kind and o["metadata"]["name"] == name]
        assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
        return matches[0]

    def workloads(self) -> list[Manifest]:
        return [o for o in self if o["kind"] in ("Deployment", "StatefulSet")]

    def service_workloads(self) -> list[Manifest]:
        """The GMC-O components' workloads (not the in-cluster stores')."""
        return [o for o in self.workloads() if self.component(o) in COMPONENTS]

    def pod_specs(self) -> list[tuple[str, Manifest]]:
        """(name, pod spec) of every workload and bare Pod (the helm test hook)."""
        specs = [(w["metadata"]["name"], w["spec"]["template"]["spec"]) for w in self.workloads()]
        return specs + [(p["metadata"]["name"], p["spec"]) for p in self.of_kind("Pod")]

    @staticmethod
    def component(obj: Manifest) -> str:
        return obj["metadata"]["labels"]["app.kubernetes.io/name"]


@dataclass(frozen=True)
class Chart:
    helm: Path
    root: Path = ROOT
    path: Path = ROOT / "deploy" / "helm" / "gmco"
    release: str = "gmco"
    namespace: str = "gmco"
    subcharts: tuple[str, ...] = ("router", "shard", "cache", "ontology", "rl-state", "envoy")
    monitoring_api: str = "monitoring.coreos.com/v1"

    @property
    def production(self) -> Path:
        return self.path / "values-production.yaml"

    @property
    def dev(self) -> Path:
        return self.path / "values-dev.yaml"

    def subchart(self, name: str) -> Path:
        return self.path / "charts" / name

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.helm), *args], check=False, capture_output=True, text=True, timeout=120)

    def _template_args(self, chart: Path | None, values: Iterable[Path], sets: Iterable[str],
                       api_versions: Iterable[str]) -> list[str]:
        args = ["template", self.release, str(chart or self.path), "--namespace", self.namespace]
        for path in values:
            args += ["-f", str(path)]
        for item in sets:
            args += ["--set", item]
        for api in api_versions:
            args += ["--api-versions", api]
        return args

    def render(self, chart: Path | None = None, values: Iterable[Path] = (), sets: Iterable[str] = (),
               api_versions: Iterable[str] = ()) -> Manifests:
        """`helm template` → the rendered objects; fails the test with helm's stderr when helm fails."""
        result = self.run(*self._template_args(chart, values, sets, api_versions))
        assert result.returncode == 0, f"helm template failed:\n{result.stderr}"
        return Manifests(doc for doc in yaml.safe_load_all(result.stdout) if doc)

    def layout_values(self, layout: str) -> tuple[tuple[Path, ...], tuple[str, ...]]:
        """The values files and --set items of a layout."""
        return {
            "default": ((), ()),
            "production": ((self.production,), ()),
            "dev": ((self.dev,), ()),
            "in-cluster": ((self.dev,), IN_CLUSTER_SETS),
            "external-secrets": ((), EXTERNAL_SECRETS_SETS),
        }[layout]

    def render_layout(self, layout: str) -> Manifests:
        values, sets = self.layout_values(layout)
        objects = self.render(values=values, sets=sets, api_versions=[self.monitoring_api])
        objects.layout = layout
        return objects

    def rejection(self, chart: Path | None = None, values: Iterable[Path] = (), sets: Iterable[str] = ()) -> str:
        """helm's error for values that must be rejected; fails the test when helm accepts them."""
        result = self.run(*self._template_args(chart, values, sets, ()))
        assert result.returncode != 0, f"helm accepted {list(sets) or list(values)}, which must be rejected"
        return result.stderr


@pytest.fixture(scope="session")
def chart() -> Chart:
    """The chart and the helm binary, installed by scripts/install-helm.sh (make helm) if missing."""
    if not HELM.exists():
        subprocess.run(["bash", str(ROOT / "scripts" / "install-helm.sh")], check=True)
    return Chart(HELM)


LAYOUTS = ("default", "production", "dev", "in-cluster", "external-secrets")
GPU_LAYOUTS = ("default", "production", "external-secrets")


@pytest.fixture(scope="session")
def layouts() -> dict[str, Manifests]:
    """Rendered layouts, each rendered once per session."""
    return {}


def _layout(chart: Chart, cache: dict[str, Manifests], layout: str) -> Manifests:
    if layout not in cache:
        cache[layout] = chart.render_layout(layout)
    return cache[layout]


@pytest.fixture(scope="session")
def default_objects(chart: Chart, layouts: dict[str, Manifests]) -> Manifests:
    return _layout(chart, layouts, "default")


@pytest.fixture(scope="session")
def production_objects(chart: Chart, layouts: dict[str, Manifests]) -> Manifests:
    return _layout(chart, layouts, "production")


@pytest.fixture(scope="session")
def dev_objects(chart: Chart, layouts: dict[str, Manifests]) -> Manifests:
    return _layout(chart, layouts, "dev")


@pytest.fixture(scope="session")
def in_cluster_objects(chart: Chart, layouts: dict[str, Manifests]) -> Manifests:
    return _layout(chart, layouts, "in-cluster")


@pytest.fixture(scope="session", params=LAYOUTS)
def rendered(request: pytest.FixtureRequest, chart: Chart, layouts: dict[str, Manifests]) -> Manifests:
    """The umbrella chart rendered with each layout in LAYOUTS."""
    return _layout(chart, layouts, request.param)


@pytest.fixture(scope="session", params=GPU_LAYOUTS)
def gpu_rendered(request: pytest.FixtureRequest, chart: Chart, layouts: dict[str, Manifests]) -> Manifests:
    """The layouts with GPU shards."""
    return _layout(chart, layouts, request.param)
