"""The environment the chart gives each pod configures the real service: every GMCO_* variable it sets is
a setting of that service, and the service's own settings loader accepts the lot (files included: a path
into a mounted ConfigMap is that ConfigMap's key; the demo catalogue is what the init container writes)."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import pytest
from gmco_common.config import load_settings

MODULES = {"router": "gmco_router", "shard": "gmco_shard", "cache": "gmco_cache", "ontology": "gmco_ontology",
           "rl-state": "gmco_rl_state"}


def pod_environment(objects, workload, root: Path) -> dict[str, str]:
    """What the container would see: its ConfigMap (envFrom), then its env; Secrets and the downward API
    get stand-in values. Paths into the pod's volumes are recreated under ``root``."""
    pod = workload["spec"]["template"]["spec"]
    (container,) = pod["containers"]
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
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: volumes.get(m["name"], {}) for m in container.get("volumeMounts", [])}
    generated = {a for c in pod.get("initContainers", []) for a, b in zip(c["command"], c["command"][1:])
                 if a == "--out" for a in [b]}
    for name, value in env.items():
        for mount, volume in mounts.items():
            if not value.startswith(mount + "/") and value != mount:
                continue
            local = root / value.lstrip("/")
            if "configMap" in volume:
                data = objects.find("ConfigMap", volume["configMap"]["name"])["data"]
                key = value.removeprefix(mount + "/")
                assert key in data, f"{name}={value}: ConfigMap {volume['configMap']['name']} has no key {key}"
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_text(data[key])
            elif value in generated:
                local.mkdir(parents=True, exist_ok=True)
                (local / "meta.json").write_text("{}")  # what gmco_common.datagen --out writes, among others
            env[name] = str(local)
    return env


@pytest.mark.parametrize("component", list(MODULES))
def test_chart_environment_configures_the_service(rendered, component, tmp_path):
    config = importlib.import_module(f"{MODULES[component]}.config")
    prefix = "GMCO_" + component.upper().replace("-", "_") + "_"
    known = {prefix + f.name.upper() for f in dataclasses.fields(config.Settings)}
    workloads = [w for w in rendered.workloads() if rendered.component(w) == component]
    assert workloads
    for workload in workloads[:2]:
        env = pod_environment(rendered, workload, tmp_path / workload["metadata"]["name"])
        unknown = {k for k in env if k.startswith(prefix)} - known
        assert not unknown, f"{component}: the chart sets variables the service does not read: {sorted(unknown)}"
        load_settings(config.Settings, prefix, env)
