"""Backends chosen by values, Secrets the chart makes, slot maps a helm upgrade changes, and the helm test.

- values-dev.yaml needs nothing made beforehand: every Secret and ConfigMap a pod refers to is rendered,
  no store is contacted, the shards run on CPU and load a synthetic catalogue.
- In-cluster PostgreSQL and Redis: rendered, wired to the components that use them, nobody else.
- External stores: the chart creates a Secret from a password given in values, never one that exists.
- Slot maps: the resharding procedure of docs/deployment.md, step by step, rolls exactly the pods it must.
"""

from __future__ import annotations

import base64
import itertools
import json

import pytest
import yaml
from gmco_common.slots import SlotMap


def env_of(objects, name: str) -> dict[str, str]:
    """A workload's configuration: its env ConfigMap merged with its container env (plain values)."""
    workload = next(w for w in objects.workloads() if w["metadata"]["name"] == name)
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env |= objects.find("ConfigMap", source["configMapRef"]["name"])["data"]
    env |= {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}
    return env


def references(objects) -> tuple[set[str], set[str]]:
    """The Secrets and ConfigMaps the pods refer to."""
    secrets, configmaps = set(), set()
    for _, spec in objects.pod_specs():
        for container in spec["containers"] + spec.get("initContainers", []):
            for var in container.get("env", []):
                if ref := var.get("valueFrom", {}).get("secretKeyRef"):
                    secrets.add(ref["name"])
            for source in container.get("envFrom", []):
                configmaps.add(source["configMapRef"]["name"])
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                configmaps.add(volume["configMap"]["name"])
            if "secret" in volume:
                secrets.add(volume["secret"]["secretName"])
    return secrets, configmaps


@pytest.mark.parametrize("layout", ["dev", "in-cluster", "external-secrets"])
def test_nothing_needs_to_exist_beforehand(chart, layout):
    objects = chart.render_layout(layout)
    secrets, configmaps = references(objects)
    assert secrets <= {s["metadata"]["name"] for s in objects.of_kind("Secret")}
    assert configmaps <= {c["metadata"]["name"] for c in objects.of_kind("ConfigMap")}


def test_dev_is_embedded_on_cpu_with_a_synthetic_catalogue(dev_objects):
    assert env_of(dev_objects, "gmco-cache")["GMCO_CACHE_BACKEND"] == "memory"
    assert env_of(dev_objects, "gmco-ontology")["GMCO_ONTOLOGY_BACKEND"] == "embedded"
    rl = env_of(dev_objects, "gmco-rl-state")
    assert rl["GMCO_RL_STATE_BACKEND"] == "sqlite" and rl["GMCO_RL_STATE_SQLITE_PATH"].startswith("/var/lib/gmco/")
    deployment = dev_objects.find("Deployment", "gmco-rl-state")
    assert deployment["spec"]["replicas"] == 1 and not dev_objects.of_kind("HorizontalPodAutoscaler")
    assert "GMCO_ROUTER_CATALOG_DSN" not in env_of(dev_objects, "gmco-router")
    shard = env_of(dev_objects, "gmco-shard-0")
    assert "GMCO_SHARD_CATALOG_DSN" not in shard
    sts = dev_objects.find("StatefulSet", "gmco-shard-0")["spec"]["template"]["spec"]
    (init,) = sts["initContainers"]
    assert init["command"][:3] == ["/app/.venv/bin/python", "-m", "gmco_common.datagen"]
    assert init["command"][init["command"].index("--out") + 1] == shard["GMCO_SHARD_DATA_DIR"]
    assert {w["spec"]["template"]["spec"]["containers"][0]["image"].rsplit(":", 1)[1]
            for w in dev_objects.workloads() if dev_objects.component(w) != "envoy"} == {"dev"}
    assert not dev_objects.of_kind("Secret") and not dev_objects.of_kind("PersistentVolumeClaim")
    (test,) = dev_objects.of_kind("Pod")
    assert test["spec"]["containers"][0]["command"][-1] == "1"  # the test wants items back


