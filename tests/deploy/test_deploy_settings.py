"""The environment the chart gives each pod configures the real service: every GMCO_* variable it sets is
a setting of that service, and the service's own settings loader accepts the lot."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
from gmco_common.config import load_settings

MODULES = {"router": "gmco_router", "shard": "gmco_shard", "cache": "gmco_cache", "ontology": "gmco_ontology",
           "rl-state": "gmco_rl_state"}


def pod_environment(objects, workload) -> dict[str, str]:
    """What the container would see: its ConfigMap (envFrom), then its env; Secrets and the downward API
    get stand-in values."""
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env |= objects.find("ConfigMap", source["configMapRef"]["name"])["data"]
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "secretKeyRef" in var["valueFrom"]:
            env[var["name"]] = "from-a-secret"
        else:
            env[var["name"]] = "0" if "pod-index" in var["valueFrom"]["fieldRef"]["fieldPath"] else "gmco-pod-0"
    return env


@pytest.mark.parametrize("component", list(MODULES))
def test_chart_environment_configures_the_service(rendered, component):
    config = importlib.import_module(f"{MODULES[component]}.config")
    prefix = "GMCO_" + component.upper().replace("-", "_") + "_"
    known = {prefix + f.name.upper() for f in dataclasses.fields(config.Settings)}
    workloads = [w for w in rendered.workloads() if rendered.component(w) == component]
    assert workloads
    for workload in workloads[:2]:
        env = pod_environment(rendered, workload)
        unknown = {k for k in env if k.startswith(prefix)} - known
        assert not unknown, f"{component}: the chart sets variables the service does not read: {sorted(unknown)}"
        load_settings(config.Settings, prefix, env)
