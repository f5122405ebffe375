"""Rendering the Helm chart for the deploy tests: the real helm CLI (.tools/bin/helm), no cluster.

Test modules get everything through fixtures (pytest runs with --import-mode=importlib, so they cannot
import this file): ``chart`` renders and lints, ``default_objects`` / ``production_objects`` are the
rendered umbrella chart as :class:`Manifests`.
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


class Manifests(list[Manifest]):
    """Rendered objects, with the look-ups the tests need."""

    def of_kind(self, kind: str) -> list[Manifest]:
        return [o for o in self if o["kind"] == kind]

    def find(self, kind: str, name: str) -> Manifest:
        matches = [o for o in self if o["kind"] == kind and o["metadata"]["name"] == name]
        assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
        return matches[0]

    def workloads(self) -> list[Manifest]:
        return [o for o in self if o["kind"] in ("Deployment", "StatefulSet")]

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


@pytest.fixture(scope="session")
def default_objects(chart: Chart) -> Manifests:
    return chart.render(api_versions=[chart.monitoring_api])


@pytest.fixture(scope="session")
def production_objects(chart: Chart) -> Manifests:
    return chart.render(values=[chart.production], api_versions=[chart.monitoring_api])


@pytest.fixture(scope="session", params=["default", "production"])
def rendered(request: pytest.FixtureRequest) -> Manifests:
    """The umbrella chart rendered with its default values, then with values-production.yaml."""
    return request.getfixturevalue(f"{request.param}_objects")