def test_in_cluster_stores_are_run_and_wired(in_cluster_objects):
    objects = in_cluster_objects
    for store, port in (("postgres", 5432), ("redis", 6379)):
        sts = objects.find("StatefulSet", f"gmco-{store}")
        assert sts["spec"]["replicas"] == 1
        service = objects.find("Service", f"gmco-{store}")
        assert [p["port"] for p in service["spec"]["ports"]] == [port]
        secret = objects.find("Secret", f"gmco-{store}")
        assert len(base64.b64decode(secret["data"]["password"])) == 32  # generated (and kept on upgrade)
    host = "gmco-postgres.gmco.svc.cluster.local"
    for name, var in (("gmco-router", "GMCO_ROUTER_CATALOG_DSN"), ("gmco-shard-0", "GMCO_SHARD_CATALOG_DSN"),
                      ("gmco-rl-state", "GMCO_RL_STATE_POSTGRES_DSN")):
        env = env_of(objects, name)
        assert f"host={host} port=5432 " in env[var] and "sslmode=disable" in env[var], name
        assert env["PGPASSWORD"] == {"secretKeyRef": {"name": "gmco-postgres", "key": "password"}}, name
    cache = env_of(objects, "gmco-cache")
    assert cache["GMCO_CACHE_BACKEND"] == "redis"
    assert cache["GMCO_CACHE_REDIS_URL"] == "redis://gmco-redis.gmco.svc.cluster.local:6379/0"
    assert cache["GMCO_CACHE_REDIS_PASSWORD"] == {"secretKeyRef": {"name": "gmco-redis", "key": "password"}}
    redis = objects.find("StatefulSet", "gmco-redis")["spec"]["template"]["spec"]["containers"][0]
    assert redis["args"][:2] == ["--requirepass", "$(REDIS_PASSWORD)"]


def test_external_secrets_are_created_from_values(chart):
    objects = chart.render_layout("external-secrets")
    created = {s["metadata"]["name"]: s["data"] for s in objects.of_kind("Secret")}
    assert {k: base64.b64decode(v["password"] if "password" in v else v["token"]).decode()
            for k, v in created.items()} == {
        "gmco-postgres": "pg-secret", "gmco-redis": "redis-secret", "gmco-neo4j": "neo4j-secret",
        "gmco-auth": "a-bearer-token"}
    assert env_of(objects, "gmco-ontology")["GMCO_ONTOLOGY_NEO4J_PASSWORD"]["secretKeyRef"]["name"] == "gmco-neo4j"
    assert env_of(objects, "gmco-router")["GMCO_ROUTER_AUTH_TOKEN"]["secretKeyRef"]["name"] == "gmco-auth"


def test_existing_secrets_are_referenced_never_created(default_objects):
    assert not default_objects.of_kind("Secret")
    assert env_of(default_objects, "gmco-rl-state")["PGPASSWORD"]["secretKeyRef"]["name"] == "gmco-postgres"


def test_an_external_store_without_credentials_is_refused(chart):
    error = chart.rejection(sets=["global.postgres.existingSecret="])
    assert "global.postgres: set existingSecret" in error and "password" in error


def test_sqlite_rl_state_refuses_more_than_one_replica(chart):
    error = chart.rejection(values=[chart.dev], sets=["rl-state.replicas=2"])
    assert "rl-state.backend=sqlite" in error


def slot_maps() -> dict[str, str]:
    old = SlotMap.even(2)
    return {"v1": old.to_json(), "v2": old.move(range(100), 1).to_json()}


def render_maps(chart, tmp_path, router: str, shard: str, per_shard: dict[str, str] | None = None):
    values = {"global": {"slotMaps": slot_maps()},
              "router": {"slotMap": router}, "shard": {"slotMap": shard, "slotMapPerShard": per_shard or {}}}
    path = tmp_path / f"slot-maps-{router}-{shard}-{len(per_shard or {})}.yaml"
    path.write_text(yaml.safe_dump(values))
    return chart.render(values=[path])


