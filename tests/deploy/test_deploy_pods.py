"""Every pod: restricted security context, no service-account token, probes, metrics port, checksum."""

from __future__ import annotations

import pytest
from gmco_common.slots import SlotMap

GRPC_PORTS = {"router": 50050, "shard": 50051, "cache": 50052, "ontology": 50053, "rl-state": 50054, "envoy": 8080}


def pods(objects):
    return [(w, w["spec"]["template"]) for w in objects.service_workloads()]


def test_every_pod_is_restricted(rendered):
    """Every pod the chart makes: the services', the in-cluster stores' and the helm test's."""
    for name, spec in rendered.pod_specs():
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        for container in spec["containers"] + spec.get("initContainers", []):
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), name
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", name
            assert sc.get("privileged", False) is False, name
    for account in rendered.of_kind("ServiceAccount"):
        assert account["automountServiceAccountToken"] is False


def test_every_pod_has_grpc_probes_a_metrics_port_and_a_config_checksum(rendered):
    for workload, pod in pods(rendered):
        name, component = workload["metadata"]["name"], rendered.component(workload)
        assert len(pod["metadata"]["annotations"]["checksum/config"]) == 64, name
        (container,) = pod["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["grpc"] == GRPC_PORTS[component] and "metrics" in ports, name
        # Readiness is the standard gRPC health check on the serving port (for Envoy it is answered by a
        # router through Envoy); liveness too, except Envoy's, which asks Envoy itself (admin /ready).
        assert container["readinessProbe"]["grpc"]["port"] == ports["grpc"], name
        liveness = container["livenessProbe"]
        if component == "envoy":
            assert liveness["httpGet"] == {"path": "/ready", "port": "metrics"}
        else:
            assert liveness["grpc"]["port"] == ports["grpc"], name
            assert container["startupProbe"]["grpc"]["port"] == ports["grpc"], name


def test_config_checksum_follows_the_config(chart, default_objects):
    changed = chart.render(sets=["router.config.MAX_K=200"])

    def checksums(objects):
        return {w["metadata"]["name"]: w["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
                for w in objects.workloads()}

    before, after = checksums(default_objects), checksums(changed)
    assert before["gmco-router"] != after["gmco-router"]
    assert {k: v for k, v in before.items() if k != "gmco-router"} == {
        k: v for k, v in after.items() if k != "gmco-router"}
    assert changed.find("ConfigMap", "gmco-router-env")["data"]["GMCO_ROUTER_MAX_K"] == "200"


def shard_sets(objects):
    return [s for s in objects.of_kind("StatefulSet") if objects.component(s) == "shard"]


def test_every_shard_pod_gets_a_gpu_on_a_gpu_node(gpu_rendered):
    rendered = gpu_rendered
    shards = shard_sets(rendered)
    assert shards
    for sts in shards:
        pod = sts["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
        assert container["resources"]["requests"]["nvidia.com/gpu"] == container["resources"]["limits"]["nvidia.com/gpu"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert pod["nodeSelector"]


def test_dev_shards_run_on_cpu_nodes(dev_objects):
    for sts in shard_sets(dev_objects):
        pod = sts["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert not [r for r in container["resources"].get("limits", {}) if "gpu" in r]
        assert not [r for r in container["resources"].get("requests", {}) if "gpu" in r]
        assert "nodeSelector" not in pod and "tolerations" not in pod
    env = dev_objects.find("ConfigMap", "gmco-shard-env")["data"]
    assert env["GMCO_SHARD_INDEX_BACKEND"] == "ivf"


def test_shard_statefulsets_map_to_shards_slots_replicas_and_zones(rendered):
    shards = sorted(shard_sets(rendered), key=lambda s: int(s["metadata"]["labels"]["gmco.io/shard"]))
    count = len(shards)
    slot_map = SlotMap.even(count)
    for shard_id, sts in enumerate(shards):
        name = f"gmco-shard-{shard_id}"
        assert sts["metadata"]["name"] == name and sts["spec"]["serviceName"] == name
        pod = sts["spec"]["template"]
        assert pod["metadata"]["labels"]["gmco.io/shard"] == str(shard_id)
        first, last = map(int, pod["metadata"]["annotations"]["gmco.io/slots"].split("-"))
        assert list(range(first, last + 1)) == slot_map.slots_for(shard_id)
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        assert env["GMCO_SHARD_SHARD_ID"]["value"] == str(shard_id)
        assert env["GMCO_SHARD_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == (
            "metadata.labels['apps.kubernetes.io/pod-index']")
        anti = pod["spec"]["affinity"]["podAntiAffinity"]
        terms = anti.get("requiredDuringSchedulingIgnoredDuringExecution") or [
            t["podAffinityTerm"] for t in anti["preferredDuringSchedulingIgnoredDuringExecution"]]
        assert terms[0]["topologyKey"] == "topology.kubernetes.io/zone"
        assert terms[0]["labelSelector"]["matchLabels"]["gmco.io/shard"] == str(shard_id)
        mounts = {m["name"]: m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
        assert mounts["snapshots"] == env_of(rendered)["GMCO_SHARD_SNAPSHOT_DIR"]
        if rendered.layout in ("dev", "in-cluster"):  # persistence off: an emptyDir
            assert {"name": "snapshots", "emptyDir": {}} in pod["spec"]["volumes"]
        else:
            (claim,) = sts["spec"]["volumeClaimTemplates"]
            assert claim["metadata"]["name"] == "snapshots"
            pdb = rendered.find("PodDisruptionBudget", name)
            assert pdb["spec"]["selector"]["matchLabels"]["gmco.io/shard"] == str(shard_id)
        service = rendered.find("Service", name)
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["selector"]["gmco.io/shard"] == str(shard_id)
    assert env_of(rendered)["GMCO_SHARD_SHARD_COUNT"] == str(count)


def env_of(objects):
    return objects.find("ConfigMap", "gmco-shard-env")["data"]


def test_production_runs_100_shards_of_3_replicas_on_t4_nodes(production_objects):
    shards = shard_sets(production_objects)
    assert len(shards) == 100
    assert sum(s["spec"]["replicas"] for s in shards) == 300
    assert {s["metadata"]["labels"]["gmco.io/shard"] for s in shards} == {str(i) for i in range(100)}
    for sts in shards:
        pod = sts["spec"]["template"]["spec"]
        assert pod["nodeSelector"]["nvidia.com/gpu.product"] == "Tesla-T4"
        assert "requiredDuringSchedulingIgnoredDuringExecution" in pod["affinity"]["podAntiAffinity"]
    for name in ("gmco-router", "gmco-envoy"):
        hpa = production_objects.find("HorizontalPodAutoscaler", name)
        assert hpa["apiVersion"] == "autoscaling/v2" and hpa["spec"]["minReplicas"] == 10
    assert production_objects.find("Service", "gmco-envoy")["spec"]["type"] == "LoadBalancer"


@pytest.mark.parametrize("name", ["gmco-router", "gmco-cache", "gmco-ontology", "gmco-rl-state", "gmco-envoy"])
def test_stateless_services_have_an_hpa_and_a_pdb(default_objects, name):
    deployment = default_objects.find("Deployment", name)
    hpa = default_objects.find("HorizontalPodAutoscaler", name)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    assert "replicas" not in deployment["spec"]  # the HPA owns it
    pdb = default_objects.find("PodDisruptionBudget", name)
    assert pdb["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