def checksums(objects) -> dict[str, str]:
    return {w["metadata"]["name"]: w["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
            for w in objects.workloads()}


def test_slot_maps_are_mounted_and_read(chart, tmp_path):
    objects = render_maps(chart, tmp_path, "v1", "v1", {"1": "v2"})
    maps = slot_maps()
    router_map = objects.find("ConfigMap", "gmco-router-slot-map")["data"]["slot-map.json"]
    assert SlotMap.from_json(router_map) == SlotMap.from_json(maps["v1"])
    assert env_of(objects, "gmco-router")["GMCO_ROUTER_SLOT_MAP_FILE"] == "/etc/gmco/slot-map/slot-map.json"
    data = objects.find("ConfigMap", "gmco-shard-slot-maps")["data"]
    assert {k: SlotMap.from_json(v) for k, v in data.items()} == {
        f"{k}.json": SlotMap.from_json(v) for k, v in maps.items()}
    assert env_of(objects, "gmco-shard-0")["GMCO_SHARD_SLOT_MAP_FILE"] == "/etc/gmco/slot-maps/v1.json"
    assert env_of(objects, "gmco-shard-1")["GMCO_SHARD_SLOT_MAP_FILE"] == "/etc/gmco/slot-maps/v2.json"
    sts = objects.find("StatefulSet", "gmco-shard-1")["spec"]["template"]
    assert sts["metadata"]["annotations"]["gmco.io/slot-map"] == "v2"


def test_resharding_by_helm_upgrade_rolls_exactly_the_pods_each_step_needs(chart, tmp_path):
    """docs/deployment.md: move slots 0-99 from shard 0 to shard 1 in three `helm upgrade`s."""
    steps = [
        render_maps(chart, tmp_path, "v1", "v1"),  # before: everyone on the old map
        render_maps(chart, tmp_path, "v1", "v1", {"1": "v2"}),  # 1. shard 1 (B) tails S as well
        render_maps(chart, tmp_path, "v2", "v1", {"1": "v2"}),  # 3. reads switch: the routers
        render_maps(chart, tmp_path, "v2", "v2"),  # 4. shard 0 (A) lets S go
    ]
    rolled = []
    for before, after in itertools.pairwise(steps):
        a, b = checksums(before), checksums(after)
        rolled.append({name for name in a if a[name] != b[name]})
    assert rolled == [{"gmco-shard-1"}, {"gmco-router"}, {"gmco-shard-0"}]


def test_a_bad_slot_map_is_refused(chart, tmp_path):
    bad = json.loads(SlotMap.even(2).to_json())
    bad["owner"][7] = 5
    path = tmp_path / "bad-slot-map.yaml"
    path.write_text(yaml.safe_dump({"global": {"slotMaps": {"v1": json.dumps(bad)}}, "router": {"slotMap": "v1"}}))
    assert "gives a slot to shard 5" in chart.rejection(values=[path])
    assert "is not in global.slotMaps" in chart.rejection(sets=["router.slotMap=v9"])


def test_helm_test_hook_checks_health_and_recommends_through_envoy(rendered):
    (pod,) = rendered.of_kind("Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod["spec"]["containers"]
    command = container["command"]
    assert command[:2] == ["/app/.venv/bin/python", "-c"]
    compile(command[2], "helm-test.py", "exec")
    assert command[3] == "gmco-envoy.gmco.svc.cluster.local:8080"
    router_image = rendered.find("Deployment", "gmco-router")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert container["image"] == router_image
    (policy,) = [p for p in rendered.of_kind("NetworkPolicy") if p["metadata"]["name"] == "gmco-test-recommend"]
    assert policy["metadata"]["annotations"]["helm.sh/hook"] == "test"
